"""8-bit and 4-bit weights: quantization, the linears against float32, batch invariance, the cache, the choice.

Tolerances are set from what 8-bit rounding can do and checked to fail a wrong implementation: the same test is run
with a wrong scale and a transposed weight, which must fall outside them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, TinyModel

from hogwild.attention import Row, StepPlan
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.model import quant
from hogwild.model.decoder import REFINE_MARGIN, Decoder
from hogwild.model.kernels import CpuFacts, choose
from hogwild.model.quant import (
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    hadamard,
    int4_fits,
    on_int4_grid,
    quantize_int4,
    quantize_linear,
    quantize_rows,
    rotate,
    unpack_int4,
)
from hogwild.sampling import SamplingParams

torch.set_num_threads(1)

AVX2_EPYC = CpuFacts("AVX2", frozenset({"avx2", "fma"}), True, False, False, None, True)
XEON_VNNI = CpuFacts(
    "AVX512", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}), True, True, False, None, True
)
HERE = CpuFacts.detect()
BITS = quant.activation_bits(HERE.flags, HERE.capability, HERE.fbgemm_isa_limit)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest error of a row over the largest value of that row, over all rows."""
    return ((out - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


def test_quantize_rows_rounds_to_the_nearest_step_of_each_row() -> None:
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 40)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert torch.equal(q.abs().amax(1), torch.full((40,), 127, dtype=torch.int8))  # each row uses its full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(quantize_rows(torch.zeros(2, 5))[0], torch.zeros(2, 5, dtype=torch.int8))  # no NaN


def test_hadamard_is_orthonormal_and_the_rotation_cancels() -> None:
    h = hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    x, w = torch.randn(3, 192), torch.randn(5, 192)
    assert torch.allclose(rotate(x, h) @ rotate(w, h).T, x @ w.T, atol=1e-4)
    assert quant.rotation_block(576) == 64 and quant.rotation_block(96) == 32 and quant.rotation_block(7) == 1


def _case(seed: int, out: int = 96, features: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, features, generator=g) * 0.05
    bias = torch.randn(out, generator=g)
    x = torch.randn(6, features, generator=g)
    x[:, 3] *= 40  # an outlier channel, as LLM activations have
    x[2] *= 100  # and a row far larger than the others
    return weight, bias, x


@pytest.mark.parametrize("bits", [7, 8] if BITS == 8 else [7])
@pytest.mark.parametrize("seed", [0, 1])
def test_int8_linear_matches_float32_and_a_wrong_one_does_not(bits: int, seed: int) -> None:
    weight, bias, x = _case(seed)
    ref = F.linear(x.double(), weight.double(), bias.double()).float()
    q, scale = quantize_linear(weight)
    err = relative_error(Int8Linear(q, scale, bias, bits)(x), ref)
    tol = 0.03 if bits == 7 else 0.02  # measured ~0.01 and ~0.006
    assert err < tol
    assert relative_error(Int8Linear(q, scale * 1.1, bias, bits)(x), ref) > tol  # a scale off by 10%
    qt, st = quantize_linear(weight[:, :96].T.contiguous())  # a transposed (square) weight
    ref_square = F.linear(x[:, :96], weight[:, :96], bias)
    assert relative_error(Int8Linear(qt, st, bias, bits)(x[:, :96]), ref_square) > 5 * tol
    assert relative_error(Int8Linear(q, scale, None, bits)(x), ref) > tol  # a lost bias


def test_a_row_is_computed_the_same_alone_or_beside_any_other_rows() -> None:
    weight, bias, x = _case(2)
    linear = Int8Linear(*quantize_linear(weight), bias, BITS)
    batched = linear(x)
    for r in range(len(x)):
        assert torch.equal(linear(x[r : r + 1]), batched[r : r + 1])
    assert torch.equal(linear(x.view(2, 3, -1)), batched.view(2, 3, -1))


def test_the_chosen_activation_bits_do_not_saturate_this_cpu() -> None:
    """Every product at its largest, all of one sign: an int16 pair sum overflows unless the bits fit the kernel
    (8 bits on fbgemm's AVX2 kernel give ~25% too little here; test_avx2.py runs this under AVX2)."""
    signs = torch.where(torch.rand(256, generator=torch.Generator().manual_seed(3)) > 0.5, 1.0, -1.0)
    h = hadamard(64)
    x = rotate(signs[None], h)  # rotates back to +-1: every activation quantizes to an end of the range
    weight = rotate((signs * 1.27)[None].repeat(4, 1), h)
    ref = x @ weight.T
    out = Int8Linear(*quantize_linear(weight), None, BITS)(x)
    assert relative_error(out, ref) < 0.02


def assert_tracks(reference: torch.Tensor, logits: torch.Tensor, tolerance: float) -> None:
    """logits within `tolerance` of the reference's spread (root mean square), and the same best token wherever
    the reference's leads by more than 4x that difference."""
    rms = (reference - logits).pow(2).mean().sqrt().item()
    spread = reference.std().item()
    assert rms < tolerance * spread, f"logits off by {rms:.3f} (rms), spread {spread:.3f}"
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * rms
    assert clear.sum() >= 3
    assert torch.equal(reference.argmax(-1)[clear], logits.argmax(-1)[clear])


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_with_int8_weights_tracks_float32(family: str) -> None:
    reference = TinyModel(family, seed=3)
    int8 = TinyModel(family, seed=3, linear="int8")
    tokens = torch.randint(0, reference.config.vocab_size, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    logits = [tm.step([Row([tm.ledger().new_block("s")], tokens)])[0] for tm in (reference, int8)]
    # 8-bit rounding through a random model moves the logits by ~5% of their spread (root mean square), the
    # largest of 500k by ~25%; a wrong scale or weight moves them by the spread itself
    assert_tracks(*logits, 0.1)


def _q4_1_weight(out: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight stored as GGUF's Q4_1 stores it: per group of 32, d * level + m, levels 0..15 with both ends used.
    -> (weight [out, features], levels [out, features])."""
    g = torch.Generator().manual_seed(seed)
    groups = features // INT4_GROUP
    d = torch.rand(out, groups, 1, generator=g) * 0.01 + 1e-3
    m = torch.randn(out, groups, 1, generator=g) * 0.05
    levels = torch.randint(0, 16, (out, groups, INT4_GROUP), generator=g)
    levels[..., 0], levels[..., -1] = 0, 15
    return (d * levels + m).view(out, features), levels.view(out, features)


def test_int4_quantization_gives_back_4bit_weights_and_rounds_others_to_the_nearest_level() -> None:
    weight, levels = _q4_1_weight(48, 128, seed=0)
    packed, scale_zero = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 64) and scale_zero.shape == (4, 48, 2)
    assert torch.equal(unpack_int4(packed), levels.int())  # the published levels, low nibble first
    assert torch.equal(packed[0, 0], (levels[0, 0] | levels[0, 1] << 4).to(torch.uint8))
    assert (dequantize_int4(packed, scale_zero) - weight.double()).abs().max() < 1e-6
    other = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    packed, scale_zero = quantize_int4(other)
    step = scale_zero[..., 0].T.repeat_interleave(INT4_GROUP, dim=1).double()
    assert ((dequantize_int4(packed, scale_zero) - other.double()).abs() <= step / 2 + 1e-6).all()
    assert int4_fits((960, 576)) and not int4_fits((100, 576)) and not int4_fits((960, 48))
    # auto's test for a 4-bit source: the first layer's projections on the grid, and nothing else passes it
    layer = {"model.layers.0.mlp.up_proj.weight": weight, "model.layers.0.input_layernorm.weight": torch.ones(128)}
    assert on_int4_grid(layer)
    assert not on_int4_grid({**layer, "model.layers.0.mlp.down_proj.weight": other})
    assert not on_int4_grid({"model.layers.0.mlp.up_proj.weight": weight + 1e-4 * torch.randn(48, 128)})
    assert not on_int4_grid({"model.layers.1.mlp.up_proj.weight": weight})  # nothing to judge by


def test_int4_linear_matches_float_and_a_wrong_one_does_not() -> None:
    weight, _ = _q4_1_weight(96, 128, seed=2)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(3))
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    ref = F.linear(x.double(), weight.double(), bias.double()).float()
    packed, scale_zero = quantize_int4(weight)
    linear = Int4Linear(packed, scale_zero, bias, torch.bfloat16)
    err = relative_error(linear(x).float(), ref)
    tol = 0.02  # bf16 activations, scales and output: measured ~0.005
    assert err < tol
    wrong_scale = scale_zero.clone()
    wrong_scale[..., 0] *= 1.1
    assert relative_error(Int4Linear(packed, wrong_scale, bias, torch.bfloat16)(x).float(), ref) > tol
    swapped = (packed >> 4) | (packed << 4)  # the nibbles of each byte in the other order
    assert relative_error(Int4Linear(swapped, scale_zero, bias, torch.bfloat16)(x).float(), ref) > tol
    square = weight[:, :96]
    transposed = Int4Linear(*quantize_int4(square.T.contiguous()), bias, torch.bfloat16)
    assert relative_error(transposed(x[:, :96]).float(), F.linear(x[:, :96].float(), square, bias)) > 5 * tol
    assert relative_error(Int4Linear(packed, scale_zero, None, torch.bfloat16)(x).float(), ref) > tol
    # each row alone as in any batch
    batched = linear(x)
    assert all(torch.equal(linear(x[r : r + 1]), batched[r : r + 1]) for r in range(len(x)))


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_with_int4_weights_tracks_float32(family: str) -> None:
    """On a model whose projections are 4-bit (as a Q4_1 GGUF's are), int4 holds the weights themselves: what is
    left is bf16 activations and the int8 vocabulary projection."""
    models = []
    for dtype, linear in ((torch.float32, "aten"), (torch.bfloat16, "int4")):
        tm = TinyModel(family, seed=3)
        with torch.no_grad():
            for name, p in tm.hf.named_parameters():
                if name.endswith("proj.weight"):
                    p.copy_(dequantize_int4(*quantize_int4(p)))
        tm.model = Decoder(tm.config, dict(tm.hf.state_dict()), dtype, linear=linear)
        models.append(tm)
    assert all(isinstance(layer.down, Int4Linear) for layer in models[1].model.layers)
    assert isinstance(models[1].model.lm_head_linear, Int8Linear)
    tokens = torch.randint(0, models[0].config.vocab_size, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    logits = [tm.step([Row([tm.ledger().new_block("s")], tokens)])[0] for tm in models]
    assert_tracks(*logits, 0.05)


def test_int4_choice_and_its_refusals() -> None:
    choice = choose(weights="int4", facts=AVX2_EPYC)
    assert (choice.weights, choice.dtype, choice.linear, choice.activation_bits) == (
        "int4",
        torch.bfloat16,
        "int4",
        7,
    )
    assert "4-bit weights" in choice.describe() and "7 bits" in choice.describe()
    assert choose("bfloat16", weights="int4", facts=XEON_VNNI).activation_bits == 8
    without = CpuFacts("AVX2", frozenset({"avx2"}), True, False, False, None, False)
    with pytest.raises(HogwildError, match="needs AVX2 or better and fbgemm"):
        choose(weights="int4", facts=without)
    with pytest.raises(HogwildError, match="leave --dtype"):
        choose("float32", weights="int4", facts=XEON_VNNI)
    with pytest.raises(HogwildError, match="CPU path"):
        choose(weights="int4", device="cuda")
    # auto: int4 for a 4-bit model where int8 would run, never over an explicit choice
    assert choose(facts=XEON_VNNI, four_bit=True).weights == "int4"
    assert "4-bit already" in choose(facts=XEON_VNNI, four_bit=True).reason
    assert choose(weights="int8", facts=XEON_VNNI, four_bit=True).weights == "int8"
    assert choose("float32", facts=XEON_VNNI, four_bit=True).weights == "float32"


def test_auto_picks_int8_where_fbgemm_runs_and_explicit_choices_win() -> None:
    limited = dataclasses.replace(XEON_VNNI, fbgemm_isa_limit="AVX2")  # FBGEMM_ENABLE_INSTRUCTIONS=AVX2
    for facts, bits in ((AVX2_EPYC, 7), (XEON_VNNI, 8), (limited, 7)):
        choice = choose(facts=facts)
        assert (choice.weights, choice.dtype, choice.activation_bits) == ("int8", torch.float32, bits)
        assert f"{bits} bits" in choice.describe()
    assert choose(weights="bf16", facts=XEON_VNNI).weights == "bfloat16"
    assert choose(weights="fp32", facts=AVX2_EPYC).weights == "float32"
    assert choose("float32", facts=XEON_VNNI).weights == "float32"  # an explicit dtype asks for float weights
    assert choose(linear="onednn", facts=XEON_VNNI).weights == "bfloat16"
    without = CpuFacts("AVX2", frozenset({"avx2"}), True, False, False, None, False)
    assert choose(facts=without).weights == "float32"
    with pytest.raises(HogwildError, match="needs fbgemm"):
        choose(weights="int8", facts=without)
    with pytest.raises(HogwildError, match="disagree"):
        choose("float32", weights="bf16", facts=XEON_VNNI)
    with pytest.raises(HogwildError, match="leave --dtype"):
        choose("bfloat16", weights="int8", facts=XEON_VNNI)
    with pytest.raises(HogwildError, match="unknown weights"):
        choose(weights="int2")


def test_this_machine_runs_int8_by_default() -> None:
    assert choose().weights == ("int8" if quant.fbgemm_available() and HERE.capability.startswith("AVX") else "float32")


def test_default_model_int8_logits_stay_within_the_refine_margin(default_model_dir: Path) -> None:
    """On real text the int8 head stays well inside the margin within which the top logits are recomputed from
    the float weights, and the recomputed ones are exactly the float head's on int8's own hidden state."""
    int8 = Engine.load(EngineConfig(weights="int8", threads=1))
    text = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins."
    ids = int8.tokenizer.encode(text)
    block = int8.pool.open(len(ids)).new_block("s", limit=len(ids))
    block.ledger.reserve([(block, len(ids))])
    plan = StepPlan([Row([block], ids)], int8.model_config, int8.rope)
    model = int8.model
    hidden = []
    head, model._logits = model._logits, lambda x: (hidden.append(x), head(x))[1]
    try:
        logits = model.forward(torch.tensor(ids), plan, logits_at=None)
    finally:
        model._logits = head
        block.ledger.release()
    exact = F.linear(hidden[0], model.lm_head.float())
    raw = model.lm_head_linear(hidden[0])
    assert (raw - exact).abs().max().item() < REFINE_MARGIN["int8"] / 2
    best = exact.argmax(-1)
    assert torch.equal(logits.argmax(-1), best)
    top = exact.gather(1, best[:, None])
    assert torch.allclose(logits.gather(1, best[:, None]), top, atol=1e-4)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_are_cached_and_reused(
    default_model_dir: Path, tmp_path: Path, monkeypatch, weights: str
) -> None:
    monkeypatch.setattr("hogwild.engine.cache_dir", lambda: tmp_path)  # the quantized cache only: the model stays
    calls = []
    name = "quantize_linear" if weights == "int8" else "quantize_int4"
    original = getattr(quant, name)
    monkeypatch.setattr(f"hogwild.model.parts.{name}", lambda w: (calls.append(1), original(w))[1])
    first = Engine.load(EngineConfig(weights=weights, threads=1))
    cached = list((tmp_path / "quantized").glob("*.safetensors"))
    assert len(cached) == 1 and calls, "the first start quantizes and writes the cache"
    calls.clear()
    second = Engine.load(EngineConfig(weights=weights, threads=1))
    assert not calls, "a second start reads the cache instead of quantizing"
    ids = first.encode_prompt("Name a colour.")
    tokens = [list(e.generate(ids, SamplingParams(max_tokens=8))) for e in (first, second)]
    assert tokens[0] == tokens[1]
    cached[0].write_bytes(b"not safetensors")  # a damaged cache is quantized again, not an error
    Engine.load(EngineConfig(weights=weights, threads=1))
    assert calls


def test_cli_refuses_contradicting_flags_in_one_line(default_model_dir: Path) -> None:
    cli = [sys.executable, "-m", "hogwild", "generate", "Hi", "--max-tokens", "2", "--threads", "1"]
    proc = subprocess.run([*cli, "--weights", "int8", "--dtype", "bfloat16"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "hogwild: error: --weights int8 runs float32 activations through fbgemm; leave --dtype and --linear auto"
    )
    proc = subprocess.run([*cli, "--weights", "int2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'int2'" in proc.stderr and "Traceback" not in proc.stderr
