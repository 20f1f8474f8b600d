"""Sampling: a small pure function from logits to token ids, with an explicit torch.Generator.

Temperature 0 means argmax. Top-k and top-p (nucleus) filter before the draw; all rows of a batch share the
parameters but draw independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hogwild.errors import HogwildError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise HogwildError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise HogwildError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise HogwildError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise HogwildError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise HogwildError("stop strings must not be empty")

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits: [rows, vocab] -> token ids [rows] (int64, on the CPU)."""
    logits = logits.float().cpu()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass before it already reaches top_p; the most likely token always stays
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
