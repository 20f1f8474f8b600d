"""What the workers read: the collaboration prompt, step headers, the self-check nudge, the finisher.

All text here is hogwild's own. The prompt tells N named workers that they share one scratchpad and see each
other's work as it is written, that they should split the work, avoid repeating each other, check each other, and
that one of them writes the final answer as \\boxed{...}. Formatting presets say how a model family wraps it (chat
template or plain text, and whether the reply opens a `<think>` block).
"""

from __future__ import annotations

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
SELF_CHECK = "Quick check: is someone else already doing what I am doing? (yes/no): "


def header(name: str, step: int) -> str:
    """Opens every step a worker writes, e.g. `**Alice [3]:** `."""
    return f"**{name} [{step}]:** "


def finisher(name: str) -> str:
    """Asks for the answer now, once the budget is spent."""
    return f"\n\n**{name} [final]:** We are out of time. Based on the work above, the final answer is \\boxed{{"


def collaboration_prompt(problem: str, names: list[str]) -> str:
    if len(names) == 1:
        return (
            f"Solve the problem below. Think step by step, check your work, and write the final answer as "
            f"\\boxed{{...}}.\n\nProblem: {problem}"
        )
    team = ", ".join(names[:-1]) + f" and {names[-1]}"
    return (
        f"You are one of {len(names)} assistants ({team}) solving one problem together. You all write at the same "
        "time into one shared scratchpad and can read each other's work as it is being written.\n\n"
        "How the scratchpad works:\n"
        f"- '{HISTORY_TITLE.strip()}' holds the steps everyone has finished, in the order they were finished.\n"
        f"- '{OTHERS_TITLE.strip()}' shows what the others are writing right now; it keeps growing while you write.\n"
        f"- '{OWN_TITLE.strip()}' is your own current step. Each step starts with a header like "
        f"{header(names[0], 1).strip()}\n\n"
        "How to work together:\n"
        "- Split the work: take a part nobody has taken yet, or try a different approach from the others.\n"
        "- Do not repeat what someone else has already done or is doing; build on it instead.\n"
        "- Check each other's results and say so when you find a mistake.\n"
        "- Keep steps short: a few sentences, then a blank line.\n"
        "- When the team agrees, one of you writes the final answer as \\boxed{...}.\n\n"
        f"Problem: {problem}"
    )


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
