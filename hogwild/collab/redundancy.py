"""How much of what the workers write was already written: the redundancy of a run, and the repeated-step tests.

Redundancy: every n-gram of `N` consecutive tokens a worker writes counts once, when its last token is written. It
is redundant when the same n-gram already stood in the shared text at that moment: earlier in the worker's own
text, or in another worker's text written in an earlier forward pass (a row sees the others' tokens from the next
pass on). Only what the workers sampled counts: the prompt, headers and nudges the run inserts are no one's work.
A run's redundancy is the share of all its workers' n-grams that were redundant: 0 for text nobody wrote before,
1 for a copy. `SharedText` keeps the same count live while a run is written, for the repeat guard.

A step repeats earlier steps when at least a threshold share of its word 4-grams stands in them (or, for a step of
two or three words, all its words in order stand in one of them); it names the one that holds most. That
catches a step that says again, in other tokens, what a finished step said; the n-gram count catches a step that
copies text being written, or itself.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

N = 8  # tokens in an n-gram
WORDS = 4  # words in the repeated-step test's n-grams


class SharedText:
    """The n-grams the workers have written, each with where it first stood: (forward pass, worker, position).
    `add` reads the n-gram a worker's newest token completes and says whose text it already stood in."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.first: dict[tuple[int, ...], tuple[int, int, int]] = {}
        # the same n-grams by their first n - 1 tokens: prefix -> {last token: (forward pass, worker)}
        self.follows: dict[tuple[int, ...], dict[int, tuple[int, int]]] = {}

    def add(self, worker: int, written: Sequence[tuple[int, int]], end: int | None = None) -> int | None:
        """`written`: the worker's tokens as (forward pass, token id); `end`: the token just written (default the
        last) -> the worker whose text the n-gram it completes already stood in (itself included), or None: fresh
        (or no n-gram yet)."""
        end = len(written) - 1 if end is None else end
        if end < self.n - 1:
            return None
        at = written[end][0]
        gram = tuple(token for _, token in written[end - self.n + 1 : end + 1])
        first = self.first.setdefault(gram, (at, worker, end))
        if first == (at, worker, end):
            self.follows.setdefault(gram[:-1], {})[gram[-1]] = (at, worker)
            return None
        p, source, _ = first
        return source if p < at or source == worker else None  # the others' tokens show one pass later

    def copies(self, worker: int, written: Sequence[tuple[int, int]], at: int) -> tuple[int, ...]:
        """The tokens that would complete, after the worker's last n - 1 `written` tokens, an n-gram another worker
        wrote that the worker sees at forward pass `at` (the others' tokens show one pass later)."""
        if len(written) < self.n - 1:
            return ()
        found = self.follows.get(tuple(token for _, token in written[len(written) - self.n + 1 :]), {})
        return tuple(sorted(t for t, (p, source) in found.items() if source != worker and p < at))

    @classmethod
    def of(cls, workers: Sequence[Sequence[tuple[int, int]]], n: int = N) -> tuple[SharedText, list[list[int | None]]]:
        """The shared text of `workers` (each one's tokens as (forward pass, token id), in order), read in the
        order they were written, and for each token whose text the n-gram it completes already stood in."""
        shared = cls(n)
        found: list[list[int | None]] = [[] for _ in workers]
        for _, w, i in sorted((p, w, i) for w, written in enumerate(workers) for i, (p, _) in enumerate(written)):
            found[w].append(shared.add(w, workers[w], i))
        return shared, found


def redundancy(workers: Sequence[Sequence[tuple[int, int]]], n: int = N) -> tuple[float | None, list[float | None]]:
    """`workers`: each worker's sampled tokens as (forward pass, token id), in order -> (the run's share of redundant
    n-grams, each worker's share); None where a worker wrote fewer than `n` tokens."""
    return shares(SharedText.of(workers, n)[1], n)


def shares(found: Sequence[Sequence[int | None]], n: int = N) -> tuple[float | None, list[float | None]]:
    """The run's and each worker's share of redundant n-grams, from `SharedText` sources (a worker's first n - 1
    tokens complete none)."""
    counts = [(sum(s is not None for s in got), max(len(got) - n + 1, 0)) for got in found]
    each = [r / t if t else None for r, t in counts]
    total = sum(t for _, t in counts)
    return (sum(r for r, _ in counts) / total if total else None), each


def copied(found: Sequence[int | None], threshold: float, least: int) -> int | None:
    """Whose text a piece of writing copies (a worker index: itself included), when at least `threshold` of its
    `found` sources (at least `least` of them) name one; None otherwise."""
    if len(found) < least:
        return None
    named = Counter(s for s in found if s is not None)
    if sum(named.values()) < threshold * len(found):
        return None
    return named.most_common(1)[0][0]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[.,/][0-9]+)*|[=+\-*/$%]", text.lower())


def _grams(seq: list[str]) -> set[tuple[str, ...]]:
    return {tuple(seq[i : i + WORDS]) for i in range(len(seq) - WORDS + 1)}


def repeated(step: str, earlier: Sequence[str], threshold: float) -> int | None:
    """The index in `earlier` of the step that `step` repeats, or None when it repeats none: `step` repeats when at
    least `threshold` of its word 4-grams stand in the earlier steps (together); the one it repeats is the
    earlier step holding most of them (the latest on a tie)."""
    mine = words(step)
    if len(mine) < 2:
        return None  # a word alone says nothing
    if len(mine) < WORDS:
        phrase = f" {' '.join(mine)} "
        same = [i for i, text in enumerate(earlier) if phrase in f" {' '.join(words(text))} "]
        return same[-1] if same else None
    grams = _grams(mine)
    shared = [grams & _grams(words(text)) for text in earlier]
    if not shared or len(set().union(*shared)) < threshold * len(grams):
        return None
    most = max(len(found) for found in shared)
    return max(i for i, found in enumerate(shared) if len(found) == most)
