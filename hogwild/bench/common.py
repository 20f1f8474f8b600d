"""Decode-speed benchmarks: hogwild against transformers' own `generate`, measured side by side in one run.

Both engines run the same weights, dtype and torch threads, greedy, and are timed on decode only. The prompt (a
fixed text repeated to exactly `context` tokens) is prefilled once per context, outside the clock, and copied into a
fresh cache before every run. hogwild then times `tokens` calls of `Engine.step`, each feeding every worker its
argmax token (never stopping at eos). transformers gets a cache holding the prompt's first `context - 1` tokens, runs
`generate(max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False)` under `torch.inference_mode`, and
a logits processor stamps the clock after each forward: from the first stamp (after the forward that read the last
prompt token) to the last one are exactly `tokens` decode forwards, with generate's own per-token work included.
Each configuration gets a short warm-up, then hogwild and transformers alternate for `repeats` runs, and the best
(fastest) run is kept, since competing processes only ever add time. KV bytes are what each cache allocated:
`KVCache.nbytes` for hogwild (float32 on CPU, where attention runs in float32), the returned `DynamicCache`'s
tensors for transformers (model dtype). `bench decode` is one stream; `bench workers` runs W hogwild workers over one
shared prompt (one forward per step for all of them) against W independent sequences batched through transformers.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from hogwild.cache.blocks import Block
from hogwild.collab.layouts import LAYOUTS, SharedCache
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.flags import add_engine_arguments, engine_config
from hogwild.model.kernels import CpuFacts, KernelChoice
from hogwild.model.loading import is_gguf_folder
from hogwild.model.registry import resolve_model_dir
from hogwild.runs import Feed, Run, Sample
from hogwild.sampling import GREEDY

PROMPT_TEXT = (
    "Two workers share one notebook. Each writes its own lines and reads the other's as they appear, so a plan "
    "started by one can be finished by the other, and a mistake seen by either is fixed before it spreads. "
)


@dataclass(frozen=True)
class DecodeBench:
    tokens: int = 128  # decode steps timed
    context: int = 64  # prompt tokens before the first timed step
    repeats: int = 3  # runs per engine; the fastest is kept
    prefill: int = 512  # prompt tokens timed through prompt processing (0: none)

    def __post_init__(self) -> None:
        _check_sizes(self.tokens, (self.context,), self.repeats)
        if self.prefill < 0:
            raise HogwildError(f"--prefill must be >= 0, got {self.prefill}")


@dataclass(frozen=True)
class WorkersBench:
    workers: tuple[int, ...] = (1, 2, 4, 8)
    contexts: tuple[int, ...] = (256, 2048)  # shared prompt tokens
    tokens: int = 32  # decode steps timed; each step writes one token per worker
    layout: str = "combined"
    repeats: int = 3  # runs per engine; the fastest is kept
    transformers: bool = True  # also time W independent sequences through transformers

    def __post_init__(self) -> None:
        _check_sizes(self.tokens, self.contexts, self.repeats)
        if not self.workers or min(self.workers) < 1:
            raise HogwildError(f"worker counts must be >= 1, got {','.join(map(str, self.workers))}")
        if self.layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class BatchBench:
    runs: tuple[int, ...] = (1, 2, 4, 8)  # collaborations in flight at once
    workers: int = 2  # workers of each collaboration
    context: int = 256  # prompt tokens of each collaboration
    tokens: int = 32  # decode steps timed
    layout: str = "combined"
    repeats: int = 3  # runs per configuration; the fastest is kept

    def __post_init__(self) -> None:
        _check_sizes(self.tokens, (self.context,), self.repeats)
        if not self.runs or min(self.runs) < 1 or self.workers < 1:
            raise HogwildError("run counts and --workers must be >= 1")
        if self.layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")


def _check_sizes(tokens: int, contexts: tuple[int, ...], repeats: int) -> None:
    if tokens < 1:
        raise HogwildError(f"tokens must be >= 1, got {tokens}")
    if not contexts or min(contexts) < 2:
        raise HogwildError(f"contexts must be >= 2 tokens, got {','.join(map(str, contexts))}")
    if repeats < 1:
        raise HogwildError(f"repeats must be >= 1, got {repeats}")


@dataclass(frozen=True)
class Measurement:
    """One table row: the fastest of `repeats` runs of `steps` decode steps."""

    engine: str  # "hogwild" or "transformers"
    workers: int  # hogwild workers, or transformers sequences in the batch
    context: int
    steps: int
    seconds: float
    kv_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.workers * self.steps / self.seconds

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / self.steps


def prompt_ids(engine: Engine, length: int) -> list[int]:
    """PROMPT_TEXT's tokens repeated and cut to exactly `length` tokens."""
    text = engine.tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return (text * (length // len(text) + 1))[:length]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# hogwild


class PromptHolder(Run):
    """Prefills a prompt once and keeps it in the pool (idle) until aborted: decode runs fork its block."""

    def __init__(self, engine: Engine, prompt: list[int]) -> None:
        super().__init__()
        self.prompt = prompt
        self.block: Block | None = None
        self.first_token = -1  # argmax after the prompt: every worker's first fed token

    @property
    def kv_tokens(self) -> int:
        return len(self.prompt)

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        assert self.ledger is not None
        self.block = self.ledger.new_block("prompt", limit=len(self.prompt))
        (sample,) = yield [Feed([self.block], self.prompt, GREEDY)]
        self.first_token = sample.token
        yield []  # idle until aborted

    def result(self, finished_by: str) -> None:
        return None


class GreedyDecode(Run):
    """W workers decoding greedily forever (eos ignored) over a layout's views, the prompt forked from a holder;
    with `own_prompt`, one stream that prefills its own block first (as a plain generation does)."""

    def __init__(self, holder: PromptHolder, workers: int, layout: str, steps: int, own_prompt: bool) -> None:
        super().__init__()
        self.holder = holder
        self.workers = workers
        self.layout = layout
        self.steps = steps
        self.own_prompt = own_prompt
        self.decoding = False  # true once every row feeds one token a step

    @property
    def kv_tokens(self) -> int:
        return len(self.holder.prompt) + self.workers * (self.steps + 2)

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        assert self.ledger is not None and self.holder.block is not None
        if self.own_prompt:
            block = self.ledger.new_block("sequence", limit=self.kv_tokens)
            (sample,) = yield [Feed([block], self.holder.prompt, GREEDY)]
            views, tokens = [[block]], [sample.token]
        else:
            shared = SharedCache(self.ledger, self.workers, self.layout, prompt=self.ledger.fork(self.holder.block))
            views = [shared.view(w) for w in range(self.workers)]
            tokens = [self.holder.first_token] * self.workers
        self.decoding = True
        while True:
            samples = yield [Feed(view, [token], GREEDY) for view, token in zip(views, tokens, strict=True)]
            tokens = [sample.token for sample in samples]

    def kv_bytes(self) -> int:
        """K/V of the tokens this run holds (a forked prompt counted once, as if the run owned it)."""
        assert self.ledger is not None
        return sum(block.length for block in self.ledger.blocks) * self.ledger.pool.token_bytes

    def result(self, finished_by: str) -> None:
        return None


def hogwild_prefill(engine: Engine, prompt: list[int]) -> PromptHolder:
    holder = engine.add(PromptHolder(engine, prompt))
    while holder.first_token < 0:
        engine.step()
    return holder


def _time_runs(engine: Engine, runs: list[GreedyDecode], steps: int) -> tuple[float, int]:
    """Add the runs, let them reach decoding (untimed), time `steps` engine steps -> (seconds, kv bytes)."""
    for run in runs:
        engine.add(run)
    engine.admit()
    while not all(run.decoding for run in runs):
        engine.step()
    device = engine.model.device
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    seconds = time.perf_counter() - start
    kv = sum(run.kv_bytes() for run in runs)
    for run in runs:
        engine.abort(run, "done")
    return seconds, kv


def hogwild_stream(engine: Engine, prompt: PromptHolder, steps: int) -> tuple[float, int]:
    """Single-stream greedy decode in one block (as `Engine.generate` does) -> (seconds, kv bytes)."""
    return _time_runs(engine, [GreedyDecode(prompt, 1, "combined", steps, own_prompt=True)], steps)


def hogwild_workers(engine: Engine, prompt: PromptHolder, workers: int, layout: str, steps: int) -> tuple[float, int]:
    """`workers` greedy workers over one shared prompt, one forward per step -> (seconds, kv bytes)."""
    return _time_runs(engine, [GreedyDecode(prompt, workers, layout, steps, own_prompt=False)], steps)


# transformers


class _Stamps:
    """A logits processor that only records when each forward's logits arrive."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


class Transformers:
    """The reference: the same model folder through transformers' `AutoModelForCausalLM.generate`."""

    def __init__(self, model: str | None, dtype: torch.dtype, device: str) -> None:
        try:
            import transformers
        except ImportError:
            raise HogwildError(
                "the transformers reference needs transformers: pip install 'hogwild[test]' (or --no-transformers)"
            ) from None
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        folder = resolve_model_dir(model)
        if is_gguf_folder(folder):  # transformers dequantizes the GGUF itself (a float copy, for the reference only)
            from hogwild.llamacpp import gguf_for

            work = Path(tempfile.mkdtemp(prefix="hogwild-reference-"))
            try:
                path = gguf_for(model, work)
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=dtype
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.model = self.model.to(device).eval()
        head = self.model.get_output_embeddings().weight
        # the linears and the vocabulary projection; the embedding reads only its rows (unless it is the head)
        self.step_bytes = sum(
            p.numel() * p.element_size()
            for name, p in self.model.named_parameters()
            if p.dim() == 2 and p is not self.model.get_input_embeddings().weight
        ) + (head.numel() * head.element_size() if head is self.model.get_input_embeddings().weight else 0)
        self.device = torch.device(device)
        self.version = transformers.__version__
        # the KV cache's argument and output field: `cache` from transformers 5.24, `past_key_values` before
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prefill(self, prompt: list[int]):
        """A DynamicCache holding all prompt tokens but the last, which generate's first forward reads."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(torch.tensor([prompt[:-1]], device=self.device), **{self.cache_arg: cache}, use_cache=True)
        return cache

    @torch.inference_mode()
    def decode(self, prompt: list[int], prefilled, sequences: int, steps: int) -> tuple[float, int]:
        """`sequences` copies of the prompt decoded greedily for `steps` forwards -> (seconds, kv bytes)."""
        from transformers import LogitsProcessorList

        cache = copy.deepcopy(prefilled)
        cache.batch_repeat_interleave(sequences)
        ids = torch.tensor([prompt] * sequences, device=self.device)
        stamps = _Stamps(self.device)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **{self.cache_arg: cache},
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamps]),
            pad_token_id=self.model.config.eos_token_id,
            return_dict_in_generate=True,
        )
        assert len(stamps.times) == steps + 1, f"generate ran {len(stamps.times)} forwards, expected {steps + 1}"
        layers = getattr(out, self.cache_arg).layers
        kv = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
        return stamps.times[-1] - stamps.times[0], kv


# measuring and reporting


def _measure(
    candidates: dict[str, Callable[[int], tuple[float, int]]], steps: int, repeats: int
) -> dict[str, tuple[float, int]]:
    """Warm each candidate up, then alternate them for `repeats` runs; the fastest run of each -> (seconds, bytes)."""
    for run in candidates.values():
        run(min(steps, 4))
    best: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):
        for name, run in candidates.items():
            seconds, kv = run(steps)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, kv)
    return best


def _machine(engine: Engine, reference: Transformers | None) -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = engine.model.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    versions = f"torch {torch.__version__}" + (f", transformers {reference.version}" if reference else "")
    model = engine.config.model or "SmolLM2-135M-Instruct"
    return f"{model}, {torch.get_num_threads()} threads on {where}; {versions}\nhogwild runs {engine.describe()}"


def _row_dict(m: Measurement, engine: Engine, repeats: int, **extra: object) -> dict:
    row = asdict(m)
    row.update(tokens_per_s=m.tokens_per_s, step_ms=m.step_ms)
    row.update(
        model=engine.config.model or "SmolLM2-135M-Instruct",
        dtype=engine.kernels.dtype_name
        if m.engine != "transformers"
        else str(reference_dtype(engine.kernels, engine.config.device)).removeprefix("torch."),
        linear=engine.kernels.linear if m.engine == "hogwild" else "aten",
        threads=torch.get_num_threads(),
        device=str(engine.model.device),
        repeats=repeats,
        statistic="best",
    )
    row.update(extra)
    return row


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    # first column left-aligned (names), the rest right-aligned (numbers)
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _cells(m: Measurement) -> list[str]:
    return [m.engine, str(m.workers), str(m.context), f"{m.tokens_per_s:.1f}", f"{m.step_ms:.2f}", f"{m.kv_bytes:,}"]


HEADERS = ["engine", "workers", "context", "tokens/s", "ms/step", "kv bytes"]


def _load(args: argparse.Namespace, transformers: bool) -> tuple[Engine, Transformers | None, Console]:
    progress = Console(stderr=True, highlight=False, soft_wrap=True)
    config = engine_config(args)
    progress.print("loading hogwild" + (" and transformers" if transformers else ""))
    engine = Engine.load(config)
    progress.print(f"hogwild runs {engine.describe()}")
    reference = None
    if transformers:
        reference = Transformers(args.model, reference_dtype(engine.kernels, args.device), args.device)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)  # both engines run on the same threads
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        progress.print(f"note: load average {load:.1f} on {cores} cores before measuring: timings will be noisy")
    return engine, reference, progress


def reference_dtype(kernels: KernelChoice, device: str) -> torch.dtype:
    """transformers' dtype: the one hogwild computes in, so both read the same float weights (or the ones
    hogwild's quantized weights stand for), except bf16 on a CPU that only emulates it (int4's activations on an
    AVX2 CPU), where transformers' fast path is float32."""
    if kernels.dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not CpuFacts.detect().native_bf16:
        return torch.float32
    return kernels.dtype


def _check_window(engine: Engine, longest: int) -> None:
    if longest > engine.context_window:
        raise HogwildError(
            f"the benchmark needs views of up to {longest} tokens; "
            f"the model's context window is {engine.context_window}"
        )


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
    engine, reference, progress = _load(args, transformers="transformers" in against)
    _check_window(engine, bench.context + bench.tokens + 1)
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
        best = _measure(candidates, bench.tokens, bench.repeats)
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
            _row_dict(
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
    print(_machine(engine, reference) + (f"; llama-cpp-python {llama.version}, the model's GGUF" if llama else ""))
    print(
        f"greedy decode of {bench.tokens} tokens after a {bench.context}-token prompt, prefill excluded, "
        f"best of {bench.repeats} runs; memory read bandwidth {bandwidth / 1e9:.1f} GB/s, measured in this run\n"
    )
    headers = [*HEADERS, "weights MB/step", "GB/s read", "limit tok/s"]
    cells = []
    for m in results:
        read = weight_bytes[m.engine]
        cells.append([*_cells(m), f"{read / 1e6:.0f}", f"{read * m.tokens_per_s / 1e9:.1f}", f"{bandwidth / read:.1f}"])
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


def cmd_workers(args: argparse.Namespace) -> int:
    bench = WorkersBench(
        workers=_int_list(args.workers, "--workers"),
        contexts=_int_list(args.contexts, "--contexts"),
        tokens=args.tokens,
        layout=args.layout,
        repeats=args.repeats,
        transformers=not args.no_transformers,
    )
    engine, reference, progress = _load(args, transformers=bench.transformers)
    _check_window(engine, max(bench.contexts) + max(bench.workers) * bench.tokens + 1)
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
            best = _measure(candidates, bench.tokens, bench.repeats)
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
            _row_dict(
                m, engine, bench.repeats, layout=bench.layout if m.engine == "hogwild" else None, speedup=speedup[id(m)]
            )
            for m in results
        ]
        print(json.dumps(rows, indent=2))
        return 0

    by_key = {(m.engine, m.workers, m.context): m for m in results}
    print(_machine(engine, reference))
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
        cells = [*_cells(m), f"{speedup[id(m)]:.2f}x"]
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


def cmd_batch(args: argparse.Namespace) -> int:
    bench = BatchBench(
        runs=_int_list(args.runs, "--runs"),
        workers=args.workers,
        context=args.context,
        tokens=args.tokens,
        layout=args.layout,
        repeats=args.repeats,
    )
    engine, _, progress = _load(args, transformers=False)
    _check_window(engine, bench.context + max(bench.runs) * bench.workers * (bench.tokens + 2))
    holder = hogwild_prefill(engine, prompt_ids(engine, bench.context))
    W, steps = bench.workers, bench.tokens

    def runs(count: int, workers: int) -> list[GreedyDecode]:
        return [GreedyDecode(holder, workers, bench.layout, steps, own_prompt=False) for _ in range(count)]

    def concurrent(count: int, _steps: int) -> tuple[float, int]:
        return _time_runs(engine, runs(count, W), _steps)

    def one_after_another(count: int, _steps: int) -> tuple[float, int]:
        times = [_time_runs(engine, runs(1, W), _steps) for _ in range(count)]
        return sum(t for t, _ in times), max(kv for _, kv in times)

    def one_run(count: int, _steps: int) -> tuple[float, int]:
        return _time_runs(engine, runs(1, count * W), _steps)

    table = []
    for count in bench.runs:
        start = time.perf_counter()
        best = _measure(
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
    print(_machine(engine, None))
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


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise HogwildError(f"{flag} takes comma-separated integers like 1,2,4, got {text!r}") from None
    return tuple(dict.fromkeys(values))


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register `hogwild bench` with `bench decode`, `bench workers` and `bench batch`; the other benches
    (`bench quality`, `bench shape`) are registered by the root command on the subcommands returned."""
    bench = sub.add_parser(
        "bench",
        help="decode-speed benchmarks against transformers",
        description="Decode-speed benchmarks. Each prints one table measured side by side in one run (progress on "
        "stderr, the table or --json on stdout).",
    )
    benches = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)

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
    return benches
