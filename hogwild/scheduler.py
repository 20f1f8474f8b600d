"""The scheduler: which runs are in flight, and which of their rows go into the next forward pass.

Policy only; the engine does the mechanism. Runs are admitted first come, first served while their KV reservation
fits the pool (and `max_runs` allows): a run that does not fit waits, and nothing behind it overtakes it, so no run
starves. Each step packs the pending rows of the running runs, oldest run first, into a budget of `step_tokens`
tokens; a row longer than what is left is cut into chunks fed over several steps. A run's step ends when all of
its rows are fed; only then are its rows sampled and its blocks published to the other rows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from hogwild.cache.pool import KVPool
from hogwild.runs import Feed, Run


@dataclass
class Chunk:
    """Tokens [start, end) of feed `index` of a run, fed in this step."""

    run: Run
    index: int
    start: int
    end: int

    @property
    def feed(self) -> Feed:
        assert self.run.feed is not None
        return self.run.feed[self.index]

    @property
    def tokens(self) -> list[int]:
        return self.feed.tokens[self.start : self.end]

    @property
    def completes(self) -> bool:
        return self.end == len(self.feed.tokens)


@dataclass
class _Progress:
    """How far a running run's current step has been fed, and the logits of its rows that are done."""

    fed: list[int]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)


class Scheduler:
    def __init__(self, pool: KVPool, step_tokens: int, max_runs: int = 0) -> None:
        self.pool = pool
        self.step_tokens = step_tokens
        self.max_runs = max_runs  # 0: no limit
        self.waiting: deque[Run] = deque()
        self.running: list[Run] = []
        self.progress: dict[int, _Progress] = {}

    def add(self, run: Run) -> None:
        self.waiting.append(run)

    def admit(self) -> list[Run]:
        """Start waiting runs, in order, while the head fits; returns the runs started."""
        started = []
        while self.waiting and (not self.max_runs or len(self.running) < self.max_runs):
            head = self.waiting[0]
            if not self.pool.fits(head.kv_tokens):
                break
            self.waiting.popleft()
            self.start(head)
            started.append(head)
        return started

    def backlog(self, pending: list[Run]) -> int:
        """How many of `pending` (runs not started yet, in arrival order) would wait for KV room or a run slot if
        they were admitted now: first come, first served, so the first that does not fit and every run behind it.
        Read from another thread it is a snapshot, as good as the moment it was taken."""
        free = self.pool.capacity - self.pool.reserved
        slots = self.max_runs - len(self.running) if self.max_runs else len(pending)
        for i, run in enumerate(pending):
            if run.kv_tokens > free or slots < 1:
                return len(pending) - i
            free -= run.kv_tokens
            slots -= 1
        return 0

    def start(self, run: Run) -> None:
        run.start(self.pool.open(run.kv_tokens))
        self.running.append(run)

    def schedule(self) -> list[Chunk]:
        """The chunks of this step: the runs' pending rows, oldest run first, within `step_tokens` tokens."""
        budget = self.step_tokens
        chunks = []
        for run in self.running:
            if not run.feed:
                continue
            progress = self.progress.setdefault(run.id, _Progress([0] * len(run.feed)))
            for i, feed in enumerate(run.feed):
                left = len(feed.tokens) - progress.fed[i]
                if left == 0:
                    continue
                n = min(left, budget)
                if n == 0:
                    return chunks
                chunks.append(Chunk(run, i, progress.fed[i], progress.fed[i] + n))
                budget -= n
        return chunks

    def advance(self, chunks: list[Chunk], logits: dict[int, torch.Tensor]) -> list[Run]:
        """Record what was fed (`logits`: chunk index -> the row's next-token logits, for completed rows that want
        them); returns the runs whose step is now complete, in running order."""
        for c, chunk in enumerate(chunks):
            progress = self.progress[chunk.run.id]
            progress.fed[chunk.index] = chunk.end
            if c in logits:
                progress.logits[chunk.index] = logits[c]
        complete = []
        for run in self.running:
            progress = self.progress.get(run.id)
            if (
                run.feed
                and progress is not None
                and all(fed == len(feed.tokens) for fed, feed in zip(progress.fed, run.feed, strict=True))
            ):
                complete.append(run)
        return complete

    def step_logits(self, run: Run) -> list[torch.Tensor]:
        """The logits of the run's completed step, in feed order (rows that asked for them), and forget the step."""
        progress = self.progress.pop(run.id)
        return [progress.logits[i] for i in sorted(progress.logits)]

    def remove(self, run: Run) -> None:
        if run in self.waiting:
            self.waiting.remove(run)
        if run in self.running:
            self.running.remove(run)
        self.progress.pop(run.id, None)
