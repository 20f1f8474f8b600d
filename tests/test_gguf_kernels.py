"""hogwild's GGUF block kernels (hogwild/native/gguf.cpp) against gguf's own dequantizer.

Weights are made by `gguf.quants.quantize` where the package can (float types, the 32-element formats), else random
bytes with sane float16 scales (K-quants). The reference is gguf's dequantization of those bytes times the
activations quantized the way the kernels quantize them (int8 per block of 32, or of 256 for K-quants: d = max|x| /
127, q = x * (1 / d) rounded half to even, in float32), summed in float64. Both instruction sets are checked in
this process (`set_isa`), and the forced AVX2 path once more the way a user forces it (an environment variable, in a
subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from hogwild import native
from hogwild.model.kernels import CpuFacts

torch.set_num_threads(1)

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK32_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
TYPES = FLOAT_TYPES + BLOCK32_TYPES + K_TYPES
K_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of each super-block's float16 scales
ISAS = ("avx512-vnni", "avx2") if CpuFacts.detect().has(("avx512_vnni",)) else ("avx2",)


@pytest.fixture(scope="module")
def kernels():
    module = native.load_gguf()
    assert module is not None, f"the GGUF kernels did not load: {native.unavailable(native.GGUF) or 'the build failed'}"
    yield module
    module.set_isa(ISAS[0])


def type_id(name: str) -> int:
    return GGMLQuantizationType[name].value


def block_size(name: str) -> int:
    return 1 if name in FLOAT_TYPES else 32 if name in BLOCK32_TYPES else 256


def make_weights(name: str, m: int, k: int, seed: int) -> np.ndarray:
    """uint8 [m, row bytes]: gguf's quantization of random floats, or random K-quant blocks with sane scales."""
    rng = np.random.default_rng(seed)
    if name in K_TYPES:
        blocks = rng.integers(0, 256, size=(m, k // 256, K_BYTES[name]), dtype=np.uint8)
        for at in K_SCALES[name]:
            scale = rng.uniform(0.002, 0.02, size=(m, k // 256, 1)).astype(np.float16)
            blocks[..., at : at + 2] = scale.view(np.uint8)
        return blocks.reshape(m, -1)
    w = rng.standard_normal((m, k)).astype(np.float32)
    return np.ascontiguousarray(quantize(w, GGMLQuantizationType[name])).view(np.uint8).reshape(m, -1)


def reference_weights(w: np.ndarray, name: str, k: int) -> np.ndarray:
    return dequantize(w, GGMLQuantizationType[name]).reshape(w.shape[0], k)


def quantized_activations(x: np.ndarray, block: int) -> np.ndarray:
    """float64 [n, k]: x as the kernels see it, int8 per `block` elements with a float32 scale."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, block)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inverse)
    assert np.abs(q).max() <= 127
    return (q * d.astype(np.float64)).reshape(x.shape)


def shapes(name: str, n: int) -> tuple[int, int]:
    """(M, K): K with a ragged end (576 = 18 blocks: a group of 4 is cut short, 200 floats: a partial vector) for
    decode rows; for the 40 rows of a prompt, K long enough to be split into blocks that stay in L1."""
    if n <= 16:
        return 24, {1: 200, 32: 576, 256: 768}[block_size(name)]
    return 20, {1: 3000, 32: 4864, 256: 4608}[block_size(name)]


def run(kernels, isa: str, x: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
    kernels.set_isa(isa)
    return kernels.mm(torch.from_numpy(x), torch.from_numpy(w), type_id(name), x.shape[1]).numpy()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 4, 16, 40])
@pytest.mark.parametrize("name", TYPES)
def test_mm_matches_gguf_dequantized_weights(kernels, name, n, isa):
    m, k = shapes(name, n)
    w = make_weights(name, m, k, seed=n)
    x = np.random.default_rng(100 + n).standard_normal((n, k)).astype(np.float32)
    x[0, : max(32, block_size(name))] *= 50  # an outlier block: per-block scales keep the rest of the row precise
    y = run(kernels, isa, x, w, name)
    assert y.shape == (n, m) and y.dtype == np.float32
    wf = reference_weights(w, name, k).astype(np.float64)
    xq = x.astype(np.float64) if name in FLOAT_TYPES else quantized_activations(x, block_size(name))
    expected = xq @ wf.T
    scale = np.abs(expected).max(axis=1, keepdims=True)
    assert (np.abs(y - expected) / scale).max() < 1e-5
    # and the quantized activations stay close to the float ones
    assert (np.abs(y - x.astype(np.float64) @ wf.T) / scale).max() < 2e-2


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_and_get_rows_are_gguf_bit_for_bit(kernels, name):
    k = {1: 200, 32: 576, 256: 768}[block_size(name)]
    w = make_weights(name, 10, k, seed=7)
    expected = reference_weights(w, name, k).astype(np.float32)
    wt = torch.from_numpy(w)
    full = kernels.dequantize(wt, type_id(name), k).numpy()
    assert np.array_equal(full.view(np.uint32), expected.view(np.uint32))
    ids = torch.tensor([9, 0, 4, 4])
    rows = kernels.get_rows(wt, type_id(name), k, ids).numpy()
    assert np.array_equal(rows.view(np.uint32), expected[ids.numpy()].view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_a_row_is_the_same_alone_batched_or_in_a_prompt(kernels, name, isa):
    """Row i's result is bitwise the same alone, in a decode batch of 16 and among 40 prompt rows."""
    m, k = shapes(name, 40)
    w = make_weights(name, m, k, seed=3)
    x = np.random.default_rng(4).standard_normal((40, k)).astype(np.float32)
    batch = run(kernels, isa, x[:16], w, name)
    prompt = run(kernels, isa, x, w, name)
    assert np.array_equal(batch, prompt[:16])
    for i in (0, 5, 15):
        assert np.array_equal(run(kernels, isa, x[i : i + 1], w, name)[0], batch[i])


def test_the_isas_agree_and_the_threads_split_rows_exactly(kernels):
    """Enough rows to split over two threads: the same bits as one thread; AVX2 and AVX-512 within float error."""
    name, k = "Q4_K", 768
    w = make_weights(name, 600, k, seed=5)
    x = np.random.default_rng(6).standard_normal((3, k)).astype(np.float32)
    results = {}
    for isa in ISAS:
        one = run(kernels, isa, x, w, name)
        torch.set_num_threads(2)
        try:
            two = run(kernels, isa, x, w, name)
        finally:
            torch.set_num_threads(1)
        assert np.array_equal(one, two)
        results[isa] = one
    scale = np.abs(results["avx2"]).max()
    assert all(np.abs(r - results["avx2"]).max() < 1e-5 * scale for r in results.values())


def test_mm_many_and_mm_out_fill_their_columns(kernels):
    """Matrices of different types stacked by rows in one call, and a product written into a column slice."""
    k = 512
    parts = [("Q5_0", 40), ("Q8_0", 8), ("Q6_K", 24), ("F16", 5)]
    ws = [make_weights(name, m, k, seed=i) for i, (name, m) in enumerate(parts)]
    x = torch.from_numpy(np.random.default_rng(8).standard_normal((3, k)).astype(np.float32))
    kernels.set_isa(ISAS[0])
    singles = [kernels.mm(x, torch.from_numpy(w), type_id(name), k) for w, (name, _) in zip(ws, parts, strict=True)]
    many = kernels.mm_many(x, [(torch.from_numpy(w), type_id(name)) for w, (name, _) in zip(ws, parts, strict=True)], k)
    assert torch.equal(many, torch.cat(singles, dim=1))
    out = torch.full((3, 100), 7.0)
    kernels.mm_out(x, torch.from_numpy(ws[0]), type_id("Q5_0"), k, out[:, 30:70])
    assert torch.equal(out[:, 30:70], singles[0])
    assert (out[:, :30] == 7).all() and (out[:, 70:] == 7).all()


def test_kernels_refuse_what_they_cannot_take(kernels):
    w = torch.from_numpy(make_weights("Q4_K", 4, 512, seed=0))
    x = torch.zeros(2, 512)
    with pytest.raises(RuntimeError, match="not one hogwild's block kernels read"):
        kernels.mm(x, w, 10, 512)  # Q2_K
    with pytest.raises(RuntimeError, match="is 288 bytes"):
        kernels.mm(x, w[:, :200], type_id("Q4_K"), 512)
    with pytest.raises(RuntimeError, match="whole number of Q4_K blocks"):
        kernels.mm(torch.zeros(2, 500), w, type_id("Q4_K"), 500)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.mm(x.double(), w, type_id("Q4_K"), 512)
    with pytest.raises(RuntimeError, match="outside the 4 rows"):
        kernels.get_rows(w, type_id("Q4_K"), 512, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="unknown kernel ISA"):
        kernels.set_isa("sse2")


def test_forcing_avx2_by_environment(kernels, tmp_path):
    """HOGWILD_KERNEL_ISA=avx2 (with torch's own AVX2 switches, as the AVX2 tests run): the module says "avx2" and
    multiplies as the in-process AVX-512 kernels do, within float error."""
    w = make_weights("Q6_K", 16, 512, seed=9)
    x = np.random.default_rng(10).standard_normal((2, 512)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, torch\n"
        "from hogwild import native\n"
        "g = native.load_gguf()\n"
        "w, x = np.load(sys.argv[1]), np.load(sys.argv[2])\n"
        "y = g.mm(torch.from_numpy(x), torch.from_numpy(w), 14, 512)\n"
        "np.save(sys.argv[3], y.numpy())\n"
        "print(g.isa())\n"
    )
    env = dict(os.environ, HOGWILD_KERNEL_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    env["FBGEMM_ENABLE_INSTRUCTIONS"] = "AVX2"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "w.npy"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["avx2"]
    expected = run(kernels, ISAS[0], x, w, "Q6_K")
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() < 1e-5 * np.abs(expected).max()


def test_the_switch_turns_the_gguf_kernels_off(monkeypatch):
    monkeypatch.setenv("HOGWILD_GGUF_KERNELS", "0")
    assert native.unavailable(native.GGUF) == "HOGWILD_GGUF_KERNELS=0"
    assert native.unavailable(native.FUSED) is None


def test_no_compiler_falls_back_with_one_line(monkeypatch, capsys, tmp_path):
    """A machine without a C++ compiler (and nothing built yet): one line on stderr, and None."""
    monkeypatch.setenv("CXX", "no-such-c++")
    monkeypatch.setattr(native, "build_folder", lambda *_: tmp_path / "never-built")
    assert native.build(native.GGUF) is None
    assert capsys.readouterr().err.splitlines() == [
        "hogwild: GGUF block kernels off (no C++ compiler: no-such-c++); running the other linear kernels"
    ]


def test_a_failed_build_falls_back(monkeypatch, capsys, tmp_path):
    """A build that fails: the notice that it started, one line saying why it failed, None, nothing marked built."""
    import torch.utils.cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'hogwild_gguf': gguf.cpp:1: error")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.setattr(native, "build_folder", lambda *_: tmp_path / "never-built")
    assert native.build(native.GGUF) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "could not compile the GGUF block kernels (Error building extension" in err[1]
    assert not (tmp_path / "never-built" / "built").exists()
