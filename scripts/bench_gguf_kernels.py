"""Benchmark hogwild's GGUF block kernels (hogwild/native/gguf.cpp) on real models' own tensors.

For each model, every 2-D weight the decoder multiplies by (the embedding only when it is also the output
projection), grouped by block type, is multiplied by `mm` at 1, 4 and 16 rows, one call each in turn, over
--repeats sweeps: a group's weight bytes over the sum of its calls' best times is the bandwidth a decode step would
stream them at, printed beside the machine's memory bandwidth measured in the same run (a torch sum over 1 GiB).
Then one layer's linears at 512 prompt rows, against float32 and bf16 torch GEMMs on the same weights dequantized
beforehand. On a machine shared with other work, --cpu-time runs one thread timed by its own CPU time (memory stalls
included, other processes' turns not): what one core streams, whatever the load.

    python scripts/bench_gguf_kernels.py                        # the installed Qwen2.5-Coder models
    python scripts/bench_gguf_kernels.py --gguf model.gguf --isa avx2
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from hogwild import native
from hogwild.errors import HogwildError
from hogwild.model import registry

MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DECODE_ROWS = (1, 4, 16)
PROMPT_ROWS = 512


CLOCK = {"clock": time.perf_counter}


def best_of(repeats: int, fn) -> float:
    clock = CLOCK["clock"]
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def best_calls(repeats: int, calls: list) -> list[float]:
    """Each call's best time over `repeats` sweeps of all of them in turn: a sweep reads far more than the caches
    hold, so no call finds its weights cached, and a call that another process interrupted is not the one kept."""
    clock = CLOCK["clock"]
    best = [float("inf")] * len(calls)
    for sweep in range(repeats + 1):
        for i, call in enumerate(calls):
            start = clock()
            call()
            if sweep:  # the first sweep maps the file's pages in
                best[i] = min(best[i], clock() - start)
    return best


def memory_bandwidth(repeats: int) -> float:
    """GB/s of a torch sum over 1 GiB of float32 on this run's threads."""
    x = torch.ones(1 << 28)
    x.sum()
    return x.numel() * 4 / best_of(repeats, x.sum) / 1e9


class Weight:
    """One GGUF weight matrix, mapped where it lies: uint8 [rows, row bytes]."""

    def __init__(self, tensor) -> None:
        self.name = tensor.name
        self.type_name = tensor.tensor_type.name
        self.type_id = int(tensor.tensor_type)
        self.k, self.m = int(tensor.shape[0]), int(tensor.shape[1])
        raw = np.asarray(tensor.data).reshape(-1).view(np.uint8).reshape(self.m, -1)
        self.blocks = torch.from_numpy(raw)  # read-only mapping; the kernels only read
        self.raw = raw

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def floats(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(dequantize(self.raw, self.type_name_enum)).reshape(self.m, self.k))

    @property
    def type_name_enum(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.type_name]


def decoder_weights(path: Path) -> list[Weight]:
    """The matrices a decode step multiplies by: every layer's, and the output projection (the embedding when the
    model ties them)."""
    reader = GGUFReader(path)
    tensors = [t for t in reader.tensors if len(t.shape) == 2]
    names = {t.name for t in tensors}
    keep = [t for t in tensors if t.name != "token_embd.weight" or "output.weight" not in names]
    return [Weight(t) for t in keep]


def model_file(name: str, folder: Path) -> Path:
    model = registry.find(name)
    if model is None:
        raise HogwildError(f"unknown model {name}")
    return registry.gguf_file(model, folder)


def bench_decode(kernels, weights: list[Weight], isa: str, repeats: int, decode_rows: tuple[int, ...]) -> list[tuple]:
    kernels.set_isa(isa)
    groups: dict[str, list[Weight]] = defaultdict(list)
    for w in weights:
        groups[w.type_name].append(w)
    rows = []
    for type_name, ws in sorted(groups.items(), key=lambda kv: -sum(w.nbytes for w in kv[1])):
        nbytes = sum(w.nbytes for w in ws)
        times = []
        for n in decode_rows:
            xs = {w.k: torch.randn(n, w.k) for w in ws}
            times.append(
                sum(best_calls(repeats, [lambda w=w, x=xs[w.k]: kernels.mm(x, w.blocks, w.type_id, w.k) for w in ws]))
            )
        rows.append((type_name, len(ws), nbytes, times))
    return rows


def bench_prompt(kernels, weights: list[Weight], isa: str, repeats: int) -> dict[str, float]:
    """One layer's linears at PROMPT_ROWS rows: seconds for `mm`, and for float32 and bf16 torch GEMMs on the weights
    dequantized beforehand; and the model's layer count."""
    kernels.set_isa(isa)
    layer = [w for w in weights if w.name.startswith("blk.0.")]
    layers = len({re.match(r"blk\.(\d+)\.", w.name).group(1) for w in weights if w.name.startswith("blk.")})
    xs = {w.k: torch.randn(PROMPT_ROWS, w.k) for w in layer}
    floats = [w.floats() for w in layer]
    bf16 = [f.bfloat16() for f in floats]
    xs16 = {k: x.bfloat16() for k, x in xs.items()}

    def ours():
        for w in layer:
            kernels.mm(xs[w.k], w.blocks, w.type_id, w.k)

    times = {"mm": best_of(repeats, ours)}
    times["float32 torch GEMM"] = best_of(repeats, lambda: [xs[w.k] @ f.T for w, f in zip(layer, floats, strict=True)])
    times["bf16 torch GEMM"] = best_of(repeats, lambda: [xs16[w.k] @ f.T for w, f in zip(layer, bf16, strict=True)])
    times["layers"] = layers
    return times


def row_line(isa: str, type_name: str, count: int, nbytes: int, times: list[float]) -> str:
    rates = "   ".join(f"{nbytes / t / 1e9:9.1f}" for t in times)
    ratios = "  ".join(f"{t / times[0]:8.2f}" for t in times[1:])
    return f"  {isa:12} {type_name:5} {count:4d} {nbytes / 1e6:7.1f}   {rates}   {ratios}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", action="append", help=f"a named model (default, without --gguf: those of {MODELS} installed)"
    )
    parser.add_argument("--gguf", action="append", type=Path, default=[], help="a GGUF file to read instead")
    parser.add_argument("--isa", choices=("both", "avx512-vnni", "avx2"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rows",
        default=",".join(map(str, DECODE_ROWS)),
        help="decode row counts, comma-separated (the first is t's base)",
    )
    parser.add_argument("--no-prompt", action="store_true", help="skip the 512-row prompt comparison")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    args = parser.parse_args()

    decode_rows = tuple(int(n) for n in args.rows.split(","))
    kernels = native.load_gguf()
    if kernels is None:
        print("the GGUF block kernels are not available here", file=sys.stderr)
        return 1
    if args.cpu_time:
        args.threads, CLOCK["clock"] = 1, time.thread_time
    torch.set_num_threads(args.threads)
    available = [kernels.isa()] if kernels.isa() == "avx2" else ["avx512-vnni", "avx2"]
    isas = available if args.isa == "both" else [args.isa]
    if any(isa not in available for isa in isas):
        print(f"this CPU runs {', '.join(available)}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="hogwild-bench-") as tmp:
        files = list(args.gguf)
        installed = [m for m in MODELS if registry.installed_parts(registry.find(m)) == len(registry.find(m).parts)]
        for name in args.model or ([] if args.gguf else installed):
            files.append(model_file(name, Path(tmp)))
        if not files:
            print("no model installed: pass --gguf FILE or install one (see `hogwild models`)", file=sys.stderr)
            return 1
        bandwidth = memory_bandwidth(args.repeats)
        timing = "thread CPU time" if args.cpu_time else "wall time"
        print(f"threads {args.threads} ({timing}), memory bandwidth (torch sum over 1 GiB): {bandwidth:.1f} GB/s\n")
        for path in files:
            weights = decoder_weights(path)
            total = sum(w.nbytes for w in weights)
            print(f"{path.name}: {len(weights)} matrices, {total / 1e6:.0f} MB a decode step")
            rates = "   ".join(f"GB/s N={n:<2}" for n in decode_rows)
            ratios = "  ".join(f"{f't({n})/t({decode_rows[0]})':>8}" for n in decode_rows[1:])
            print(f"  {'isa':12} {'type':5} {'mats':>4} {'MB':>7}   {rates}   {ratios}")
            for isa in isas:
                rows = bench_decode(kernels, weights, isa, args.repeats, decode_rows)
                for type_name, count, nbytes, times in rows:
                    print(row_line(isa, type_name, count, nbytes, times))
                step = [sum(times[i] for *_, times in rows) for i in range(len(decode_rows))]
                line = row_line(isa, "all", len(weights), total, step)
                print(f"{line}   (a step's matrices at 1 row: {step[0] * 1e3:.1f} ms)")
            if not args.no_prompt:
                for isa in isas:
                    times = bench_prompt(kernels, weights, isa, max(2, args.repeats // 2))
                    layers = times.pop("layers")
                    print(f"  prompt, {PROMPT_ROWS} rows through layer 0's linears ({isa}):")
                    for label, t in times.items():
                        print(f"    {label:20} {t * 1e3:7.1f} ms   x {layers} layers: {t * layers:5.2f} s")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
