"""Sampling: a small pure function from logits to token ids, each row with its own parameters and generator.

Temperature 0 (or below `GREEDY_BELOW`, where dividing the logits by it would overflow) means argmax. Top-k and
top-p (nucleus) filter before the draw. The rows of a step (from any number of runs) are sampled together; each
row draws one uniform number from its own run's `torch.Generator` and picks its token by inverse CDF, so a seeded
run draws the same tokens alone or batched with other runs. Each sample carries its token's log-probability under
the model and, when its parameters ask for them, the most likely alternatives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from hogwild.errors import HogwildError

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily: logits / 1e-38 overflow float32
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED (what every torch.Generator takes)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float  # log-probability of the token under the model (temperature 1, no filtering)
    top: tuple[tuple[int, float], ...] = ()  # the `top_logprobs` most likely tokens and their log-probabilities


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # alternatives reported with each sampled token
    banned: tuple[int, ...] = ()  # token ids never drawn (a logits mask); logprobs stay the model's own
    only: tuple[int, ...] = ()  # when given, the only token ids that may be drawn
    blocked: tuple[int, ...] = ()  # a few more ids not drawn at this one step (beside `banned`, which stays cached)

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):
            raise HogwildError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise HogwildError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise HogwildError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if not 0 < self.top_p <= 1:
            raise HogwildError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise HogwildError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise HogwildError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise HogwildError("stop strings must not be empty")
        if self.only and set(self.only) <= set(self.banned):
            raise HogwildError("every token of `only` is banned: nothing could be drawn")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


GREEDY = SamplingParams()


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    kernels: ModuleType | None = None,
) -> list[Sample]:
    """logits: [rows, vocab] -> one `Sample` a row (its token, log-probability and asked-for alternatives).

    Row r uses `params[r]`; rows with a temperature draw from `generators[r]` (greedy rows need none). `kernels`
    (hogwild's fused CPU kernels, `hogwild.native.load()`) makes the argmax and log-normalizer passes over the
    vocabulary one vectorized pass each: torch's take ~100 us each on a row of a 152k vocabulary."""
    logits = logits.float().cpu().contiguous()
    choice = _masked(logits, params)  # what the draw reads: banned tokens at -inf
    if kernels is not None:
        tokens, norm = kernels.argmax_logsumexp(logits, None if choice is logits else choice)
        norm = norm.unsqueeze(1)  # [rows, 1]
    else:
        tokens = choice.argmax(dim=-1)
        # log-probabilities of the chosen and the top tokens only: one logsumexp pass, no log-softmax
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [rows, 1]
    drawn = [r for r, p in enumerate(params) if not p.greedy]
    if drawn:
        index = torch.tensor(drawn)
        temperature = torch.tensor([params[r].temperature for r in drawn]).unsqueeze(1)
        probs = (choice.index_select(0, index) / temperature).softmax(dim=-1)  # [drawn, vocab], in vocab order
        vocab = probs.shape[1]
        top_k = torch.tensor([params[r].top_k or vocab for r in drawn]).unsqueeze(1)
        top_p = torch.tensor([params[r].top_p for r in drawn]).unsqueeze(1)
        ranked = _ranked(probs, top_k, top_p)
        # keep a token when its probability reaches the k-th largest and the nucleus threshold: the smallest
        # probability whose mass before it is still under top_p (the most likely token always stays)
        kth = ranked.gather(1, (top_k - 1).clamp(max=ranked.shape[1] - 1))
        inside = (ranked.cumsum(dim=-1) - ranked) < top_p
        nucleus = ranked.masked_fill(~inside, float("inf")).amin(dim=-1, keepdim=True)
        probs = probs.masked_fill_((probs < kth) | (probs < nucleus), 0.0)
        # inverse CDF in vocabulary order: a tiny change in the logits moves the boundaries a tiny bit, where a
        # sorted order could swap near-tied tokens, so a seeded run draws the same tokens alone or batched
        cdf = probs.cumsum(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=generators[r]) for r in drawn]).unsqueeze(1)
        tokens[index] = torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp_(max=vocab - 1).squeeze(1)
    logprobs = (logits.gather(1, tokens.unsqueeze(1)) - norm).squeeze(1).tolist()
    k = max(p.top_logprobs for p in params)
    top: list[tuple] = [()] * len(params)
    if k:
        values, ids = logits.topk(k, dim=-1)
        values, ids = (values - norm).tolist(), ids.tolist()
        top = [
            tuple(zip(ids[r][: p.top_logprobs], values[r][: p.top_logprobs], strict=True)) for r, p in enumerate(params)
        ]
    return [Sample(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), logprobs, top, strict=True)]


HEAD = 256  # sampling ranks this many of the most likely tokens first; the whole vocabulary only when it must


def _ranked(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's probabilities in descending order, as far as its top-k and top-p reach: the first `head` of them
    (a top-k pass, a fraction of a full sort of a 150k vocabulary), or all when a row without a top-k inside the
    head has a nucleus that the head does not close. What the draw keeps is the same as with the full sort: a row's
    k-th largest and its nucleus both lie in the head, or its nucleus is inside the head and above anything past it.
    """
    vocab = probs.shape[1]
    within = top_k[top_k < vocab]
    head = min(vocab, max(HEAD, int(within.max()) if within.numel() else 0))
    if head == vocab:
        return probs.sort(dim=-1, descending=True).values
    ranked = probs.topk(head, dim=-1).values
    open_nucleus = (ranked.cumsum(dim=-1)[:, -1:] - ranked[:, -1:]) < top_p  # the last of the head still inside
    if (open_nucleus & (top_k > head)).any():
        return probs.sort(dim=-1, descending=True).values
    return ranked


def _masked(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`logits` with every row's banned tokens (and, for a row with `only`, every other token) at -inf."""
    rows = [r for r, p in enumerate(params) if p.banned or p.only or p.blocked]
    if not rows:
        return logits
    out = logits.clone()
    for r in rows:
        if params[r].only:
            keep = _ids(params[r].only)
            row = torch.full_like(out[r], float("-inf"))
            row[keep] = out[r, keep]
            out[r] = row
        if params[r].banned:
            out[r, _ids(params[r].banned)] = float("-inf")
        if params[r].blocked:
            out[r, list(params[r].blocked)] = float("-inf")
    return out


@functools.lru_cache(maxsize=64)
def _ids(ids: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits: [rows, vocab] -> token ids [rows]; every row with the same parameters and generator."""
    samples = sample_rows(logits, [params] * logits.shape[0], [generator] * logits.shape[0])
    return torch.tensor([s.token for s in samples])
