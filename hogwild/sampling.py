"""Sampling: a small pure function from logits to token ids, each row with its own parameters and generator.

Temperature 0 means argmax. Top-k and top-p (nucleus) filter before the draw. The rows of a step (from any number
of runs) are sampled together; each row draws one uniform number from its own run's `torch.Generator` and picks
its token by inverse CDF, so a seeded run draws the same tokens alone or batched with other runs.
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


GREEDY = SamplingParams()


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [rows, vocab] -> (token ids [rows] int64, their log-probabilities [rows] under the model), on the CPU.

    Row r uses `params[r]`; rows with a temperature draw from `generators[r]` (greedy rows need none)."""
    logits = logits.float().cpu()
    tokens = logits.argmax(dim=-1)
    drawn = [r for r, p in enumerate(params) if p.temperature > 0]
    if drawn:
        index = torch.tensor(drawn)
        temperature = torch.tensor([params[r].temperature for r in drawn]).unsqueeze(1)
        probs = (logits.index_select(0, index) / temperature).softmax(dim=-1)  # [drawn, vocab], in vocab order
        vocab = probs.shape[1]
        top_k = torch.tensor([params[r].top_k or vocab for r in drawn]).unsqueeze(1)
        ranked = probs.sort(dim=-1, descending=True).values
        # keep a token when its probability reaches the k-th largest and the nucleus threshold: the smallest
        # probability whose mass before it is still under top_p (the most likely token always stays)
        kth = ranked.gather(1, (top_k - 1).clamp(max=vocab - 1))
        top_p = torch.tensor([params[r].top_p for r in drawn]).unsqueeze(1)
        inside = (ranked.cumsum(dim=-1) - ranked) < top_p
        nucleus = ranked.masked_fill(~inside, float("inf")).amin(dim=-1, keepdim=True)
        probs = probs.masked_fill_((probs < kth) | (probs < nucleus), 0.0)
        # inverse CDF in vocabulary order: a tiny change in the logits moves the boundaries a tiny bit, where a
        # sorted order could swap near-tied tokens, so a seeded run draws the same tokens alone or batched
        cdf = probs.cumsum(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=generators[r]) for r in drawn]).unsqueeze(1)
        tokens[index] = torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp_(max=vocab - 1).squeeze(1)
    # log-probability of the chosen token only: one logsumexp pass, no [rows, vocab] log-softmax
    return tokens, logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits: [rows, vocab] -> token ids [rows]; every row with the same parameters and generator."""
    return sample_rows(logits, [params] * logits.shape[0], [generator] * logits.shape[0])[0]
