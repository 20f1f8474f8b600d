"""Reading the workers' text: where a step may end, and the final answer in \\boxed{...}."""

from __future__ import annotations

import re

_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*$")
# a line ending like this is still going: a list opener, an operator, a comma, a dangling conjunction
_UNFINISHED = re.compile(r"([,;:(\[{=+\-*/\\&^<>]|\b(and|or|but|so|then|the|a|an|of|to|with|is|are|by))$", re.I)


def open_block(text: str) -> bool:
    """True while `text` is inside a code block or a math block (display or inline)."""
    if text.count("```") % 2:
        return True
    if text.count("$$") % 2 or text.count("\\[") > text.count("\\]") or text.count("\\(") > text.count("\\)"):
        return True
    # a `$` before a digit is money ("costs $5"), not math, in the word problems small models solve
    single_dollars = re.sub(r"\$(?=\d)", "", text.replace("\\$", "").replace("$$", "")).count("$")
    return single_dollars % 2 == 1


def step_ends(text: str, force: bool = False) -> bool:
    """A step ends at a paragraph break after a finished sentence, never inside an open code or math block.

    A sentence counts as finished unless its last line visibly goes on: it ends in a comma, a colon, an operator,
    an opening bracket or a dangling conjunction. Small models often end a line of arithmetic without a period.

    With `force` (an over-long step), any line break outside a code or math block will do."""
    stripped = text.rstrip()
    if not stripped or open_block(stripped):
        return False
    if force:
        return text.endswith("\n")
    return bool(_PARAGRAPH_END.search(text)) and not _UNFINISHED.search(stripped)


def boxed_answers(text: str) -> list[str]:
    """Contents of every complete \\boxed{...} in `text`, in order (nested braces allowed); an empty box or the
    prompt's own placeholder `\\boxed{...}` copied by a worker is no answer."""
    found, start = [], text.find("\\boxed{")
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        content = text[start + len("\\boxed{") : i - 1].strip()
        if depth == 0 and content.strip(".… ") != "":  # `\\boxed{...}` is the prompt's placeholder, no answer
            found.append(content)
        start = text.find("\\boxed{", start + 1)
    return found


def boxed_answer(text: str, parts: int = 1) -> str | None:
    """Content of the last complete \\boxed{...} in `text` that holds `parts` answers (see `split_answer`), or
    None."""
    for content in reversed(boxed_answers(text)):
        if parts == 1 or split_answer(content, parts) is not None:
            return content
    return None


def split_answer(answer: str, k: int) -> list[str] | None:
    """k answers written in one box, separated by semicolons (or by commas or line breaks when that gives exactly k
    parts); None when the box does not hold k."""
    parts = [p.strip() for p in answer.split(";")]
    if len(parts) != k:
        parts = [p.strip() for p in re.split(r",\s+|\s*\n\s*", answer)]
    return parts if len(parts) == k and all(parts) else None
