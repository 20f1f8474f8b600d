"""Concurrent attention over a shared cache of blocks: the fast path, and a flat reference beside it.

A step feeds a batch of rows through the model once. A row is a worker (or a piece of inserted text): new tokens
appended to the last block of its view, attending over every block of the view in order. Keys are stored rotated
at block-local positions; a query at flat position p attending to a block that starts at flat offset o is rotated
by p - o instead, since <R(p) q, R(o + l) k> = <R(p - o) q, R(l) k>. So keys never move, and a block shared by
several views is read once per layer with the queries of every row that sees it stacked, one matmul per block.
Per-block partial softmaxes are merged exactly with a log-sum-exp merge.

Within a step every row reads the cache as it was before the step plus its own new tokens: other rows' tokens of
the same step become visible at the next step. This keeps rows independent, which the reference relies on.

`StepPlan` is the per-step metadata of the fast path (built once, read by every layer); `FlatReference` is the
brutal, obviously correct path: each row alone, its view's un-rotated keys concatenated into one flat sequence,
standard RoPE at flat positions, one float64 softmax. Both expose `attend(layer, q, k, v)` for the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hogwild.cache.blocks import Block
from hogwild.model.config import ModelConfig
from hogwild.model.rope import Rope, apply_rope


@dataclass
class Row:
    """One batch row of a step: `tokens` are appended to `view[-1]`, attending over the whole view."""

    view: list[Block]
    tokens: list[int]

    @property
    def own(self) -> Block:
        return self.view[-1]

    @property
    def context(self) -> int:
        """Flat length of the view once the row's tokens are written."""
        return sum(block.length for block in self.view) + len(self.tokens)


@dataclass
class _BlockRead:
    """How one block is read in a step: by the pairs [start, end) of the stacked query rows."""

    block: Block
    start: int
    end: int
    length: int  # keys visible to the owner, new tokens included
    old_length: int  # keys committed before the step: all that non-owners see
    tail_mask: torch.Tensor | None  # [rows, T, 1, new] additive mask over the new keys, or None when all visible


class StepPlan:
    """Per-step attention metadata of the fast path. Build, run the model forward with it, then `commit()`."""

    def __init__(self, rows: list[Row], config: ModelConfig, rope: Rope, out_dtype: torch.dtype | None = None) -> None:
        assert rows, "a step needs at least one row"
        self.rows = rows
        self.config = config
        self.batch = len(rows)
        self.width = max(len(row.tokens) for row in rows)  # T: rows shorter than this are padded
        device = rope.cos.device
        writers: dict[int, int] = {}
        for r, row in enumerate(rows):
            assert row.tokens, "a row must feed at least one token"
            assert len({id(block) for block in row.view}) == len(row.view), "a block appears twice in one view"
            assert id(row.own) not in writers, f"two rows write into block {row.own.name!r} in one step"
            writers[id(row.own)] = r
            assert row.context <= rope.max_position, f"row of {row.context} tokens overflows the rope tables"
            row.own.reserve(row.own.length + len(row.tokens))

        T = self.width
        # t_eff: padded query slots repeat the row's last real position, keeping every angle inside the tables
        t_eff = [[min(t, len(row.tokens) - 1) for t in range(T)] for row in rows]
        local = torch.tensor(
            [[row.own.length + t for t in ts] for row, ts in zip(rows, t_eff, strict=True)], device=device
        )
        self.cos_k = rope.cos[local].unsqueeze(2)  # [R, T, 1, D] for k: [R, T, kv_heads, D]
        self.sin_k = rope.signed_sin[local].unsqueeze(2)
        self.writes = [(row.own, row.own.length, len(row.tokens)) for row in rows]

        # blocks in first-appearance order; each (block, row) pair that sees any key becomes one stacked query row
        order: dict[int, Block] = {}
        for row in rows:
            for block in row.view:
                order.setdefault(id(block), block)
        # flat position of each row's first new token
        firsts = [_offset_in_view(row.view, row.own) + row.own.length for row in rows]
        pair_rows: list[int] = []
        deltas: list[list[int]] = []
        self.reads: list[_BlockRead] = []
        for block in order.values():
            writer = writers.get(id(block))
            new = len(rows[writer].tokens) if writer is not None else 0
            start = len(pair_rows)
            masks = []
            for r, row in enumerate(rows):
                offset = _offset_in_view(row.view, block)
                if offset is None or (r != writer and block.length == 0):
                    continue
                pair_rows.append(r)
                deltas.append([firsts[r] + t - offset for t in t_eff[r]])
                if new:
                    # owner: causal over the new keys; others: none of them (they land at the next step)
                    visible = (
                        torch.ones(T, new, dtype=torch.bool).tril()
                        if r == writer
                        else torch.zeros(T, new, dtype=torch.bool)
                    )
                    masks.append(visible)
            if len(pair_rows) == start:
                continue
            tail_mask = None
            if new and not all(m.all() for m in masks):
                stacked = torch.stack(masks).unsqueeze(2)  # [rows, T, 1, new]
                tail_mask = torch.zeros(stacked.shape, dtype=rope.cos.dtype).masked_fill_(~stacked, float("-inf"))
                tail_mask = tail_mask.to(device)
            self.reads.append(_BlockRead(block, start, len(pair_rows), block.length + new, block.length, tail_mask))

        self.pairs = len(pair_rows)
        self.pair_rows = torch.tensor(pair_rows, device=device)
        delta = torch.tensor(deltas, device=device)  # [P, T]
        # the softmax scale rides on the query rotation: [1, P, T, 1, D] for q: [kv_heads, P, T, group, D]
        scale = config.head_dim**-0.5
        self.cos_q = (rope.cos[delta] * scale)[None, :, :, None, :]
        self.sin_q = (rope.signed_sin[delta] * scale)[None, :, :, None, :]
        # one pair per row (no view spans several blocks with keys) needs no merge
        self.single = self.pairs == self.batch
        if self.single:
            assert pair_rows == list(range(self.batch)), "single-block rows must read in row order"
        kvh, g = config.num_kv_heads, config.group_size
        self.merge_index = self.pair_rows.view(1, -1, 1, 1).expand(kvh, self.pairs, T, g)
        self.dtype = rope.cos.dtype  # q, k, v come in the cache's dtype
        self.out_dtype = out_dtype or self.dtype  # the model's dtype, for the output projection
        self.out = None  # [R, T, heads * D] output buffer, reused by every layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [R, T, heads, D]; k, v: [R, T, kv_heads, D] (not rotated, in `self.dtype`) -> [R, T, heads * D]

        in `self.out_dtype` (the model's dtype); the returned tensor is reused by the next layer's call."""
        R, T, H, D = q.shape
        kvh, g = self.config.num_kv_heads, self.config.group_size
        k = apply_rope(k, self.cos_k, self.sin_k)
        kv_new = torch.stack((k, v), dim=1).transpose(2, 3)  # [R, 2, kv_heads, T, D]
        for r, (block, start, n) in enumerate(self.writes):
            block.kv[layer, :, :, start : start + n] = kv_new[r, :, :, :n]

        qg = q.view(R, T, kvh, g, D).permute(2, 0, 1, 3, 4)  # [kv_heads, R, T, group, D]
        if not self.single:
            qg = qg.index_select(1, self.pair_rows)  # [kv_heads, P, T, group, D]
        qg = apply_rope(qg, self.cos_q, self.sin_q)

        outs, maxes, sums = [], [], []
        for read in self.reads:
            keys = read.block.kv[layer, 0, :, : read.length]  # [kv_heads, L, D]
            values = read.block.kv[layer, 1, :, : read.length]
            rows = read.end - read.start
            scores = qg[:, read.start : read.end].reshape(kvh, rows * T * g, D) @ keys.transpose(1, 2)
            if read.tail_mask is not None:
                scores.view(kvh, rows, T, g, read.length)[..., read.old_length :] += read.tail_mask
            if self.single:
                outs.append(torch.softmax(scores, dim=-1) @ values)
                continue
            top = scores.amax(dim=-1, keepdim=True)
            probs = scores.sub_(top).exp_()
            sums.append(probs.sum(dim=-1, dtype=torch.float32).view(kvh, rows, T, g))
            maxes.append(top.float().view(kvh, rows, T, g))
            outs.append((probs @ values).view(kvh, rows, T, g, D))

        if self.single:
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            out = out.view(kvh, R, T, g, D)
        else:
            out = self._merge(torch.cat(maxes, 1), torch.cat(sums, 1), torch.cat(outs, 1), R)
        if self.out is None:
            self.out = torch.empty((R, T, kvh, g, D), dtype=self.out_dtype, device=out.device)
        return self.out.copy_(out.permute(1, 2, 0, 3, 4)).view(R, T, H * D)

    def _merge(self, maxes: torch.Tensor, sums: torch.Tensor, outs: torch.Tensor, R: int) -> torch.Tensor:
        """Exact log-sum-exp merge of per-block partials. maxes, sums: [kv_heads, P, T, group]; outs: [..., D]."""
        kvh, _, T, g = maxes.shape
        top = maxes.new_full((kvh, R, T, g), float("-inf")).scatter_reduce_(1, self.merge_index, maxes, "amax")
        weight = (maxes - top.index_select(1, self.pair_rows)).exp_()
        total = maxes.new_zeros((kvh, R, T, g)).index_add_(1, self.pair_rows, weight * sums)
        merged = outs.new_zeros((kvh, R, T, g, outs.shape[-1]), dtype=torch.float32)
        merged.index_add_(1, self.pair_rows, outs * weight.unsqueeze(-1))
        return merged / total.unsqueeze(-1)

    def commit(self) -> None:
        """Record the rows' tokens in their blocks; their K/V were written during the forward."""
        for row in self.rows:
            row.own.tokens.extend(row.tokens)


def _offset_in_view(view: list[Block], block: Block) -> int | None:
    offset = 0
    for b in view:
        if b is block:
            return offset
        offset += b.length
    return None


class FlatReference:
    """The reference path: each row alone, its view flattened into one causal sequence of un-rotated keys.

    It keeps its own store of raw (pre-RoPE) K/V per block name and never touches the blocks' storage, so it shares
    no cache code with the fast path; positions are recomputed from scratch at every step.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.inv_freq = config.inv_freq().double()
        self.dtype = torch.float32  # of the q, k, v it is given (it computes in float64)
        self.raw: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # name -> per layer (k, v): [L, kvh, D]
        self._row: Row | None = None

    def length(self, block: Block) -> int:
        store = self.raw.get(block.name)
        return 0 if store is None else store[0][0].shape[0]

    def move(self, src: Block, dst: Block) -> None:
        if self.length(src):
            self._append(dst, self.raw.pop(src.name))

    def _append(self, block: Block, new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append per-layer raw (k, v) to the block's store."""
        old = self.raw.get(block.name)
        self.raw[block.name] = (
            new
            if old is None
            else [(torch.cat((ko, kn)), torch.cat((vo, vn))) for (ko, vo), (kn, vn) in zip(old, new, strict=True)]
        )

    def clear(self, block: Block) -> None:
        self.raw.pop(block.name, None)

    def step(self, model, rows: list[Row]) -> list[torch.Tensor]:
        """Feed each row alone through `model`, all against the cache as it was before the step, then commit.

        Returns logits [len(tokens), vocab] in float32 per row."""
        logits, pending = [], []
        for row in rows:
            self._row, self._pending = row, []
            try:
                logits.append(model.forward(torch.tensor([row.tokens]), self, logits_at=None)[0].float())
            finally:
                self._row = None
            pending.append(self._pending)
        for row, new in zip(rows, pending, strict=True):
            self._append(row.own, new)
        return logits

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [L, heads, D] float64; standard RoPE at flat positions
        freqs = positions.double()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        half = x.shape[-1] // 2
        return x * angles.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * angles.sin()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        row = self._row
        assert row is not None and q.shape[0] == 1, "the reference runs one row at a time"
        past_k = [self.raw[b.name][layer][0] for b in row.view if self.length(b)]
        past_v = [self.raw[b.name][layer][1] for b in row.view if self.length(b)]
        keys = torch.cat([*past_k, k[0]]).double()  # [N, kvh, D]
        values = torch.cat([*past_v, v[0]]).double()
        n, total = k.shape[1], keys.shape[0]
        positions = torch.arange(total)
        keys = self._rotate(keys, positions)
        queries = self._rotate(q[0].double(), positions[total - n :])  # [n, heads, D]
        g = self.config.group_size
        keys = keys.repeat_interleave(g, dim=1)  # [N, heads, D]
        values = values.repeat_interleave(g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) / self.config.head_dim**0.5
        causal = positions[None, :] <= positions[total - n :, None]  # [n, N]
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)
        self._pending.append((k[0].clone(), v[0].clone()))
        return out.float().reshape(1, n, -1)
