"""The `hogwild` command line, run as a subprocess: each bad input prints one clean error line, argparse's own
exits, and a real generation on the default model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

TINY_CONTEXT = 64


def hogwild(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hogwild", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_error_line(run: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit code 2 and exactly one `hogwild: error: ...` line naming `words`; no traceback."""
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith("hogwild: error: "), line
    for word in words:
        assert word in line, line
    assert run.returncode == 2, (run.returncode, line)
    assert not run.stdout.strip(), run.stdout
    return line


def copy_tokenizer(default_model_dir: Path, folder: Path) -> None:
    for path in default_model_dir.iterdir():
        if path.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(path, folder / path.name)


def save_model(model: transformers.PreTrainedModel, folder: Path) -> None:
    """config.json and model.safetensors, tied weights stored once."""
    folder.mkdir()
    model.config.to_json_file(folder / "config.json")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny random llama with the default model's tokenizer and a 64-token context."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,  # the default tokenizer's
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=TINY_CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    save_model(transformers.LlamaForCausalLM(config), folder)
    copy_tokenizer(default_model_dir, folder)
    return folder


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    assert_one_error_line(hogwild("generate", "hi", "--model", str(missing)), str(missing), "does not exist", ".gguf")


def test_folder_without_weights(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    assert_one_error_line(hogwild("generate", "hi", "--model", str(tmp_path)), "no *.safetensors weights")


def test_unsupported_architecture(tmp_path: Path, default_model_dir: Path) -> None:
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=8, n_layer=1, n_head=2)
    save_model(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2")
    copy_tokenizer(default_model_dir, tmp_path / "gpt2")
    line = assert_one_error_line(hogwild("generate", "hi", "--model", str(tmp_path / "gpt2")), "'gpt2'")
    assert "llama, mistral, qwen2, qwen3" in line  # what is supported


@pytest.mark.parametrize("keep", [0.5, 0.0001])  # cut inside the tensor data; cut inside the header
def test_truncated_weights(tmp_path: Path, tiny_llama_dir: Path, keep: float) -> None:
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    assert_one_error_line(hogwild("generate", "hi", "--model", str(folder)), "model.safetensors", "truncated")


def test_tiny_model_generates(tiny_llama_dir: Path) -> None:
    """The tiny folder itself is sound, so the failures above come from the damage, not the folder."""
    run = hogwild("generate", "hi", "--max-tokens", "4", "--model", str(tiny_llama_dir), "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_prompt_longer_than_context(tiny_llama_dir: Path) -> None:
    prompt = "word " * (2 * TINY_CONTEXT)
    run = hogwild("generate", prompt, "--raw", "--model", str(tiny_llama_dir))
    assert_one_error_line(run, "prompt", f"context window is {TINY_CONTEXT}")


def test_unknown_flag() -> None:
    run = hogwild("generate", "hi", "--no-such-flag")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == "hogwild: error: unrecognized arguments: --no-such-flag"


def test_help() -> None:
    run = hogwild("--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: hogwild")
    assert "generate" in run.stdout
    run = hogwild("generate", "--help")
    assert run.returncode == 0, run.stderr
    for flag in ("--max-tokens", "--model", "--dtype", "--raw"):
        assert flag in run.stdout


def test_generate_default_model(default_model_dir: Path) -> None:  # the fixture converts the model once
    # one thread: with two on this 2-core machine and any other load, OpenMP's spinning threads run 20x slower
    run = hogwild("generate", "What is 2+2?", "--max-tokens", "8", "--threads", "1")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert any(c.isalnum() for c in run.stdout), run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith("[8 tokens,"), run.stderr


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--kv-memory", "lots"], ["--kv-memory takes a size"]),
        (["--kv-memory", "1B"], ["holds no token"]),
        (["--kv-memory", "2KiB"], ["KV cache", "raise --kv-memory"]),
        (["--step-tokens", "0"], ["step_tokens must be >= 1"]),
    ],
)
def test_bad_engine_budgets(tiny_llama_dir: Path, flags: list[str], words: list[str]) -> None:
    assert_one_error_line(hogwild("generate", "Hi", "--model", str(tiny_llama_dir), "--threads", "1", *flags), *words)
