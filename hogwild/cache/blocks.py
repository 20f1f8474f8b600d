"""The shared key-value cache: blocks of tokens whose keys are rotated at positions local to the block.

A `Block` holds K and V for a span of tokens at every layer, keys rotated (RoPE) at local positions 0..length-1,
so a block can sit at any offset in any worker's view without touching its keys: the attention rotates the queries
instead. Storage is preallocated per block and grows by doubling, so appending a token writes in place and costs
an amortised O(1). Moving a finished span into another block is the one place keys are re-rotated, once.
"""

from __future__ import annotations

import torch

from hogwild.model.config import ModelConfig
from hogwild.model.rope import Rope, apply_rope


class Block:
    """K/V of a span of tokens. `tokens` are committed ids; their K/V live in `kv[:, :, :, :length]`."""

    def __init__(self, name: str, config: ModelConfig, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.name = name
        self.tokens: list[int] = []
        self.min_capacity = capacity  # allocated on first use, so blocks that stay empty cost nothing
        # kv: [layers, 2 (k, v), kv_heads, capacity, head_dim]; K and V together so one copy writes both
        self.kv = torch.empty(
            (config.num_layers, 2, config.num_kv_heads, 0, config.head_dim), dtype=dtype, device=device
        )

    def __repr__(self) -> str:
        return f"Block({self.name!r}, length={self.length})"

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens; grows by doubling so appends copy an amortised O(1) per token."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, self.min_capacity)
        grown = self.kv.new_empty((*self.kv.shape[:3], capacity, self.kv.shape[4]))
        grown[:, :, :, : self.length] = self.kv[:, :, :, : self.length]
        self.kv = grown

    def clear(self) -> None:
        self.tokens = []


class KVCache:
    """Owns the blocks of one run; every block stores K/V for all layers of the same model."""

    def __init__(
        self,
        config: ModelConfig,
        rope: Rope,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 64,
    ) -> None:
        self.config = config
        self.rope = rope
        self.dtype = dtype
        self.device = torch.device(device)
        self.initial_capacity = capacity
        self.blocks: list[Block] = []

    def new_block(self, name: str, capacity: int | None = None) -> Block:
        block = Block(name, self.config, self.dtype, self.device, capacity or self.initial_capacity)
        self.blocks.append(block)
        return block

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage allocated, all blocks."""
        return sum(block.nbytes for block in self.blocks)

    def move(self, src: Block, dst: Block) -> None:
        """Append all of `src` to the end of `dst` and clear `src`; keys are re-rotated once by the shift."""
        n, start = src.length, dst.length
        if n == 0:
            return
        dst.reserve(start + n)
        cos, sin = self.rope.angles_for(start, self.dtype)
        dst.kv[:, 0, :, start : start + n] = apply_rope(src.kv[:, 0, :, :n], cos.to(self.device), sin.to(self.device))
        dst.kv[:, 1, :, start : start + n] = src.kv[:, 1, :, :n]
        dst.tokens.extend(src.tokens)
        src.clear()
