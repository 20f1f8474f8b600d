"""The engine: a loaded model, the KV pool, the scheduler, and the one loop that feeds every run through the model.

`add(run)` queues a run, `step()` runs one forward pass over the rows the scheduler picks from all running runs
(one flat batch, no padding), samples every row that finished its step with its own run's parameters, hands the
tokens back to the runs and returns their events; `abort(run)` stops one and frees its blocks at once. A fault in
one run (its script, its sampling) ends that run with `Failed` and `Done` and the step goes on; only a failing
forward pass, which leaves the cache in an unknown state, raises out of `step`. Nothing else in hogwild calls the
model's forward. `stream`, `generate` and `generate_text` are thin loops on top:
prepare -> run model -> sample -> postprocess, yielding as they go.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

from hogwild import native
from hogwild.attention import Row, StepPlan
from hogwild.cache.pool import KVPool
from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig
from hogwild.model.decoder import Decoder
from hogwild.model.gguf import GgufWeights
from hogwild.model.kernels import DTYPE_CHOICES, LINEARS, WEIGHTS, KernelChoice, choose
from hogwild.model.loading import cache_dir, open_weights, read_config, weight_files
from hogwild.model.quant import cache_key, load_cached, on_int4_grid, save_cached
from hogwild.model.registry import resolve_model_dir
from hogwild.model.rope import Rope
from hogwild.model.tokenizer import Tokenizer
from hogwild.runs import Done, Event, Failed, Feed, GenerationResult, ModelContext, Run, Sample, Sampled, Token
from hogwild.sampling import SamplingParams, sample_rows
from hogwild.scheduler import Scheduler

KV_FRACTION_CPU = 0.3  # of available memory after the model is loaded, when --kv-memory is not given
KV_FRACTION_CUDA = 0.8  # of free GPU memory


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a model name, a Hugging Face folder or a .gguf file; None: SmolLM2-135M-Instruct
    weights: str = "auto"  # int8, int4, bf16 or fp32; auto: int4 or int8 on CPUs with AVX2 (see kernels), else by dtype
    dtype: str = "auto"  # float dtype; auto: the fastest this machine runs natively (see hogwild.model.kernels)
    linear: str = "auto"  # linear kernel: onednn (prepacked weights, CPU), aten (F.linear); auto: by machine
    threads: int = 0  # torch CPU threads; 0: one per core
    device: str = "cpu"
    step_tokens: int = 512  # tokens fed per forward pass at most, all rows together; longer prompts go in chunks
    kv_memory: str | None = None  # KV pool budget ("2GiB", "512MB", bytes); None: a share of free memory
    max_runs: int = 0  # runs in flight at once; 0: as many as the KV budget holds
    fused: bool = True  # CPU: norms, silu * up and decode attention through hogwild's compiled kernels (see native)
    mmap: bool = False  # a GGUF's blocks read where the file is mapped; else read into private memory when it fits

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise HogwildError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.linear not in LINEARS:
            raise HogwildError(f"unknown linear kernel {self.linear!r}: choose one of {', '.join(LINEARS)}")
        if self.weights not in WEIGHTS:
            raise HogwildError(f"unknown weights {self.weights!r}: choose one of {', '.join(WEIGHTS)}")
        if self.threads < 0:
            raise HogwildError(f"threads must be >= 0, got {self.threads}")
        if self.step_tokens < 1:
            raise HogwildError(f"step_tokens must be >= 1, got {self.step_tokens}")
        if self.max_runs < 0:
            raise HogwildError(f"max_runs must be >= 0, got {self.max_runs}")
        if self.kv_memory is not None:
            parse_bytes(self.kv_memory)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise HogwildError(f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5gb' or '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise HogwildError(f"--kv-memory takes a size like 2GiB, 512MB or a byte count, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def available_memory() -> int:
    """Bytes of memory the system can still give (MemAvailable; 8 GiB where there is no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * KV_FRACTION_CUDA)
    return int(available_memory() * KV_FRACTION_CPU)


def hold_blocks(weights: GgufWeights, mmap: bool) -> str:
    """Read a GGUF whose blocks the kernels multiply into private memory unless `mmap` asks to keep it mapped or
    the memory is short (its size and 1 GiB to spare); says which."""
    mapping = weights.mapping
    if not mmap and mapping.size + 2**30 <= available_memory() and mapping.read_into_memory():
        return "read into memory"
    return "memory-mapped"


@dataclass
class Stats:
    """Counters since the engine started, for benchmarks and metrics."""

    steps: int = 0  # forward passes
    rows: int = 0  # rows fed, summed over steps
    tokens: int = 0  # tokens fed, summed over steps
    sampled: int = 0  # rows sampled
    busy_s: float = 0.0  # time inside step()
    per_step_rows: list[int] = field(default_factory=list)


@dataclass
class Generation:
    """What `Engine.generate_text` produced, filled in as it streams."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (eos or stop string), "length", or "interrupted"
    prompt_tokens: int = 0


class Engine:
    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer,
        config: EngineConfig = EngineConfig(),
        kernels: KernelChoice | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.kernels = kernels or KernelChoice(model.dtype, "aten", "given a built decoder")
        self.model_config: ModelConfig = model.config
        # on CPU the cache and attention run in float32: aten's bf16 bmm is 3-4x slower than float32 there
        self.cache_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
        self.rope = Rope(model.config, self.cache_dtype, model.device)
        eos_ids = frozenset(tokenizer.eos_token_ids) | frozenset(model.config.eos_token_ids)
        self.context = ModelContext(tokenizer, eos_ids, model.config.max_position)  # what runs read of the model
        budget = parse_bytes(config.kv_memory) if config.kv_memory else default_kv_budget(model.device)
        self.pool = KVPool(model.config, self.rope, self.cache_dtype, model.device, budget)
        self.scheduler = Scheduler(self.pool, config.step_tokens, config.max_runs)
        self.stats = Stats()
        self.progressed = False  # whether the last step admitted, fed or ended anything

    @classmethod
    def load(cls, config: EngineConfig = EngineConfig()) -> Engine:
        """Load a model (the default model when config.model is None)."""
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        # the flags are checked before anything loads; whether a GGUF's blocks run is known once the model is open
        choose(
            config.dtype, config.linear, config.device, weights="auto" if config.weights == "gguf" else config.weights
        )
        folder = resolve_model_dir(config.model)
        hf = read_config(folder)
        model_config = ModelConfig.from_hf(hf)
        tokenizer = Tokenizer.from_folder(folder, extra_eos_ids=model_config.eos_token_ids)
        weights = open_weights(folder)  # tensors read one at a time, a GGUF's mapped
        block_kernels = blocks = None
        auto = config.weights == config.dtype == config.linear == "auto"
        if (
            hasattr(weights, "blocks")
            and torch.device(config.device).type == "cpu"
            and (auto or config.weights == "gguf")
        ):
            block_kernels = native.load_gguf()
            if block_kernels is not None:
                held = hold_blocks(weights, config.mmap)
                blocks = f"{weights.describe()}, {held}, {block_kernels.isa()} kernels"
        kernels = choose(config.dtype, config.linear, config.device, weights=config.weights, blocks=blocks)
        # auto's int8, for a 4-bit source (the default model's Q4_1): int4 loses nothing of it and reads half the bytes
        if kernels.linear == "int8" and config.weights == "auto" and on_int4_grid(weights):
            kernels = choose(config.dtype, config.linear, config.device, weights="auto", four_bit=True)
        if kernels.warning:
            print(f"hogwild: note: {kernels.warning}", file=sys.stderr)
        cache = cached = None
        if kernels.linear in ("int8", "int4"):
            # quantized once per weight files; a later start reads the quantized weights instead
            key = cache_key(weight_files(folder), kernels.linear)
            cache = cache_dir() / "quantized" / f"{key}.safetensors"
            cached = load_cached(cache)
        fused = native.load() if config.fused and torch.device(config.device).type == "cpu" else None
        model = Decoder(
            model_config,
            weights,
            kernels.dtype,
            config.device,
            kernels.linear,
            kernels.activation_bits,
            cached,
            fused,
            block_kernels,
        )
        del weights
        if cache is not None and cached is None:
            save_cached(cache, model.quantized)  # an unwritable cache only costs the next start a quantization
        model.quantized.clear()  # the kernels hold their own packed copies
        return cls(model, tokenizer, config, kernels)

    @property
    def fused(self) -> ModuleType | None:
        """hogwild.native's compiled kernels, or None: torch ops."""
        return self.model.fused

    def describe(self) -> str:
        """The weights, kernels and fused path this engine runs, and why, in one line."""
        fused = (
            "norms, silu * up and decode attention through hogwild's fused CPU kernels"
            if self.fused is not None
            else "norms and attention as torch ops"
        )
        return f"{self.kernels.describe()}; {fused}"

    # context

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.context.eos_ids

    @property
    def context_window(self) -> int:
        return self.context.window

    def fits_context(self, tokens: int) -> bool:
        return self.context.fits(tokens)

    def check_context(self, tokens: int, what: str) -> None:
        """The one context-window check for user input: `what` names what is too long."""
        self.context.check(tokens, what)

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        if not prompt:
            raise HogwildError("the prompt is empty")
        if not chat:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(messages)

    # the loop

    def check_fits_pool(self, run: Run) -> None:
        """Refuse, with a clear error, a run that could never fit the KV budget."""
        if run.kv_tokens > self.pool.capacity:
            needs = _size(run.kv_tokens * self.pool.token_bytes)
            raise HogwildError(
                f"the run needs up to {run.kv_tokens} tokens of KV cache ({needs}); the KV budget holds "
                f"{self.pool.capacity} ({_size(self.pool.budget_bytes)}): raise --kv-memory"
            )

    def add(self, run: Run) -> Run:
        """Queue `run`; it starts when its KV reservation fits (a run marked `immediate` starts now, or is refused).
        Returns the run (its own handle)."""
        self.check_fits_pool(run)
        if run.immediate:
            # a snapshot of a live run (a probe) starts now or never: later, what it forks would have moved on
            if not self.pool.fits(run.kv_tokens):
                raise HogwildError(
                    f"no KV room for a {run} of {run.kv_tokens} tokens now "
                    f"({self.pool.reserved}/{self.pool.capacity} reserved): raise --kv-memory or run fewer at once"
                )
            self.scheduler.start(run)
            return run
        self.scheduler.add(run)
        return run

    def abort(self, run: Run, reason: str = "interrupted") -> list[Run]:
        """Stop `run` now and free its blocks; its `Done` event (the result so far) goes to its outbox, and the run
        is returned (nothing when it had ended)."""
        if run.done:
            return []
        self.scheduler.remove(run)
        run.abort(reason)
        if run.ledger is not None:
            run.ledger.release()
        return self._collect([run])

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def admit(self) -> list[Run]:
        """Start the waiting runs that fit now (`step` does this first); returns them."""
        return self.scheduler.admit()

    def step(self) -> list[Run]:
        """One forward pass over the scheduled rows of every running run; returns the runs it gave new events
        (in their outboxes)."""
        start = time.perf_counter()
        touched = self.admit()
        chunks = self.scheduler.schedule()
        if chunks:
            touched += self._forward(chunks)
        else:
            touched += [run for run in self.scheduler.running if run.done]
        self.stats.busy_s += time.perf_counter() - start
        self.progressed = bool(touched or chunks)
        return self._collect(touched)

    def _forward(self, chunks) -> list[Run]:
        for run in {id(c.run): c.run for c in chunks}.values():
            assert run.ledger is not None
            run.ledger.reserve([(c.feed.own, c.feed.own.length + c.end - c.start) for c in chunks if c.run is run])
        rows = [Row(c.feed.view, c.tokens) for c in chunks]
        wanted = [c for c, chunk in enumerate(chunks) if chunk.completes and chunk.feed.sampling is not None]
        logits = self.run_model(rows, wanted)
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.tokens += sum(len(row.tokens) for row in rows)
        self.stats.per_step_rows.append(len(rows))
        complete = self.scheduler.advance(chunks, {c: logits[i] for i, c in enumerate(wanted)})

        asked = {}
        for run in complete:
            for feed in run.feed:
                feed.own.publish()
            step_logits = self.scheduler.step_logits(run)
            asking = [feed for feed in run.feed if feed.sampling is not None]
            assert len(asking) == len(step_logits), f"{run}: {len(asking)} rows ask for logits"
            asked[run] = (asking, step_logits)
        try:
            samples = self._sample(asked)
        except Exception:  # one run's rows may be at fault: sample each run alone, and end the runs that fail
            samples = {}
            for run, rows in asked.items():
                try:
                    samples |= self._sample({run: rows})
                except Exception as e:
                    run.fail(e)
        for run, taken in samples.items():
            run.take(taken)
        return complete

    def _sample(self, asked: dict[Run, tuple[list[Feed], list[torch.Tensor]]]) -> dict[Run, list[Sample]]:
        """The rows of every run whose step is complete, sampled at once, each with its own run's parameters."""
        flat = [
            (feed, logits)
            for feeds, step_logits in asked.values()
            for feed, logits in zip(feeds, step_logits, strict=True)
        ]
        samples = []
        if flat:
            logits = torch.stack([logits for _, logits in flat])
            params, generators = [f.sampling for f, _ in flat], [f.generator for f, _ in flat]
            samples = sample_rows(logits, params, generators, self.fused)
            self.stats.sampled += len(flat)
        taken, offset = {}, 0
        for run, (feeds, _) in asked.items():
            taken[run] = samples[offset : offset + len(feeds)]
            offset += len(feeds)
        return taken

    def run_model(self, rows: list[Row], wanted: list[int]) -> torch.Tensor:
        """One forward pass of `rows` as one flat batch, committed to their blocks; returns the next-token logits
        [len(wanted), vocab] (float32) of the rows indexed by `wanted`."""
        plan = StepPlan(rows, self.model_config, self.rope, self.model.dtype, self.fused)
        tokens = torch.tensor([t for row in rows for t in row.tokens])
        at = torch.tensor([plan.starts[r] + len(rows[r].tokens) - 1 for r in wanted], dtype=torch.long)
        logits = self.model.forward(tokens, plan, logits_at=at)
        plan.commit()
        return logits.float()

    def _collect(self, touched: list[Run]) -> list[Run]:
        """Move the touched runs' new events to their outboxes, the one channel a run's consumer reads; free the
        runs that ended. Returns the runs with new events."""
        fresh = []
        for run in dict.fromkeys(touched):
            if run.events:
                fresh.append(run)
                run.outbox.extend(run.events)
                run.events = []
            if run.done:
                self.scheduler.remove(run)
                if run.ledger is not None:
                    run.ledger.release()
        return fresh

    def stream(self, run: Run) -> Iterator[Event]:
        """Add `run` and step the engine until it is done, yielding its events (other runs progress too). Ctrl-C
        or closing the iterator aborts the run; after Ctrl-C its last event, `Done`, still comes."""
        if run not in self.scheduler.waiting and run not in self.scheduler.running:
            self.add(run)
        try:
            while True:
                while run.outbox:
                    event = run.outbox.popleft()
                    if isinstance(event, Failed):
                        raise event.error
                    yield event
                if run.done:
                    return
                self.step()
                if not self.progressed:
                    raise HogwildError(f"{run} cannot start: the KV budget is held by runs that are not advancing")
        except KeyboardInterrupt:
            self.abort(run)
            while run.outbox:
                yield run.outbox.popleft()
        finally:
            if not run.done:
                self.abort(run)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Stream the token ids of one completion (eos excluded); stops at eos or params.max_tokens."""
        for event in self.stream(Sampled(self, prompt_ids, params)):
            if isinstance(event, Token) and event.token >= 0:
                yield event.token

    def generate_text(
        self, prompt_ids: list[int], params: SamplingParams | None = None, result: Generation | None = None
    ) -> Iterator[str]:
        """Stream text deltas of one completion, cut before the first stop string; fills `result` as it goes."""
        result = result if result is not None else Generation()
        result.prompt_tokens = len(prompt_ids)
        for event in self.stream(Sampled(self, prompt_ids, params)):
            if isinstance(event, Token):
                if event.token >= 0:
                    result.tokens.append(event.token)
                if event.text:
                    result.text += event.text
                    yield event.text
            elif isinstance(event, Done):
                assert isinstance(event.result, GenerationResult)
                result.finish_reason = event.result.samples[0].finish_reason
