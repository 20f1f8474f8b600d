"""Linears and the embedding on a GGUF's own blocks, through hogwild's block kernels (`hogwild.native.load_gguf`).

A decode step reads every weight once, so the fewest bytes are the fastest: the GGUF's blocks (Q4_K, Q6_K, Q5_0,
Q8_0, ...) are multiplied where they lie in the mapped file, never converted to float or requantized. The kernels
quantize each activation row per block to 8 bits the way its block type needs and multiply it by the blocks in
integers, reading each weight byte once for all rows of a step; a row computes the same alone or batched.
"""

from __future__ import annotations

from types import ModuleType

import torch

from hogwild.model.gguf import Blocks


class GgufLinear:
    """y = x @ W.T (+ b) for float32 x [N, in], W one or more GGUF block matrices stacked by rows (q, k, v or
    gate, up, each in its own block type), y float32 [N, sum of their rows]."""

    def __init__(self, parts: list[Blocks], bias: torch.Tensor | None, kernels: ModuleType) -> None:
        columns = {p.columns for p in parts}
        assert len(columns) == 1, f"stacked matrices must share their input width, got {sorted(columns)}"
        self.parts = parts
        self.columns = columns.pop()
        self.shape = torch.Size((sum(p.rows for p in parts), self.columns))
        self.bias = None if bias is None else bias.float()
        self.kernels = kernels
        self._weights = [(p.data, p.type_id) for p in parts]
        # the kernel call for 2-D x, chosen once: a 135M decode step makes 121 of them, where each microsecond of
        # Python is 2% of the step
        mm, mm_many, weights, k = kernels.mm, kernels.mm_many, self._weights, self.columns
        if len(parts) == 1:
            ((w, t),) = weights
            self._multiply = lambda x: mm(x, w, t, k)
        else:
            self._multiply = lambda x: mm_many(x, weights, k)

    @property
    def nbytes(self) -> int:
        return sum(p.data.numel() for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.columns)).view(*x.shape[:-1], self.shape[0])
        y = self._multiply(x)
        if self.bias is not None:
            y += self.bias
        return y

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 [len(index), in]: the weight rows at `index` (of a single matrix), dequantized exactly."""
        assert len(self.parts) == 1, "rows() reads one matrix"
        w, t = self._weights[0]
        return self.kernels.get_rows(w, t, self.columns, index)
