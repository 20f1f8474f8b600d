"""`hogwild bench decode` and `hogwild bench workers` end to end on the real default model, at tiny sizes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from hogwild.bench.common import reference_dtype
from hogwild.cli import main
from hogwild.model.kernels import choose
from hogwild.model.loading import read_config

torch.set_num_threads(1)

FIELDS = {"engine", "workers", "context", "tokens_per_s", "step_ms", "kv_bytes", "dtype", "linear", "threads"}
# the benches run --weights auto on the default model, whose weights are 4-bit (tested in test_quant.py)
AUTO = choose(blocks="the default model's Q4_1 blocks")  # a GGUF model on the block kernels
REFERENCE = reference_dtype(AUTO, "cpu")  # transformers' dtype


@pytest.fixture(scope="module")
def token_bytes(default_model_dir: Path) -> dict[str, int]:
    """K/V bytes per cached token: hogwild keeps float32 on CPU, transformers the dtype of the weights."""
    config = read_config(default_model_dir)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    elements = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim
    return {"hogwild": 4 * elements, "transformers": REFERENCE.itemsize * elements}


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    assert main(["bench", *argv, "--threads", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else


def check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert row.keys() >= FIELDS, f"missing {FIELDS - row.keys()}"
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["kv_bytes"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["workers"] * row["steps"] / row["seconds"])
        assert row["step_ms"] == pytest.approx(1000 * row["seconds"] / row["steps"])
        assert (row["dtype"], row["linear"], row["threads"]) == (
            str(REFERENCE).removeprefix("torch.") if row["engine"] == "transformers" else AUTO.dtype_name,
            AUTO.linear if row["engine"] == "hogwild" else "aten",
            1,
        )


def test_decode_rows(capsys: pytest.CaptureFixture, token_bytes: dict[str, int]) -> None:
    rows = run_json(capsys, "decode", "--tokens", "4", "--context", "16", "--repeats", "1", "--prefill", "24")
    check_rows(rows)
    assert [row["engine"] for row in rows] == ["hogwild", "transformers"]
    hogwild, transformers = rows
    assert hogwild["prompt_tokens"] == 24 and hogwild["prompt_seconds"] > 0
    # a step reads the GGUF's blocks (0.6 bytes a weight for Q4_1), transformers its float32 weights
    assert 0.1 < hogwild["weight_bytes"] / transformers["weight_bytes"] < 0.35
    assert hogwild["bandwidth"] == transformers["bandwidth"] > 1e8
    for row in rows:
        assert (row["workers"], row["context"], row["steps"]) == (1, 16, 4)
        # one sequence holding the prompt and the 4 decoded tokens, nothing more
        assert row["kv_bytes"] == (16 + 4) * token_bytes[row["engine"]]


def test_workers_rows(capsys: pytest.CaptureFixture, token_bytes: dict[str, int]) -> None:
    rows = run_json(capsys, "workers", "--workers", "1,2", "--contexts", "32", "--tokens", "4", "--repeats", "1")
    check_rows(rows)
    kv = {(row["engine"], row["workers"]): row["kv_bytes"] for row in rows}
    assert sorted(kv) == [("hogwild", 1), ("hogwild", 2), ("transformers", 1), ("transformers", 2)]
    assert all(row["context"] == 32 and row["steps"] == 4 for row in rows)
    # hogwild shares the prompt: a second worker adds only its own 4-token block
    assert kv["hogwild", 2] - kv["hogwild", 1] == 4 * token_bytes["hogwild"]
    # transformers copies it: W sequences of prompt + decoded tokens each
    assert kv["transformers", 2] == 2 * kv["transformers", 1] == 2 * (32 + 4) * token_bytes["transformers"]
    for row in rows:
        assert row["layout"] == ("combined" if row["engine"] == "hogwild" else None)
        if row["workers"] == 1:
            assert row["speedup"] == 1.0


def test_workers_table_without_transformers(capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "workers", "--workers", "1,2", "--contexts", "16,24", "--tokens", "2", "--repeats", "1"]
    assert main([*argv, "--threads", "1", "--no-transformers", "--layout", "interleaved"]) == 0
    captured = capsys.readouterr()
    assert "transformers" not in captured.out
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("engine"))
    table = [line.split() for line in lines[header + 1 : header + 5]]
    assert [(cells[0], cells[1], cells[2]) for cells in table] == [
        ("hogwild", "1", "16"),
        ("hogwild", "2", "16"),
        ("hogwild", "1", "24"),
        ("hogwild", "2", "24"),
    ]
    assert "interleaved layout" in captured.out
    assert "step time at context 24 / context 16" in captured.out
    assert captured.err.count("[") == 4  # one progress line per configuration, on stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["workers", "--workers", "1,x"], "--workers takes comma-separated integers"),
        (["workers", "--workers", "0,2"], "worker counts must be >= 1"),
        (["workers", "--contexts", "1"], "contexts must be >= 2"),
        (["decode", "--tokens", "0"], "tokens must be >= 1"),
        (["decode", "--repeats", "0"], "repeats must be >= 1"),
        (["workers", "--contexts", "9000", "--no-transformers"], "context window is 8192"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert main(["bench", *argv, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hogwild: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["decode", "--against", "vllm"], "--against takes transformers and/or llama.cpp"),
        (["decode", "--against", "llama.cpp"], "pip install 'hogwild[llama-cpp]'"),
    ],
)
def test_against_mistakes_are_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert main(["bench", *argv, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hogwild: error: ") and message in err[0]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (an optional extra)")
def test_decode_against_llama_cpp_and_transformers(capsys: pytest.CaptureFixture) -> None:
    rows = run_json(capsys, "decode", "--tokens", "4", "--context", "16", "--repeats", "1", "--against",
                    "llama.cpp,transformers")  # fmt: skip
    assert [row["engine"] for row in rows] == ["hogwild", "transformers", "llama.cpp"]
    assert all(row["steps"] == 4 and row["tokens_per_s"] > 0 for row in rows)


def test_quality_rows_put_fp32_first_and_int8_near_it(capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "quality", "--problems", "2", "--tokens", "6", "--choices", "int8", "--threads", "1", "--json"]
    assert main(argv) == 0
    fp32, int8 = json.loads(capsys.readouterr().out)
    assert (fp32["weights"], int8["weights"]) == ("fp32", "int8")
    assert (fp32["agreement"], fp32["identical"], fp32["flips"], fp32["loglik_loss"]) == (1.0, 2, 0.0, 0.0)
    assert fp32["loglik"] < 0 and abs(int8["loglik_loss"]) < 0.05  # measured ~0.2-1% over 20 problems
    assert 0 <= int8["flips"] < 0.2
    # agreement counts whole tokens of 2 x 6 (up to each question's first difference): a multiple of 1/12, 1 exactly
    # when both continuations are fp32's, and at least the 6/12 of each identical one
    agreed = int8["agreement"] * 12
    assert abs(agreed - round(agreed)) < 1e-9
    assert (int8["agreement"] == 1.0) == (int8["identical"] == 2)
    assert int8["agreement"] >= int8["identical"] / 2
