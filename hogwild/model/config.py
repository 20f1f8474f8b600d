"""Model configuration: which decoder family, its sizes, and the small switches that tell the families apart.

hogwild runs one decoder implementation for the RoPE decoder families Llama (SmolLM2 included), Mistral, Qwen2 /
Qwen2.5 and Qwen3. They differ only in a few switches read here from a Hugging Face `config.json`: q/k/v bias
(Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings, and the RoPE frequency schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hogwild.errors import HogwildError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3 / linear frequency schedules, as in config.json
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    generation: tuple[tuple[str, float], ...] = ()  # the model's own sampling settings (generation_config.json)

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise HogwildError(
                f"unsupported architecture {self.family!r}: hogwild runs {', '.join(SUPPORTED_FAMILIES)} models"
            )
        if self.num_heads % self.num_kv_heads:
            raise HogwildError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise HogwildError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise HogwildError(f"unsupported rope scaling {rope_type!r}: hogwild supports default, linear and llama3")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output [N, (heads + 2 * kv_heads) * D] -> q [N, heads, D], k and v
        [N, kv_heads, D] (views)."""
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split((H * D, KV * D, KV * D), dim=-1)
        N = qkv.shape[0]
        return q.view(N, H, D), k.view(N, KV, D), v.view(N, KV, D)

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Read a Hugging Face `config.json` dict; unsupported or malformed configs raise HogwildError."""
        family = hf.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            arch = family or (hf.get("architectures") or ["unknown"])[0]
            raise HogwildError(
                f"unsupported architecture {arch!r}: hogwild runs {', '.join(SUPPORTED_FAMILIES)} models"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise HogwildError(f"unsupported activation {hf['hidden_act']!r}: hogwild supports silu")
        # transformers >= 5 nests rope settings under rope_parameters; older configs keep them at the top level
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            max_position = int(hf.get("max_position_embeddings", 2048))
            sliding = hf.get("sliding_window")
            if sliding and hf.get("use_sliding_window", family == "mistral"):
                max_position = min(max_position, int(sliding))  # beyond the window our full attention would differ
            eos = hf.get("generation_eos_token_id", hf.get("eos_token_id"))
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                family=family,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                max_position=max_position,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
                qkv_bias=bool(hf.get("attention_bias", family == "qwen2")),
                qk_norm=family == "qwen3",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                eos_token_ids=eos_ids,
                generation=tuple(sorted((hf.get("generation_sampling") or {}).items())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HogwildError(f"config.json is missing or has a malformed field: {e}") from None

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, [head_dim // 2] float32, with the config's frequency schedule applied."""
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv = inv / float(scaling["factor"])
        elif kind == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_context = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            smooth = (old_context / wavelen - low) / (high - low)
            mid = (1 - smooth) * inv / factor + smooth * inv
            inv = torch.where(
                wavelen > old_context / low, inv / factor, torch.where(wavelen < old_context / high, inv, mid)
            )
        return inv.float()
