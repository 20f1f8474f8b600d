"""What a strategy is: one way to spend a budget of sequential forward passes on a problem, with its name, its
count (`hogwild:4`, `vote:2`), the run it builds on the engine and how the evaluation reads that run's answer and
transcript at every budget. The registry of strategies by name is `hogwild.strategies`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hogwild.collab.protocol import CollabConfig, Collaboration
from hogwild.engine import Engine
from hogwild.runs import Run
from hogwild.sampling import SamplingParams

if TYPE_CHECKING:
    from hogwild.eval.runner import Job


@dataclass
class Point:
    """What one strategy answered for one problem at one budget."""

    answer: str | None
    passes: int  # sequential forward passes the answer rests on (<= the budget, or the pass a late probe read)
    tokens: int  # tokens written by all workers or samples up to then (probe and finisher tokens not counted)
    wall_s: float  # from the job's start to this answer
    transcript: str
    redundancy: float | None = None  # a collaboration's, up to then


class Reader(Protocol):
    """How the evaluation reads one job's run: `poll()` after every engine step records the job's points (through
    `job.point`) as they become known; `passes` is the run's progress in sequential forward passes."""

    def poll(self) -> None: ...

    @property
    def passes(self) -> int: ...


class Strategy:
    """A strategy, registered by `name` in `hogwild.strategies` and read from there by the CLI (`hogwild solve
    --mode`, `hogwild eval --strategies`), `hogwild.solve`, the server (its `mode` field, the model card the web
    page reads) and the evaluation. Its contract:

    - `name`, and `summary`: one line for help texts and the web page.
    - `counted`: named `name:N` (N workers or samples, 1 to 16), else plain `name` (one worker).
    - `served`: its run is a `Collaboration` (events for every worker, `Done` with a `SolveResult`), which
      `hogwild solve --mode`, `hogwild.solve(mode=...)` and the server's `mode` field can name.
    - `samples`: it needs sampling to be itself (independent samples), so it samples by default; the others decode
      greedily unless given a temperature (`default_sampling`).
    - `build(engine, problem, n, collab, sampling)`: its run of `n` workers or samples on the engine; `collab`
      holds the layout, budget and protocol fields the caller gave (its `workers` and `mode` are the
      strategy's to set), `sampling` the workers' sampling.
    - `group(n)`: the run it reads; strategies of the same group share one run in an evaluation (vote:N and
      best:N), which is seeded by the group.
    - `reader(job)`: how an evaluation reads the job's run (`job.run`, built by the job's first strategy) at
      every budget, for every strategy of the job (`Reader`).
    """

    name: str = ""
    summary: str = ""
    counted: bool = True
    served: bool = False
    samples: bool = False

    @property
    def usage(self) -> str:
        return f"{self.name}:N" if self.counted else self.name

    def named(self, n: int) -> str:
        """The name of the strategy with `n` workers or samples, as results and the CLI spell it."""
        return f"{self.name}:{n}" if self.counted else self.name

    def group(self, n: int) -> str:
        return self.named(n)

    def build(self, engine: Engine, problem: str, n: int, collab: CollabConfig, sampling: SamplingParams) -> Run:
        raise NotImplementedError(f"strategy {self.name!r} builds no run")

    def live(self, engine: Engine, problem: str, collab: CollabConfig, sampling: SamplingParams) -> Collaboration:
        """The live run of a served strategy, of `collab.workers` workers: what `hogwild solve`, `hogwild.solve`
        and the server run."""
        assert self.served, f"strategy {self.name!r} is not served"
        run = self.build(engine, problem, collab.workers, collab, sampling)
        assert isinstance(run, Collaboration), f"served strategy {self.name!r} built {run}, not a collaboration"
        return run

    def reader(self, job: Job) -> Reader:
        raise NotImplementedError(f"strategy {self.name!r} has no evaluation reader")

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


@dataclass(frozen=True)
class Spec:
    """A strategy as named in a list: the strategy and its count (`hogwild:4`)."""

    strategy: Strategy
    workers: int = 1

    @property
    def kind(self) -> str:
        return self.strategy.name

    @property
    def name(self) -> str:
        return self.strategy.named(self.workers)

    @property
    def group(self) -> str:
        return self.strategy.group(self.workers)
