"""Rotary position embeddings (RoPE), half-split layout as in Hugging Face checkpoints.

Tables of cos/sin are computed once per model for every position up to the context length; the cache rotates
keys at block-local positions, and the attention rotates queries per block, by indexing these tables.
"""

from __future__ import annotations

import torch

from hogwild.model.config import ModelConfig


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate x [..., head_dim] by angles whose cos and signed sin (see `sign_sin`) broadcast against it (into
    `out` when given).

    Equals x * cos + cat(-x2, x1) * sin (x1, x2 the halves of x); rolling the halves and folding the sign into
    the table takes two fewer ops than slicing, negating and concatenating."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin, out=out)


def sign_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for `apply_rope`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class Rope:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.inv_freq = config.inv_freq().to(device)  # [head_dim // 2] float32
        self.max_position = config.max_position
        positions = torch.arange(config.max_position, dtype=torch.float32, device=device)
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.cos = angles.cos().to(dtype)
        self.sin = angles.sin().to(dtype)
        self.signed_sin = sign_sin(self.sin)

    def angles_for(self, delta: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [head_dim] for one (possibly negative) position shift, computed in float32."""
        freqs = delta * self.inv_freq
        angles = torch.cat((freqs, freqs))
        return angles.cos().to(dtype), sign_sin(angles.sin()).to(dtype)
