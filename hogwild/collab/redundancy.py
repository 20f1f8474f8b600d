"""How much of what the workers write was already written: the redundancy of a run, and the repeated-step test.

Redundancy: every n-gram of `N` consecutive tokens a worker writes counts once, when its last token is written. It
is redundant when the same n-gram already stood in the shared text at that moment: earlier in the worker's own
text, or in another worker's text written in an earlier forward pass (a row sees the others' tokens from the next
pass on). Only what the workers sampled counts: the prompt, headers and nudges the run inserts are no one's work.
A run's redundancy is the share of all its workers' n-grams that were redundant: 0 for text nobody wrote before,
1 for a copy.

A step repeats earlier steps when at least a threshold share of its word 4-grams stands in them (or, for a step of
fewer than four words, all its words in order stand in one of them); it names the one that holds most. A step
goes in circles when the 4-grams of its last words stand earlier in the step itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

N = 8  # tokens in an n-gram
WORDS = 4  # words in the repeated-step test's n-grams


def redundancy(workers: Sequence[Sequence[tuple[int, int]]], n: int = N) -> tuple[float | None, list[float | None]]:
    """`workers`: each worker's sampled tokens as (forward pass, token id), in order -> (the run's share of redundant
    n-grams, each worker's share); None where a worker wrote fewer than `n` tokens."""
    by_pass: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for w, written in enumerate(workers):
        ids = [token for _, token in written]
        for end in range(n - 1, len(ids)):
            by_pass.setdefault(written[end][0], []).append((w, tuple(ids[end - n + 1 : end + 1])))
    seen: set[tuple[int, ...]] = set()
    counts = [[0, 0] for _ in workers]  # [redundant, all] per worker
    for p in sorted(by_pass):
        grams = by_pass[p]
        for w, gram in grams:
            counts[w][0] += gram in seen
            counts[w][1] += 1
        seen.update(gram for _, gram in grams)  # the others see this pass's tokens from the next pass on
    shares = [r / t if t else None for r, t in counts]
    total = sum(t for _, t in counts)
    return (sum(r for r, _ in counts) / total if total else None), shares


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[.,/][0-9]+)*|[=+\-*/$%]", text.lower())


def _grams(seq: list[str]) -> set[tuple[str, ...]]:
    return {tuple(seq[i : i + WORDS]) for i in range(len(seq) - WORDS + 1)}


def repeated(step: str, earlier: Sequence[str], threshold: float) -> int | None:
    """The index in `earlier` of the step that `step` repeats, or None when it repeats none: `step` repeats when at
    least `threshold` of its word 4-grams stand in the earlier steps (together); the one it repeats is the
    earlier step holding most of them (the latest on a tie)."""
    mine = words(step)
    if not mine:
        return None
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


def looping(step: str, threshold: float, window: int = 32) -> bool:
    """Whether `step` goes in circles: at least `threshold` of the word 4-grams in its last `window` words stand
    earlier in the step itself."""
    mine = words(step)
    if len(mine) < 2 * window:
        return False
    first: dict[tuple[str, ...], int] = {}
    for i in range(len(mine) - WORDS + 1):
        first.setdefault(tuple(mine[i : i + WORDS]), i)
    tail = range(len(mine) - window, len(mine) - WORDS + 1)
    again = sum(first[tuple(mine[i : i + WORDS])] < i for i in tail)
    return again >= threshold * len(tail)
