"""The Hogwild! cache layouts: how the shared blocks are arranged into each worker's view.

One run has a prompt block, a shared history of finished steps (in completion order), and one current block per
worker. A worker's view is an ordered list of those blocks, its own current block always last (that is where its
tokens go). The three layouts of the paper:

- `contiguous`: [prompt, the other workers' blocks, own block]; a worker's block holds its whole transcript;
- `interleaved`: [prompt, history, own current step]; others' unfinished steps are not visible (step-wise sync);
- `combined`: [prompt, history, the other workers' current steps, own current step] (token-wise sync).

A worker can also have a private block right after the prompt (Group Think gives each thinker its own prompt),
seen by that worker only. Two small shared blocks can hold section titles placed before the other workers' blocks
and before the worker's own block; left empty they take no room and are skipped.
"""

from __future__ import annotations

from hogwild.cache.blocks import Block
from hogwild.cache.pool import Ledger
from hogwild.errors import HogwildError

LAYOUTS = ("combined", "interleaved", "contiguous")


class SharedCache:
    """The blocks of one collaborative run and the views the layout builds from them."""

    def __init__(
        self, ledger: Ledger, workers: int, layout: str = "combined", private: bool = False, prompt: Block | None = None
    ) -> None:
        """Blocks for `workers` workers in `ledger`; `prompt`, when given, is an existing block (a fork) to start
        from instead of a new, empty prompt block."""
        if layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        if workers < 1:
            raise HogwildError(f"workers must be >= 1, got {workers}")
        self.ledger = ledger
        self.layout = layout
        self.prompt = prompt if prompt is not None else ledger.new_block("prompt")
        self.history = ledger.new_block("history")
        self.current = [ledger.new_block(f"worker{w}") for w in range(workers)]
        self.private = [ledger.new_block(f"private{w}") for w in range(workers)] if private else None
        self.others_title = ledger.new_block("others-title")
        self.own_title = ledger.new_block("own-title")

    @property
    def workers(self) -> int:
        return len(self.current)

    @property
    def has_history(self) -> bool:
        return self.layout != "contiguous"

    def view(self, worker: int) -> list[Block]:
        """The blocks worker `worker` attends to, in order; its own current block is last."""
        head = [self.prompt] + ([self.private[worker]] if self.private else [])
        own = [self.own_title, self.current[worker]]
        others = [self.others_title] + [block for w, block in enumerate(self.current) if w != worker]
        if self.layout == "contiguous":
            return head + others + own
        if self.layout == "interleaved":
            return head + [self.history] + own
        return head + [self.history] + others + own

    def history_view(self) -> list[Block]:
        """View for text inserted into the shared history: the prompt and the history itself."""
        return [self.prompt, self.history]

    def finish_step(self, worker: int) -> None:
        """Move the worker's finished step to the end of the shared history (a no-op in `contiguous`)."""
        if self.has_history:
            self.ledger.pool.move(self.current[worker], self.history)

    def context(self, worker: int) -> int:
        """Tokens in the worker's view."""
        return sum(block.length for block in self.view(worker))

    def blocks(self) -> list[Block]:
        """Every block of the run, once."""
        return [self.prompt, self.history, *self.current, *(self.private or []), self.others_title, self.own_title]
