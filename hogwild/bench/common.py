"""What the decode-speed benches (`bench decode`, `bench workers`, `bench batch`) share: the prompt, hogwild's timed
runs, the transformers reference, the measuring loop and the table.

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
tensors for transformers (model dtype).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from hogwild.cache.blocks import Block
from hogwild.collab.layouts import SharedCache
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.flags import engine_config
from hogwild.model.kernels import CpuFacts, KernelChoice
from hogwild.model.loading import is_gguf_folder
from hogwild.model.registry import resolve_model_dir
from hogwild.runs import Feed, Run, Sample
from hogwild.sampling import GREEDY

PROMPT_TEXT = (
    "Two workers share one notebook. Each writes its own lines and reads the other's as they appear, so a plan "
    "started by one can be finished by the other, and a mistake seen by either is fixed before it spreads. "
)


def check_sizes(tokens: int, contexts: tuple[int, ...], repeats: int) -> None:
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


def sync(device: torch.device) -> None:
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


def time_runs(engine: Engine, runs: list[GreedyDecode], steps: int) -> tuple[float, int]:
    """Add the runs, let them reach decoding (untimed), time `steps` engine steps -> (seconds, kv bytes)."""
    for run in runs:
        engine.add(run)
    engine.admit()
    while not all(run.decoding for run in runs):
        engine.step()
    device = engine.model.device
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    seconds = time.perf_counter() - start
    kv = sum(run.kv_bytes() for run in runs)
    for run in runs:
        engine.abort(run, "done")
    return seconds, kv


# transformers


class _Stamps:
    """A logits processor that only records when each forward's logits arrive."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
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


def measure(
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


def machine(engine: Engine, reference: Transformers | None) -> str:
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


def row_dict(m: Measurement, engine: Engine, repeats: int, **extra: object) -> dict:
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


def row_cells(m: Measurement) -> list[str]:
    return [m.engine, str(m.workers), str(m.context), f"{m.tokens_per_s:.1f}", f"{m.step_ms:.2f}", f"{m.kv_bytes:,}"]


HEADERS = ["engine", "workers", "context", "tokens/s", "ms/step", "kv bytes"]


def load_engines(args: argparse.Namespace, transformers: bool) -> tuple[Engine, Transformers | None, Console]:
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


def check_window(engine: Engine, longest: int) -> None:
    if longest > engine.context_window:
        raise HogwildError(
            f"the benchmark needs views of up to {longest} tokens; "
            f"the model's context window is {engine.context_window}"
        )


def int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise HogwildError(f"{flag} takes comma-separated integers like 1,2,4, got {text!r}") from None
    return tuple(dict.fromkeys(values))
