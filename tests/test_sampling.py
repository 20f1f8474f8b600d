"""Sampling and stop strings."""

from __future__ import annotations

import pytest
import torch

from hogwild import sampling
from hogwild.engine import Engine, EngineConfig, Generation
from hogwild.errors import HogwildError
from hogwild.runs import find_stop, stop_prefix_length
from hogwild.sampling import SamplingParams, sample, sample_rows


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 100)
    params = SamplingParams(temperature=0.0)
    assert torch.equal(sample(logits, params, params.generator()), logits.argmax(-1))


def test_top_k_and_top_p_keep_only_the_head():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top2 = logits.topk(2, dim=-1).indices
    params = SamplingParams(temperature=1.5, top_k=2, seed=3)
    gen = params.generator()
    for _ in range(50):
        drawn = sample(logits, params, gen)
        assert all(drawn[r] in top2[r] for r in range(4))
    # a nucleus smaller than the top token's mass keeps just the top token
    peaked = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    gen = params.generator()
    assert {int(sample(peaked, params, gen)) for _ in range(30)} == {0}


def test_seed_reproduces_and_rows_draw_independently():
    logits = torch.zeros(8, 1000)
    params = SamplingParams(temperature=1.0, seed=7)
    a = sample(logits, params, params.generator())
    b = sample(logits, params, params.generator())
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 1


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"max_tokens": 0}, {"stop": ("",)}]
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(HogwildError):
        SamplingParams(**kwargs)


def test_stop_helpers():
    assert find_stop("abc END def", ("END",)) == 4
    assert find_stop("abc", ("END",)) is None
    assert stop_prefix_length("abc EN", ("END",)) == 2
    assert stop_prefix_length("abc", ("END",)) == 0


def test_generate_text_cuts_at_the_stop_string(default_model_dir):
    engine = Engine.load(EngineConfig(model=str(default_model_dir), threads=1))
    prompt = engine.encode_prompt("Count from 1 to 20, separated by commas.")
    free = Generation()
    full = "".join(engine.generate_text(prompt, SamplingParams(max_tokens=40), free))
    assert "7" in full, full
    cut = full.index("7")
    stopped = Generation()
    text = "".join(engine.generate_text(prompt, SamplingParams(max_tokens=40, stop=("7",)), stopped))
    assert text == full[:cut]
    assert stopped.finish_reason == "stop" and stopped.text == text
    assert free.finish_reason in ("length", "stop")


def test_seeds_out_of_range_and_tiny_temperatures():
    for seed in (-1, 2**63, 2**64):
        with pytest.raises(HogwildError, match="seed"):
            SamplingParams(seed=seed)
    SamplingParams(seed=2**63 - 1).generator()
    logits = torch.randn(6, 300) * 5
    for temperature in (1e-38, 1e-45, 1e-6):  # dividing by these overflows float32: sampled greedily instead
        params = SamplingParams(temperature=temperature, seed=1)
        assert torch.equal(sample(logits, params, params.generator()), logits.argmax(-1))
    with pytest.raises(HogwildError, match="finite"):
        SamplingParams(temperature=float("inf"))


@pytest.mark.parametrize("top_k,top_p", [(0, 0.95), (20, 0.8), (0, 1.0), (300, 0.99), (5, 1.0)])
def test_draws_on_the_ranked_head_equal_the_full_sort(top_k, top_p, monkeypatch):
    # a flat and a peaked row: the peaked row's nucleus closes within the head, the flat one's does not; each draw
    # must be the token a full sort of the vocabulary would give, for every seed
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(1, 5000) * 0.1, torch.randn(1, 5000) * 6, torch.randn(1, 5000) * 2])
    params = [SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, seed=s) for s in range(3)]

    def draws() -> list[int]:
        return [
            s.token
            for seed in range(40)
            for s in sample_rows(logits, params, [torch.Generator().manual_seed(seed + r) for r in range(3)])
        ]

    fast = draws()
    monkeypatch.setattr(sampling, "HEAD", 10**9)  # the head is the whole vocabulary: a full sort
    assert fast == draws()
    assert len(set(fast)) > 10  # the draws do vary
