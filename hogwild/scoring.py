"""What the model thinks of a given text: the log-probability of each of its tokens given the ones before it.

One function, `score`, serves `hogwild bench quality` (greedy flips and the log-likelihood of reference solutions)
and the server's `echo` with `logprobs` (the prompt's own token log-probabilities, which loglikelihood evaluations
read). It feeds the tokens through the model as one sequence in chunks of the engine's `step_tokens`, in a block
of its own that is freed at the end, and keeps only each position's token and top log-probabilities, so a long
text never holds a [tokens, vocab] matrix. It runs the model directly: call it where nothing else steps the
engine (a script, or the engine loop's thread through `EngineLoop.call`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hogwild.attention import Row, StepPlan
from hogwild.engine import Engine
from hogwild.errors import HogwildError


@dataclass
class Scores:
    """Log-probabilities (float32) of tokens 1.. of a text, each given the tokens before it."""

    token: torch.Tensor  # [len(ids) - 1]: of the text's own token
    top_ids: torch.Tensor  # [len(ids) - 1, top]: the most likely tokens, best first
    top: torch.Tensor  # [len(ids) - 1, top]: their log-probabilities


def score(engine: Engine, ids: list[int], top: int = 1) -> Scores:
    """Teacher-forced log-probabilities of every token of `ids` after the first, and the `top` most likely tokens
    at each position. Needs KV room for `len(ids)` tokens now (a `HogwildError` if the pool has none)."""
    assert ids, "score needs at least one token"
    if not engine.pool.fits(len(ids)):
        raise HogwildError(f"no KV room to score {len(ids)} tokens now: the pool is in use, try again")
    ledger = engine.pool.open(len(ids))
    tokens, top_ids, tops = [], [], []
    try:
        block = ledger.new_block("score", limit=len(ids))
        for start in range(0, len(ids), engine.config.step_tokens):
            chunk = ids[start : start + engine.config.step_tokens]
            ledger.reserve([(block, block.length + len(chunk))])
            plan = StepPlan([Row([block], chunk)], engine.model_config, engine.rope, engine.model.dtype, engine.fused)
            logprobs = torch.log_softmax(engine.model.forward(torch.tensor(chunk), plan, logits_at=None).float(), -1)
            plan.commit()
            block.publish()
            # position i predicts token i + 1: the chunk's last position predicts the next chunk's first token
            following = torch.tensor(ids[start + 1 : start + len(chunk) + 1])
            logprobs = logprobs[: len(following)]  # [chunk (one less at the end of the text), vocab]
            tokens.append(logprobs.gather(1, following[:, None]).squeeze(1))
            values, indices = logprobs.topk(top, dim=-1)
            top_ids.append(indices)
            tops.append(values)
    finally:
        ledger.release()
    return Scores(torch.cat(tokens), torch.cat(top_ids), torch.cat(tops))
