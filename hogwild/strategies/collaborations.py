"""The strategies that are one `Collaboration`: `single` (one worker, plain chain of thought), `hogwild:N` (the
Hogwild! protocol), `groupthink:N` (Group Think thinkers) and `sot:N` (Skeleton-of-Thought), each a protocol mode
of `collab/protocol.py`.

The evaluation reads such a run once to the largest budget B (where its own finisher asks for the answer). When
`run.passes` reaches a smaller budget b, a probe forks the live cache and asks worker 0 for the answer now (the
finisher question, greedy, `probe_tokens` at most) in throwaway blocks; the run goes on untouched. A run that ends
before b (an answer found, the worker ended its reply) holds its final answer for every larger budget.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from hogwild.collab.protocol import CollabConfig, Collaboration, Pass
from hogwild.engine import Engine
from hogwild.eval import grading
from hogwild.runs import Probe
from hogwild.sampling import SamplingParams
from hogwild.strategies.base import Point, Strategy

if TYPE_CHECKING:
    from hogwild.eval.runner import Job


class Collaborative(Strategy):
    """N workers of one `Collaboration` in the protocol's mode `mode`."""

    def __init__(self, name: str, summary: str, mode: str, counted: bool = True, served: bool = True) -> None:
        self.name, self.summary, self.mode, self.counted, self.served = name, summary, mode, counted, served

    def build(
        self, engine: Engine, problem: str, n: int, collab: CollabConfig, sampling: SamplingParams
    ) -> Collaboration:
        return Collaboration(engine, problem, dataclasses.replace(collab, workers=n, mode=self.mode), sampling)

    def reader(self, job: Job) -> CollaborationReader:
        return CollaborationReader(job)


class CollaborationReader:
    """Reads a job's `Collaboration` at every budget: probes at the smaller ones, the run's own answer at the end."""

    def __init__(self, job: Job) -> None:
        assert isinstance(job.run, Collaboration), f"{job.run} is not a collaboration"
        self.job = job
        self.run: Collaboration = job.run
        self.main_passes = 0  # the collaboration's passes before its finisher
        self.probing: set[int] = set()  # budgets whose probe is in flight

    @property
    def passes(self) -> int:
        return min(self.run.passes, self.job.budgets[-1])

    def poll(self) -> None:
        job, run = self.job, self.run
        spec = job.strategies[0]
        while run.outbox:
            event = run.outbox.popleft()
            if isinstance(event, Pass):
                self.main_passes = event.forward_passes  # the finisher's passes come without a Pass event
        waiting = [b for b in job.budgets if (spec.name, b) not in job.points and b not in self.probing]
        parts = job.problem.parts
        if run.done:
            result = run.final
            answer = result.answer
            if answer is None:
                answer = grading.extract_answer(result.workers[0].text, parts)
            shown = transcript(result.workers)
            point = Point(answer, self.main_passes, result.tokens, job.elapsed(), shown, result.redundancy)
            for budget in waiting:
                job.point(spec, budget, point)
            return
        due = [b for b in waiting if b < job.budgets[-1] and run.passes >= b]
        if not due or run.shared is None:
            return
        budget = due[0]
        passes, tokens = run.passes, sum(w.tokens for w in run.workers)
        texts, shared = transcript(run.workers), run.redundancy()[0]

        def record(probe: Probe, budget: int = budget) -> None:
            self.probing.discard(budget)
            final = probe.final
            answer = final.answer if final.answer is not None else grading.extract_answer(final.text, parts)
            shown = f"{texts}\n\n[probe] {run.finisher_text.strip()}{final.text}"
            job.point(spec, budget, Point(answer, passes, tokens, job.elapsed(), shown, shared))

        if job.add_probe(run.probe(worker=0, max_tokens=job.config.probe_tokens), record):
            self.probing.add(budget)


def transcript(workers) -> str:
    """The workers' texts, each under its name when there are several."""
    if len(workers) == 1:
        return workers[0].text
    return "\n\n".join(f"[{w.name}]\n{w.text}" for w in workers)


SINGLE = Collaborative("single", "one worker, plain chain of thought", "hogwild", counted=False, served=False)
HOGWILD = Collaborative("hogwild", "the Hogwild! protocol: steps, one shared history", "hogwild")
GROUPTHINK = Collaborative("groupthink", "Group Think: token-level, each sees every other's tokens", "groupthink")
SOT = Collaborative(
    "sot", "Skeleton-of-Thought: an outline, one point per worker, unseen by the others, then one answer", "sot"
)
