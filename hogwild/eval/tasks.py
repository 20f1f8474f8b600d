"""Tasks: the problems an evaluation runs, each with its question text and gold answer(s).

`gsm8k` reads GSM8K's JSONL (`question`, `answer` with the gold number after `#### `; a 20-problem sample ships in
`hogwild/eval/data/`), `gsm8k-multi` puts k consecutive GSM8K problems in one prompt and wants all k answers (the
Hogwild! paper's synthetic task, whose work splits naturally between workers; scored per question, with the
all-k-right figure beside it; its problems come from the shared GSM8K split `../shared/data/gsm8k/test_dev.jsonl`
beside the checkout when there is one, else from the sample), `arithmetic` makes seeded
procedural expressions whose size grows with the difficulty, and `jsonl` reads any math set from a local file with
the two field names given. Every problem asks for its final answer in \\boxed{}; the collaboration prompt says so too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from hogwild.errors import HogwildError

TASKS = ("gsm8k", "gsm8k-multi", "arithmetic", "jsonl")
SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test_dev.jsonl"


@dataclass(frozen=True)
class TaskConfig:
    name: str = "gsm8k"
    data: str | None = None  # JSONL file; None: default_data(name)
    limit: int = 0  # problems at most, the first ones of the file (or of the seeded sequence); 0: all
    k: int = 5  # gsm8k-multi: problems per prompt
    difficulty: int = 1  # arithmetic: 1 (three small operands) and up
    arithmetic_problems: int = 100  # arithmetic: problems generated when no --limit is given
    seed: int = 0  # arithmetic: which problems
    question_field: str = "question"  # jsonl
    answer_field: str = "answer"  # jsonl

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise HogwildError(f"unknown task {self.name!r}: choose one of {', '.join(TASKS)}")
        if self.limit < 0:
            raise HogwildError(f"--limit must be >= 0, got {self.limit}")
        if self.k < 1:
            raise HogwildError(f"--k must be >= 1, got {self.k}")
        if self.difficulty < 1:
            raise HogwildError(f"--difficulty must be >= 1, got {self.difficulty}")
        if self.name == "jsonl" and self.data is None:
            raise HogwildError("--task jsonl needs --data PATH")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # what the model is asked, the answer format included
    golds: tuple[str, ...]  # one gold answer, or k for gsm8k-multi

    @property
    def parts(self) -> int:
        """Questions in the problem, each scored on its own."""
        return len(self.golds)


BOXED = "Give the final answer in \\boxed{}."


def load(config: TaskConfig) -> list[Problem]:
    """The task's problems, at most `config.limit` of them."""
    limit = config.limit or None
    if config.name == "arithmetic":
        return arithmetic(config.difficulty, config.seed, limit or config.arithmetic_problems)
    path = Path(config.data) if config.data else default_data(config.name)
    if config.name == "jsonl":
        rows = read_jsonl(path, config.question_field, config.answer_field)
        return [
            Problem(f"{path.stem}-{i}", f"{question}\n\n{BOXED}", (gold,))
            for i, (question, gold) in enumerate(rows[:limit])
        ]
    rows = [(q, gsm8k_gold(a, path, i)) for i, (q, a) in enumerate(read_jsonl(path, "question", "answer"))]
    if config.name == "gsm8k":
        return [Problem(f"gsm8k-{i}", f"{q}\n\n{BOXED}", (gold,)) for i, (q, gold) in enumerate(rows[:limit])]
    groups = [rows[i : i + config.k] for i in range(0, len(rows) - config.k + 1, config.k)][:limit]
    if not groups:
        raise HogwildError(f"{path} has {len(rows)} problems, fewer than --k {config.k}")
    return [multi(f"gsm8k-multi{config.k}-{g}", group) for g, group in enumerate(groups)]


def default_data(task: str) -> Path:
    """The dataset a task reads when no --data is given."""
    return SHARED if task == "gsm8k-multi" and SHARED.is_file() else SAMPLE


def read_jsonl(path: Path, question_field: str, answer_field: str) -> list[tuple[str, str]]:
    """(question, answer) per line of a JSONL file; a missing file or a malformed line is one clear error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise HogwildError(f"no dataset file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HogwildError(f"cannot read the dataset {path}: {e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise HogwildError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise HogwildError(f"{path}:{number}: a line must be a JSON object")
        for field in (question_field, answer_field):
            if field not in row:
                raise HogwildError(f"{path}:{number}: no {field!r} field (it has {', '.join(map(repr, row))})")
        question, answer = row[question_field], row[answer_field]
        if not isinstance(question, str) or not question.strip():
            raise HogwildError(f"{path}:{number}: {question_field!r} must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise HogwildError(f"{path}:{number}: {answer_field!r} must be a non-empty string or a number")
        rows.append((question.strip(), str(answer).strip()))
    if not rows:
        raise HogwildError(f"{path} holds no problems")
    return rows


def gsm8k_gold(answer: str, path: Path, index: int) -> str:
    if "####" not in answer:
        raise HogwildError(f"{path}: problem {index + 1}: its answer has no '#### ' line with the gold number")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def multi(id: str, group: list[tuple[str, str]]) -> Problem:
    """One prompt of k problems. Its format line shows no example box: small models copy one as their answer."""
    k = len(group)
    parts = "\n\n".join(f"Problem {i + 1}: {q}" for i, (q, _) in enumerate(group))
    question = (
        f"Solve all {k} problems below.\n\n{parts}\n\nAt the end, give all {k} final answers in one \\boxed{{}}, "
        "in order and separated by semicolons."
    )
    return Problem(id, question, tuple(gold for _, gold in group))


def arithmetic(difficulty: int, seed: int, count: int) -> list[Problem]:
    """`count` seeded expressions of difficulty + 2 integer operands in [1, 10 * difficulty] with +, - and *,
    some parenthesized: difficulty 1 is `a + b * c`-sized."""
    problems = []
    for i in range(count):
        rng = random.Random(f"arithmetic:{difficulty}:{seed}:{i}")
        top = 10 * difficulty
        expr = str(rng.randint(1, top))
        for _ in range(difficulty + 1):
            if rng.random() < 0.3 and any(op in expr for op in "+-"):
                expr = f"({expr})"
            expr += f" {rng.choice('+-*')} {rng.randint(1, top)}"
        value = eval(expr, {"__builtins__": {}})  # noqa: S307 - our own string of digits, + - * and parentheses
        problems.append(Problem(f"arithmetic{difficulty}-{seed}-{i}", f"Compute {expr}.\n\n{BOXED}", (str(value),)))
    return problems
