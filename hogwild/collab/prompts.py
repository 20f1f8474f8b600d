"""What the workers read: the collaboration prompt, step headers, the self-check nudge, the finisher.

All text here is hogwild's own. The prompt tells N named workers that they share one scratchpad and see each
other's work as it is written, that they should split the work, avoid repeating each other, check each other, and
that one of them writes the final answer as \\boxed{...}. The engine also writes a few lines for the workers: the
openings of their first steps, the parts it assigns them, the self-check question, the nudge after a repeated
step, and Skeleton-of-Thought's outline, expansion and answer cues. Formatting presets say how a model family
wraps it (chat template or plain text, and whether the reply opens a `<think>` block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hogwild.errors import HogwildError

NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi",
    "Ivan", "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
)  # fmt: skip
MAX_WORKERS = len(NAMES)

HISTORY_TITLE = "### Finished steps\n\n"
OTHERS_TITLE = "### Work in progress (others)\n\n"
OWN_TITLE = "### Work in progress (yours)\n\n"
SELF_CHECK = "Quick check: am I doing redundant work? (yes/no):"  # answered with one word (see masks.ANSWERS)
OPENINGS = ("crosscheck", "plan", "paper", "symmetric")


def header(name: str, step: int) -> str:
    """Opens every step a worker writes, e.g. `**Alice [3]:** `."""
    return f"**{name} [{step}]:** "


def finisher(name: str, parts: int = 1) -> str:
    """Asks for the answer now, once the budget is spent (all `parts` answers of a multi-part problem)."""
    return f"\n\n**{name} [final]:** We are out of time. Based on the work above, {_final(parts)} \\boxed{{"


def _final(parts: int) -> str:
    if parts == 1:
        return "the final answer is"
    return f"the {parts} final answers, in order and separated by semicolons, are"


def opening(kind: str, names: list[str], me: int, parts: int = 1) -> str:
    """What the engine writes after worker `me`'s first header (`parts`: the problem's independent questions).
    `plan`: the first worker proposes how to split the work; the others introduce themselves and wait until that
    step is finished, then follow it (`plan_follow`); `paper`: the Hogwild! paper's openers (the first worker
    proposes, the others start at once); `symmetric` and `crosscheck` (every worker solves the whole problem
    apart, as a lone worker would): nothing."""
    if kind == "plan":
        if me == 0:
            if parts == 1:
                return f"Hi, I'm {names[0]}. Here is how we split the work: I"
            return f"Hi, I'm {names[0]}. Here is how we split the {parts} problems: I take problem"
        return f"Hi, I'm {names[me]}."  # then it waits for the plan (plan_follow)
    if kind == "paper":
        return f"Hi, I'm {names[0]}. Here's how we can" if me == 0 else f"Hi, I'm {names[me]}."
    return ""


def plan_follow(names: list[str], me: int) -> str:
    """What the engine writes for a waiting worker once the first worker's plan is finished."""
    return f" {names[0]}'s plan gives me"


def assigned(workers: int, me: int, parts: int) -> list[int]:
    """The parts (1-based) worker `me` takes when the engine splits `parts` parts: consecutive runs, as even as
    they go (a model that finishes one part goes on to the next one in order: then that one is its own)."""
    size, extra = divmod(parts, workers)
    start = me * size + min(me, extra)
    return list(range(start + 1, start + size + (me < extra) + 1))


def _listed(numbers: list[int]) -> str:
    words = [str(n) for n in numbers]
    if len(words) == 1:
        return f"problem {words[0]}"
    return "problems " + ", ".join(words[:-1]) + f" and {words[-1]}"


def assignment(names: list[str], me: int, parts: int) -> str:
    """Worker `me`'s first line when the engine splits a problem of `parts` parts."""
    taken = [assigned(len(names), w, parts) for w in range(len(names))]
    others = "; ".join(f"{names[w]} takes {_listed(taken[w])}" for w in range(len(names)) if w != me and taken[w])
    if not taken[me]:
        return f"Every problem is taken ({others}), so I check their answers as they come."
    return f"I take {_listed(taken[me])}" + (f" ({others})" if others else "") + f". Problem {taken[me][0]}:"


def part_texts(problem: str, parts: int) -> list[str] | None:
    """The statements of a problem's `parts` parts when it lists them as `Problem 1: ...`, `Problem 2: ...` in
    order (the last one ends at the first blank line after it, where instructions may follow), else None."""
    pieces = re.split(r"(?:^|(?<=\s))Problem (\d+):[ \t]*", problem)
    numbers = [int(n) for n in pieces[1::2]]
    if numbers != list(range(1, parts + 1)):
        return None
    texts = [text.strip() for text in pieces[2::2]]
    texts[-1] = texts[-1].split("\n\n", 1)[0].strip()
    return texts if all(texts) else None


def next_part(part: int, headed: bool) -> str:
    """What the engine writes when a worker with assigned parts has answered one and goes on to its next `part`:
    after a step header, or (no header) after the answer it just wrote."""
    return f"Problem {part}:" if headed else f"\n\nProblem {part}:"


def taken_part(owner: str, part: int, headed: bool) -> str:
    """What the engine writes when a worker that has answered its own parts takes `part`, which `owner` had not
    begun: after a step header, or (no header) after the answer it just wrote."""
    text = f"My problems are done, so I take problem {part} from {owner}. Problem {part}:"
    return text if headed else f"\n\n{text}"


def repeat_nudge(names: list[str], me: int, worker: int, step: int | None, mine: list[int] = ()) -> str:
    """Opens a step again after worker `me`'s last try repeated step `step` of `worker`, or (no step) copied the
    text `worker` was writing (its own: it went in circles); `mine`: the parts the engine gave it that it has still
    to answer, if any."""
    onward = f"Back to my own {_listed(list(mine))}:" if mine else "Moving on to a part nobody has done yet:"
    if step is not None:
        who = "I" if worker == me else names[worker]
        return f"Wait, {who} already wrote that in {names[worker]} [{step}]. {onward}"
    if worker == me:
        return f"Wait, I am repeating myself. {onward}"
    return f"Wait, {names[worker]} is already doing this. {onward}"


def discarded(names: list[str], me: int, worker: int, step: int | None) -> str:
    """Closes, in a worker's transcript, a step that was not taken (it never reached the shared cache)."""
    if step is not None:
        return f"[not taken: it repeats {names[worker]} [{step}]]\n\n"
    return "[not taken: it repeats itself]\n\n" if worker == me else f"[not taken: it copies {names[worker]}]\n\n"


def collaboration_prompt(problem: str, names: list[str], parts: int = 1, assign: bool = False) -> str:
    """The prompt every worker reads (one worker: the lone worker's, which cross-check workers read too);
    `assign`: the engine splits the problem's `parts` between the workers."""
    if assign and len(names) > 1:
        return assigned_prompt(problem, names)
    if len(names) == 1:
        return (
            f"Solve the problem below. Think step by step, check your work, and write the final answer as "
            f"\\boxed{{...}}.\n\nProblem: {problem}"
        )
    team = ", ".join(names[:-1]) + f" and {names[-1]}"
    split = "the problems" if parts > 1 else "the work"
    return (
        f"You are one of {len(names)} assistants ({team}) solving one problem together. You all write at the same "
        "time into one shared scratchpad and can read each other's work as it is being written.\n\n"
        "How the scratchpad works:\n"
        f"- '{HISTORY_TITLE.strip()}' holds the steps everyone has finished, in the order they were finished.\n"
        f"- '{OTHERS_TITLE.strip()}' shows what the others are writing right now; it keeps growing while you write.\n"
        f"- '{OWN_TITLE.strip()}' is your own current step. Each step starts with a header like "
        f"{header(names[0], 1).strip()}\n\n"
        "How to work together:\n"
        f"- Split {split}: each of you takes a different part. {names[0]} proposes the split first; follow it.\n"
        "- Never write again what is already written, by you or anyone: use it and go on to what is still missing.\n"
        "- Do not copy the problem's text: start calculating right away.\n"
        "- Each step is a paragraph of real progress: several sentences of reasoning and calculation.\n"
        "- Check each other's results when a part is done, and say so when you find a mistake.\n"
        "- When every part is done, one of you writes the final answer as \\boxed{...}.\n\n"
        f"Problem: {problem}"
    )


def assigned_prompt(problem: str, names: list[str]) -> str:
    """The prompt of a multi-part problem whose parts the engine splits: the lone worker's instructions (a small
    model solves a problem best the way it would alone), then the split: each worker solves its own parts one after
    another, each answer in a \\boxed{} of its own (the engine reads them, one per part, and puts them together)."""
    team = ", ".join(names[:-1]) + f" and {names[-1]}"
    return (
        "Solve the problems below. Think step by step, check your work, and write each problem's final answer as "
        f"\\boxed{{...}}.\n\n{problem}\n\n"
        f"You are one of {len(names)} assistants ({team}) who solve these problems together, at the same time. "
        "The first line of your work names your problems: solve only those, one after another, each ending with "
        "its answer in a \\boxed{}."
    )


def reconcile(answers: list[str]) -> str:
    """What the engine writes to open the cross-check step when the solutions above, written apart, boxed
    different `answers` (in the order they stand): the model reads them as its own attempts."""
    found = ", ".join(answers[:-1]) + f" and {answers[-1]}"
    return (
        f"I solved this problem {_times(len(answers))} above and got different answers: {found}. Let me check each "
        "solution step by step to find the mistake, then give the right answer as \\boxed{...}.\n\n"
    )


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def sot_prompt(problem: str, points: int) -> str:
    """Skeleton-of-Thought's first pass: an outline of `points` independent points, nothing solved yet."""
    return (
        f"Write only the skeleton of a solution to the problem below: exactly {points} numbered points, one short "
        "line each, each an independent part of the work that can be done on its own. Do not solve anything yet."
        f"\n\nProblem: {problem}"
    )


def sot_expand(point: int) -> str:
    """What the engine writes before a Skeleton-of-Thought worker expands its point."""
    return f"\n\nNow I work out point {point} of the skeleton, and only that point, in full:\n"


def sot_answer(parts: int = 1) -> str:
    """What the engine writes before the last pass of Skeleton-of-Thought answers."""
    return f"\n\nPutting all the points together, {_final(parts)}"


def groupthink_prompt(problem: str, names: list[str], me: int) -> tuple[str, str]:
    """(shared prompt, private prompt of thinker `me`) for Group Think."""
    shared = (
        f"{len(names)} thinkers ({', '.join(names)}) reason about one problem at the same time. Each sees every "
        "other thinker's words token by token as they are written, and adapts: no one repeats what another is "
        "already doing. One of them writes the final answer as \\boxed{...}.\n\n"
        f"Problem: {problem}"
    )
    private = f"\n\nYou are {names[me]}. Your thoughts:\n"
    return shared, private


@dataclass(frozen=True)
class Format:
    """How a model family wraps the prompt: its chat template or plain text, and a reply opening."""

    chat: bool = True
    reply_prefix: str = ""  # text the assistant turn starts with, e.g. "<think>\n" for reasoning models

    def __post_init__(self) -> None:
        if not self.chat and self.reply_prefix:
            raise HogwildError("a reply prefix needs the chat format")


FORMATS = {
    "chat": Format(),
    "think": Format(reply_prefix="<think>\n"),
    "plain": Format(chat=False),
}
FAMILY_FORMATS = {"llama": "chat", "mistral": "chat", "qwen2": "chat", "qwen3": "think"}


def format_for(family: str, name: str | None = None) -> Format:
    """The preset named `name`, or the family's default."""
    name = name or FAMILY_FORMATS.get(family, "chat")
    if name not in FORMATS:
        raise HogwildError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
