"""The strategies of independent samples: `vote:N` and `best:N` are N samples of the prompt a single worker reads,
sharing its block (`Sampled(n=N)`), so the strategies differ only in how they spend the passes. `vote:N` takes the
majority answer (ties go to the lowest-numbered sample), `best:N` the answer of the sample with the highest mean
token log-probability. A vote:N and a best:N of the same N read one and the same run.

In an evaluation a budget of b passes is b tokens of each sample: when a sample has written b tokens, its answer
at b is the last \\boxed{} in its text if it wrote one, else a probe forked off its blocks asks for the answer with
the finisher question; a sample that ended before b keeps the answer in its text. The samples run to B + 1 tokens
(B: the largest budget) so the probe at B reads a sample as long as the budget, then the run is stopped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from hogwild.collab import prompts
from hogwild.collab.protocol import CollabConfig
from hogwild.collab.text import boxed_answer
from hogwild.engine import Engine
from hogwild.eval import grading
from hogwild.runs import Probe, Sampled
from hogwild.sampling import SamplingParams
from hogwild.strategies.base import Point, Strategy

if TYPE_CHECKING:
    from hogwild.eval.runner import Job

# what the evaluation knows of one sample at one budget: (answer, mean log-probability, tokens, transcript)
Known = tuple[str | None, float, int, str]


class Samples(Strategy):
    """N independent samples of one prompt; `pick` chooses the one whose answer is the strategy's."""

    samples = True

    def __init__(self, name: str, summary: str) -> None:
        self.name, self.summary = name, summary

    def group(self, n: int) -> str:
        return f"sampled:{n}"

    def build(self, engine: Engine, problem: str, n: int, collab: CollabConfig, sampling: SamplingParams) -> Sampled:
        # the same prompt a single worker reads, so the strategies differ only in how they spend the passes
        fmt = prompts.format_for(engine.model_config.family)
        text = prompts.collaboration_prompt(problem, [prompts.NAMES[0]])
        if fmt.chat:
            ids = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
            ids += engine.tokenizer.encode(fmt.reply_prefix, add_special_tokens=False) if fmt.reply_prefix else []
        else:
            ids = engine.tokenizer.encode(text + "\n\n")
        return Sampled(engine, ids, dataclasses.replace(sampling, max_tokens=collab.budget + 1), n=n)

    def reader(self, job: Job) -> SamplesReader:
        return SamplesReader(job)

    def pick(self, samples: list[Known]) -> int:
        raise NotImplementedError


class Vote(Samples):
    def pick(self, samples: list[Known]) -> int:
        keys = [grading.answer_key(s[0]) for s in samples]
        counts = Counter(k for k in keys if k is not None)
        if not counts:
            return 0
        top = max(counts.values())
        return next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)


class Best(Samples):
    def pick(self, samples: list[Known]) -> int:
        return max(range(len(samples)), key=lambda i: (samples[i][1], -i))


class SamplesReader:
    """Reads a job's samples at every budget, and gives each of the job's strategies its pick."""

    def __init__(self, job: Job) -> None:
        assert isinstance(job.run, Sampled), f"{job.run} is not a run of samples"
        self.job = job
        self.run: Sampled = job.run
        self.probing: set[tuple[int, int]] = set()  # (sample, budget) probes in flight
        self.answers: dict[int, dict[int, Known]] = {b: {} for b in job.budgets}  # per budget, per sample

    @property
    def passes(self) -> int:
        return min(max(len(s.result.tokens) for s in self.run.streams), self.job.budgets[-1])

    def poll(self) -> None:
        job, run = self.job, self.run
        parts = job.problem.parts
        question = prompts.finisher(prompts.NAMES[0], parts)
        run.outbox.clear()  # the samples are read from their streams
        for i, stream in enumerate(run.streams):
            result = stream.result
            ended = bool(result.finish_reason) and result.finish_reason != "length"
            for budget in job.budgets:
                known = self.answers[budget]
                if i in known or (i, budget) in self.probing:
                    continue
                n, text = len(result.tokens), result.text
                if ended and n <= budget:  # the sample ended on its own before the budget: its own answer
                    known[i] = (grading.extract_answer(text, parts), result.mean_logprob, n, text)
                elif n >= budget and boxed_answer(text, parts) is not None:  # it has answered already
                    known[i] = (boxed_answer(text, parts), result.logprob / n, n, text)
                elif n >= budget and not run.done:
                    mean = result.logprob / n

                    def record(probe: Probe, i=i, budget=budget, mean=mean, n=n, text=text) -> None:
                        self.probing.discard((i, budget))
                        final = probe.final
                        answer = final.answer
                        if answer is None:
                            answer = grading.extract_answer(final.text, parts)
                        shown = f"{text}\n\n[probe] {question.strip()}{final.text}"
                        self.answers[budget][i] = (answer, mean, n, shown)

                    prefix = [result.tokens[-1]] + job.engine.tokenizer.encode(question, add_special_tokens=False)
                    probe = Probe(
                        job.engine, self._view(i), prefix, job.config.probe_tokens, _finisher_answer(question, parts)
                    )
                    if job.add_probe(probe, record):
                        self.probing.add((i, budget))
                elif run.done:  # stopped with no probe possible any more: what it wrote is all there is
                    known[i] = (grading.extract_answer(text, parts), result.mean_logprob, n, text)
        for budget in job.budgets:
            known = self.answers[budget]
            if len(known) == run.n and all((s.name, budget) not in job.points for s in job.strategies):
                for spec in job.strategies:
                    job.point(spec, budget, self._choose(spec.strategy, budget, known))
        if len(job.points) == len(job.strategies) * len(job.budgets) and not run.done:
            job.engine.abort(run)  # every budget is read: the token past the last budget is not needed

    def _view(self, i: int) -> list:
        run = self.run
        assert run.ledger is not None
        blocks = {block.name: block for block in run.ledger.blocks}
        if run.n == 1:
            return [blocks["sequence"]]
        return [blocks["prompt"], blocks[f"sample{i}"]]

    def _choose(self, strategy: Strategy, budget: int, known: dict[int, Known]) -> Point:
        assert isinstance(strategy, Samples), f"{strategy} does not read samples"
        samples = [known[i] for i in sorted(known)]
        pick = strategy.pick(samples)
        answer = samples[pick][0]
        passes = min(budget, max(s[2] for s in samples))
        transcript = "\n\n".join(
            f"[sample {i}{' (chosen)' if i == pick else ''}, mean logprob {s[1]:.3f}, answer {s[0]!r}]\n{s[3]}"
            for i, s in enumerate(samples)
        )
        return Point(answer, passes, sum(s[2] for s in samples), self.job.elapsed(), transcript)


def _finisher_answer(question: str, parts: int) -> Callable[[str, bool], str | None]:
    def answer(text: str, final: bool) -> str | None:
        return boxed_answer(question + text + ("}" if final else ""), parts)

    return answer


VOTE = Vote("vote", "the majority answer of N independent samples")
BEST = Best("best", "the answer of the one of N independent samples with the highest mean token log-probability")
