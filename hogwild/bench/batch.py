"""`hogwild bench batch`: P runs of W workers each in flight at once (continuous batching: one forward per step for
all their rows) against the same P runs one after another, and against one run of P x W workers (the same rows per
step), measured side by side in one run with hogwild's timed runs from `common`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from functools import partial

import torch

from hogwild.bench.common import (
    GreedyDecode,
    check_sizes,
    check_window,
    format_table,
    hogwild_prefill,
    int_list,
    load_engines,
    machine,
    measure,
    prompt_ids,
    time_runs,
)
from hogwild.collab.layouts import LAYOUTS
from hogwild.errors import HogwildError
from hogwild.flags import add_engine_arguments


@dataclass(frozen=True)
class BatchBench:
    runs: tuple[int, ...] = (1, 2, 4, 8)  # collaborations in flight at once
    workers: int = 2  # workers of each collaboration
    context: int = 256  # prompt tokens of each collaboration
    tokens: int = 32  # decode steps timed
    layout: str = "combined"
    repeats: int = 3  # runs per configuration; the fastest is kept

    def __post_init__(self) -> None:
        check_sizes(self.tokens, (self.context,), self.repeats)
        if not self.runs or min(self.runs) < 1 or self.workers < 1:
            raise HogwildError("run counts and --workers must be >= 1")
        if self.layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")


def cmd_batch(args: argparse.Namespace) -> int:
    bench = BatchBench(
        runs=int_list(args.runs, "--runs"),
        workers=args.workers,
        context=args.context,
        tokens=args.tokens,
        layout=args.layout,
        repeats=args.repeats,
    )
    engine, _, progress = load_engines(args, transformers=False)
    check_window(engine, bench.context + max(bench.runs) * bench.workers * (bench.tokens + 2))
    holder = hogwild_prefill(engine, prompt_ids(engine, bench.context))
    W, steps = bench.workers, bench.tokens

    def runs(count: int, workers: int) -> list[GreedyDecode]:
        return [GreedyDecode(holder, workers, bench.layout, steps, own_prompt=False) for _ in range(count)]

    def concurrent(count: int, _steps: int) -> tuple[float, int]:
        return time_runs(engine, runs(count, W), _steps)

    def one_after_another(count: int, _steps: int) -> tuple[float, int]:
        times = [time_runs(engine, runs(1, W), _steps) for _ in range(count)]
        return sum(t for t, _ in times), max(kv for _, kv in times)

    def one_run(count: int, _steps: int) -> tuple[float, int]:
        return time_runs(engine, runs(1, count * W), _steps)

    table = []
    for count in bench.runs:
        start = time.perf_counter()
        best = measure(
            {
                "concurrent": partial(concurrent, count),
                "one after another": partial(one_after_another, count),
                f"1 run x {count * W} workers": partial(one_run, count),
            },
            steps,
            bench.repeats,
        )
        rates = {name: count * W * steps / seconds for name, (seconds, _) in best.items()}
        table.append((count, best, rates))
        took = time.perf_counter() - start
        progress.print(
            f"[{count} runs] " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in rates.items()) + f" ({took:.1f} s)"
        )
    engine.abort(holder, "done")

    rows = []
    for count, best, rates in table:
        names = list(best)
        rows.append(
            {
                "runs": count,
                "workers_per_run": W,
                "rows_per_step": count * W,
                "context": bench.context,
                "steps": steps,
                "concurrent_tokens_per_s": rates[names[0]],
                "concurrent_step_ms": 1000 * best[names[0]][0] / steps,
                "sequential_tokens_per_s": rates[names[1]],
                "sequential_step_ms": 1000 * best[names[1]][0] / (count * steps),
                "one_run_tokens_per_s": rates[names[2]],
                "concurrent_vs_sequential": rates[names[0]] / rates[names[1]],
                "concurrent_vs_one_run": rates[names[0]] / rates[names[2]],
                "kv_bytes": best[names[0]][1],
            }
        )
    if args.json:
        extra = dict(
            model=engine.config.model or "SmolLM2-135M-Instruct",
            dtype=engine.kernels.dtype_name,
            linear=engine.kernels.linear,
            threads=torch.get_num_threads(),
            device=str(engine.model.device),
            layout=bench.layout,
            repeats=bench.repeats,
            statistic="best",
        )
        print(json.dumps([{**row, **extra} for row in rows], indent=2))
        return 0
    print(machine(engine, None))
    print(
        f"greedy decode, {steps} steps; P runs of {W} workers ({bench.layout} layout), each over its own "
        f"{bench.context}-token prompt: all P in flight at once (one forward per step for all their rows), the same "
        f"P runs one after another, and one run of P x {W} workers (the same rows per step); best of "
        f"{bench.repeats}\n"
    )
    headers = [
        "runs", "rows/step", "concurrent tok/s", "ms/step", "sequential tok/s", "ms/step",
        "1-run tok/s", "vs sequential", "vs 1 run",
    ]  # fmt: skip
    cells = [
        [
            str(r["runs"]),
            str(r["rows_per_step"]),
            f"{r['concurrent_tokens_per_s']:.1f}",
            f"{r['concurrent_step_ms']:.2f}",
            f"{r['sequential_tokens_per_s']:.1f}",
            f"{r['sequential_step_ms']:.2f}",
            f"{r['one_run_tokens_per_s']:.1f}",
            f"{r['concurrent_vs_sequential']:.2f}x",
            f"{r['concurrent_vs_one_run']:.2f}x",
        ]  # fmt: skip
        for r in rows
    ]
    print(format_table(headers, cells))
    return 0


def add_parser(benches: argparse._SubParsersAction) -> None:
    """Register `hogwild bench batch` on `hogwild bench`'s subcommands."""
    batch = benches.add_parser(
        "batch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="P collaborations in flight at once against the same runs one after another",
        description="Aggregate greedy decode tokens/s and step time of P concurrent runs of W workers each "
        "(continuous batching: one forward pass per step for all their rows) against the same P runs one after "
        "another, and against one run of P x W workers (the same rows per step).",
    )
    batch.add_argument("--runs", default=",".join(map(str, BatchBench.runs)), help="comma-separated run counts P")
    batch.add_argument("--workers", type=int, default=BatchBench.workers, help="workers per run W")
    batch.add_argument("--context", type=int, default=BatchBench.context, help="prompt tokens of each run")
    batch.add_argument("--tokens", type=int, default=BatchBench.tokens, help="decode steps timed")
    batch.add_argument("--layout", choices=LAYOUTS, default=BatchBench.layout, help="how workers see each other")
    batch.add_argument("--repeats", type=int, default=BatchBench.repeats, help="runs per configuration; the fastest")
    batch.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_engine_arguments(batch)
    batch.set_defaults(func=cmd_batch)
