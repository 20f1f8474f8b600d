"""Tiny random models of each supported family, built in memory from a config and seeded, for exactness tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from hogwild import native
from hogwild.attention import Row, StepPlan
from hogwild.cache.pool import KVPool, Ledger
from hogwild.engine import Engine, EngineConfig
from hogwild.model.config import ModelConfig
from hogwild.model.decoder import Decoder
from hogwild.model.rope import Rope
from hogwild.model.tokenizer import Tokenizer

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def hf_config(family: str) -> transformers.PretrainedConfig:
    kwargs = dict(_COMMON)
    if family == "llama":
        kwargs["tie_word_embeddings"] = True  # SmolLM2 ties embeddings
        return transformers.LlamaConfig(**kwargs, rope_theta=10000.0)
    if family == "mistral":
        return transformers.MistralConfig(**kwargs, sliding_window=None, rope_theta=1e6)
    if family == "qwen2":
        return transformers.Qwen2Config(**kwargs, rope_theta=1e6, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**kwargs, head_dim=32, rope_theta=1e6, use_sliding_window=False)
    raise ValueError(family)


class TinyModel:
    """A transformers reference model and hogwild's decoder holding the same random weights."""

    def __init__(
        self, family: str, seed: int = 0, dtype: torch.dtype = torch.float32, linear: str = "aten", fused: bool = False
    ) -> None:
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
        with torch.no_grad():
            for name, p in hf.named_parameters():
                # larger-than-default random weights, norms and biases included, so a misplaced op shows
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        self.hf = hf.eval()
        self.config = ModelConfig.from_hf(hf.config.to_dict())
        self.model = Decoder(self.config, dict(hf.state_dict()), dtype, linear=linear, fused=fused_kernels(fused))
        self.rope = Rope(self.config, torch.float32)  # the cache dtype on CPU

    def ledger(self, tokens: int = 1 << 15) -> Ledger:
        return new_ledger(self.config, self.rope, tokens)

    def step(self, rows: list[Row], publish: bool = True) -> list[torch.Tensor]:
        return step_rows(self.model, self.rope, rows, publish)

    @torch.no_grad()
    def hf_logits(self, tokens: list[int]) -> torch.Tensor:
        """Reference logits [len(tokens), vocab] from transformers, recomputed from scratch."""
        return self.hf(torch.tensor([tokens])).logits[0].float()


def fused_kernels(wanted: bool = True):
    """hogwild's compiled kernels when `wanted`, else None. A machine that cannot build them fails the tests
    that want them: every machine hogwild's tests run on (x86-64 with AVX2, a C++ compiler) can."""
    if not wanted:
        return None
    module = native.load()
    assert module is not None, f"the fused kernels did not load: {native.unavailable() or 'the build failed'}"
    return module


def new_ledger(config: ModelConfig, rope: Rope, tokens: int = 1 << 15) -> Ledger:
    """A ledger of `tokens` tokens in a pool of its own, float32 K/V (the CPU cache dtype)."""
    pool = KVPool(config, rope, torch.float32, "cpu", budget_bytes=tokens * _token_bytes(config))
    return pool.open(pool.capacity)


def _token_bytes(config: ModelConfig) -> int:
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4


@torch.no_grad()
def step_rows(model: Decoder, rope: Rope, rows: list[Row], publish: bool = True) -> list[torch.Tensor]:
    """One step of `rows` through the fast path as one flat batch, as the engine runs it: reserve the own blocks,
    forward, commit, publish. Returns each row's logits [len(tokens), vocab] at every position."""
    for row in rows:
        row.own.ledger.reserve([(row.own, row.own.length + len(row.tokens))])
    plan = StepPlan(rows, model.config, rope, model.dtype, model.fused)
    logits = model.forward(torch.tensor([t for row in rows for t in row.tokens]), plan, logits_at=None).float()
    plan.commit()
    if publish:
        for row in rows:
            row.own.publish()
    return [logits[start : start + len(row.tokens)] for start, row in zip(plan.starts, rows, strict=True)]


def _tiny_llama(vocab_size: int, seed: int):
    """A small random Llama (config, model), its weights scaled for sharper logits than the default init
    (|logits| ~ 10), so greedy choices are far from ties."""
    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)
    return hf, model


def tiny_engine(tokenizer, seed: int = 0, **config) -> Engine:
    """A real engine (pool, scheduler, runs) over a small random Llama with the default model's tokenizer, float32,
    so whole runs of every kind take milliseconds a step. `config`: EngineConfig fields (step_tokens, kv_memory...)."""
    hf, model = _tiny_llama(tokenizer.vocab_size, seed)
    decoder = Decoder(ModelConfig.from_hf(hf.to_dict()), dict(model.state_dict()), torch.float32)
    return Engine(decoder, tokenizer, EngineConfig(**{"kv_memory": "256MiB", **config}))


def tiny_model_folder(tokenizer_dir: Path, folder: Path, seed: int = 0) -> Path:
    """`tiny_engine`'s model written as a Hugging Face folder (config, safetensors, the default model's tokenizer
    files), for what loads a model by path: other processes, Ray actors."""
    _, model = _tiny_llama(Tokenizer.from_folder(tokenizer_dir).vocab_size, seed)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder
