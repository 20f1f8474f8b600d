"""Synthetic GGUF files: llama.cpp's Q4_K_M choice of Q6_K layers, the 7B plan's size, and the tiny shape written
with the tiny test tokenizer read back through hogwild (its config, block types, weight scale, tokenizer and finite
greedy decoding), written once by `hogwild bench shape` and never left half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import new_ledger, step_rows
from tiny_gguf import TOKENS, tiny_source_model, write_model_gguf

from hogwild import cli, native
from hogwild.attention import Row
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.model import synthetic
from hogwild.model.loading import open_weights, read_config
from hogwild.model.registry import resolve_model_dir
from hogwild.model.synthetic import SHAPES, more_bits, tensor_plan, write_synthetic_gguf

TINY = SHAPES["tiny"]


@pytest.fixture(scope="module", autouse=True)
def gguf_kernels_built() -> None:
    """Build (or find) the GGUF block kernels in the real cache before `own_cache` points HOGWILD_CACHE away."""
    native.load_gguf()


@pytest.fixture(autouse=True)
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF carrying the tiny test tokenizer (262 tokens)."""
    return write_model_gguf(tmp_path_factory.mktemp("tokenizer") / "tokenizer.gguf", tiny_source_model("qwen2"))


def test_more_bits_picks_llamacpp_q6_k_layers() -> None:
    assert [i for i in range(28) if more_bits(i, 28)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]
    # llama.cpp counts in file order: Qwen's own Qwen2.5-Coder-1.5B Q4_K_M file, its tensors sorted by name, has
    # Q6_K attn_v and ffn_down on exactly these layers
    by_name = sorted(range(28), key=str)
    assert sorted(layer for k, layer in enumerate(by_name) if more_bits(k, 28)) == [
        0, 1, 5, 6, 7, 8, 9, 10, 13, 16, 19, 21, 24, 27,
    ]  # fmt: skip


def test_7b_plan_has_the_q4_k_m_files_types_and_size() -> None:
    plan = {t.name: t for t in tensor_plan(SHAPES["qwen2.5-7b"])}
    assert len(plan) == 28 * 12 + 3
    assert plan["token_embd.weight"].type_name == "Q4_K" and plan["output.weight"].type_name == "Q6_K"
    assert plan["blk.3.ffn_down.weight"].shape == (3584, 18944)
    assert plan["blk.3.attn_k.weight"].shape == (512, 3584)
    assert {plan[f"blk.{i}.attn_q.weight"].type_name for i in range(28)} == {"Q4_K"}
    assert [i for i in range(28) if plan[f"blk.{i}.attn_v.weight"].type_name == "Q6_K"] == [
        i for i in range(28) if plan[f"blk.{i}.ffn_down.weight"].type_name == "Q6_K"
    ]
    total = sum(t.nbytes for t in plan.values())
    assert total == pytest.approx(4.68e9, rel=0.005)  # llama.cpp's Qwen2.5-7B-Instruct Q4_K_M: 4.68 GB


def test_tiny_shape_reads_back_and_decodes(tmp_path: Path, tokenizer_gguf: Path) -> None:
    path = write_synthetic_gguf(tmp_path / "tiny.gguf", TINY, tokenizer_gguf)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    folder = resolve_model_dir(str(path))
    config = read_config(folder)
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")} == {
        "vocab_size": TINY.vocab,
        "hidden_size": TINY.hidden,
        "intermediate_size": TINY.intermediate,
        "num_hidden_layers": TINY.layers,
    }
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert config["rope_parameters"]["rope_theta"] == TINY.rope_theta
    assert config["rms_norm_eps"] == pytest.approx(TINY.rms_eps)
    assert config["attention_bias"] and not config["tie_word_embeddings"]

    weights = open_weights(folder)
    types = {name: weights.tensors[name].type_name for name in weights.names()}
    q6 = [i for i in range(TINY.layers) if types[f"model.layers.{i}.self_attn.v_proj.weight"] == "Q6_K"]
    assert q6 == [i for i in range(TINY.layers) if types[f"model.layers.{i}.mlp.down_proj.weight"] == "Q6_K"]
    assert q6 == [0, 3, 6, 7]
    assert types["lm_head.weight"] == "Q6_K" and types["model.embed_tokens.weight"] == "Q4_K"
    assert types["model.layers.0.self_attn.q_proj.bias"] == "F32"
    for name in ["model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]:
        w = weights.get(name)
        assert float(w.std()) == pytest.approx(w.shape[1] ** -0.5, rel=0.1), name  # scales where gguf reads them
        assert abs(float(w.mean())) < 0.1 * w.shape[1] ** -0.5, name

    engine = Engine.load(EngineConfig(model=str(path), threads=1, kv_memory="64MB"))
    assert engine.tokenizer.decode([TOKENS.index("Ġthe")]) == " the"  # the tiny tokenizer, padded
    assert engine.tokenizer.decode([TINY.vocab - 1]) == f"[PAD{TINY.vocab - 1}]"
    block = new_ledger(engine.model_config, engine.rope, 64).new_block("s")
    tokens = engine.tokenizer.encode("the the")
    for _ in range(4):
        (logits,) = step_rows(engine.model, engine.rope, [Row([block], tokens)])
        assert logits.shape[-1] == TINY.vocab and torch.isfinite(logits).all()
        assert float(logits[-1].std()) > 0.1  # random weights, not zeros
        tokens = [int(logits[-1].argmax())]


def test_interrupted_write_leaves_nothing(
    tmp_path: Path, tokenizer_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = []

    def interrupt_third(rng: np.random.Generator, t: synthetic.Planned) -> np.ndarray:
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(t.name)
        return real(rng, t)

    real = synthetic.random_tensor
    monkeypatch.setattr(synthetic, "random_tensor", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_gguf(tmp_path / "tiny.gguf", TINY, tokenizer_gguf)
    assert list(tmp_path.iterdir()) == []


def test_bench_shape_writes_once_and_prints_the_path(
    tmp_path: Path, tokenizer_gguf: Path, own_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["bench", "shape", "tiny", "--tokenizer", str(tokenizer_gguf)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == own_cache / "synthetic" / "tiny-q4_k_m.gguf" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cli.main(["bench", "shape", "tiny", "--tokenizer", str(tokenizer_gguf)]) == 0
    assert Path(capsys.readouterr().out.strip()) == path and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the tokenizer's work folder is gone

    assert synthetic.written_shape(path) == "tiny"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-100])
    assert synthetic.written_shape(truncated) is None
    with pytest.raises(HogwildError, match="not a complete synthetic tiny"):
        synthetic.synthetic_gguf(TINY, truncated, str(tokenizer_gguf))

    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF and then nothing")
    with pytest.raises(HogwildError, match="not a complete synthetic tiny"):
        synthetic.synthetic_gguf(TINY, other, str(tokenizer_gguf))
    assert other.read_bytes() == b"GGUF and then nothing"
    assert cli.main(["bench", "shape", "tiny", "--out", str(tmp_path / "new.gguf")]) == 2
    assert "has no tokenizer of its own" in capsys.readouterr().err
    assert cli.main(["bench", "shape", "tiny", "--out", str(other), "--tokenizer", str(tokenizer_gguf)]) == 2
