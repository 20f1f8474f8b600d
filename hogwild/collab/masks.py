"""Token masks for the workers' sampling: what a worker may not write while it writes a step, and the two words it
may answer a self-check question with.

A worker that writes the scratchpad's own structure forges it: a `### Work in progress` title or a `**Bob [4]:**`
header inside a step reads, to everyone after, as a section or a step that is not there, and small models copy
what they see. So while workers write, tokens that open markup (`#` first, after any spaces), every special token
(the end of a turn, `<think>` and `</think>` included), bold text or a rule opening a line (`**`, where headers
start; `---`, which a model kept from `#` headings writes instead, over and over) and, right after a `*`, a
worker's name (in any case) are never drawn. The sets are read once per tokenizer from its decoded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from hogwild.model.tokenizer import Tokenizer

ANSWERS = (" yes", " no", " Yes", " No")  # what a self-check question, ending in "(yes/no):", may be answered


@dataclass(frozen=True)
class Masks:
    forging: tuple[int, ...]  # never drawn while a worker writes a step
    line_start: tuple[int, ...]  # also never drawn at a line's start: bold (a forged header's start) and rules
    after_star: tuple[int, ...]  # also never drawn right after a `*`: the names that would start a forged header
    answers: tuple[int, ...]  # the only tokens a self-check question may be answered with


_vocab: dict[int, list[str]] = {}  # id(tokenizer backend) -> every token id's text


def _texts(tokenizer: Tokenizer) -> list[str]:
    key = id(tokenizer.backend)
    if key not in _vocab:
        ids = [[i] for i in range(tokenizer.vocab_size)]
        _vocab[key] = tokenizer.backend.decode_batch(ids, skip_special_tokens=False)
    return _vocab[key]


def masks(tokenizer: Tokenizer, names: list[str], eos_ids: set[int], vocab: int) -> Masks:
    """The masks for a run whose workers are `names`, over a model's `vocab` logits."""
    texts = _texts(tokenizer)[:vocab]
    added = tokenizer.backend.get_added_tokens_decoder().items()
    special = {i for i, token in added if token.special and i < vocab} | {i for i in eos_ids if i < vocab}
    forging = sorted(special | {i for i, text in enumerate(texts) if text.lstrip().startswith("#")})
    line_start = sorted(i for i, text in enumerate(texts) if text.lstrip(" \t").startswith(("**", "---", "===")))
    lowered = [name.lower() for name in names]
    after_star = sorted(
        i for i, text in enumerate(texts) if text.strip() and any(text.lstrip().lower().startswith(n) for n in lowered)
    )
    answers = sorted({ids[0] for ids in (tokenizer.encode(a, add_special_tokens=False) for a in ANSWERS) if ids})
    return Masks(tuple(forging), tuple(line_start), tuple(after_star), tuple(answers))
