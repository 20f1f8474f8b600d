"""hogwild's decoder against transformers: tiny random models of every family in float32 (prefill, decode, a flat
batch of rows of different lengths), the real default model's greedy tokens, and a bf16 sanity check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, TinyModel

from hogwild.attention import Row
from hogwild.engine import Engine, EngineConfig
from hogwild.model.gguf import INDEX
from hogwild.sampling import SamplingParams

torch.set_num_threads(1)

TOL = 1e-4
DECODE_STEPS = 20
GREEDY_TOKENS = 32
CHAT_PROMPTS = [
    "Tell me about the city of Paris.",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return TinyModel(request.param, seed=1)


def prompt(seed: int, length: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def test_tiny_prefill_and_decode_match_transformers(tiny: TinyModel) -> None:
    tokens = prompt(0, 13, tiny.config.vocab_size)
    block = tiny.ledger().new_block("s")
    logits = tiny.step([Row([block], tokens)])[0]  # [T, vocab]
    assert max_diff(logits, tiny.hf_logits(tokens)) < TOL
    generated = []
    for _ in range(DECODE_STEPS):
        token = int(logits[-1].argmax())
        tokens = tokens + [token]
        generated.append(token)
        logits = tiny.step([Row([block], [token])])[0]
        assert block.length == len(tokens)
        assert max_diff(logits[-1], tiny.hf_logits(tokens)[-1]) < TOL, f"decode step {len(generated)}"
    assert len(set(generated)) > 1, "greedy decode stuck on one token: the comparison would prove little"


def test_tiny_flat_batch_of_uneven_rows_matches_transformers(tiny: TinyModel) -> None:
    vocab = tiny.config.vocab_size
    prompts = [prompt(10, 5, vocab), prompt(11, 17, vocab), prompt(12, 1, vocab)]
    ledger = tiny.ledger()
    blocks = [ledger.new_block(f"s{i}") for i in range(len(prompts))]
    # one flat batch of 5 + 17 + 1 tokens: no row is padded to another's width
    logits = tiny.step([Row([b], p) for b, p in zip(blocks, prompts, strict=True)])
    for r, tokens in enumerate(prompts):
        assert max_diff(logits[r], tiny.hf_logits(tokens)) < TOL, f"row {r} prefill"
    seqs = [list(p) for p in prompts]
    last = [logits[r][-1] for r in range(len(prompts))]
    for i in range(5):
        feed = [int(x.argmax()) for x in last]
        for seq, token in zip(seqs, feed, strict=True):
            seq.append(token)
        logits = tiny.step([Row([b], [t]) for b, t in zip(blocks, feed, strict=True)])  # 3 x [1, vocab]
        last = [logits[r][0] for r in range(len(seqs))]
        for r, seq in enumerate(seqs):
            assert max_diff(last[r], tiny.hf_logits(seq)[-1]) < TOL, f"row {r} decode step {i + 1}"


@pytest.fixture(scope="module")
def engine32(default_model_dir: Path) -> Engine:
    return Engine.load(EngineConfig(dtype="float32", threads=1))


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path):
    from transformers import AutoModelForCausalLM

    (gguf,) = json.loads((default_model_dir / INDEX).read_text())["source"]["files"]  # the default model's one file
    gguf = Path(gguf)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def hogwild_greedy(engine: Engine, text: str, max_tokens: int) -> list[int]:
    ids = engine.encode_prompt(text)
    return list(engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens)))


@pytest.mark.parametrize("text", CHAT_PROMPTS)
def test_default_model_greedy_matches_transformers(engine32: Engine, hf_model, text: str) -> None:
    ids = engine32.encode_prompt(text)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
        )[0, len(ids) :].tolist()
    # transformers keeps the eos token it stopped on; hogwild's generate excludes it
    eos = [i for i, t in enumerate(out) if t in engine32.eos_ids]
    reference = out[: eos[0]] if eos else out
    ours = hogwild_greedy(engine32, text, GREEDY_TOKENS)
    assert ours == reference
    assert len(reference) >= 8, "the reply is too short to prove much"


def test_default_model_bf16_greedy_starts_like_float32(engine32: Engine) -> None:
    engine16 = Engine.load(EngineConfig(dtype="bfloat16", threads=1))
    text = "What is 2+2?"
    ours16 = hogwild_greedy(engine16, text, 8)
    ours32 = hogwild_greedy(engine32, text, 8)
    assert len(ours32) == 8
    assert ours16 == ours32
