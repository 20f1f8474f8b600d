"""A toy strategy, defined outside hogwild, for tests/test_strategies.py: `tally:N` runs N workers of the Hogwild!
protocol and answers with how many tokens they wrote, never with what they wrote: an answer no built-in strategy
gives, so wherever it shows up, the toy's own run was built and read."""

from __future__ import annotations

import dataclasses

from hogwild.collab.protocol import CollabConfig, Collaboration, SolveResult
from hogwild.engine import Engine
from hogwild.sampling import SamplingParams
from hogwild.strategies import Strategy
from hogwild.strategies.collaborations import CollaborationReader


class Tallied(Collaboration):
    def result(self, finished_by: str) -> SolveResult:
        result = super().result(finished_by)
        return dataclasses.replace(result, answer=f"tally {result.tokens}", account="counted, not solved")


class Tally(Strategy):
    name = "tally"
    summary = "N workers, answered with the count of their tokens"
    counted = True
    served = True

    def build(self, engine: Engine, problem: str, n: int, collab: CollabConfig, sampling: SamplingParams) -> Tallied:
        return Tallied(engine, problem, dataclasses.replace(collab, workers=n, mode="hogwild"), sampling)

    def reader(self, job) -> CollaborationReader:
        return CollaborationReader(job)


TALLY = Tally()
