"""Concurrent attention over a shared cache of blocks: the fast path, and a flat reference beside it.

A step feeds a batch of rows through the model once. A row is a worker (or a piece of inserted text): new tokens
appended to the last block of its view, attending over every block of the view in order. Keys are stored rotated
at block-local positions; a query at flat position p attending to a block that starts at flat offset o is rotated
by p - o instead, since <R(p) q, R(o + l) k> = <R(p - o) q, R(l) k>. So keys never move, and a block shared by
several views is read once per layer with the queries of every row that sees it stacked, one matmul per block.
Blocks read by the same rows (a shared prompt and the workers' blocks in the combined layout, a prompt and a
generation's own block) share one softmax over their scores side by side; where the rows reading blocks differ,
the partial softmaxes of each such group are merged exactly with a log-sum-exp merge.

Within a step every row reads the cache as it was before the step plus its own new tokens: other rows' tokens of
the same step become visible at the next step. This keeps rows independent, which the reference relies on.

A step's `StepLayout` (where its rows write, which slots read which keys) is built once and read by every layer
through an attention backend meeting `hogwild.model.parts.Attention`: `TorchAttention` (torch ops, any device)
or `FusedAttention` (the same maths in hogwild's fused CPU kernel, `hogwild/native/fused.cpp`, for decode steps);
`StepPlan` picks them for the step. `FlatReference` is the brutal, obviously correct path: each row alone, its
view's un-rotated keys concatenated into one flat sequence, standard RoPE at flat positions, one float64 softmax.
All expose `attend(layer, q, k, v)` for the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from hogwild.cache.blocks import Block
from hogwild.model.config import ModelConfig
from hogwild.model.rope import Rope, apply_rope
from hogwild.native import DTYPES, HEAD_DIMS

if TYPE_CHECKING:
    from hogwild.model.parts import Attention

FUSED_ROW_TOKENS = 16  # steps whose rows feed at most this many tokens each attend through the fused kernel


@dataclass
class Row:
    """One row of a step: `tokens` are appended to `view[-1]` (the row's own block), attending over the whole view.

    The own block is read whole; every other block only up to its `published` length (see `cache/blocks.py`)."""

    view: list[Block]
    tokens: list[int]

    @property
    def own(self) -> Block:
        return self.view[-1]

    @property
    def first_position(self) -> int:
        """Flat position of the row's first new token in its view."""
        return sum(block.published for block in self.view[:-1]) + self.own.length

    @property
    def context(self) -> int:
        """Flat length of the view once the row's tokens are written."""
        return self.first_position + len(self.tokens)


@dataclass
class _BlockRead:
    """How one block is read in a step: by the query slots [start, end) (a slot is one token of one reading row)."""

    block: Block
    start: int
    end: int
    length: int  # keys read: the owner's view of the block, new tokens included, or `published` without an owner
    mask: torch.Tensor | None  # [1, slots * group, length] additive mask (-inf past each slot's limit), or None

    def __post_init__(self) -> None:
        # every layer's keys (transposed for the score matmul) and values as views made once a step: a layer then
        # takes its own with one index (the block's storage was reserved for the step and stays put)
        kv = self.block.kv[:, :, :, : self.length]  # [layers, 2, kv_heads, length, D]
        self.keys_t = kv[:, 0].transpose(-1, -2)  # [layers, kv_heads, D, length]
        self.values = kv[:, 1]  # [layers, kv_heads, length, D]


def flat_starts(rows: list[Row]) -> tuple[list[int], int]:
    """Where each row's tokens start in the step's flat batch (the rows' tokens concatenated), and its length N."""
    starts, total = [], 0
    for row in rows:
        starts.append(total)
        total += len(row.tokens)
    return starts, total


@dataclass
class StepLayout:
    """Where a step's rows sit and what each of their tokens reads: what every attention backend is built from.

    Row r's tokens sit at flat indices `starts[r]:starts[r] + len(rows[r].tokens)` of the step's `tokens`. A slot
    is one token of one row reading one block: slot s is token `slot_tokens[s]`, its query is rotated by
    `slot_deltas[s]` (the token's flat position minus the block's offset in the row's view) and it sees the block's
    first `slot_limits[s]` keys: the owner all of its block and its new tokens causally, every other row the
    published keys. `reads` lists each block read in the step with its slots, in first-appearance order."""

    rows: list[Row]
    starts: list[int]
    tokens: int  # N
    reads: list[tuple[Block, int, int, int]]  # block, its slots [start, end), keys read
    slot_tokens: list[int]
    slot_deltas: list[int]
    slot_limits: list[int]

    @classmethod
    def of(cls, rows: list[Row], max_position: int) -> StepLayout:
        writers: dict[int, int] = {}
        starts, total = flat_starts(rows)
        for r, row in enumerate(rows):
            assert row.tokens, "a row must feed at least one token"
            assert len({id(block) for block in row.view}) == len(row.view), "a block appears twice in one view"
            assert id(row.own) not in writers, f"two rows write into block {row.own.name!r} in one step"
            writers[id(row.own)] = r
            assert row.context <= max_position, f"row of {row.context} tokens overflows the rope tables"
            assert row.own.writer and row.own.capacity >= row.own.length + len(row.tokens), (
                f"block {row.own.name!r} was not reserved for this step"
            )

        # blocks in first-appearance order, with the rows that read each and where it sits in their view
        readers: dict[int, tuple[Block, list[tuple[int, int]]]] = {}
        firsts = []
        for r, row in enumerate(rows):
            offset = 0
            for block in row.view:
                readers.setdefault(id(block), (block, []))[1].append((r, offset))
                offset += block.published
            firsts.append(offset - row.own.published + row.own.length)  # flat position of the row's first token
        slot_tokens: list[int] = []
        deltas: list[int] = []
        limits: list[int] = []
        reads: list[tuple[Block, int, int, int]] = []
        for block, seen_by in readers.values():
            writer = writers.get(id(block))
            length = block.length + len(rows[writer].tokens) if writer is not None else block.published
            start = len(slot_tokens)
            for r, offset in seen_by:
                if r != writer and block.published == 0:
                    continue
                n = len(rows[r].tokens)
                slot_tokens.extend(range(starts[r], starts[r] + n))
                deltas.extend(firsts[r] + t - offset for t in range(n))
                limits.extend(block.length + t + 1 if r == writer else block.published for t in range(n))
            if len(slot_tokens) > start:
                reads.append((block, start, len(slot_tokens), length))
        return cls(rows, starts, total, reads, slot_tokens, deltas, limits)


class FusedAttention:
    """The attention backend of short rows (decode steps) on hogwild's fused CPU kernel (`fused.Plan`, see
    `hogwild/native/fused.cpp`): the same maths as `TorchAttention`, every block read once per kv head, in one
    call a layer."""

    def __init__(
        self, layout: StepLayout, config: ModelConfig, rope: Rope, out_dtype: torch.dtype, fused: ModuleType
    ) -> None:
        self.dtype = rope.cos.dtype
        reads = layout.reads
        plan = fused.Plan(
            heads=config.num_heads,
            kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            cos=rope.cos,
            signed_sin=rope.signed_sin,
            write_kv=[row.own.kv for row in layout.rows],
            write_start=layout.starts,
            write_count=[len(row.tokens) for row in layout.rows],
            write_offset=[row.own.length for row in layout.rows],
            read_kv=[block.kv for block, *_ in reads],
            read_length=[length for *_, length in reads],
            read_start=[start for _, start, _, _ in reads],
            read_end=[end for _, _, end, _ in reads],
            slot_token=layout.slot_tokens,
            slot_delta=layout.slot_deltas,
            slot_limit=layout.slot_limits,
            tokens=layout.tokens,
            out_dtype=out_dtype,
        )
        self.attend = plan.attend
        self.attend_qkv = plan.attend_qkv


class TorchAttention:
    """The attention backend on torch ops (any device, any row length): per block read, one score matmul and one
    value matmul for all the slots that read it; blocks read by the same slots share one softmax, other groups are
    merged exactly with a log-sum-exp merge."""

    def __init__(self, layout: StepLayout, config: ModelConfig, rope: Rope, out_dtype: torch.dtype) -> None:
        device = rope.cos.device
        self.config = config
        self.dtype = rope.cos.dtype  # q, k, v come in the cache's dtype
        self.out_dtype = out_dtype
        rows, starts, total = layout.rows, layout.starts, layout.tokens
        local = torch.tensor([row.own.length + t for row in rows for t in range(len(row.tokens))], device=device)
        self.cos_k = rope.cos[local].unsqueeze(1)  # [N, 1, D] for k: [N, kv_heads, D]
        self.sin_k = rope.signed_sin[local].unsqueeze(1)
        # the step's rotated keys and values, [N, 2, kv_heads, D], and per row where they go: every layer's
        # destination in the row's block and the row's slice of the buffer, as views made once (one copy a layer)
        kvh, D, g = config.num_kv_heads, config.head_dim, config.group_size
        self.new_kv = torch.empty((total, 2, kvh, D), dtype=self.dtype, device=device)
        self.writes = [
            (
                row.own.kv[:, :, :, row.own.length : row.own.length + len(row.tokens)],  # [layers, 2, kvh, n, D]
                self.new_kv[starts[r] : starts[r] + len(row.tokens)].permute(1, 2, 0, 3),
            )
            for r, row in enumerate(rows)
        ]
        slot_tokens, limits = layout.slot_tokens, layout.slot_limits
        self.reads: list[_BlockRead] = []
        for block, start, end, length in layout.reads:
            limit = torch.tensor(limits[start:end])
            mask = None
            if int(limit.min()) < length:
                # a score matmul adds it: [1, slots * group, length], -inf at the keys a slot may not see
                hidden = torch.arange(length)[None, :] >= limit[:, None]  # [slots, length]
                full = torch.zeros((end - start, g, length), dtype=self.dtype)
                mask = full.masked_fill_(hidden[:, None, :], float("-inf")).view(1, -1, length).to(device)
            self.reads.append(_BlockRead(block, start, end, length, mask))

        self.slot_tokens = torch.tensor(slot_tokens, device=device)
        # reads whose slots are the same tokens in the same order share one softmax: a group per token sequence
        grouped: dict[tuple[int, ...], list[_BlockRead]] = {}
        for read in self.reads:
            grouped.setdefault(tuple(slot_tokens[read.start : read.end]), []).append(read)
        self.groups = list(grouped.values())
        group_tokens = [t for tokens in grouped for t in tokens]
        delta = torch.tensor(layout.slot_deltas, device=device)  # [S]
        # the softmax scale rides on the query rotation: [1, S, 1, D] for q: [kv_heads, S, group, D]
        scale = config.head_dim**-0.5
        self.cos_q = (rope.cos[delta] * scale)[None, :, None, :]
        self.sin_q = (rope.signed_sin[delta] * scale)[None, :, None, :]
        # queries gathered into slots unless every token is read by exactly one slot, in token order
        self.gather = slot_tokens != list(range(total))
        # every token in exactly one group, in order: each group's softmax is final, no merge
        self.single = group_tokens == list(range(total))
        self.merge_tokens = torch.tensor(group_tokens, device=device)
        self.merge_index = self.merge_tokens.view(1, -1, 1).expand(kvh, len(group_tokens), g)
        self.out = None  # [N, heads * D] output buffer, reused by every layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N, H, D = q.shape
        kvh, g = self.config.num_kv_heads, self.config.group_size
        apply_rope(k, self.cos_k, self.sin_k, out=self.new_kv[:, 0])
        self.new_kv[:, 1].copy_(v)
        for destination, source in self.writes:
            destination[layer].copy_(source)

        qg = q.view(N, kvh, g, D).transpose(0, 1)  # [kv_heads, N, group, D]
        if self.gather:
            qg = qg.index_select(1, self.slot_tokens)  # [kv_heads, S, group, D]
        qg = apply_rope(qg, self.cos_q, self.sin_q)

        outs, maxes, sums = [], [], []
        for reads in self.groups:
            slots = reads[0].end - reads[0].start
            scores = []
            for read in reads:
                queries = qg[:, read.start : read.end].reshape(kvh, slots * g, D)  # rotated for this block
                keys_t = read.keys_t[layer]
                # [kv_heads, slots * g, length]
                scores.append(torch.bmm(queries, keys_t) if read.mask is None else read.mask.baddbmm(queries, keys_t))
            scores = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)  # [kv_heads, slots * g, keys]
            top = scores.amax(dim=-1, keepdim=True)
            probs = scores.sub_(top).exp_()  # unnormalized: one division of the output rounds less
            total = probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
            out, at = None, 0
            for read in reads:
                weights = probs.narrow(-1, at, read.length)
                values = read.values[layer]
                out = torch.bmm(weights, values) if out is None else out.baddbmm_(weights, values)
                at += read.length
            if self.single:
                out = out.div_(total)
            else:
                sums.append(total.view(kvh, slots, g))
                maxes.append(top.float().view(kvh, slots, g))
            outs.append(out.view(kvh, slots, g, D))

        if self.single:
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        else:
            out = self._merge(torch.cat(maxes, 1), torch.cat(sums, 1), torch.cat(outs, 1), N)
        if self.out is None:
            self.out = torch.empty((N, kvh, g, D), dtype=self.out_dtype, device=out.device)
        return self.out.copy_(out.transpose(0, 1)).view(N, H * D)

    def attend_qkv(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        return self.attend(layer, *self.config.split_qkv(qkv.to(self.dtype)))

    def _merge(self, maxes: torch.Tensor, sums: torch.Tensor, outs: torch.Tensor, N: int) -> torch.Tensor:
        """Exact log-sum-exp merge of per-group partials. maxes, sums: [kv_heads, G, group]; outs: [..., D]."""
        kvh, _, g = maxes.shape
        top = maxes.new_full((kvh, N, g), float("-inf")).scatter_reduce_(1, self.merge_index, maxes, "amax")
        weight = (maxes - top.index_select(1, self.merge_tokens)).exp_()
        total = maxes.new_zeros((kvh, N, g)).index_add_(1, self.merge_tokens, weight * sums)
        merged = outs.new_zeros((kvh, N, g, outs.shape[-1]), dtype=torch.float32)
        merged.index_add_(1, self.merge_tokens, outs * weight.unsqueeze(-1))
        return merged / total.unsqueeze(-1)


class SplitAttention:
    """A step of short rows (decode tokens, a few inserted words) and long ones (prompts): each kind attends in a
    backend of its own, the short rows through the fused kernel, the long ones through torch ops, so a decode row
    takes the same path whatever shares its step. Rows are independent within a step (each reads the cache as it
    was plus its own tokens), so the two backends see exactly what one would."""

    def __init__(
        self,
        rows: list[Row],
        short: list[bool],
        starts: list[int],
        config: ModelConfig,
        rope: Rope,
        out_dtype: torch.dtype,
        fused: ModuleType,
    ) -> None:
        self.dtype = rope.cos.dtype
        self.out_dtype = out_dtype
        self.width = config.num_heads * config.head_dim
        self.parts: list[tuple[torch.Tensor, Attention]] = []  # each part's flat token indices and backend
        for kind in (True, False):
            members = [r for r in range(len(rows)) if short[r] == kind]
            index = [starts[r] + t for r in members for t in range(len(rows[r].tokens))]
            layout = StepLayout.of([rows[r] for r in members], rope.max_position)
            part = (
                FusedAttention(layout, config, rope, out_dtype, fused)
                if kind
                else TorchAttention(layout, config, rope, out_dtype)
            )
            self.parts.append((torch.tensor(index, device=rope.cos.device), part))
        self.out = None

    def _gather(self, call, *inputs: torch.Tensor) -> torch.Tensor:
        """Each part's attention on its rows' slice of `inputs`, gathered into one [N, heads * D] output."""
        if self.out is None:  # inputs[0]: [N, ...], the step's tokens
            self.out = torch.empty((len(inputs[0]), self.width), dtype=self.out_dtype, device=inputs[0].device)
        for index, part in self.parts:
            self.out.index_copy_(0, index, call(part, *(x.index_select(0, index) for x in inputs)))
        return self.out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._gather(lambda part, *x: part.attend(layer, *x), q, k, v)

    def attend_qkv(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        return self._gather(lambda part, x: part.attend_qkv(layer, x), qkv)


class StepPlan:
    """One step's attention for the decoder: builds the step's backend and hands it the layers' calls.

    Build it, run the model forward on the rows' tokens concatenated, then `commit()`. Row r's tokens sit at flat
    indices `starts[r]:starts[r] + len(rows[r].tokens)`. With `fused` (`hogwild.native.load()`), a step whose
    rows are short (decode steps) attends through `FusedAttention`, other steps (prompts) through
    `TorchAttention`, and a step of both kinds through `SplitAttention`. A new backend (a GPU kernel) is a class
    meeting `hogwild.model.parts.Attention`, built from a `StepLayout`, and one more choice here."""

    def __init__(
        self,
        rows: list[Row],
        config: ModelConfig,
        rope: Rope,
        out_dtype: torch.dtype | None = None,
        fused: ModuleType | None = None,
    ) -> None:
        assert rows, "a step needs at least one row"
        self.rows = rows
        self.config = config
        self.dtype = rope.cos.dtype  # q, k, v come in the cache's dtype
        self.out_dtype = out_dtype or self.dtype  # the model's dtype, for the output projection
        fits = (
            fused is not None
            and rope.cos.device.type == "cpu"
            and config.head_dim in HEAD_DIMS
            and self.dtype in DTYPES
            and self.out_dtype in DTYPES
        )
        short = [len(row.tokens) <= FUSED_ROW_TOKENS for row in rows]
        self.starts, self.tokens = flat_starts(rows)  # self.tokens: N
        self.backend: Attention
        if fits and any(short) and not all(short):
            self.backend = SplitAttention(rows, short, self.starts, config, rope, self.out_dtype, fused)
        elif fits and all(short):
            self.backend = FusedAttention(StepLayout.of(rows, rope.max_position), config, rope, self.out_dtype, fused)
        else:
            self.backend = TorchAttention(StepLayout.of(rows, rope.max_position), config, rope, self.out_dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, heads, D]; k, v: [N, kv_heads, D] (not rotated, in `self.dtype`) -> [N, heads * D]

        in `self.out_dtype` (the model's dtype); the returned tensor is reused by the next layer's call."""
        return self.backend.attend(layer, q, k, v)

    def attend_qkv(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """`attend` on the fused projection's output, qkv: [N, (heads + 2 * kv_heads) * D] in any float dtype;
        the fused kernel reads it as it is (no split, no cast)."""
        return self.backend.attend_qkv(layer, qkv)

    def commit(self) -> None:
        """Record the rows' tokens in their blocks (K/V were written during the forward). Nothing is published:
        the engine publishes a run's blocks when its step ends."""
        for row in self.rows:
            row.own.tokens.extend(row.tokens)


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
                logits.append(model.forward(torch.tensor(row.tokens), self, logits_at=None, plain=True).float())
            finally:
                self._row = None
            pending.append(self._pending)
        for row, new in zip(rows, pending, strict=True):
            self._append(row.own, new)
        return logits

    def attend_qkv(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        return self.attend(layer, *self.config.split_qkv(qkv.float()))

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [L, heads, D] float64; standard RoPE at flat positions
        freqs = positions.double()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        half = x.shape[-1] // 2
        return x * angles.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * angles.sin()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        row = self._row
        assert row is not None and q.shape[0] == len(row.tokens), "the reference runs one row at a time"
        past_k = [self.raw[b.name][layer][0] for b in row.view if self.length(b)]
        past_v = [self.raw[b.name][layer][1] for b in row.view if self.length(b)]
        keys = torch.cat([*past_k, k]).double()  # [N, kvh, D]
        values = torch.cat([*past_v, v]).double()
        n, total = k.shape[0], keys.shape[0]
        positions = torch.arange(total)
        keys = self._rotate(keys, positions)
        queries = self._rotate(q.double(), positions[total - n :])  # [n, heads, D]
        g = self.config.group_size
        keys = keys.repeat_interleave(g, dim=1)  # [N, heads, D]
        values = values.repeat_interleave(g, dim=1)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) / self.config.head_dim**0.5
        causal = positions[None, :] <= positions[total - n :, None]  # [n, N]
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)
        self._pending.append((k.clone(), v.clone()))
        return out.float().reshape(n, -1)
