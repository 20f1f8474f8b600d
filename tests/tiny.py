"""Tiny random models of each supported family, built in memory from a config and seeded, for exactness tests."""

from __future__ import annotations

import torch
import transformers

from hogwild.model.config import ModelConfig
from hogwild.model.decoder import Decoder
from hogwild.model.rope import Rope

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

    def __init__(self, family: str, seed: int = 0, dtype: torch.dtype = torch.float32, linear: str = "aten") -> None:
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
        with torch.no_grad():
            for name, p in hf.named_parameters():
                # larger-than-default random weights, norms and biases included, so a misplaced op shows
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        self.hf = hf.eval()
        self.config = ModelConfig.from_hf(hf.config.to_dict())
        self.model = Decoder(self.config, dict(hf.state_dict()), dtype, linear=linear)
        self.rope = Rope(self.config, torch.float32)  # the cache dtype on CPU

    @torch.no_grad()
    def hf_logits(self, tokens: list[int]) -> torch.Tensor:
        """Reference logits [len(tokens), vocab] from transformers, recomputed from scratch."""
        return self.hf(torch.tensor([tokens])).logits[0].float()
