"""The AVX2 path on every machine: the model loads and generates with torch and oneDNN held to AVX2.

`ATEN_CPU_CAPABILITY=avx2` and `ONEDNN_MAX_CPU_ISA=AVX2` make an AVX-512 machine behave like an AVX2-only CPU (an
AMD EPYC without native bf16), so whatever machine CI lands on, this path is exercised. The subprocess first checks
that the restriction took (oneDNN refuses to prepack a bf16 weight, the crash such CPUs used to hit), then loads
the default model with `--dtype auto` and decodes greedily; its tokens must equal float32 decoding in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hogwild.engine import Engine, EngineConfig
from hogwild.sampling import SamplingParams

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
PROMPT = "Name three colours of the rainbow."
TOKENS = 16

SCRIPT = f"""
import json, torch
w = torch.ones(8, 8, dtype=torch.bfloat16)
try:
    torch.ops.mkldnn._reorder_linear_weight(w)
    prepack = "ran"
except RuntimeError as e:
    prepack = str(e)
from hogwild.engine import Engine, EngineConfig
from hogwild.sampling import SamplingParams
engine = Engine.load(EngineConfig(threads=1))
ids = engine.encode_prompt({PROMPT!r})
tokens = list(engine.generate(ids, SamplingParams(max_tokens={TOKENS})))
print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(), prepack=prepack,
                      dtype=engine.kernels.dtype_name, linear=engine.kernels.linear, tokens=tokens)))
"""


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**os.environ, **AVX2}, capture_output=True, text=True, timeout=300)


def test_default_model_runs_on_avx2_and_matches_float32(default_model_dir: Path) -> None:
    proc = run([sys.executable, "-c", SCRIPT])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["capability"] == "AVX2"
    assert "bf16 path needs" in report["prepack"], "the AVX2 restriction did not take: the test would prove nothing"
    assert (report["dtype"], report["linear"]) == ("float32", "onednn")

    engine = Engine.load(EngineConfig(dtype="float32", linear="aten", threads=1))
    ours = list(engine.generate(engine.encode_prompt(PROMPT), SamplingParams(max_tokens=TOKENS)))
    assert len(ours) >= 8
    assert report["tokens"] == ours


@pytest.mark.parametrize(
    ("flags", "code", "expect"),
    [
        (["--dtype", "bfloat16"], 0, "will be slow"),
        (["--dtype", "bfloat16", "--linear", "onednn"], 2, "hogwild: error: --linear onednn cannot run bfloat16"),
    ],
)
def test_cli_bf16_on_avx2(default_model_dir: Path, flags: list[str], code: int, expect: str) -> None:
    cli = [sys.executable, "-m", "hogwild", "generate", "Hi", "--max-tokens", "4", "--threads", "1", "-v", *flags]
    proc = run(cli)
    assert proc.returncode == code, proc.stderr
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    if code == 2:
        assert proc.stderr.strip().count("\n") == 0, "a refused choice is one line"
