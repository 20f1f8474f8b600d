"""The live terminal view of a run: one column per worker writing side by side, the shared history, progress.

`LiveView` consumes the run's events; rich redraws it a few times a second, and each redraw wraps only the tail
of each worker's text that fits on screen.
"""

from __future__ import annotations

import textwrap

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hogwild.collab.protocol import AnswerFound, Event, NudgeInserted, Pass, StepDiscarded, StepFinished, StepStarted
from hogwild.runs import Done, Token

COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


def _tail(text: str, width: int, lines: int) -> str:
    """The last `lines` lines of `text` wrapped at `width`, reading only as much of the text as they can hold."""
    recent = text[-(width * lines * 2) :]
    wrapped: list[str] = []
    for paragraph in recent.split("\n"):
        wrapped.extend(textwrap.wrap(paragraph, width, drop_whitespace=False) or [""])
    return "\n".join(wrapped[-lines:])


class LiveView:
    def __init__(self, names: list[str], budget: int, console: Console, title: str) -> None:
        self.names = names
        self.budget = budget
        self.console = console
        self.title = title
        self.texts = ["" for _ in names]
        self.history: list[tuple[int, str]] = []
        self.passes = 0
        self.answer: str | None = None

    def update(self, event: Event) -> None:
        if isinstance(event, (Token, StepStarted, NudgeInserted, StepDiscarded)):
            self.texts[event.worker] += event.text
        elif isinstance(event, StepFinished):
            self.history.append((event.worker, event.text.strip()))
        elif isinstance(event, Pass):
            self.passes = event.forward_passes
        elif isinstance(event, AnswerFound):
            self.answer = event.answer
        elif isinstance(event, Done):
            self.passes = event.result.forward_passes

    def __rich__(self) -> Group:
        width, height = self.console.size
        n = len(self.names)
        column = max(10, (width - 3 * n - 1) // n)
        history_lines = 6 if self.history else 0
        body = max(4, height - history_lines - 12)  # title, table rules, history panel, progress, answer
        table = Table(expand=True, show_lines=False, padding=(0, 1))
        for i, name in enumerate(self.names):
            table.add_column(name, style=COLORS[i % len(COLORS)], ratio=1, overflow="fold")
        table.add_row(*(Text(_tail(text, column, body)) for text in self.texts))
        parts = [Text(self.title, style="bold"), table]
        if self.history:
            recent = self.history[-history_lines:]
            lines = Text()
            for worker, text in recent:
                lines.append(" ".join(text.split())[: width - 6] + "\n", COLORS[worker % len(COLORS)])
            parts.append(Panel(lines, title=f"shared history ({len(self.history)} steps)", title_align="left"))
        bar = Table.grid(expand=True)
        bar.add_column(ratio=1)
        bar.add_column(no_wrap=True)
        extra = self.passes - self.budget
        bar.add_row(
            ProgressBar(total=self.budget, completed=min(self.passes, self.budget)),
            f" {min(self.passes, self.budget)}/{self.budget} forward passes"
            + (f" + {extra} finisher" if extra > 0 else ""),
        )
        parts.append(bar)
        if self.answer is not None:
            parts.append(Text(f"answer: {self.answer}", style="bold green"))
        return Group(*parts)
