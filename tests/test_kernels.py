"""The per-machine kernel choice and every linear path it can pick.

The choice is a pure function of what the CPU reports, so it is tested on made-up machines (an AVX2 EPYC, an
AVX-512 Xeon with and without native bf16, a torch without oneDNN). Each kernel path is then forced through the
`linear` switch and checked against the float32 aten reference; a path this machine cannot run (oneDNN bf16 on a CPU
without it) is covered on the machines that have it, and `test_avx2.py` runs the AVX2 path on every machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, TinyModel

from hogwild.attention import Row
from hogwild.errors import HogwildError
from hogwild.model.kernels import CpuFacts, Linear, choose

torch.set_num_threads(1)

AVX2_EPYC = CpuFacts("AVX2", frozenset({"avx2", "fma", "f16c"}), True, False, False, None)
XEON_BF16 = CpuFacts("AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}), True, True, False, None)
XEON_NO_BF16 = CpuFacts("AVX512", frozenset({"avx2", "avx512f", "avx512bw"}), True, True, False, None)
NO_ONEDNN = CpuFacts("AVX2", frozenset({"avx2"}), False, False, False, None)
HERE = CpuFacts.detect()


def test_auto_picks_bf16_only_where_the_cpu_converts_it_natively() -> None:
    assert (choose(facts=XEON_BF16).dtype, choose(facts=XEON_BF16).linear) == (torch.bfloat16, "onednn")
    for facts in (AVX2_EPYC, XEON_NO_BF16):
        choice = choose(facts=facts)
        assert (choice.dtype, choice.linear, choice.warning) == (torch.float32, "onednn", None)
    assert (choose(facts=NO_ONEDNN).dtype, choose(facts=NO_ONEDNN).linear) == (torch.float32, "aten")
    assert "avx512_bf16" in choose(facts=XEON_BF16).describe()
    assert "AVX2" in choose(facts=AVX2_EPYC).describe()


def test_explicit_choices_are_honoured_with_a_note_or_a_clear_error() -> None:
    slow = choose("bfloat16", facts=AVX2_EPYC)
    assert (slow.dtype, slow.linear) == (torch.bfloat16, "aten")
    assert "slow" in slow.warning and "--dtype auto" in slow.warning
    assert choose("bfloat16", facts=XEON_BF16).warning is None
    assert choose("float32", "aten", facts=XEON_BF16).linear == "aten"
    assert choose("auto", "aten", facts=XEON_BF16).dtype == torch.float32  # aten bf16 is the slow path
    with pytest.raises(HogwildError, match="cannot run bfloat16"):
        choose("bfloat16", "onednn", facts=AVX2_EPYC)
    with pytest.raises(HogwildError, match="no oneDNN"):
        choose("float32", "onednn", facts=NO_ONEDNN)
    with pytest.raises(HogwildError, match="unknown dtype"):
        choose("int3")
    with pytest.raises(HogwildError, match="unknown linear"):
        choose(linear="mkl")


def test_this_machine_gets_a_float_choice_it_can_run() -> None:
    choice = choose(linear="onednn" if HERE.onednn else "aten")  # an explicit kernel asks for float weights
    expected = torch.bfloat16 if HERE.native_bf16 else torch.float32
    assert choice.dtype == expected and choice.linear == ("onednn" if HERE.onednn else "aten")


# every (dtype, linear) path, forced; those this CPU lacks are named in the skip reason
PATHS = [
    pytest.param(torch.float32, "aten", id="float32-aten"),
    pytest.param(
        torch.float32,
        "onednn",
        id="float32-onednn",
        marks=pytest.mark.skipif(not HERE.onednn, reason="this torch has no oneDNN"),
    ),
    pytest.param(torch.bfloat16, "aten", id="bf16-aten"),
    pytest.param(
        torch.bfloat16,
        "onednn",
        id="bf16-onednn",
        marks=pytest.mark.skipif(
            not HERE.onednn_bf16, reason="this CPU's oneDNN has no bf16 path (covered on CPUs with AVX-512)"
        ),
    ),
]


@pytest.mark.parametrize(("dtype", "linear"), PATHS)
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_linear_matches_float32_reference(dtype: torch.dtype, linear: str, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=g)
    bias = torch.randn(96, generator=g)
    x = torch.randn(rows, 3, 64, generator=g)
    ref = F.linear(x.double(), weight.double(), bias.double()).float()
    out = Linear(weight.to(dtype), bias.to(dtype), linear)(x.to(dtype)).float()
    # bf16 rounds inputs to 8 bits of mantissa: ~0.4% of |x| |w| summed over 64 terms; a transposed weight, a lost
    # bias or a wrong row is off by the size of the output itself (~8)
    tol = 1e-4 if dtype == torch.float32 else 0.25
    assert (out - ref).abs().max().item() < tol
    assert ref.abs().max().item() > 10 * tol


@pytest.mark.parametrize(("dtype", "linear"), PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_path_matches_float32_reference(family: str, dtype: torch.dtype, linear: str) -> None:
    reference = TinyModel(family, seed=3)
    forced = TinyModel(family, seed=3, dtype=dtype, linear=linear)
    tokens = torch.randint(0, reference.config.vocab_size, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    logits = [tm.step([Row([tm.ledger().new_block("s")], tokens)])[0] for tm in (reference, forced)]
    diff = (logits[0] - logits[1]).abs().max().item()
    spread = logits[0].std().item()
    if dtype == torch.float32:
        assert diff < 1e-4
    else:
        # bf16 weights move the logits by a few percent of their spread, never by the spread itself
        assert diff < 0.1 * spread, f"bf16 logits off by {diff:.3f}, spread {spread:.3f}"
        assert (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean() > 0.8
