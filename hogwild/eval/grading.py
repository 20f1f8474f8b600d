"""Grading: read the final answer out of a model's text and decide whether it equals the gold answer.

`extract_answer` takes the last complete `\\boxed{...}`, else what follows "the answer is", else the last number (for
a problem of k questions: the last box that holds k answers, else the last k boxes).
`grade` counts an answer right when math-verify shows it equal to the gold (LaTeX, fractions, percentages,
equations, symbolic equality) or when both are plainly the same number (commas, dollar signs, units, `\\text{}` and
trailing words stripped, which math-verify reads as symbols), so "$1,000.00", "1000 dollars" and "\\frac{2000}{2}"
all equal a gold "1000". An answer that leaves arithmetic undone ("2 + 3 * 4") never equals a numeric gold,
though math-verify would evaluate it. The numeric comparison is tried first because it is instant.
math-verify's own timeouts use `signal.alarm`, which only works in a process's main thread, so they are disabled;
it runs instead in one helper process of its own that is killed and restarted when a comparison takes longer than
`timeout_s` (sympy can hang on adversarial input).
Without math-verify installed (it is the `eval` extra), only the numeric comparison runs.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

from hogwild.collab.text import boxed_answer, boxed_answers, split_answer

VERIFY_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0  # the helper imports hogwild (torch) and math-verify before its first comparison

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE)
_LAST_NUMBER = re.compile(_NUMBER)
_FRAC = re.compile(r"^\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}$")
_PLAIN_FRACTION = re.compile(r"^(-?\d+)\s*/\s*(\d+)$")
_MIXED = re.compile(r"^(-?\d+)\s+(\d+)\s*/\s*(\d+)$")
# arithmetic left undone: a +, *, x or a minus between two numbers (a fraction's slash is a number's own)
_UNEVALUATED = re.compile(r"\d\s*(?:[-+*×÷]|\\times|\\cdot|\\div)\s*\(?\s*-?\d")
_DECIMAL = re.compile(r"^-?(?:\d+(?:,\d{3})*|\d+)?(?:\.\d+)?$")


def extract_answer(text: str, parts: int = 1) -> str | None:
    """The final answer in `text`: the last complete \\boxed{}, else what follows "the answer is", else the last
    number; None when there is none. With `parts` > 1: the last box holding that many answers, else the last
    `parts` boxes joined by semicolons, else as for one."""
    if parts > 1:
        whole = boxed_answer(text, parts)
        boxes = boxed_answers(text)
        if whole is not None or len(boxes) >= parts:
            return whole if whole is not None else "; ".join(boxes[-parts:])
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip()
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(text: str) -> Fraction | None:
    """The number `text` writes, if it writes one and nothing else but decoration: currency, thousands commas,
    `\\text{...}`/words of units, a percent sign, `$` math delimiters, a trailing period. Fractions (1/2,
    \\frac{1}{2}), mixed numbers (1 1/2) and negatives (-3, −3) count."""
    s = text.strip()
    s = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: " " + (m.group(1) or m.group(2) or ""), s)
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").replace("−", "-")
    s = s.replace("\\%", "").replace("%", "").replace("{,}", ",")
    s = re.sub(r"^\\left\(|\\right\)$", "", s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # x = 5
    s = s.rstrip(".").strip()
    # units and words after the number, currency words before it: keep the numeric part when it is the only one
    m = re.fullmatch(rf"(?:[A-Za-z€£¥]+\s*)?({_NUMBER}(?:\s*/\s*\d+)?|\\[dt]?frac\{{[^{{}}]*\}}\{{[^{{}}]*\}})"
                     r"(?:\s*[A-Za-z][A-Za-z .'/²³^0-9-]*)?", s)  # fmt: skip
    if m is None:
        m2 = _MIXED.fullmatch(s)
        if m2:
            whole, num, den = (int(g) for g in m2.groups())
            if den == 0:
                return None
            sign = -1 if whole < 0 else 1
            return Fraction(whole) + sign * Fraction(num, den)
        return None
    s = m.group(1).replace(" ", "")
    frac = _FRAC.match(s)
    if frac:
        try:
            num, den = Fraction(frac.group(1)), Fraction(frac.group(2))
        except ValueError:
            return None
        return num / den if den else None
    plain = _PLAIN_FRACTION.match(s)
    if plain:
        den = int(plain.group(2))
        return Fraction(int(plain.group(1)), den) if den else None
    if not _DECIMAL.match(s) or s in ("", "-"):
        return None
    if "," in s and not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        return None  # 1,2 is a list, not a number
    return Fraction(s.replace(",", ""))


def answer_key(answer: str | None) -> object:
    """What two answers share when they say the same: the number they write, else the stripped text; None for no
    answer (a vote counts, and a cross-check compares, answers by it)."""
    if answer is None or not answer.strip():
        return None
    number = to_number(answer)
    return number if number is not None else answer.strip()


def numbers_equal(answer: str, gold: str) -> bool:
    a, g = to_number(answer), to_number(gold)
    if a is None or g is None:
        return False
    return a == g or abs(a - g) <= Fraction(1, 10**6) * max(1, abs(g))


class _Verifier:
    """math-verify in a helper process (JSON lines over its stdin and stdout): `equal(answer, gold)` -> True,
    False, or None (timed out, or math-verify unavailable)."""

    def __init__(self, timeout_s: float, code: str = "from hogwild.eval.grading import serve; serve()") -> None:
        self.timeout_s = timeout_s
        self.code = code  # what the helper runs: `serve()`, or a stand-in in tests
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.available: bool | None = None  # None: not known yet

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        if self._read(STARTUP_TIMEOUT_S) != "ready":
            self.stop()
            self.available = False  # it cannot start here: grade numerically from now on

    def _read(self, timeout_s: float) -> str | None:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def equal(self, answer: str, gold: str) -> bool | None:
        if self.available is None:
            self.available = importlib.util.find_spec("math_verify") is not None
        if not self.available:
            return None
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            if self.process is None:
                return None
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps([answer, gold]) + "\n")
            self.process.stdin.flush()
            verdict = self._read(self.timeout_s)
            if verdict is None:
                self.stop()  # stuck in sympy (or gone): kill it, the next comparison starts a fresh one
            return verdict


def serve() -> None:
    """The helper process: compare [answer, gold] pairs read from stdin with math-verify, one verdict a line."""
    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off: we enforce our own
    from math_verify import parse, verify

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        answer, gold = json.loads(line)
        try:
            parsed_gold = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
            parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
            verdict = bool(parsed_gold and parsed and verify(parsed_gold, parsed, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - a parse or compare error means "not shown equal"
            verdict = False
        print(json.dumps(verdict), flush=True)


_verifier = _Verifier(VERIFY_TIMEOUT_S)
atexit.register(_verifier.stop)


def set_timeout(seconds: float) -> None:
    _verifier.timeout_s = seconds


def grade(answer: str | None, gold: str) -> bool:
    """Whether `answer` (already extracted) equals `gold`: math-verify, else the numeric comparison."""
    if answer is None or not answer.strip():
        return False
    if numbers_equal(answer, gold):
        return True
    if to_number(gold) is not None and _UNEVALUATED.search(answer):
        return False  # "\\boxed{2 + 3 * 4}" restates the question; math-verify would evaluate it to the gold
    return bool(_verifier.equal(answer, gold))


def grade_parts(answer: str | None, golds: list[str]) -> int:
    """How many of `golds` `answer` gets right, in order (a problem of several questions; one gold: 0 or 1)."""
    if answer is None:
        return 0
    if len(golds) == 1:
        return int(grade(answer, golds[0]))
    parts = split_answer(answer, len(golds))
    return 0 if parts is None else sum(grade(p, g) for p, g in zip(parts, golds, strict=True))


def grade_all(answer: str | None, golds: list[str]) -> bool:
    """Whether `answer` holds all of `golds`, in order (the multi-problem task)."""
    return grade_parts(answer, golds) == len(golds)
