"""The evaluation loop: every (problem, strategy) is one run of one engine, all in flight together, each read at
every budget of sequential forward passes from a single run to the largest budget.

Strategies come from the registry (`hogwild.strategies`): each builds its run and reads it at every budget (a
collaboration through probes forked off its live cache, independent samples each at its own length). A vote:N and
a best:N of the same N read one and the same run. `temperature` and `top_p` apply to every strategy alike; by
default the strategies of independent samples (vote:N, best:N) sample with the model's generation settings (else
0.6 and 0.95) and the others decode greedily (`default_sampling`; a cross-check's workers after the first sample
all the same), each run seeded from `seed`, the problem and
the strategy's group (`Strategy.group`).

Scores. A problem of k questions (gsm8k-multi) is scored per question: a record holds how many of its k answers
are right (`parts_correct`) beside whether all are (`correct`). Collaborations also record their redundancy: the
share of the workers' 8-token n-grams that stood in the shared text already (collab/redundancy.py).

Budget points. A run goes once to the largest budget B; its strategy's reader gives its answer at every smaller
budget b as if it had stopped there (see `strategies/collaborations.py` and `strategies/samples.py`). A probe's own
tokens are counted in neither a point's tokens nor its passes, and neither are the collaboration's own finisher's
at B (they are the same few greedy tokens for every strategy).

Throughput. Jobs are admitted while their KV reservation fits the pool with `probe_room` of it kept free for
probes, and `concurrency` allows (0: as many as fit); one `Engine.step` serves every run and probe in flight.
A probe refused for lack of room is retried after the next step, and its point records the pass it really read.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from hogwild.collab.layouts import LAYOUTS
from hogwild.collab.protocol import CollabConfig, default_sampling
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.eval import grading
from hogwild.eval.tasks import Problem
from hogwild.runs import Probe, Run
from hogwild.sampling import SamplingParams
from hogwild.strategies import Point, Reader, Spec, parse


def parse_budgets(text: str) -> tuple[int, ...]:
    """'128,256,512' -> increasing budgets of sequential forward passes; anything else is a HogwildError."""
    try:
        budgets = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise HogwildError(f"--budgets takes increasing whole numbers like 128,256,512, got {text!r}") from None
    if not budgets or budgets[0] < 1 or any(b >= c for b, c in zip(budgets, budgets[1:], strict=False)):
        raise HogwildError(f"--budgets takes increasing positive whole numbers like 128,256,512, got {text!r}")
    return budgets


@dataclass(frozen=True)
class EvalConfig:
    strategies: str = "single,hogwild:2,vote:2"
    budgets: str = "128,256,512"  # sequential forward passes
    layout: str = "combined"  # hogwild:N's cache layout
    temperature: float | None = None  # every strategy; None: greedy, vote:N and best:N the model's settings (or 0.6)
    top_p: float | None = None  # every strategy; None: the model's generation settings, else 0.95
    protocol: CollabConfig = CollabConfig()  # hogwild:N's protocol (workers, mode, layout, budget: per strategy)
    seed: int = 0  # every run's seed derives from it, the problem and the strategy (and the arithmetic problems)
    concurrency: int = 0  # runs in flight at once; 0: as many as the KV budget holds
    probe_tokens: int = 24  # tokens a finisher probe decodes at most
    probe_room: float = 0.2  # share of the KV budget kept free for probes when admitting runs

    def __post_init__(self) -> None:
        self.plan  # noqa: B018 - validates strategies and budgets
        if self.layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.concurrency < 0:
            raise HogwildError(f"--concurrency must be >= 0 (0: as many as fit), got {self.concurrency}")
        given = {"temperature": self.temperature, "top_p": self.top_p}
        SamplingParams(**{k: v for k, v in given.items() if v is not None})
        if self.probe_tokens < 1 or not 0 <= self.probe_room < 1:
            raise HogwildError("probe_tokens must be >= 1 and probe_room in [0, 1)")

    @property
    def plan(self) -> tuple[tuple[Spec, ...], tuple[int, ...]]:
        return parse(self.strategies), parse_budgets(self.budgets)


def seed_for(seed: int, problem: Problem, group: str) -> int:
    return zlib.crc32(f"{seed}:{problem.id}:{group}".encode())


class Job:
    """One run on one problem, serving one strategy (or several that read one run: vote:N and best:N), read at
    every budget by its strategy's reader."""

    def __init__(
        self, engine: Engine, problem: Problem, strategies: list[Spec], budgets: tuple[int, ...], config: EvalConfig
    ) -> None:
        self.engine = engine
        self.problem = problem
        self.strategies = strategies
        self.budgets = budgets
        self.config = config
        self.started = 0.0
        self.probes: list[tuple[Probe, Callable[[Probe], None]]] = []
        self.points: dict[tuple[str, int], Point] = {}
        first = strategies[0]
        assert all(s.group == first.group for s in strategies), f"{strategies} do not read one run"
        seed = seed_for(config.seed, problem, first.group)
        sampling = default_sampling(
            engine, seed, first.strategy.samples, temperature=config.temperature, top_p=config.top_p
        )
        collab = dataclasses.replace(
            config.protocol, layout=config.layout, budget=budgets[-1], finisher_tokens=config.probe_tokens,
            parts=problem.parts,
        )  # fmt: skip
        self.run: Run = first.strategy.build(engine, problem.question, first.workers, collab, sampling)
        self.reader: Reader = first.strategy.reader(self)

    @property
    def kv_tokens(self) -> int:
        return self.run.kv_tokens

    @property
    def done(self) -> bool:
        return len(self.points) == len(self.strategies) * len(self.budgets) and not self.probes

    @property
    def passes(self) -> int:
        """Progress in sequential forward passes, for the progress bar."""
        return self.budgets[-1] if self.done else self.reader.passes

    # driving

    def start(self) -> None:
        self.started = time.perf_counter()
        self.engine.add(self.run)

    def poll(self) -> None:
        """After each engine step: collect finished probes, then let the reader start the probes now due and
        record what is known."""
        for probe, record in list(self.probes):
            if probe.done:
                self.probes.remove((probe, record))
                record(probe)
        self.reader.poll()

    def abort(self) -> None:
        for probe, _ in self.probes:
            self.engine.abort(probe)
        self.probes = []
        self.engine.abort(self.run)

    # what readers call

    def add_probe(self, probe: Probe, record: Callable[[Probe], None]) -> bool:
        """Start `probe`; `record` gets it once it is done. False when there is no KV room for it this step."""
        try:
            self.engine.add(probe)
        except HogwildError:
            return False  # no KV room this step: try again after the next one
        self.probes.append((probe, record))
        return True

    def point(self, strategy: Spec, budget: int, point: Point) -> None:
        self.points[(strategy.name, budget)] = point

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def records(self, extra: dict) -> list[dict]:
        out = []
        for strategy in self.strategies:
            for budget in self.budgets:
                point = self.points[(strategy.name, budget)]
                golds = list(self.problem.golds)
                right = grading.grade_parts(point.answer, golds)
                shared = None if point.redundancy is None else round(point.redundancy, 4)
                out.append({
                    "problem": self.problem.id, "strategy": strategy.name, "budget": budget,
                    "answer": point.answer, "gold": golds[0] if len(golds) == 1 else golds,
                    "correct": right == len(golds), "parts": len(golds), "parts_correct": right,
                    "passes": point.passes, "tokens": point.tokens, "wall_s": round(point.wall_s, 3),
                    "redundancy": shared, **extra, "question": self.problem.question, "transcript": point.transcript,
                })  # fmt: skip
        return out


def job_groups(strategies: tuple[Spec, ...]) -> list[list[Spec]]:
    """The strategies one run serves together: those of one group (`Strategy.group`: each alone, except vote:N
    and best:N of the same N)."""
    groups: dict[str, list[Spec]] = {}
    for strategy in strategies:
        groups.setdefault(strategy.group, []).append(strategy)
    return list(groups.values())


def plan_jobs(
    problems: list[Problem], config: EvalConfig, skip: set[tuple[str, str]] = frozenset()
) -> list[tuple[Problem, list[Spec]]]:
    """(problem, strategies of one run) for every job still to do, in problem order, leaving out the
    (problem, strategy) pairs in `skip`."""
    strategies, _ = config.plan
    plan = []
    for problem in problems:
        for group in job_groups(strategies):
            todo = [s for s in group if (problem.id, s.name) not in skip]
            if todo:
                plan.append((problem, todo))
    return plan


def make_jobs(
    engine: Engine, problems: list[Problem], config: EvalConfig, skip: set[tuple[str, str]] = frozenset()
) -> list[Job]:
    """One job per problem and strategy (vote:N and best:N of the same N share one), in problem order, leaving
    out the (problem, strategy) pairs in `skip`."""
    _, budgets = config.plan
    return [Job(engine, problem, todo, budgets, config) for problem, todo in plan_jobs(problems, config, skip)]


@dataclass
class Progress:
    """What the loop reports after each step, for a progress bar."""

    passes: int  # sequential forward passes done, summed over jobs
    total: int
    jobs_done: int
    jobs: int


@dataclass
class Outcome:
    records: list[dict] = field(default_factory=list)
    jobs_done: int = 0
    interrupted: bool = False
    wall_s: float = 0.0
    sampled_tokens: int = 0  # tokens the engine sampled (runs and probes)
    steps: int = 0
    max_in_flight: int = 0  # over Ray: summed over the actors
    by_actor: list[int] = field(default_factory=list)  # over Ray: jobs finished by each actor
    retried: int = 0  # over Ray: problems sent to another actor after theirs died
    gave_up: list[str] = field(default_factory=list)  # over Ray: problems whose every attempt died with its actor


def step_jobs(engine: Engine, jobs: list[Job], config: EvalConfig, outcome: Outcome) -> Iterator[list[Job]]:
    """The loop of `run_jobs` as a generator: runs every job to the end, `config.concurrency` at a time (0: as many
    as fit), and after each engine step yields the jobs that finished in it (often none). `outcome` counts the jobs
    done and the most in flight. Closing it, or an exception in it (Ctrl-C included), aborts the jobs in flight."""
    queue = list(jobs)
    for job in queue:
        engine.check_fits_pool(job.run)
    live: list[Job] = []
    keep = int(engine.pool.capacity * config.probe_room)
    try:
        while queue or live:
            while queue and (not config.concurrency or len(live) < config.concurrency):
                job = queue[0]
                if live and engine.pool.reserved + job.kv_tokens + keep > engine.pool.capacity:
                    break
                queue.pop(0)
                job.start()
                live.append(job)
            outcome.max_in_flight = max(outcome.max_in_flight, len(live))
            engine.step()
            finished = []
            for job in list(live):
                job.poll()
                if job.done:
                    live.remove(job)
                    finished.append(job)
            outcome.jobs_done += len(finished)
            yield finished
    except BaseException:
        for job in live:
            job.abort()
        raise


def run_jobs(
    engine: Engine,
    jobs: list[Job],
    config: EvalConfig,
    on_records: Callable[[list[dict]], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    extra: dict | None = None,
) -> Outcome:
    """Run every job to the end, `config.concurrency` at a time (0: as many as fit), through one engine loop.
    Each finished job's records go to `on_records` at once. Ctrl-C aborts the jobs in flight (their records are
    not written) and returns with `interrupted` set."""
    extra = extra or {}
    outcome = Outcome()
    start = time.perf_counter()
    steps0, sampled0 = engine.stats.steps, engine.stats.sampled
    total = sum(job.budgets[-1] for job in jobs)
    try:
        with closing(step_jobs(engine, jobs, config, outcome)) as steps:
            for finished in steps:
                for job in finished:
                    records = job.records(extra)
                    outcome.records += records
                    if on_records is not None:
                        on_records(records)
                if on_progress is not None:
                    passes = sum(job.passes for job in jobs if job.started)
                    on_progress(Progress(passes, total, outcome.jobs_done, len(jobs)))
    except KeyboardInterrupt:
        outcome.interrupted = True
    outcome.wall_s = time.perf_counter() - start
    outcome.steps = engine.stats.steps - steps0
    outcome.sampled_tokens = engine.stats.sampled - sampled0
    return outcome


# results.jsonl


def read_results(path: Path) -> list[dict]:
    """The records in a results.jsonl; a last line cut short by a kill is dropped (it is re-run)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise HogwildError(f"{path}:{number}: not a JSON line; remove or fix it") from None
    return records


def done_pairs(records: list[dict], budgets: tuple[int, ...]) -> set[tuple[str, str]]:
    """(problem, strategy) pairs that have a record at every budget."""
    have: dict[tuple[str, str], set[int]] = {}
    for r in records:
        have.setdefault((r["problem"], r["strategy"]), set()).add(r["budget"])
    return {pair for pair, got in have.items() if set(budgets) <= got}
