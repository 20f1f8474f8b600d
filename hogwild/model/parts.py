"""The swappable parts of a decoder layer, each behind a small written contract.

The decoder (`hogwild.model.decoder`) runs one layer loop: norm, qkv projection, attention, output projection,
norm, gate/up projection, silu * up, down projection. What varies between machines and models is not the loop but
its parts, and each is chosen once, at load or at the step's start, never by a branch inside the loop:

- `Linear`: one projection in one weights format. The formats: float (`hogwild.model.kernels.Linear`: fp32 or
  bf16, aten or prepacked for oneDNN), int8 (`hogwild.model.quant.Int8Linear`), int4
  (`hogwild.model.quant.Int4Linear`) and a GGUF's own blocks (`hogwild.model.blocks.GgufLinear`).
  `WeightsFormat.linear` (`gguf_linear` for a GGUF's blocks) picks the format's class for each projection as the
  model loads (as gpt-fast swaps its quantized modules in), so the loop calls `layer.qkv(h)` whatever the weights
  are.
- `LayerOps`: the small per-layer ops between the projections, a residual add with the RMSNorm after it and
  silu * up. `TORCH_OPS` runs them as torch ops (every device; the reference path); hogwild's fused CPU kernels
  (`hogwild.native.load()`, the compiled module itself) run each in one call.
- `Attention`: one step's concurrent attention over the cache, built per step (see `hogwild.attention`:
  `StepPlan` picks the fused-kernel backend or the torch-ops backend; `FlatReference` is the reference).

A GPU backend is then new modules that meet these contracts (a linear class, an ops object, an attention
backend), not an edit of the decoder's loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F

from hogwild.model import kernels
from hogwild.model.blocks import GgufLinear
from hogwild.model.quant import Int4Linear, Int8Linear, int4_fits, quantize_int4, quantize_linear


class Linear(Protocol):
    """One projection y = x @ W.T (+ b), its weights stored in one format and multiplied by that format's kernel.

    `x`: [..., in] rows in the dtype the format takes (float32 for int8 and GGUF blocks, the model's dtype for
    float and int4 weights); returns [..., out] in the format's output dtype, a new tensor the caller may update in
    place. A row's output never depends on the other rows of the call. `shape` is (out, in), as the float matrix's;
    `nbytes` the bytes a decode step reads, for the benchmarks' bandwidth figures."""

    shape: torch.Size

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class LayerOps(Protocol):
    """The per-layer ops between the projections.

    `rms_norm(x, residual, weight, eps, dtype)`: x [N, hidden] is the float32 residual stream; adds `residual`
    (any float dtype, or None) into x in place, then returns weight * x / rms(x) computed in float32, in `dtype`.
    `silu_mul(gate_up)`: [N, 2 * I] the fused gate/up output -> silu(gate) * up, [N, I] in its dtype."""

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, dtype: torch.dtype
    ) -> torch.Tensor: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...


class TorchOps:
    """`LayerOps` as torch ops: any device, any dtype."""

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, dtype: torch.dtype
    ) -> torch.Tensor:
        if residual is not None:
            x += residual
        return F.rms_norm(x, (x.shape[-1],), weight, eps).to(dtype)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


TORCH_OPS = TorchOps()


class Attention(Protocol):
    """One step's attention over the cache, for the rows the step feeds (built per step, read by every layer).

    `attend(layer, q, k, v)`: q [N, heads, D], k and v [N, kv_heads, D] of the step's N tokens, un-rotated, in
    `dtype`; the backend applies RoPE, writes k and v into the cache and returns [N, heads * D] in the model's dtype
    (a buffer the next layer's call may reuse). `attend_qkv(layer, qkv)`: the same on the fused projection's output
    [N, (heads + 2 * kv_heads) * D], in any float dtype."""

    dtype: torch.dtype  # q, k, v are handed over in this dtype

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def attend_qkv(self, layer: int, qkv: torch.Tensor) -> torch.Tensor: ...


@dataclass
class WeightsFormat:
    """How a model's projections are stored, chosen once at load (`hogwild.model.kernels.choose`): `kind` is the
    linear kernel ("onednn", "aten", "int8", "int4" or "gguf"), `dtype` the model's activation dtype.

    int8 and int4 quantize from the float weights, or take `cached` tensors of an earlier start; the tensors they
    use are recorded in `quantized` for the cache (int8 as "<name>.q" and "<name>.scale", int4 as "<name>.q4" and
    "<name>.scale_zero"). int4 keeps the vocabulary projection int8. "gguf" multiplies a GGUF's own blocks with
    `blocks` (`hogwild.native.load_gguf()`)."""

    kind: str
    dtype: torch.dtype
    activation_bits: int = 7
    cached: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: ModuleType | None = None
    quantized: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def head_int8(self) -> bool:
        """The vocabulary projection takes float32 rows and int8 weights."""
        return self.kind in ("int8", "int4")

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype float tensors are taken in. int4 quantizes from the float32 weights, not from their bf16
        rounding, so 4-bit weights keep their grid; the embedding and norms stay float32 too (the float32 recompute
        of the top logits reads the embedding)."""
        return torch.float32 if self.kind in ("int4", "gguf") else self.dtype

    def _stored(self, name: str, keys: tuple[str, str], quantize: Callable, weight: torch.Tensor) -> tuple:
        """One projection's quantized tensors, from the cache or quantized now, and recorded for the cache."""
        names = [f"{name}.{key}" for key in keys]
        cached = self.cached
        tensors = tuple(cached[n] for n in names) if all(n in cached for n in names) else quantize(weight)
        self.quantized.update(zip(names, tensors, strict=True))
        return tensors

    def linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        """The `Linear` of the float matrix `weight` [out, in] (in `stored_dtype`) and its bias, for the
        projection `name` ("lm_head" is the vocabulary projection)."""
        assert self.kind != "gguf", "GGUF projections are built from their blocks (`gguf_linear`)"
        if self.kind == "int4" and name != "lm_head":
            if not int4_fits(weight.shape):  # no model we know of; bf16 keeps it running
                return kernels.Linear(weight.to(self.dtype), None if bias is None else bias.to(self.dtype), "aten")
            return Int4Linear(*self._stored(name, ("q4", "scale_zero"), quantize_int4, weight), bias, self.dtype)
        if self.head_int8:
            weights = self._stored(name, ("q", "scale"), quantize_linear, weight)
            return Int8Linear(*weights, bias, self.activation_bits)
        return kernels.Linear(weight, bias, self.kind)

    def gguf_linear(self, parts: list, bias: torch.Tensor | None) -> Linear:
        """The `Linear` of GGUF block matrices (`hogwild.model.gguf.Blocks`) stacked by rows."""
        assert self.blocks is not None, "gguf runs a GGUF's blocks through hogwild's block kernels"
        return GgufLinear(parts, bias, self.blocks)
