"""GGUF models through the engine on their own blocks: against the same blocks dequantized to float32 (tiny models
of each family, llama's permuted q/k rows and qwen2's biases and untied head among them, and the real default
model), and a row's tokens the same alone or batched with other runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_gguf import tiny_source_model, write_model_gguf

from hogwild.bench.quality import greedy
from hogwild.engine import Engine, EngineConfig
from hogwild.scoring import score

TEXT = "Two workers share one notebook and read each other's lines as they are written."


@pytest.fixture
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))


def engines(model: str) -> tuple[Engine, Engine]:
    """The model on its own blocks, and on the same blocks dequantized to float32."""
    blocks = Engine.load(EngineConfig(model=model, threads=1, kv_memory="64MiB"))
    floats = Engine.load(EngineConfig(model=model, threads=1, kv_memory="64MiB", weights="fp32"))
    assert blocks.kernels.linear == "gguf", blocks.describe()
    return blocks, floats


@pytest.mark.parametrize(("family", "types"), [("llama", ("Q8_0", "Q4_0")), ("qwen2", ("Q4_1", "Q5_0", "Q8_0"))])
def test_tiny_gguf_blocks_track_their_float32_weights(
    family: str, types: tuple[str, ...], tmp_path: Path, own_cache: None
) -> None:
    path = write_model_gguf(tmp_path / f"{family}.gguf", tiny_source_model(family, seed=5), types)
    blocks, floats = engines(str(path))
    ids = list(range(3, 40))
    ours, reference = (torch.log_softmax(logits_of(e, ids), -1) for e in (blocks, floats))
    # 8-bit activations move each log-probability by ~0.03 on average; llama's q/k rows left permuted moved them
    # by 1.0 (and picked another argmax at 80% of positions), and a lost bias or a wrong block type moves the whole
    # distribution too
    error = (ours - reference).abs()
    assert error.mean() < 0.08 and error.max() < 0.5, (error.mean(), error.max())
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.85


def logits_of(engine: Engine, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: teacher-forced log-probabilities as `score` computes them, all of the vocabulary."""
    scores = score(engine, ids, top=engine.model_config.vocab_size)
    order = scores.top_ids.argsort(-1)
    return scores.top.gather(-1, order)


def test_default_model_blocks_against_float32_and_batched(default_model_dir: Path) -> None:
    blocks, floats = engines("smollm2-135m")
    ids = blocks.tokenizer.encode(TEXT, add_special_tokens=False)
    ours, reference = score(blocks, ids), score(floats, ids)
    assert (ours.top_ids[:, 0] == reference.top_ids[:, 0]).float().mean() >= 0.9
    loss = (reference.token.mean() - ours.token.mean()) / reference.token.mean().abs()
    assert abs(float(loss)) < 0.02, float(loss)

    prompts = [blocks.encode_prompt(q) for q in ("What is 2+2?", "Name a colour.", "Say hi.")]
    together = greedy(blocks, prompts, 12)
    alone = [greedy(blocks, [prompt], 12)[0] for prompt in prompts]
    assert together == alone, "a row computes the same alone or batched"
