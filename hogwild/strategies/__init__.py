"""The strategies, each defined once and registered here by name: `single`, `hogwild:N`, `groupthink:N`, `sot:N`
(one `Collaboration` each, `strategies/collaborations.py`), `vote:N` and `best:N` (independent samples,
`strategies/samples.py`). What a strategy is: `strategies/base.py`. The CLI's choices and help, `hogwild.solve`,
the server's `mode` field and model card (which the web page reads) and the evaluation all take the list from
here, so a strategy registered with `register` is available to all of them.
"""

from __future__ import annotations

from hogwild.collab import prompts
from hogwild.errors import HogwildError
from hogwild.strategies.base import Point, Reader, Spec, Strategy
from hogwild.strategies.collaborations import GROUPTHINK, HOGWILD, SINGLE, SOT
from hogwild.strategies.samples import BEST, VOTE

__all__ = [
    "REGISTRY",
    "Point",
    "Reader",
    "Spec",
    "Strategy",
    "get",
    "help_text",
    "parse",
    "register",
    "served",
    "served_names",
]

REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Make `strategy` available everywhere by its name; a name taken already is an error."""
    if not strategy.name or not strategy.name.isidentifier():
        raise HogwildError(f"a strategy's name must be a word, got {strategy.name!r}")
    if strategy.name in REGISTRY:
        raise HogwildError(f"a strategy named {strategy.name!r} is registered already")
    REGISTRY[strategy.name] = strategy
    return strategy


for _strategy in (SINGLE, HOGWILD, GROUPTHINK, SOT, VOTE, BEST):
    register(_strategy)


def get(name: str) -> Strategy:
    """The strategy registered as `name`; an unknown name is a HogwildError."""
    if name not in REGISTRY:
        raise HogwildError(f"unknown strategy {name!r}: use {_usages()}")
    return REGISTRY[name]


def served_names() -> list[str]:
    """The strategies a live run can be (`hogwild solve --mode`, `hogwild.solve(mode=...)`, the server's `mode`)."""
    return [name for name, strategy in REGISTRY.items() if strategy.served]


def served(name: str) -> Strategy:
    """The served strategy `name`; any other name is a HogwildError listing the choices."""
    strategy = REGISTRY.get(name)
    if strategy is None or not strategy.served:
        raise HogwildError(f"unknown mode {name!r}: choose one of {', '.join(served_names())}")
    return strategy


def parse(text: str) -> tuple[Spec, ...]:
    """'single,hogwild:2,vote:4' -> strategies with their counts; an unknown or malformed one is a HogwildError."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        name, _, count = item.partition(":")
        strategy = REGISTRY.get(name)
        if strategy is None:
            raise HogwildError(f"unknown strategy {item!r}: use {_usages()}")
        if not strategy.counted:
            if count:
                raise HogwildError(f"strategy {item!r}: {name} takes no count (it is one worker)")
            out.append(Spec(strategy))
            continue
        if not count.isdigit() or not 1 <= int(count) <= prompts.MAX_WORKERS:
            raise HogwildError(f"strategy {item!r}: give {name}:N with N from 1 to {prompts.MAX_WORKERS}")
        out.append(Spec(strategy, int(count)))
    if len({s.name for s in out}) != len(out):
        raise HogwildError(f"strategies {text!r} name one strategy twice")
    return tuple(out)


def _usages() -> str:
    usages = [strategy.usage for strategy in REGISTRY.values()]
    return ", ".join(usages[:-1]) + " or " + usages[-1] if len(usages) > 1 else usages[0]


def help_text(served_only: bool = False) -> str:
    """The strategies with their summaries, for a CLI flag's help."""
    chosen = [s for s in REGISTRY.values() if s.served or not served_only]
    return ", ".join(f"{s.name if served_only else s.usage} ({s.summary})" for s in chosen)
