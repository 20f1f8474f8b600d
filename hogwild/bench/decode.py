"""`hogwild bench decode`: single-stream greedy decode of hogwild against transformers' `generate` and/or llama.cpp
on the same model and threads, measured side by side in one run (the method is in `common`), with the weight bytes
each step reads against this machine's memory read bandwidth, and optionally the time to process a longer prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from hogwild.bench.common import (
    HEADERS,
    GreedyDecode,
    Measurement,
    PromptHolder,
    check_sizes,
    check_window,
    format_table,
    hogwild_prefill,
    load_engines,
    machine,
    measure,
    prompt_ids,
    row_cells,
    row_dict,
    time_runs,
)
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.flags import add_engine_arguments


@dataclass(frozen=True)
class DecodeBench:
    tokens: int = 128  # decode steps timed
    context: int = 64  # prompt tokens before the first timed step
    repeats: int = 3  # runs per engine; the fastest is kept
    prefill: int = 512  # prompt tokens timed through prompt processing (0: none)

    def __post_init__(self) -> None:
        check_sizes(self.tokens, (self.context,), self.repeats)
        if self.prefill < 0:
            raise HogwildError(f"--prefill must be >= 0, got {self.prefill}")


def hogwild_stream(engine: Engine, prompt: PromptHolder, steps: int) -> tuple[float, int]:
    """Single-stream greedy decode in one block (as `Engine.generate` does) -> (seconds, kv bytes)."""
    return time_runs(engine, [GreedyDecode(prompt, 1, "combined", steps, own_prompt=True)], steps)


REFERENCES = ("transformers", "llama.cpp")


def _against(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in REFERENCES]
    if unknown:
        raise HogwildError(f"--against takes {' and/or '.join(REFERENCES)}, comma-separated; got {', '.join(unknown)}")
    return names


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes a second this machine reads with torch's threads: the fastest of `repeats` sums over a buffer far
    larger than any cache."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def hogwild_prompt_seconds(engine: Engine, prompt: list[int]) -> float:
    """Prompt processing: seconds to feed `prompt` into a fresh block and sample its first token."""
    start = time.perf_counter()
    holder = hogwild_prefill(engine, prompt)
    seconds = time.perf_counter() - start
    engine.abort(holder, "done")
    return seconds


def cmd_decode(args: argparse.Namespace) -> int:
    bench = DecodeBench(tokens=args.tokens, context=args.context, repeats=args.repeats, prefill=args.prefill)
    against = _against(args.against)
    if "llama.cpp" in against:
        from hogwild.llamacpp import import_llama_cpp

        import_llama_cpp()  # before loading anything: one line on how to install it
    engine, reference, progress = load_engines(args, transformers="transformers" in against)
    check_window(engine, bench.context + bench.tokens + 1)
    prompt = prompt_ids(engine, bench.context)
    hog_prompt = hogwild_prefill(engine, prompt)
    candidates: dict[str, Callable[[int], tuple[float, int]]] = {"hogwild": partial(hogwild_stream, engine, hog_prompt)}
    if reference is not None:
        candidates["transformers"] = partial(reference.decode, prompt, reference.prefill(prompt), 1)
    llama = None
    if "llama.cpp" in against:
        from hogwild.llamacpp import LlamaCpp

        progress.print("loading llama.cpp")
        llama = LlamaCpp(args.model, torch.get_num_threads(), max(bench.context + bench.tokens, bench.prefill) + 16)
        c = engine.model_config
        kv = llama.kv_bytes(c.num_layers, c.num_kv_heads, c.head_dim)
        candidates["llama.cpp"] = lambda steps: (llama.decode(prompt, steps), kv)
    weight_bytes = {"hogwild": engine.model.step_bytes}
    if reference is not None:
        weight_bytes["transformers"] = reference.step_bytes
    if llama is not None:
        weight_bytes["llama.cpp"] = llama.step_bytes
    progress.print(f"decoding {bench.tokens} tokens after {bench.context}, {bench.repeats} runs each")
    prompt_seconds: dict[str, float] = {}
    try:
        best = measure(candidates, bench.tokens, bench.repeats)
        if bench.prefill:
            progress.print(f"processing a {bench.prefill}-token prompt, {bench.repeats} runs each")
            long_prompt = prompt_ids(engine, bench.prefill)
            prompts = {"hogwild": partial(hogwild_prompt_seconds, engine, long_prompt)}
            if llama is not None:
                prompts["llama.cpp"] = partial(llama.prompt_seconds, long_prompt)
            for _ in range(bench.repeats):
                for name, run in prompts.items():
                    prompt_seconds[name] = min(prompt_seconds.get(name, float("inf")), run())
        progress.print("measuring the memory read bandwidth")
        bandwidth = memory_bandwidth()
    finally:
        if llama is not None:
            llama.close()
    results = [Measurement(name, 1, bench.context, bench.tokens, *best[name]) for name in candidates]
    if args.json:
        rows = [
            row_dict(
                m,
                engine,
                bench.repeats,
                weight_bytes=weight_bytes[m.engine],
                bandwidth=bandwidth,
                prompt_tokens=bench.prefill,
                prompt_seconds=prompt_seconds.get(m.engine),
            )
            for m in results
        ]
        print(json.dumps(rows, indent=2))
        return 0
    print(machine(engine, reference) + (f"; llama-cpp-python {llama.version}, the model's GGUF" if llama else ""))
    print(
        f"greedy decode of {bench.tokens} tokens after a {bench.context}-token prompt, prefill excluded, "
        f"best of {bench.repeats} runs; memory read bandwidth {bandwidth / 1e9:.1f} GB/s, measured in this run\n"
    )
    headers = [*HEADERS, "weights MB/step", "GB/s read", "limit tok/s"]
    cells = []
    for m in results:
        read = weight_bytes[m.engine]
        cells.append(
            [*row_cells(m), f"{read / 1e6:.0f}", f"{read * m.tokens_per_s / 1e9:.1f}", f"{bandwidth / read:.1f}"]
        )
    print(format_table(headers, cells))
    print("\nlimit: weight bytes a step reads over the memory read bandwidth; no decode step can be faster\n")
    for other in results[1:]:
        print(f"hogwild / {other.engine}: {results[0].tokens_per_s / other.tokens_per_s:.2f}x")
    if prompt_seconds:
        timed = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in prompt_seconds.items())
        print(f"\nprompt processing, {bench.prefill} tokens (best of {bench.repeats}): {timed}")
        if "llama.cpp" in prompt_seconds:
            ratio = prompt_seconds["hogwild"] / prompt_seconds["llama.cpp"]
            print(f"hogwild's time / llama.cpp's: {ratio:.2f}x")
    return 0


def add_parser(benches: argparse._SubParsersAction) -> None:
    """Register `hogwild bench decode` on `hogwild bench`'s subcommands."""
    decode = benches.add_parser(
        "decode",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="single-stream greedy decode: hogwild vs transformers generate",
        description="Single-stream greedy decode tokens/s of hogwild and of transformers' generate on the same "
        "model, dtype and threads, prefill excluded; the fastest of --repeats runs of each.",
    )
    decode.add_argument("--tokens", type=int, default=DecodeBench.tokens, help="decode steps timed")
    decode.add_argument("--context", type=int, default=DecodeBench.context, help="prompt length in tokens")
    decode.add_argument("--repeats", type=int, default=DecodeBench.repeats, help="runs per engine; the fastest is kept")
    decode.add_argument(
        "--prefill",
        type=int,
        default=DecodeBench.prefill,
        help="also time processing a prompt of this many tokens (hogwild and llama.cpp; 0: skip)",
    )
    decode.add_argument(
        "--against",
        default="transformers",
        help="references, comma-separated: transformers (its generate, the dtype hogwild computes in) and/or "
        "llama.cpp (llama-cpp-python on the model's GGUF file, same threads; pip install 'hogwild[llama-cpp]')",
    )
    decode.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_engine_arguments(decode)
    decode.set_defaults(func=cmd_decode)
