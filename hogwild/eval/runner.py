"""The evaluation loop: every (problem, strategy) is one run of one engine, all in flight together, each read at
every budget of sequential forward passes from a single run to the largest budget.

Strategies. `single` is a collaboration of one worker (plain chain of thought), `hogwild:N` N workers in the
Hogwild! protocol (`--layout`, and the protocol's fields in `EvalConfig.protocol`), `groupthink:N` N Group Think
thinkers, `sot:N` Skeleton-of-Thought (an outline of N points, N workers expanding one each unseen by the others,
one answer). `vote:N` and `best:N` are N independent samples of the same prompt sharing its block
(`Sampled(n=N)`); `vote:N` takes the majority answer (ties go to the lowest-numbered sample), `best:N` the answer
of the sample with the highest mean token log-probability. A vote:N and a best:N of the same N read one and the
same run. Every strategy samples alike: `temperature` and `top_p`, by default the model's generation settings
(else 0.6 and 0.95), each run seeded from `seed`, the problem and the strategy.

Scores. A problem of k questions (gsm8k-multi) is scored per question: a record holds how many of its k answers
are right (`parts_correct`) beside whether all are (`correct`). Collaborations also record their redundancy: the
share of the workers' 8-token n-grams that stood in the shared text already (collab/redundancy.py).

Budget points. A collaboration runs once to the largest budget B (where its own finisher asks for the answer).
When `run.passes` reaches a smaller budget b, a probe forks the live cache and asks worker 0 for the answer now
(the finisher question, greedy, `probe_tokens` at most) in throwaway blocks; the run goes on untouched. A run that
ends before b (an answer found, the worker ended its reply) holds its final answer for every larger budget. For
the samples, a budget of b passes is b tokens of each sample: when a sample has written b tokens, its answer at b
is the last \\boxed{} in its text if it wrote one, else a probe forked off its blocks asks for the answer with the
same finisher question; a sample that ended before b keeps the answer in its text. The samples run to B + 1
tokens so the probe at B reads a sample as long as the budget, then the run is stopped. A probe's own tokens are
counted in neither a point's tokens nor its passes, and neither are the collaboration's own finisher's at B (they
are the same few greedy tokens for every strategy).

Throughput. Jobs are admitted while their KV reservation fits the pool with `probe_room` of it kept free for
probes, and `concurrency` allows (0: as many as fit); one `Engine.step` serves every run and probe in flight.
A probe refused for lack of room is retried after the next step, and its point records the pass it really read.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from hogwild.collab import prompts
from hogwild.collab.layouts import LAYOUTS
from hogwild.collab.protocol import CollabConfig, Collaboration, Pass, default_sampling
from hogwild.collab.text import boxed_answer
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.eval import grading
from hogwild.eval.tasks import Problem
from hogwild.runs import Probe, Sampled
from hogwild.sampling import SamplingParams

KINDS = ("single", "hogwild", "groupthink", "sot", "vote", "best")


@dataclass(frozen=True)
class Strategy:
    kind: str
    workers: int = 1

    @property
    def name(self) -> str:
        return self.kind if self.kind == "single" else f"{self.kind}:{self.workers}"

    @property
    def sampled(self) -> bool:
        return self.kind in ("vote", "best")


def parse_strategies(text: str) -> tuple[Strategy, ...]:
    """'single,hogwild:2,vote:4' -> strategies; an unknown or malformed one is a HogwildError."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        kind, _, count = item.partition(":")
        if kind not in KINDS:
            raise HogwildError(
                f"unknown strategy {item!r}: use single, hogwild:N, groupthink:N, sot:N, vote:N or best:N"
            )
        if kind == "single":
            if count:
                raise HogwildError(f"strategy {item!r}: single takes no count (it is one worker)")
            out.append(Strategy("single"))
            continue
        if not count.isdigit() or not 1 <= int(count) <= prompts.MAX_WORKERS:
            raise HogwildError(f"strategy {item!r}: give {kind}:N with N from 1 to {prompts.MAX_WORKERS}")
        out.append(Strategy(kind, int(count)))
    if len({s.name for s in out}) != len(out):
        raise HogwildError(f"strategies {text!r} name one strategy twice")
    return tuple(out)


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
    temperature: float | None = None  # every strategy; None: the model's generation settings, else 0.6
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
    def plan(self) -> tuple[tuple[Strategy, ...], tuple[int, ...]]:
        return parse_strategies(self.strategies), parse_budgets(self.budgets)


@dataclass
class Point:
    """What one strategy answered for one problem at one budget."""

    answer: str | None
    passes: int  # sequential forward passes the answer rests on (<= the budget, or the pass a late probe read)
    tokens: int  # tokens written by all workers or samples up to then (probe and finisher tokens not counted)
    wall_s: float  # from the job's start to this answer
    transcript: str
    redundancy: float | None = None  # a collaboration's, up to then


def seed_for(seed: int, problem: Problem, group: str) -> int:
    return zlib.crc32(f"{seed}:{problem.id}:{group}".encode())


class Job:
    """One run on one problem, serving one strategy (or vote:N and best:N together), read at every budget."""

    def __init__(
        self, engine: Engine, problem: Problem, strategies: list[Strategy], budgets: tuple[int, ...], config: EvalConfig
    ) -> None:
        self.engine = engine
        self.problem = problem
        self.strategies = strategies
        self.budgets = budgets
        self.config = config
        self.started = 0.0
        self.probes: list[tuple[Probe, Callable[[Probe], None]]] = []
        self.points: dict[tuple[str, int], Point] = {}
        self.main_passes = 0  # the collaboration's passes before its finisher
        self.probing: set[int] = set()  # budgets whose collaboration probe is in flight
        self.sample_probing: set[tuple[int, int]] = set()  # (sample, budget) probes in flight
        # per budget, per sample: (answer, mean log-probability, tokens, transcript), once known
        self.answers: dict[int, dict[int, tuple[str | None, float, int, str]]] = {b: {} for b in budgets}
        self.run: Collaboration | Sampled = self._make_run()

    @property
    def kv_tokens(self) -> int:
        return self.run.kv_tokens

    @property
    def done(self) -> bool:
        return len(self.points) == len(self.strategies) * len(self.budgets) and not self.probes

    @property
    def passes(self) -> int:
        """Progress in sequential forward passes, for the progress bar."""
        if self.done:
            return self.budgets[-1]
        if isinstance(self.run, Collaboration):
            return min(self.run.passes, self.budgets[-1])
        return min(max(len(s.result.tokens) for s in self.run.streams), self.budgets[-1])

    def _make_run(self) -> Collaboration | Sampled:
        strategy, engine, config = self.strategies[0], self.engine, self.config
        seed = seed_for(
            config.seed, self.problem, strategy.name if not strategy.sampled else f"sampled:{strategy.workers}"
        )
        sampling = default_sampling(engine, seed=seed, temperature=config.temperature, top_p=config.top_p)
        if not strategy.sampled:
            mode = "hogwild" if strategy.kind == "single" else strategy.kind
            collab = dataclasses.replace(
                config.protocol, workers=strategy.workers, mode=mode, layout=config.layout, budget=self.budgets[-1],
                finisher_tokens=config.probe_tokens, parts=self.problem.parts,
            )  # fmt: skip
            return Collaboration(engine, self.problem.question, collab, sampling)
        # the same prompt a single worker reads, so the strategies differ only in how they spend the passes
        fmt = prompts.format_for(engine.model_config.family)
        text = prompts.collaboration_prompt(self.problem.question, [prompts.NAMES[0]])
        if fmt.chat:
            ids = engine.tokenizer.encode_chat([{"role": "user", "content": text}])
            ids += engine.tokenizer.encode(fmt.reply_prefix, add_special_tokens=False) if fmt.reply_prefix else []
        else:
            ids = engine.tokenizer.encode(text + "\n\n")
        return Sampled(engine, ids, dataclasses.replace(sampling, max_tokens=self.budgets[-1] + 1), n=strategy.workers)

    # driving

    def start(self) -> None:
        self.started = time.perf_counter()
        self.engine.add(self.run)

    def poll(self) -> None:
        """After each engine step: collect finished probes, start the probes now due, resolve what is known."""
        for probe, record in list(self.probes):
            if probe.done:
                self.probes.remove((probe, record))
                record(probe)
        if isinstance(self.run, Collaboration):
            self._poll_collaboration(self.run)
        else:
            self._poll_samples(self.run)

    def abort(self) -> None:
        for probe, _ in self.probes:
            self.engine.abort(probe)
        self.probes = []
        self.engine.abort(self.run)

    def _add_probe(self, probe: Probe, record: Callable[[Probe], None]) -> bool:
        try:
            self.engine.add(probe)
        except HogwildError:
            return False  # no KV room this step: try again after the next one
        self.probes.append((probe, record))
        return True

    def _point(self, strategy: Strategy, budget: int, point: Point) -> None:
        self.points[(strategy.name, budget)] = point

    # collaborations

    def _poll_collaboration(self, run: Collaboration) -> None:
        strategy = self.strategies[0]
        while run.outbox:
            event = run.outbox.popleft()
            if isinstance(event, Pass):
                self.main_passes = event.forward_passes  # the finisher's passes come without a Pass event
        waiting = [b for b in self.budgets if (strategy.name, b) not in self.points and b not in self.probing]
        parts = self.problem.parts
        if run.done:
            result = run.final
            answer = result.answer
            if answer is None:
                answer = grading.extract_answer(result.workers[0].text, parts)
            transcript = _transcript(result.workers)
            point = Point(answer, self.main_passes, result.tokens, self._elapsed(), transcript, result.redundancy)
            for budget in waiting:
                self._point(strategy, budget, point)
            return
        due = [b for b in waiting if b < self.budgets[-1] and run.passes >= b]
        if not due or run.shared is None:
            return
        budget = due[0]
        passes, tokens = run.passes, sum(w.tokens for w in run.workers)
        texts, shared = _transcript(run.workers), run.redundancy()[0]

        def record(probe: Probe, budget: int = budget) -> None:
            self.probing.discard(budget)
            final = probe.final
            answer = final.answer if final.answer is not None else grading.extract_answer(final.text, parts)
            transcript = f"{texts}\n\n[probe] {run.finisher_text.strip()}{final.text}"
            self._point(strategy, budget, Point(answer, passes, tokens, self._elapsed(), transcript, shared))

        if self._add_probe(run.probe(worker=0, max_tokens=self.config.probe_tokens), record):
            self.probing.add(budget)

    # independent samples

    def _poll_samples(self, run: Sampled) -> None:
        parts = self.problem.parts
        question = prompts.finisher(prompts.NAMES[0], parts)
        run.outbox.clear()  # the samples are read from their streams
        for i, stream in enumerate(run.streams):
            result = stream.result
            ended = bool(result.finish_reason) and result.finish_reason != "length"
            for budget in self.budgets:
                known = self.answers[budget]
                if i in known or (i, budget) in self.sample_probing:
                    continue
                n, text = len(result.tokens), result.text
                if ended and n <= budget:  # the sample ended on its own before the budget: its own answer
                    known[i] = (grading.extract_answer(text, parts), result.mean_logprob, n, text)
                elif n >= budget and boxed_answer(text, parts) is not None:  # it has answered already
                    known[i] = (boxed_answer(text, parts), result.logprob / n, n, text)
                elif n >= budget and not run.done:
                    mean = result.logprob / n

                    def record(probe: Probe, i=i, budget=budget, mean=mean, n=n, text=text) -> None:
                        self.sample_probing.discard((i, budget))
                        final = probe.final
                        answer = final.answer
                        if answer is None:
                            answer = grading.extract_answer(final.text, parts)
                        shown = f"{text}\n\n[probe] {question.strip()}{final.text}"
                        self.answers[budget][i] = (answer, mean, n, shown)

                    prefix = [result.tokens[-1]] + self.engine.tokenizer.encode(question, add_special_tokens=False)
                    probe = Probe(
                        self.engine,
                        self._sample_view(run, i),
                        prefix,
                        self.config.probe_tokens,
                        _finisher_answer(question, parts),
                    )
                    if self._add_probe(probe, record):
                        self.sample_probing.add((i, budget))
                elif run.done:  # stopped with no probe possible any more: what it wrote is all there is
                    known[i] = (grading.extract_answer(text, parts), result.mean_logprob, n, text)
        for budget in self.budgets:
            known = self.answers[budget]
            if len(known) == run.n and all((s.name, budget) not in self.points for s in self.strategies):
                for strategy in self.strategies:
                    self._point(strategy, budget, self._choose(strategy, budget, known))
        if len(self.points) == len(self.strategies) * len(self.budgets) and not run.done:
            self.engine.abort(run)  # every budget is read: the token past the last budget is not needed

    @staticmethod
    def _sample_view(run: Sampled, i: int) -> list:
        assert run.ledger is not None
        blocks = {block.name: block for block in run.ledger.blocks}
        if run.n == 1:
            return [blocks["sequence"]]
        return [blocks["prompt"], blocks[f"sample{i}"]]

    def _choose(self, strategy: Strategy, budget: int, known: dict) -> Point:
        samples = [known[i] for i in sorted(known)]
        if strategy.kind == "best":
            pick = max(range(len(samples)), key=lambda i: (samples[i][1], -i))
            answer = samples[pick][0]
        else:
            keys = [_vote_key(s[0]) for s in samples]
            counts = Counter(k for k in keys if k is not None)
            if counts:
                top = max(counts.values())
                pick = next(i for i, k in enumerate(keys) if k is not None and counts[k] == top)
            else:
                pick = 0
            answer = samples[pick][0]
        passes = min(budget, max(s[2] for s in samples))
        transcript = "\n\n".join(
            f"[sample {i}{' (chosen)' if i == pick else ''}, mean logprob {s[1]:.3f}, answer {s[0]!r}]\n{s[3]}"
            for i, s in enumerate(samples)
        )
        return Point(answer, passes, sum(s[2] for s in samples), self._elapsed(), transcript)

    def _elapsed(self) -> float:
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


def _finisher_answer(question: str, parts: int) -> Callable[[str, bool], str | None]:
    def answer(text: str, final: bool) -> str | None:
        return boxed_answer(question + text + ("}" if final else ""), parts)

    return answer


def _vote_key(answer: str | None) -> object:
    if answer is None or not answer.strip():
        return None
    number = grading.to_number(answer)
    return number if number is not None else answer.strip()


def _transcript(workers) -> str:
    if len(workers) == 1:
        return workers[0].text
    return "\n\n".join(f"[{w.name}]\n{w.text}" for w in workers)


def job_groups(strategies: tuple[Strategy, ...]) -> list[list[Strategy]]:
    """The strategies one run serves together: each alone, except vote:N and best:N of the same N (one run)."""
    groups: dict[str, list[Strategy]] = {}
    for strategy in strategies:
        key = f"sampled:{strategy.workers}" if strategy.sampled else strategy.name
        groups.setdefault(key, []).append(strategy)
    return list(groups.values())


def plan_jobs(
    problems: list[Problem], config: EvalConfig, skip: set[tuple[str, str]] = frozenset()
) -> list[tuple[Problem, list[Strategy]]]:
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
