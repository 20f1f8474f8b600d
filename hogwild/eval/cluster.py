"""`hogwild eval --ray`: an evaluation's problems sharded over Ray actors, one engine each.

Each `EvalActor` loads the model once and runs the problems it is given through its own scheduler (`step_jobs`, as
`run_jobs` does in one process), yielding each finished job's records at once over a Ray streaming generator. The
driver (`RayEval.run`) deals the problems round-robin, one share per actor, and is the only one to write
`results.jsonl`, through the same `on_records` as a run in one process, so resuming, the summary and the plot do not
know the difference. The records of a (problem, strategy) pair are written once: the driver keeps what each problem
still owes and drops anything else. An actor that dies has its problems' unfinished strategies sent to the live
actor with the fewest problems outstanding, at most `attempts` times a problem; a problem that outlives them is
given up (said, not written; a re-run resumes it). Ctrl-C kills the actors and keeps every record written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field

from hogwild.cluster import Cluster, actor_config, actor_options, failure
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.eval.runner import EvalConfig, Outcome, Progress, make_jobs, plan_jobs, step_jobs
from hogwild.eval.tasks import Problem

PROGRESS_EVERY_S = 1.0
ATTEMPTS = 3  # times a problem is sent to an actor at most


class EvalActor:
    """One engine in a Ray actor. Messages yielded by `run`: ("records", [record...]) for each finished job,
    ("progress", passes) about once a second, and last ("done", forward passes, sampled tokens, most in flight)."""

    def __init__(self, engine_config: EngineConfig, config: EvalConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.error: str | None = None
        try:
            self.engine = Engine.load(engine_config)
        except HogwildError as e:  # said by `ready`, so the driver prints one line instead of Ray's traceback
            self.error = str(e)

    def ready(self) -> tuple[int, str | None]:
        """(process id, the load error or None)."""
        return os.getpid(), self.error

    def run(self, problems: list[Problem], skip: set[tuple[str, str]], extra: dict) -> Iterator[tuple]:
        assert self.engine is not None, "run on an actor whose engine did not load"
        engine = self.engine
        jobs = make_jobs(engine, problems, self.config, skip)
        outcome = Outcome()
        steps0, sampled0 = engine.stats.steps, engine.stats.sampled
        last = time.perf_counter()
        with closing(step_jobs(engine, jobs, self.config, outcome)) as steps:
            for finished in steps:
                for job in finished:
                    yield ("records", job.records(extra))
                if time.perf_counter() - last > PROGRESS_EVERY_S:
                    last = time.perf_counter()
                    yield ("progress", sum(job.passes for job in jobs if job.started and not job.done))
        yield ("done", engine.stats.steps - steps0, engine.stats.sampled - sampled0, outcome.max_in_flight)


@dataclass
class Call:
    """One `EvalActor.run` in flight: its actor and the problems it still owes."""

    actor: int
    problems: list[Problem]
    passes: int = 0  # sequential forward passes of its jobs in flight, as last reported


@dataclass
class RayEval:
    """The actors of one evaluation: `start` loads them, `run` spreads problems over them, `close` kills them."""

    cluster: Cluster
    engine_config: EngineConfig
    config: EvalConfig
    actors: int
    attempts: int = ATTEMPTS
    handles: list = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    alive: list[bool] = field(default_factory=list)
    load_s: float = 0.0

    def start(self) -> None:
        """Start the actors and wait until each has loaded its model; a load error is one HogwildError."""
        ray = self.cluster.ray
        engine_config = actor_config(self.engine_config)
        remote = ray.remote(**actor_options(engine_config), max_restarts=0)(EvalActor)
        start = time.perf_counter()
        self.handles = [remote.remote(engine_config, self.config) for _ in range(self.actors)]
        try:
            readies = ray.get([h.ready.remote() for h in self.handles])
        except ray.exceptions.RayError as e:
            raise HogwildError(f"an actor did not start: {failure(e)}") from None
        self.load_s = time.perf_counter() - start
        errors = [error for _, error in readies if error]
        if errors:
            raise HogwildError(errors[0])
        self.pids = [pid for pid, _ in readies]
        self.alive = [True] * self.actors

    def close(self) -> None:
        for handle in self.handles:
            self.cluster.ray.kill(handle)
        self.handles, self.alive = [], []

    def run(
        self,
        problems: list[Problem],
        skip: set[tuple[str, str]] = frozenset(),
        on_records: Callable[[list[dict]], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        extra: dict | None = None,
    ) -> Outcome:
        """Every job `plan_jobs` leaves to do, over the actors; each finished job's records go to `on_records` as
        they arrive. Ctrl-C returns with `interrupted` set."""
        ray, extra = self.cluster.ray, extra or {}
        _, budgets = self.config.plan
        plan = plan_jobs(problems, self.config, skip)
        owed: dict[str, set[str]] = {}  # problem id -> strategies not yet written
        for problem, strategies in plan:
            owed.setdefault(problem.id, set()).update(s.name for s in strategies)
        todo = [p for p in problems if p.id in owed]
        tries = dict.fromkeys(owed, 1)
        outcome = Outcome(by_actor=[0] * self.actors)
        total, done_passes = len(plan) * budgets[-1], 0
        calls: dict = {}  # streaming generator -> Call

        def send(actor: int, share: list[Problem]) -> None:
            pairs = {(p.id, s) for p in share for s in self._names() if s not in owed[p.id]}
            calls[self.handles[actor].run.remote(share, pairs | set(skip), extra)] = Call(actor, share)

        def load(actor: int) -> int:
            return sum(len(c.problems) for c in calls.values() if c.actor == actor)

        start = time.perf_counter()
        for actor in range(self.actors):
            if todo[actor :: self.actors]:
                send(actor, todo[actor :: self.actors])
        try:
            while calls:
                ready, _ = ray.wait(list(calls), num_returns=1, timeout=1.0)
                for generator in ready:
                    call = calls[generator]
                    try:
                        message = ray.get(next(generator))
                    except StopIteration:
                        del calls[generator]
                        continue
                    except ray.exceptions.RayActorError:
                        del calls[generator]
                        self._died(call, owed, tries, outcome, send, load)
                        continue
                    except ray.exceptions.RayTaskError as e:
                        raise HogwildError(f"actor {call.actor} failed: {failure(e)}") from None
                    kind = message[0]
                    if kind == "records":
                        records = [r for r in message[1] if r["strategy"] in owed.get(r["problem"], ())]
                        if not records:
                            continue  # already written (a second actor finished the same job): counted once
                        problem = records[0]["problem"]
                        owed[problem] -= {r["strategy"] for r in records}
                        if not owed[problem]:
                            call.problems = [p for p in call.problems if p.id != problem]
                        outcome.records += records
                        outcome.jobs_done += 1
                        outcome.by_actor[call.actor] += 1
                        done_passes += budgets[-1]
                        if on_records is not None:
                            on_records(records)
                    elif kind == "progress":
                        call.passes = message[1]
                    elif kind == "done":
                        outcome.steps += message[1]
                        outcome.sampled_tokens += message[2]
                        outcome.max_in_flight += message[3]
                        call.passes = 0
                if on_progress is not None:
                    passes = min(done_passes + sum(c.passes for c in calls.values()), total)
                    on_progress(Progress(passes, total, outcome.jobs_done, len(plan)))
        except KeyboardInterrupt:
            outcome.interrupted = True
            self.close()
        outcome.wall_s = time.perf_counter() - start
        return outcome

    def _names(self) -> list[str]:
        strategies, _ = self.config.plan
        return [s.name for s in strategies]

    def _died(self, call: Call, owed, tries, outcome: Outcome, send, load) -> None:
        """`call`'s actor died: its unfinished problems go to the live actors, least loaded first."""
        if self.alive[call.actor]:
            self.alive[call.actor] = False
            print(f"hogwild: actor {call.actor} died (pid {self.pids[call.actor]})", file=sys.stderr)
        unfinished = [p for p in call.problems if owed[p.id]]
        retry = [p for p in unfinished if tries[p.id] < self.attempts]
        for p in unfinished:
            if tries[p.id] >= self.attempts:
                outcome.gave_up.append(p.id)
                print(f"hogwild: giving up {p.id}: its actor died {self.attempts} times", file=sys.stderr)
        live = [a for a in range(self.actors) if self.alive[a]]
        if retry and not live:
            raise HogwildError(
                f"every actor died; {len(retry)} problems left undone (run the same command again to resume)"
            )
        shares: dict[int, list[Problem]] = {}
        for p in retry:
            tries[p.id] += 1
            actor = min(live, key=lambda a: load(a) + len(shares.get(a, [])))
            shares.setdefault(actor, []).append(p)
        for actor, share in shares.items():
            print(f"hogwild: {len(share)} problems of actor {call.actor} go to actor {actor}", file=sys.stderr)
            send(actor, share)
        outcome.retried += len(retry)
