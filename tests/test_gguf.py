"""GGUF files as hogwild reads them: tiny models of each family through a GGUF file and back (weights, config,
tokenizer and chat template), quantized files against transformers' GGUF loader, the tensor index and the mapping
(one file, or parts mapped back to back), and each unsupported or damaged file's one-line error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from tiny_gguf import BOS, CHAT_TEMPLATE, EOS, add_tensor, finish, tiny_source_model, write_model_gguf

from hogwild import cli
from hogwild.errors import HogwildError
from hogwild.model import gguf as hw_gguf
from hogwild.model.config import ModelConfig
from hogwild.model.loading import load_state_dict, read_config
from hogwild.model.registry import resolve_model_dir
from hogwild.model.tokenizer import Tokenizer

ROWS, COLS = 3, 512  # two K-quant super-blocks or sixteen 32-element blocks per row
K_QUANT_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of each block's float16 scales


@pytest.fixture(autouse=True)
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def k_quant_blocks(type_name: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes [ROWS, bytes per row]: every bit pattern of the packed values and 6-bit scales, with
    float16 scales drawn from a sane range so no block decodes to inf or nan (gguf cannot quantize to K-quants)."""
    _, block_size, type_size = hw_gguf.TYPES[hw_gguf.type_id(type_name)]
    blocks = rng.integers(0, 256, (ROWS * COLS // block_size, type_size), dtype=np.uint8)
    for at in K_QUANT_SCALES[type_name]:
        scale = rng.uniform(1e-3, 2e-2, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8)
    return blocks.reshape(ROWS, -1)


def write_tensor_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """A GGUF with tensors {name: (type, float32 values to quantize or raw uint8 blocks)} and no model metadata."""
    writer = gguf.GGUFWriter(path, "qwen2")
    for name, (type_name, data) in tensors.items():
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
        else:
            add_tensor(writer, name, data, type_name)
    finish(writer)
    return path


def test_unsupported_type_name_is_refused() -> None:
    with pytest.raises(HogwildError, match="Q2_K is not supported.*Q6_K"):
        hw_gguf.dequantize(np.zeros(84, dtype=np.uint8), "Q2_K")


def reference_config(model) -> ModelConfig:
    """The source model's config as a GGUF carries it: the epsilon stored as float32, the eos from the tokenizer."""
    config = ModelConfig.from_hf(model.config.to_dict())
    return dataclasses.replace(config, rms_norm_eps=float(np.float32(config.rms_norm_eps)), eos_token_ids=(EOS,))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_float_gguf_converts_to_the_source_model(family: str, tmp_path: Path) -> None:
    # llama: tied embeddings and llama.cpp's q/k row permutation; qwen2: biases and an untied output; qwen3: q/k
    # norms and a head_dim that is not hidden / heads
    model = tiny_source_model(family, seed=3)
    folder = resolve_model_dir(str(write_model_gguf(tmp_path / f"{family}.gguf", model)))
    state = load_state_dict(folder)
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), name
    assert ModelConfig.from_hf(read_config(folder)) == reference_config(model)

    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    chat = [{"role": "user", "content": "the cat"}]
    assert tokenizer.render_chat(chat) == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode_chat(chat)
    assert ids[0] == BOS and EOS in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == tokenizer.render_chat(chat)
    assert EOS in tokenizer.eos_token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_gguf_matches_transformers_loader(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mixed block types, read from the mapped file, against transformers' own GGUF dequantization (which also
    undoes llama's q/k permutation): the same float32 weights, bit for bit."""
    from transformers import AutoModelForCausalLM

    types = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16")
    path = write_model_gguf(tmp_path / f"{family}.gguf", tiny_source_model(family, seed=4), types)
    state = load_state_dict(resolve_model_dir(str(path)))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert len(state) >= 20
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("hogwild: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def bad_files(tmp_path: Path) -> list[tuple[Path, tuple[str, ...]]]:
    llama = tiny_source_model("llama")
    good = write_model_gguf(tmp_path / "good.gguf", llama)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    q2k = np.random.default_rng(0).integers(0, 256, (64, 84), dtype=np.uint8)
    return [
        (write_model_gguf(tmp_path / "phi3.gguf", llama, architecture="phi3"), ("architecture 'phi3'", "llama")),
        (write_tensor_gguf(tmp_path / "q2k.gguf", {"blk.0.ffn_down.weight": ("Q2_K", q2k)}), ("Q2_K", "ffn_down")),
        (truncated, ("not a readable GGUF file",)),
        (
            write_model_gguf(tmp_path / "rope.gguf", llama, extra={"rope_freqs.weight": np.ones(8, np.float32)}),
            ("rope_freqs",),
        ),
        (
            write_model_gguf(tmp_path / "gate.gguf", llama, extra={"blk.0.attn_gate.weight": np.ones(8, np.float32)}),
            ("blk.0.attn_gate.weight has no place in a llama decoder",),
        ),
    ]


def test_unsupported_or_damaged_gguf_is_one_error_line(
    tmp_path: Path, own_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    for path, words in bad_files(tmp_path):
        code, out, err = run_cli(capsys, "generate", "hi", "--model", str(path), "--threads", "1")
        assert_one_error_line(code, err, path.name, *words)
        assert not out
    assert not any((own_cache / "models").iterdir()), "a refused file left a cache folder behind"
