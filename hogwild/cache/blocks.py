"""Blocks of the shared key-value cache: spans of tokens whose keys are rotated at positions local to the block.

A `Block` holds K and V for a span of tokens at every layer, keys rotated (RoPE) at local positions 0..length-1,
so a block can sit at any offset in any view without touching its keys: the attention rotates the queries instead.
Its K/V live in one contiguous `Storage` that grows by a quarter when full (appends write in place, an amortised
O(1) copy per token), so the attention reads a block with one matmul. Storage comes from the `KVPool`, which
alone counts the bytes in use, and is charged to the `Ledger` of the run that holds the block, which alone counts
its capacity (see `pool.py`); a fork shares its parent's storage and copies it only if written.

Visibility: `length` counts every committed token, `published` the tokens other rows may read. The owner of a block
reads all of it; everyone else reads `published`, which the engine advances when the writing run's step ends. So a
row never sees the tokens other rows wrote in the same step, even when a long row is fed in several chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hogwild.cache.pool import KVPool, Ledger

GROWTH = 1.25  # capacity grows to this times the length asked for (when the ledger has room)
ALIGN = 16  # capacities are multiples of this many tokens


class Storage:
    """One contiguous K/V tensor: kv [layers, 2 (k, v), kv_heads, capacity, head_dim]. `refs` blocks share it."""

    def __init__(self, kv: torch.Tensor, pool: KVPool) -> None:
        self.kv = kv
        self.refs = 1
        self.pool = pool  # made by `KVPool.storage`, given back by `drop`

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def drop(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.pool.free(self)


class Block:
    """K/V of a span of tokens. `tokens` are the committed ids; their K/V are `kv[:, :, :, :length]`."""

    def __init__(self, name: str, ledger: Ledger, limit: int | None = None) -> None:
        self.name = name
        self.ledger = ledger
        self.limit = limit  # tokens this block will ever hold, when known: growth never reserves past it
        self.tokens: list[int] = []
        self.published = 0
        self.storage: Storage | None = None
        self.writer = True  # False for forks: their first write copies the shared storage

    def __repr__(self) -> str:
        return f"Block({self.name!r}, length={self.length})"

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage.capacity

    @property
    def kv(self) -> torch.Tensor:
        assert self.storage is not None, f"block {self.name!r} has no storage yet"
        return self.storage.kv

    def growth(self, length: int, slack: bool = False) -> int:
        """Capacity the ledger must add for this block to hold `length` tokens (0 if it already can); with `slack`,
        the capacity it adds when growing by a quarter more.

        A writer appends in place even when forks share its storage: they never read past their own length."""
        if self.writer and length <= self.capacity:
            return 0
        return self._target(length, slack) - (self.capacity if self.writer else 0)

    def _target(self, length: int, slack: bool) -> int:
        if not slack:
            return length
        wanted = -(-int(length * GROWTH) // ALIGN) * ALIGN
        return max(length, wanted if self.limit is None else min(wanted, self.limit))

    def reserve(self, length: int, slack: bool = True) -> None:
        """Make room for `length` tokens, growing (or copying a shared storage) through the ledger; with `slack`,
        a quarter more when the ledger has room for it, so appends copy an amortised O(1) per token."""
        if self.growth(length) == 0:
            return
        room = self.ledger.room + (self.capacity if self.writer else 0)
        assert length <= room, f"block {self.name!r} needs {length} tokens; its run's KV ledger has room for {room}"
        storage = self.ledger.pool.storage(min(self._target(length, slack), room))
        if self.storage is not None:
            storage.kv[:, :, :, : self.length] = self.storage.kv[:, :, :, : self.length]
        self._set_storage(storage)
        self.writer = True

    def _set_storage(self, storage: Storage | None) -> None:
        old = self.storage
        self.ledger.charge(self, (0 if storage is None else storage.capacity) - (0 if old is None else old.capacity))
        self.storage = storage
        if old is not None:
            old.drop()

    def share(self, storage: Storage) -> None:
        """Hold `storage` read-only (a fork): charged to this block's ledger, copied on the first write."""
        storage.refs += 1
        self._set_storage(storage)
        self.writer = False

    def clear(self) -> None:
        """Forget the tokens. A storage shared with forks is left to them; an unshared one is kept for reuse."""
        if self.storage is not None and self.storage.refs > 1:
            self._set_storage(None)
            self.writer = True
        self.tokens = []
        self.published = 0

    def release(self) -> None:
        """Free the K/V (the run ended); the token ids stay readable."""
        self._set_storage(None)

    def publish(self) -> None:
        self.published = self.length
