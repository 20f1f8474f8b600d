"""Log-probabilities in OpenAI's shapes, one choice at a time, token by token.

Chat completions carry `logprobs.content`: one entry per sampled token (`token`, `logprob`, its UTF-8 `bytes`,
and `top_logprobs`, the asked-for number of most likely alternatives). Completions carry four parallel lists:
`tokens`, `token_logprobs`, `top_logprobs` (a token -> log-probability map of the alternatives and the chosen
token, as vLLM gives it) and `text_offset`; with `echo` the prompt's own tokens come first, the very first with
`None` (nothing precedes it). The values are float32 log-probabilities under the model (temperature 1, no
filtering), as the sampler and `hogwild.scoring` compute them.
"""

from __future__ import annotations

from collections.abc import Iterable

from hogwild.model.tokenizer import Tokenizer


class Logprobs:
    """One choice's log-probabilities: `add` records a token and returns what its stream chunk carries; `whole()`
    is the choice's `logprobs` once it is complete. `offset`: where the first token's text starts."""

    def __init__(self, tokenizer: Tokenizer, chat: bool, offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset = offset
        self.parts: dict[str, list] = {"content": []} if chat else {key: [] for key in COMPLETION_KEYS}

    def add(self, token: int, logprob: float | None, top: Iterable[tuple[int, float]] | None) -> dict:
        text = self.text(token)
        if self.chat:
            entry = {**_entry(text, logprob), "top_logprobs": [_entry(self.text(t), lp) for t, lp in top or ()]}
            self.parts["content"].append(entry)
            return {"content": [entry], "refusal": None}
        alternatives = None
        if top is not None:  # the chosen token too, so the best of the map is never below it
            alternatives = {}
            for t, lp in (*top, (token, logprob)):
                alternatives.setdefault(self.text(t), lp)
        values = (text, logprob, alternatives, self.offset)
        self.offset += len(text)
        for key, value in zip(COMPLETION_KEYS, values, strict=True):
            self.parts[key].append(value)
        return {key: [value] for key, value in zip(COMPLETION_KEYS, values, strict=True)}

    def whole(self) -> dict:
        return {**self.parts, "refusal": None} if self.chat else dict(self.parts)

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


COMPLETION_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def _entry(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
