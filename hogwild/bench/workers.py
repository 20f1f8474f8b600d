"""`hogwild bench workers`: W hogwild workers over one shared prompt (one forward per step for all of them) against
W independent sequences batched through transformers' `generate`, per worker count and context, measured side by
side in one run (the method is in `common`); also the speedup over the fewest workers and the step-time growth with
context.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from functools import partial

from hogwild.bench.common import (
    HEADERS,
    GreedyDecode,
    Measurement,
    PromptHolder,
    check_sizes,
    check_window,
    format_table,
    hogwild_prefill,
    int_list,
    load_engines,
    machine,
    measure,
    prompt_ids,
    row_cells,
    row_dict,
    time_runs,
)
from hogwild.collab.layouts import LAYOUTS
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.flags import add_engine_arguments


@dataclass(frozen=True)
class WorkersBench:
    workers: tuple[int, ...] = (1, 2, 4, 8)
    contexts: tuple[int, ...] = (256, 2048)  # shared prompt tokens
    tokens: int = 32  # decode steps timed; each step writes one token per worker
    layout: str = "combined"
    repeats: int = 3  # runs per engine; the fastest is kept
    transformers: bool = True  # also time W independent sequences through transformers

    def __post_init__(self) -> None:
        check_sizes(self.tokens, self.contexts, self.repeats)
        if not self.workers or min(self.workers) < 1:
            raise HogwildError(f"worker counts must be >= 1, got {','.join(map(str, self.workers))}")
        if self.layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")


def hogwild_workers(engine: Engine, prompt: PromptHolder, workers: int, layout: str, steps: int) -> tuple[float, int]:
    """`workers` greedy workers over one shared prompt, one forward per step -> (seconds, kv bytes)."""
    return time_runs(engine, [GreedyDecode(prompt, workers, layout, steps, own_prompt=False)], steps)


def cmd_workers(args: argparse.Namespace) -> int:
    bench = WorkersBench(
        workers=int_list(args.workers, "--workers"),
        contexts=int_list(args.contexts, "--contexts"),
        tokens=args.tokens,
        layout=args.layout,
        repeats=args.repeats,
        transformers=not args.no_transformers,
    )
    engine, reference, progress = load_engines(args, transformers=bench.transformers)
    check_window(engine, max(bench.contexts) + max(bench.workers) * bench.tokens + 1)
    results: list[Measurement] = []
    total, done = len(bench.contexts) * len(bench.workers), 0
    for context in bench.contexts:
        progress.print(f"prefilling {context} prompt tokens")
        prompt = prompt_ids(engine, context)
        hog_prompt = hogwild_prefill(engine, prompt)
        hf_prompt = reference.prefill(prompt) if reference else None
        for workers in bench.workers:
            start = time.perf_counter()
            candidates = {"hogwild": partial(hogwild_workers, engine, hog_prompt, workers, bench.layout)}
            if reference:
                candidates["transformers"] = partial(reference.decode, prompt, hf_prompt, workers)
            best = measure(candidates, bench.tokens, bench.repeats)
            row = [Measurement(name, workers, context, bench.tokens, s, kv) for name, (s, kv) in best.items()]
            results += row
            rates = ", ".join(f"{m.engine} {m.tokens_per_s:.1f} tok/s" for m in row)
            done += 1
            took = time.perf_counter() - start
            progress.print(f"[{done}/{total}] workers={workers} context={context}: {rates} ({took:.1f} s)")
        engine.abort(hog_prompt, "done")

    base = {(m.engine, m.context): m for m in results if m.workers == min(bench.workers)}
    speedup = {id(m): m.tokens_per_s / base[m.engine, m.context].tokens_per_s for m in results}
    if args.json:
        rows = [
            row_dict(
                m, engine, bench.repeats, layout=bench.layout if m.engine == "hogwild" else None, speedup=speedup[id(m)]
            )
            for m in results
        ]
        print(json.dumps(rows, indent=2))
        return 0

    by_key = {(m.engine, m.workers, m.context): m for m in results}
    print(machine(engine, reference))
    print(
        f"greedy decode, {bench.tokens} steps after a shared prompt, prefill excluded, best of {bench.repeats} runs; "
        f"hogwild: W workers in one shared cache ({bench.layout} layout), one forward per step"
        + ("; transformers: a batch of W independent copies of the prompt" if reference else "")
        + "\n"
    )
    headers = [*HEADERS, f"vs {min(bench.workers)} worker" + ("s" if min(bench.workers) > 1 else "")]
    if reference:
        headers.append("hogwild / transformers")
    rows = []
    for m in results:
        cells = [*row_cells(m), f"{speedup[id(m)]:.2f}x"]
        if reference:
            other = by_key.get(("transformers", m.workers, m.context))
            cells.append(f"{m.tokens_per_s / other.tokens_per_s:.2f}x" if m.engine == "hogwild" and other else "")
        rows.append(cells)
    print(format_table(headers, rows))

    small, large = min(bench.contexts), max(bench.contexts)
    if large != small:
        print(f"\nstep time at context {large} / context {small}:\n")
        engines = [name for name in ("hogwild", "transformers") if name == "hogwild" or reference]
        ratios = [
            [name] + [f"{by_key[name, w, large].step_ms / by_key[name, w, small].step_ms:.2f}x" for w in bench.workers]
            for name in engines
        ]
        print(format_table(["engine", *(f"W={w}" for w in bench.workers)], ratios))
    return 0


def add_parser(benches: argparse._SubParsersAction) -> None:
    """Register `hogwild bench workers` on `hogwild bench`'s subcommands."""
    workers = benches.add_parser(
        "workers",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="aggregate tokens/s of W workers sharing one cache",
        description="Aggregate greedy decode tokens/s of W hogwild workers over one shared prompt (one forward per "
        "step), per worker count and context, against W independent sequences batched through transformers' "
        "generate; also the speedup over the fewest workers and the step-time growth with context.",
    )
    workers.add_argument(
        "--workers", default=",".join(map(str, WorkersBench.workers)), help="comma-separated worker counts"
    )
    workers.add_argument(
        "--contexts", default=",".join(map(str, WorkersBench.contexts)), help="comma-separated shared prompt lengths"
    )
    workers.add_argument("--tokens", type=int, default=WorkersBench.tokens, help="decode steps timed")
    workers.add_argument("--layout", choices=LAYOUTS, default=WorkersBench.layout, help="how workers see each other")
    workers.add_argument(
        "--repeats", type=int, default=WorkersBench.repeats, help="runs per engine; the fastest is kept"
    )
    workers.add_argument("--no-transformers", action="store_true", help="skip the transformers reference")
    workers.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_engine_arguments(workers)
    workers.set_defaults(func=cmd_workers)
