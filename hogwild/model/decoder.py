"""The decoder: one lean PyTorch implementation for Llama, Mistral, Qwen2 and Qwen3.

Weights are plain tensors (no nn.Module), with q/k/v and gate/up fused into one matmul each at load time. The
forward pass computes q, k, v for a batch of rows and hands them, un-rotated, to the step's attention object
(`attend(layer, q, k, v)`), which owns RoPE and the cache: the decoder does not care whether the cache is one
sequence or a set of shared blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig


class Attention(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


class Decoder:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            tensor = weights.get(name)
            if tensor is None:
                if required:
                    raise HogwildError(f"weights are missing tensor {name!r}; is the folder a complete checkpoint?")
                return None
            return tensor.to(device=self.device, dtype=dtype)

        c = config
        self.embed = take("model.embed_tokens.weight")
        if self.embed.shape != (c.vocab_size, c.hidden_size):
            raise HogwildError(
                f"embedding shape {tuple(self.embed.shape)} does not match config ({c.vocab_size}, {c.hidden_size})"
            )
        self.norm = take("model.norm.weight")
        self.lm_head = self.embed if c.tie_embeddings else take("lm_head.weight", required=False)
        if self.lm_head is None:
            self.lm_head = self.embed  # checkpoints that tie weights without saying so
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            attn = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            bias = None
            if c.qkv_bias:
                bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(
                Layer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=torch.cat(attn).contiguous(),
                    qkv_bias=bias,
                    q_norm=take(p + "self_attn.q_norm.weight") if c.qk_norm else None,
                    k_norm=take(p + "self_attn.k_norm.weight") if c.qk_norm else None,
                    o=take(p + "self_attn.o_proj.weight"),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).contiguous(),
                    down=take(p + "mlp.down_proj.weight"),
                )
            )
            expected = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            if self.layers[-1].qkv.shape != (expected, c.hidden_size):
                raise HogwildError(f"layer {i} attention weights do not match the config's head counts")

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, attention: Attention, logits_at: torch.Tensor | None) -> torch.Tensor:
        """tokens: [R, T] -> logits [R, vocab] at position `logits_at[r]` of each row, or [R, T, vocab] if None."""
        c = self.config
        R, T = tokens.shape
        H, KV, D = c.num_heads, c.num_kv_heads, c.head_dim
        eps = c.rms_norm_eps
        x = F.embedding(tokens.to(self.device), self.embed)  # [R, T, hidden]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (c.hidden_size,), layer.input_norm, eps)
            q, k, v = F.linear(h, layer.qkv, layer.qkv_bias).split((H * D, KV * D, KV * D), dim=-1)
            q = q.view(R, T, H, D)
            k = k.view(R, T, KV, D)
            v = v.view(R, T, KV, D)
            if layer.q_norm is not None:
                q = F.rms_norm(q, (D,), layer.q_norm, eps)
                k = F.rms_norm(k, (D,), layer.k_norm, eps)
            x = x + F.linear(attention.attend(i, q, k, v), layer.o)
            h = F.rms_norm(x, (c.hidden_size,), layer.post_norm, eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        if logits_at is not None:
            x = x[torch.arange(R, device=x.device), logits_at.to(x.device)]  # [R, hidden]
        return F.linear(F.rms_norm(x, (c.hidden_size,), self.norm, eps), self.lm_head)
