"""The Python API: `hogwild.solve` and its streaming form `hogwild.solve_stream`.

    import hogwild
    result = hogwild.solve("What is 17 * 23?", workers=2, layout="combined", budget=256)
    print(result.answer, result.forward_passes, result.tokens_per_s)
    for worker in result.workers:
        print(worker.name, worker.text)

`solve_stream` yields the run's events as they happen (`Token`, `StepStarted`, `NudgeInserted`, `StepFinished`,
`Pass`, `AnswerFound`, and last `Done` with the result); the CLI, the server and the evaluation harness use it.
`mode` names the strategy (a served one of `hogwild.strategies`). Defaults live in `CollabConfig`,
`default_sampling` (the workers sample with the model's settings, from seed 0 unless told) and `EngineConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from hogwild import strategies
from hogwild.collab.protocol import CollabConfig, Event, SolveResult, default_sampling
from hogwild.engine import Engine, EngineConfig
from hogwild.runs import Done
from hogwild.sampling import SamplingParams
from hogwild.strategies import Strategy

_ENGINES: dict[EngineConfig, Engine] = {}


def load(config: EngineConfig | None = None, **kwargs) -> Engine:
    """A loaded engine, reused across calls with the same config (`load(model="path/to/folder")`)."""
    config = config or EngineConfig(**kwargs)
    if config not in _ENGINES:
        _ENGINES[config] = Engine.load(config)
    return _ENGINES[config]


def _split(engine: Engine, kwargs: dict) -> tuple[Strategy, CollabConfig, SamplingParams]:
    names = {f.name for f in dataclasses.fields(CollabConfig)} - {"mode"}
    collab = {k: v for k, v in kwargs.items() if k in names}
    sampling = {k: v for k, v in kwargs.items() if k not in names and k != "mode"}
    strategy = strategies.served(kwargs.get("mode", CollabConfig.mode))
    return (
        strategy,
        CollabConfig(**collab),
        default_sampling(engine, sampled=strategy.samples, **{"seed": 0, **sampling}),
    )


def solve_stream(problem: str, engine: Engine | None = None, **kwargs) -> Iterator[Event]:
    """Yield the events of one collaborative run; keyword arguments are `mode` (the strategy), CollabConfig and
    SamplingParams fields."""
    engine = engine or load()
    strategy, config, sampling = _split(engine, kwargs)
    yield from engine.stream(strategy.live(engine, problem, config, sampling))


def solve(problem: str, engine: Engine | None = None, **kwargs) -> SolveResult:
    """Run the workers on `problem` to the end; returns the answer, transcripts, shared history and stats."""
    for event in solve_stream(problem, engine, **kwargs):
        if isinstance(event, Done):
            return event.result
    raise AssertionError("a run always ends with Done")
