"""What real OpenAI clients send, through the official `openai` client on a live loopback server: several prompts in
one completions request, `logprobs` and `top_logprobs` on chat and completions, `echo` with `logprobs` (the
prompt's own log-probabilities, which loglikelihood evaluations read). A tiny random model serves; its numbers are
checked against the engine's own: the same run alone, and `hogwild.scoring.score` of the same tokens.
"""

from __future__ import annotations

import math

import openai
import pytest
import torch
from serving import live_server
from tiny import tiny_engine

from hogwild.runs import Sampled
from hogwild.sampling import SamplingParams
from hogwild.scoring import score

torch.set_num_threads(1)
MODEL = "smollm2-135m"
PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def twin(tokenizer):
    """An engine with the served model's weights, for the engine's own numbers."""
    return tiny_engine(tokenizer)


@pytest.fixture(scope="module")
def live(tokenizer):
    with live_server(tiny_engine(tokenizer)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_list_of_prompts_is_one_choice_each_in_shared_steps(client, live, twin, tokenizer):
    steps = live.server.backend.engine.stats.steps
    reply = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, max_tokens=5, temperature=0.8, seed=11)
    assert [c.index for c in reply.choices] == list(range(6))
    # the engine's own run of the same prompts: choice p * n + j is sample j of prompt p
    ids = [tokenizer.encode(p) for p in PROMPTS]
    run = Sampled(twin, ids, SamplingParams(temperature=0.8, seed=11, max_tokens=5), n=2)
    list(twin.stream(run))
    assert [c.text for c in reply.choices] == [s.text for s in run.final.samples]
    assert reply.usage.prompt_tokens == sum(len(i) for i in ids)
    assert reply.usage.completion_tokens == sum(len(s.tokens) for s in run.final.samples)
    # all six samples advanced together: 5 tokens (prompts fed in the first pass) take at most 6 passes, not 30
    assert live.server.backend.engine.stats.steps - steps <= 6
    # prompts given as token ids answer the same
    by_ids = client.completions.create(model=MODEL, prompt=ids, n=2, max_tokens=5, temperature=0.8, seed=11)
    assert [c.text for c in by_ids.choices] == [c.text for c in reply.choices]


def test_chat_logprobs_and_top_logprobs(client, twin, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    (choice,) = reply.choices
    content = choice.logprobs.content
    alone = Sampled(twin, tokenizer.encode_chat(messages), SamplingParams(max_tokens=6))
    list(twin.stream(alone))
    tokens = alone.final.samples[0].tokens
    assert len(content) == len(tokens) + (choice.finish_reason == "stop")  # an end-of-sequence token has its entry
    for entry, token in zip(content, tokens, strict=False):
        assert entry.token == tokenizer.decode([token], skip_special_tokens=False)
        assert bytes(entry.bytes) == entry.token.encode()
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the best alternative, and the alternatives come best first
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob <= 0
    total = sum(entry.logprob for entry in content[: len(tokens)])
    assert math.isclose(total, alone.final.samples[0].logprob, rel_tol=1e-6)
    # streamed: each chunk carries its token's entry, the same as unstreamed
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape(client):
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    n = len(logprobs.tokens)
    assert n >= 1 and len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    assert "".join(logprobs.tokens).startswith(reply.choices[0].text)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert token in top and top[token] == logprob  # the chosen token is in the map (vLLM's shape)
        assert max(top.values()) == logprob  # greedy
        assert 2 <= len(top) <= 3
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_echo_gives_the_prompts_own_log_probabilities(client, twin, tokenizer):
    """What lm-evaluation-harness's loglikelihood reads: echo, logprobs 1, max_tokens 1, token ids in a batch."""
    ids = [tokenizer.encode(p) for p in PROMPTS]
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    for p, choice in enumerate(sorted(reply.choices, key=lambda c: c.index)):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids[p]) + 1  # the prompt's tokens, then the one sampled
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        own = score(twin, ids[p])
        assert logprobs.token_logprobs[1 : len(ids[p])] == own.token.tolist()
        best = [max(top.values()) for top in logprobs.top_logprobs[1 : len(ids[p])]]
        assert best == own.top[:, 0].tolist()
        assert choice.text.startswith(tokenizer.decode(ids[p], skip_special_tokens=False))
    # a text prompt echoes its own text, and without logprobs no scores are computed
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(PROMPTS[0]) and plain.choices[0].logprobs is None


def test_the_sampled_tokens_log_probability_matches_scoring(client, twin, tokenizer):
    ids = tokenizer.encode(PROMPTS[1])
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, logprobs=0)
    alone = Sampled(twin, ids, SamplingParams(max_tokens=3))
    list(twin.stream(alone))
    tokens = alone.final.samples[0].tokens
    teacher = score(twin, ids + tokens).token[len(ids) - 1 :].tolist()
    assert reply.choices[0].logprobs.token_logprobs[: len(tokens)] == pytest.approx(teacher, abs=1e-4)
