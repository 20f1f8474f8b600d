"""The AVX2 path on every machine: the model loads and generates with torch and oneDNN held to AVX2.

`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2` and `FBGEMM_ENABLE_INSTRUCTIONS=AVX2` make an AVX-512
machine behave like an AVX2-only CPU (an AMD EPYC without native bf16 or VNNI), so whatever machine CI lands on,
this path is exercised. The subprocess first checks that the restriction took (oneDNN refuses to prepack a bf16
weight, the crash such CPUs used to hit), then loads the default model twice: with float weights (float32 through
oneDNN), whose greedy tokens must equal float32 decoding in this process, then with the default weights (the
GGUF's own blocks through hogwild's AVX2 block kernels, `HOGWILD_KERNEL_ISA=avx2`), int4 (aten's int4 kernel on
bf16 activations emulated without native bf16) and int8 (fbgemm's AVX2 kernel, 7-bit activations), whose logits
must track float32's on that continuation.
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

AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "HOGWILD_KERNEL_ISA": "avx2",
    "OMP_NUM_THREADS": "1",
}
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
from hogwild.scoring import score
from hogwild.sampling import SamplingParams
floats = Engine.load(EngineConfig(threads=1, linear="onednn"))
ids = floats.encode_prompt({PROMPT!r})
tokens = list(floats.generate(ids, SamplingParams(max_tokens={TOKENS})))
text = ids + tokens
picked = torch.tensor(tokens)
ref = score(floats, text).token[len(ids) - 1:].mean().item()
report = dict(capability=torch.backends.cpu.get_cpu_capability(), prepack=prepack, dtype=floats.kernels.dtype_name,
              linear=floats.kernels.linear, tokens=tokens, ref=ref)
for name, weights in (("default", "auto"), ("int8", "int8"), ("int4", "int4")):
    engine = Engine.load(EngineConfig(threads=1, weights=weights))
    scores = score(engine, text)
    report[name] = dict(weights=engine.kernels.weights, bits=engine.kernels.activation_bits, runs=engine.describe(),
                        agree=(scores.top_ids[len(ids) - 1:, 0] == picked).float().mean().item(),
                        loglik=scores.token[len(ids) - 1:].mean().item())
print(json.dumps(report))
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
    assert report["default"]["weights"] == "gguf", "a GGUF model runs its own blocks"
    assert "avx2 kernels" in report["default"]["runs"], report["default"]["runs"]
    for name in ("int8", "int4"):
        # no VNNI under AVX2: 8-bit activations would saturate fbgemm's kernel (int8, and int4's vocabulary head)
        assert report[name]["bits"] == 7
    for name in ("default", "int8", "int4"):
        # on float32's own greedy continuation both pick the same token almost everywhere and lose little
        # likelihood; saturated or mis-scaled weights pick noise
        assert report[name]["agree"] >= 0.75, name
        assert report[name]["loglik"] > report["ref"] - 0.1 * abs(report["ref"]) - 0.1, name

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


def test_quantized_linear_tests_pass_on_the_avx2_kernels() -> None:
    """test_quant.py's linear tests (the saturation case among them, and the int4 linear's) again, with torch and
    fbgemm held to AVX2."""
    tests = str(Path(__file__).parent / "test_quant.py")
    keys = "saturate or matches_float32_and_a_wrong or alone_or_beside or int4_linear_matches"
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", tests, "-k", keys])  # -q: addopts
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "5 passed" in proc.stdout, proc.stdout[-500:]  # 7-bit only: the 8-bit cases need VNNI
