"""The engine's KV pool: one byte budget shared by every run, handed out as per-run ledgers.

A run is admitted with a `Ledger` for the most tokens of K/V it can ever hold at once (its reservation); the pool
admits runs while their reservations fit the budget, so no run can run out of memory half-way, and everything a run
holds is freed at once when it ends (`Ledger.release`). Each count has one owner: the pool's `reserved` (tokens
promised to open ledgers) and `in_use_bytes` (what the block storages really take, changed only by `storage` and
`free`), and a ledger's `charged` (the capacity its blocks hold, changed only by `Ledger.charge`).

`fork(block)` branches off a live block without copying: the fork shares the storage and reads the first
`length` tokens as they were at the fork; the original keeps appending in place (past every fork's length), and a
storage the original clears is left to its forks. `move(src, dst)` appends one block to another, re-rotating the
keys once by the shift: the one place keys are re-rotated.
"""

from __future__ import annotations

import torch

from hogwild.cache.blocks import Block, Storage
from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig
from hogwild.model.rope import Rope, apply_rope


class KVPool:
    def __init__(
        self, config: ModelConfig, rope: Rope, dtype: torch.dtype, device: torch.device | str, budget_bytes: int
    ) -> None:
        self.config = config
        self.rope = rope
        self.dtype = dtype
        self.device = torch.device(device)
        # an empty tensor of the storage shape, [layers, 2, kv_heads, 0, head_dim]: new storages copy its layout
        self.template = torch.empty(
            (config.num_layers, 2, config.num_kv_heads, 0, config.head_dim), dtype=dtype, device=self.device
        )
        self.token_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim * self.template.element_size()
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // self.token_bytes  # tokens of K/V the budget holds
        if self.capacity < 1:
            raise HogwildError(f"a KV budget of {budget_bytes} bytes holds no token ({self.token_bytes} bytes each)")
        self.reserved = 0  # tokens reserved by open ledgers
        self.in_use_bytes = 0  # bytes of live block storage
        self.ledgers: set[Ledger] = set()

    def fits(self, tokens: int) -> bool:
        return self.reserved + tokens <= self.capacity

    def open(self, tokens: int) -> Ledger:
        """A ledger for `tokens` of K/V; the caller checks `fits` first."""
        assert self.fits(tokens), f"{tokens} tokens do not fit the pool ({self.reserved}/{self.capacity} reserved)"
        ledger = Ledger(self, tokens)
        self.reserved += tokens
        self.ledgers.add(ledger)
        return ledger

    def storage(self, capacity: int) -> Storage:
        """A new, uninitialised storage for `capacity` tokens; its bytes are in use until `free`."""
        shape = self.template.shape
        storage = Storage(self.template.new_empty((*shape[:3], capacity, shape[4])), self)
        self.in_use_bytes += storage.nbytes
        return storage

    def free(self, storage: Storage) -> None:
        """Let a storage's memory go (its last holder dropped it)."""
        self.in_use_bytes -= storage.nbytes
        storage.kv = self.template

    def close(self, ledger: Ledger) -> None:
        """Take a released ledger's reservation back."""
        if ledger in self.ledgers:
            self.ledgers.remove(ledger)
            self.reserved -= ledger.limit

    def move(self, src: Block, dst: Block) -> None:
        """Append all of `src` to the end of `dst` and clear `src`; keys are re-rotated once by the shift."""
        n, start = src.length, dst.length
        if n == 0:
            return
        dst.ledger.reserve([(dst, start + n)])
        cos, sin = self.rope.angles_for(start, self.dtype)
        src_kv = src.kv[:, :, :, :n]
        dst.kv[:, 0, :, start : start + n] = apply_rope(src_kv[:, 0], cos.to(self.device), sin.to(self.device))
        dst.kv[:, 1, :, start : start + n] = src_kv[:, 1]
        dst.tokens.extend(src.tokens)
        dst.publish()
        src.clear()


class Ledger:
    """One run's share of the pool: at most `limit` tokens of storage capacity, and the blocks that hold it."""

    def __init__(self, pool: KVPool, limit: int) -> None:
        self.pool = pool
        self.limit = limit
        self.charged = 0  # capacity held by this ledger's blocks (a fork is charged for the storage it shares)
        self.keep = 0  # room that growth slack may not take: what the run needs for its last phase
        self.blocks: list[Block] = []

    @property
    def room(self) -> int:
        return self.limit - self.charged

    def new_block(self, name: str, limit: int | None = None) -> Block:
        """A new, empty block. `limit`: the most tokens it will ever hold; a run whose reservation is exact gives
        every block its limit, so growth slack never takes room another block needs."""
        block = Block(name, self, limit)
        self.blocks.append(block)
        return block

    def fork(self, block: Block) -> Block:
        """A read-only branch of `block` as it is now, sharing its storage; copied on its first write."""
        fork = self.new_block(f"{block.name}~fork", limit=block.length)
        if block.storage is not None and block.length:
            fork.share(block.storage)
        fork.tokens = list(block.tokens)
        fork.publish()
        return fork

    def charge(self, block: Block, capacity: int) -> None:
        """Add `capacity` tokens (negative: give them back) to what `block` holds of this ledger."""
        self.charged += capacity
        assert self.charged <= self.limit, f"run's KV ledger overdrawn by block {block.name!r}"

    def fits(self, needs: list[tuple[Block, int]]) -> bool:
        """Whether every (block, length) can be held at once with no more capacity than this ledger has left."""
        return sum(block.growth(length) for block, length in needs) <= self.room

    def reserve(self, needs: list[tuple[Block, int]]) -> None:
        """Grow each block to hold its length; growth slack is given only when every block's need fits with it."""
        total = sum(block.growth(length) for block, length in needs)
        assert total <= self.room, f"the run needs {total} more tokens of KV; its ledger has room for {self.room}"
        slack = sum(block.growth(length, slack=True) for block, length in needs) <= self.room - self.keep
        for block, length in needs:
            block.reserve(length, slack=slack)

    def release(self) -> None:
        """Free every block; the pool takes the reservation back."""
        for block in self.blocks:
            block.release()
        self.blocks = []
        self.pool.close(self)
