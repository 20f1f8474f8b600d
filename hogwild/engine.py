"""The engine: a loaded model plus the step loop that feeds rows of tokens through it.

`Engine.step` is the one forward the rest of hogwild uses: prepare a `StepPlan` for a batch of rows (workers, or
pieces of inserted text), run the decoder once, commit the tokens to their blocks, return each row's next-token
logits. Long rows are fed in chunks so a long prompt never builds one huge attention matrix. `generate` is the
single-stream loop on top of it: prepare -> run model -> sample -> postprocess, yielding tokens as they come.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hogwild.attention import Row, StepPlan
from hogwild.cache.blocks import KVCache
from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig
from hogwild.model.decoder import Decoder
from hogwild.model.kernels import DTYPE_CHOICES, LINEARS, KernelChoice, choose
from hogwild.model.loading import load_state_dict, read_config, resolve_model_dir
from hogwild.model.rope import Rope
from hogwild.model.tokenizer import TextStream, Tokenizer
from hogwild.sampling import SamplingParams, sample


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a Hugging Face folder or a .gguf file; None: the default SmolLM2-135M-Instruct
    dtype: str = "auto"  # weights dtype; auto: the fastest this machine runs natively (see hogwild.model.kernels)
    linear: str = "auto"  # linear kernel: onednn (prepacked weights, CPU), aten (F.linear); auto: by machine
    threads: int = 0  # torch CPU threads; 0: one per core
    device: str = "cpu"
    prefill_chunk: int = 512  # tokens of one row fed per forward at most

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise HogwildError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.linear not in LINEARS:
            raise HogwildError(f"unknown linear kernel {self.linear!r}: choose one of {', '.join(LINEARS)}")
        if self.threads < 0:
            raise HogwildError(f"threads must be >= 0, got {self.threads}")
        if self.prefill_chunk < 1:
            raise HogwildError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise HogwildError(f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu")


@dataclass
class Generation:
    """What `Engine.generate` produced, filled in as it streams."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop" (eos or stop string) or "length"
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
        self.kernels = kernels or KernelChoice(model.dtype, "aten", "given a built decoder")
        self.tokenizer = tokenizer
        self.config = config
        self.model_config: ModelConfig = model.config
        # on CPU the cache and attention run in float32: aten's bf16 bmm is 3-4x slower than float32 there
        self.cache_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
        self.rope = Rope(model.config, self.cache_dtype, model.device)
        self.eos_ids = set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids)

    @classmethod
    def load(cls, config: EngineConfig = EngineConfig()) -> Engine:
        """Load a model folder or .gguf (the default model when config.model is None)."""
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        kernels = choose(config.dtype, config.linear, config.device)
        if kernels.warning:
            print(f"hogwild: note: {kernels.warning}", file=sys.stderr)
        folder = resolve_model_dir(config.model)
        hf = read_config(folder)
        model_config = ModelConfig.from_hf(hf)
        tokenizer = Tokenizer.from_folder(folder, extra_eos_ids=model_config.eos_token_ids)
        weights = load_state_dict(folder)
        model = Decoder(model_config, weights, kernels.dtype, config.device, kernels.linear)
        return cls(model, tokenizer, config, kernels)

    @property
    def context_window(self) -> int:
        return self.model_config.max_position

    def new_cache(self, capacity: int = 64) -> KVCache:
        return KVCache(self.model_config, self.rope, self.cache_dtype, self.model.device, capacity)

    def step(self, rows: list[Row]) -> torch.Tensor:
        """Feed every row's tokens into its own block; returns next-token logits [rows, vocab] (float32)."""
        for row in rows:
            if row.context > self.context_window:
                raise HogwildError(
                    f"{row.context} tokens do not fit the model's context window of {self.context_window}"
                )
        logits: list[torch.Tensor | None] = [None] * len(rows)
        chunk = self.config.prefill_chunk
        pending = list(range(len(rows)))
        done = 0
        while pending:
            batch = [Row(rows[i].view, rows[i].tokens[done : done + chunk]) for i in pending]
            out = self._forward(batch)
            for i, row_logits in zip(pending, out, strict=True):
                logits[i] = row_logits
            done += chunk
            pending = [i for i in pending if len(rows[i].tokens) > done]
        return torch.stack(logits)

    def _forward(self, rows: list[Row]) -> torch.Tensor:
        width = max(len(row.tokens) for row in rows)
        tokens = torch.tensor([row.tokens + [0] * (width - len(row.tokens)) for row in rows])  # [R, T], 0-padded
        last = torch.tensor([len(row.tokens) - 1 for row in rows])
        plan = StepPlan(rows, self.model_config, self.rope, out_dtype=self.model.dtype)
        logits = self.model.forward(tokens, plan, logits_at=last)
        plan.commit()
        return logits.float()

    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        if not prompt:
            raise HogwildError("the prompt is empty")
        if not chat:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.tokenizer.encode_chat(messages)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Stream the tokens of one completion (eos excluded); stops at eos or params.max_tokens."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise HogwildError("the prompt is empty")
        if len(prompt_ids) + 1 > self.context_window:
            raise HogwildError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context window is {self.context_window}"
            )
        generator = params.generator()
        block = self.new_cache(capacity=len(prompt_ids) + min(params.max_tokens, 1024)).new_block("sequence")
        feed = prompt_ids
        for _ in range(params.max_tokens):
            if block.length + len(feed) > self.context_window:
                return
            logits = self.step([Row([block], feed)])
            token = int(sample(logits, params, generator)[0])
            if token in self.eos_ids:
                return
            yield token
            feed = [token]

    def generate_text(
        self, prompt_ids: list[int], params: SamplingParams | None = None, result: Generation | None = None
    ) -> Iterator[str]:
        """Stream text deltas of one completion, cut before the first stop string; fills `result` as it goes."""
        params = params or SamplingParams()
        result = result if result is not None else Generation()
        result.prompt_tokens = len(prompt_ids)
        stream = TextStream(self.tokenizer)
        held = ""  # text that may be the start of a stop string
        result.finish_reason = "stop"
        count = 0
        for token in self.generate(prompt_ids, params):
            count += 1
            result.tokens.append(token)
            held += stream.push(token)
            cut = _find_stop(held, params.stop)
            if cut is not None:
                result.text += held[:cut]
                yield held[:cut]
                return
            keep = _stop_prefix_length(held, params.stop)
            if len(held) > keep:
                emit, held = held[: len(held) - keep], held[len(held) - keep :]
                result.text += emit
                yield emit
        held += stream.flush()
        cut = _find_stop(held, params.stop)
        held = held if cut is None else held[:cut]
        if held:
            result.text += held
            yield held
        if count == params.max_tokens and cut is None:
            result.finish_reason = "length"


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
