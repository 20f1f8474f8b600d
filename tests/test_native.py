"""hogwild's fused CPU kernels (hogwild/native): each against the torch ops it replaces, long blocks read in spans
against the flat reference, and the switches that turn them off."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, TinyModel, fused_kernels, step_rows

from hogwild import native
from hogwild.attention import (
    FUSED_ROW_TOKENS,
    FlatReference,
    FusedAttention,
    Row,
    SplitAttention,
    StepPlan,
    TorchAttention,
)
from hogwild.cache.pool import KVPool
from hogwild.collab.layouts import SharedCache
from hogwild.model.parts import TORCH_OPS
from hogwild.model.rope import Rope
from hogwild.sampling import SamplingParams, sample_rows

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fused():
    return fused_kernels()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [None, torch.float32, torch.bfloat16])
def test_rms_norm_adds_the_residual_and_matches_torch(fused, dtype, residual):
    torch.manual_seed(0)
    x = torch.randn(5, 200) * 3  # 200: not a multiple of 8, so the tail loop runs too
    weight = torch.rand(200) + 0.5
    r = None if residual is None else torch.randn(5, 200).to(residual)
    expected_x = x if r is None else x + r.float()
    expected = F.rms_norm(expected_x, (200,), weight, 1e-5)
    out = fused.rms_norm(x, r, weight, 1e-5, dtype)
    assert out.dtype == dtype and out.shape == (5, 200)
    assert torch.equal(x, expected_x), "the residual is added into x in place"
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() < tol
    # a wrong eps or a lost weight would not pass
    assert (F.rms_norm(expected_x, (200,), None, 1e-5) - expected).abs().max().item() > 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(fused, dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 2 * 100) * 6).to(dtype)  # large |x|: both tails of silu
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = fused.silu_mul(gate_up)
    assert out.dtype == dtype and out.shape == (3, 100)
    tol = 1e-5 * expected.abs().max().item() if dtype == torch.float32 else 8e-3 * expected.abs().max().item()
    assert (out.float() - expected).abs().max().item() < tol
    assert (F.silu(up) * gate - expected).abs().max().item() > 10 * tol  # gate and up swapped would fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_ops_and_the_fused_kernels_meet_one_contract(fused, dtype):
    """The decoder's layer loop runs either as its `LayerOps`: same residual update of x, same outputs."""
    torch.manual_seed(1)
    x = torch.randn(4, 72) * 2
    r, weight, gate_up = torch.randn(4, 72).to(dtype), torch.rand(72) + 0.5, (torch.randn(4, 2 * 40) * 4).to(dtype)
    xs, outs = [], []
    for ops in (TORCH_OPS, fused):
        y = x.clone()
        outs.append((ops.rms_norm(y, r, weight, 1e-6, dtype), ops.silu_mul(gate_up)))
        xs.append(y)
    assert torch.equal(xs[0], xs[1]) and not torch.equal(xs[0], x), "both add the residual into x in place"
    for a, b in zip(*outs, strict=True):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert (a.float() - b.float()).abs().max().item() <= 1e-5 + 8e-3 * (dtype == torch.bfloat16) * a.abs().max()


@pytest.mark.parametrize("vocab", [13, 40, 49152, 151_937])  # short rows, a ragged vector tail, real vocabularies
def test_the_vocabulary_passes_match_torch(fused, vocab):
    torch.manual_seed(2)
    logits = torch.randn(3, vocab) * 6
    logits[1, 5] = logits[1, 9] = 100.0  # a tie: the first index wins, as torch.argmax has it
    logits[2, : vocab // 2] = float("-inf")  # masked tokens add nothing
    index, norm = fused.argmax_logsumexp(logits)
    assert torch.equal(index, logits.argmax(dim=-1)) and index[1] == 5
    expected = torch.logsumexp(logits.double(), dim=-1).float()
    assert (norm - expected).abs().max().item() < 1e-5
    choice = logits.clone()
    choice[:, 0] = 1000.0  # a masked copy's argmax, beside the unmasked logits' normalizer
    index, norm_again = fused.argmax_logsumexp(logits, choice)
    assert index.tolist() == [0, 0, 0] and torch.equal(norm_again, norm)
    rows, cols = fused.near_best(logits, 2.0)
    want_rows, want_cols = (logits >= logits.amax(dim=-1, keepdim=True) - 2.0).nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert rows.numel() >= 3, "every row's best is within the margin of itself"


def test_the_vocabulary_passes_refuse_a_choice_of_another_shape(fused):
    with pytest.raises(RuntimeError, match="shape"):
        fused.argmax_logsumexp(torch.zeros(2, 10), torch.zeros(2, 9))


def test_the_vocabulary_passes_treat_nan_as_torch_does(fused):
    logits = torch.randn(2, 100)
    logits[0, 37] = float("nan")
    index, norm = fused.argmax_logsumexp(logits)
    assert index.tolist() == logits.argmax(dim=-1).tolist() == [37, index[1].item()]
    assert norm[0].isnan() and not norm[1].isnan()


def test_the_sampler_draws_the_same_with_the_fused_passes(fused):
    """Greedy and seeded rows, with and without a banned token, pick the same tokens with the same logprobs."""
    torch.manual_seed(3)
    logits = torch.randn(4, 3000) * 4
    top = int(logits[0].argmax())
    params = [
        SamplingParams(),
        SamplingParams(banned=(top,)),
        SamplingParams(temperature=0.8, seed=5, top_logprobs=3),
        SamplingParams(temperature=1.0, top_p=0.9, seed=6),
    ]
    logits[1] = logits[0]
    runs = []
    for kernels in (None, fused):
        generators = [None, None, *(p.generator() for p in params[2:])]
        runs.append(sample_rows(logits, params, generators, kernels))
    plain, fast = runs
    assert [s.token for s in plain] == [s.token for s in fast]
    assert fast[0].token == top and fast[1].token != top, "the banned token is never drawn"
    for a, b in zip(plain, fast, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_kernels_refuse_what_they_cannot_take(fused):
    with pytest.raises(RuntimeError, match="float32"):
        fused.rms_norm(torch.zeros(2, 8, dtype=torch.float64), None, torch.ones(8), 1e-5, torch.float32)
    with pytest.raises(RuntimeError, match="2 \\* intermediate"):
        fused.silu_mul(torch.zeros(2, 7))


@pytest.mark.parametrize("family", FAMILIES)
def test_long_blocks_are_read_in_spans_exactly(family):
    """A prompt of 400 tokens (longer than the kernel's span of 256 keys, so each read of it is cut into two spans
    whose partial softmaxes are merged) and workers decoding over it: every step equals the flat reference."""
    tm = TinyModel(family, seed=2, fused=True)
    shared = SharedCache(tm.ledger(), 3, "combined")
    ref = FlatReference(tm.config)
    rng = random.Random(0)
    vocab = tm.config.vocab_size

    def step(rows):
        expected = ref.step(tm.model, rows)
        fast = tm.step(rows)
        for f, e in zip(fast, expected, strict=True):
            assert (f - e).abs().max().item() < 1e-4

    step([Row([shared.prompt], [rng.randrange(vocab) for _ in range(200)])])  # prompts go through torch ops
    step([Row([shared.prompt], [rng.randrange(vocab) for _ in range(200)])])
    for n in range(5):
        rows = [Row(shared.view(w), [rng.randrange(vocab) for _ in range(1 + (w + n) % 3)]) for w in range(3)]
        for row in rows:
            row.own.ledger.reserve([(row.own, row.own.length + len(row.tokens))])
        plan = StepPlan(rows, tm.config, tm.rope, tm.model.dtype, tm.model.fused)
        assert isinstance(plan.backend, FusedAttention), "decode steps attend through the fused kernel"
        step(rows)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_step_plan_picks_the_backend_by_row_length(family):
    """Short rows attend through the fused kernel, long ones through torch ops, a step of both through each for its
    rows; every step equals the flat reference."""
    tm = TinyModel(family, seed=3, fused=True)
    ref = FlatReference(tm.config)
    shared = SharedCache(tm.ledger(), 2, "combined")
    rng = random.Random(1)
    vocab = tm.config.vocab_size
    long = FUSED_ROW_TOKENS + 5
    steps = [
        ([Row([shared.prompt], [rng.randrange(vocab) for _ in range(long)])], TorchAttention),
        ([Row(shared.view(w), [rng.randrange(vocab)]) for w in range(2)], FusedAttention),
        ([Row(shared.view(0), [rng.randrange(vocab) for _ in range(long)]), Row(shared.view(1), [7])], SplitAttention),
    ]
    for rows, backend in steps:
        for row in rows:
            row.own.ledger.reserve([(row.own, row.own.length + len(row.tokens))])
        plan = StepPlan(rows, tm.config, tm.rope, tm.model.dtype, tm.model.fused)
        assert isinstance(plan.backend, backend)
        assert isinstance(plan.backend, FusedAttention) == (backend is FusedAttention), "only a whole fused step"
        expected = ref.step(tm.model, rows)
        fast = tm.step(rows)
        for f, e in zip(fast, expected, strict=True):
            assert (f - e).abs().max().item() < 1e-4


def assert_paths_agree(plain: TinyModel, fast: TinyModel, workers: int, layout: str, prompt: int) -> None:
    """The same prompt and 4 decode steps of `workers` rows through both models: their logits agree to 3% of the
    largest (bf16 rounds after every torch op, once per fused kernel)."""
    outs = []
    for tm in (plain, fast):
        shared = SharedCache(tm.ledger(), workers, layout)
        rng = random.Random(prompt)
        tm.step([Row([shared.prompt], [rng.randrange(211) for _ in range(prompt)])])
        logits = []
        for _ in range(4):
            rows = [Row(shared.view(w), [rng.randrange(211)]) for w in range(workers)]
            logits += [out[-1] for out in tm.step(rows)]
        outs.append(torch.stack(logits))
    scale = outs[0].abs().max().item()
    assert (outs[0] - outs[1]).abs().max().item() < 0.03 * scale


def test_a_bf16_cache_attends_like_the_torch_ops_path():
    """K/V stored in bf16 (the fused kernel converts each tile of keys and values as it reads it, and rounds the
    new ones once as it writes them): the same steps through both paths agree, and stay near the float64
    reference."""
    outs = []
    for fused in (False, True):
        tm = TinyModel("mistral", seed=5, fused=fused)
        rope = Rope(tm.config, torch.bfloat16)
        pool = KVPool(tm.config, rope, torch.bfloat16, "cpu", budget_bytes=1 << 24)
        shared = SharedCache(pool.open(pool.capacity), 3, "combined")
        ref = FlatReference(tm.config)
        rng = random.Random(3)
        rows = [Row([shared.prompt], [rng.randrange(211) for _ in range(10)])]
        logits = []
        for _ in range(5):
            expected = ref.step(tm.model, rows)
            got = step_rows(tm.model, rope, rows)
            assert (got[-1][-1] - expected[-1][-1]).abs().max().item() < 0.05 * expected[-1].abs().max().item()
            logits += [out[-1] for out in got]
            rows = [Row(shared.view(w), [rng.randrange(211)]) for w in range(3)]
        outs.append(torch.cat(logits))
    assert (outs[0] - outs[1]).abs().max().item() < 0.03 * outs[0].abs().max().item()


def test_bf16_fused_decoder_tracks_the_torch_ops_decoder():
    """bf16 activations, the same weights: the fused decoder and the torch-ops decoder agree."""
    plain, fast = (TinyModel("qwen2", seed=3, dtype=torch.bfloat16, fused=f) for f in (False, True))
    assert_paths_agree(plain, fast, 2, "interleaved", 12)


def test_switches_turn_the_fused_kernels_off(monkeypatch):
    monkeypatch.setenv("HOGWILD_FUSED", "0")
    assert native.unavailable() == "HOGWILD_FUSED=0"
    monkeypatch.delenv("HOGWILD_FUSED")
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert "x86-64" in native.unavailable()


def test_a_failed_build_falls_back_with_one_line(monkeypatch, capsys, tmp_path):
    """No compiler (or any build error): the build says so in one line and gives None, so torch ops run."""
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'hogwild_fused': c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native, "build_folder", lambda *_: tmp_path / "never-built")
    assert native.build() is None
    err = capsys.readouterr().err
    assert "could not compile the fused CPU kernels (Error building extension" in err and "torch ops" in err
    assert not (tmp_path / "never-built" / "built").exists()


def test_a_build_killed_midway_does_not_stop_the_next_start(fused):
    """A first start stopped during the build leaves torch's lock file in the build folder; the next start must
    build or load anyway, not wait on it for ever."""
    (native.build_folder(native.FUSED) / "lock").touch()
    code = "from hogwild import native; import sys; sys.exit(native.build() is None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (native.build_folder(native.FUSED) / "lock").exists()


def test_engine_uses_the_fused_kernels_unless_told_not_to(default_model_dir):
    from hogwild.engine import Engine, EngineConfig

    on = Engine.load(EngineConfig(model=str(default_model_dir), threads=1, kv_memory="64MiB"))
    off = Engine.load(EngineConfig(model=str(default_model_dir), threads=1, kv_memory="64MiB", fused=False))
    assert on.fused is not None and off.fused is None
    prompt = on.encode_prompt("Name three colours.")
    params = SamplingParams(max_tokens=16)
    assert list(on.generate(prompt, params)) == list(off.generate(prompt, params))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int4_layers_on_the_fused_kernels_track_the_torch_ops_path(family):
    """int4 projections (qkv bias included for qwen2) through the one layer loop, fused norms, silu * up and decode
    attention against torch ops on the same 4-bit weights; a lost bias or a swapped projection would be far off."""
    plain, fast = (TinyModel(family, seed=4, dtype=torch.bfloat16, linear="int4", fused=f) for f in (False, True))
    assert plain.model.fused is None and fast.model.ops is fast.model.fused
    assert_paths_agree(plain, fast, 3, "combined", 20)
