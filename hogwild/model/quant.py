"""8-bit weights on CPU: per-channel int8 weights through fbgemm, activations quantized per row.

A decode step reads every weight once, so on a CPU its speed is the weight bytes over the memory bandwidth: int8
halves bf16's bytes and quarters float32's. fbgemm (in every x86 torch build) multiplies uint8 activations by int8
weights prepacked once at load, at close to the read bandwidth; its dynamic entry point quantizes the whole input
with one scale, so a single row with large values (a first token, a delimiter) would flatten every other row of the
batch. `Int8Linear` scales each row to [-1, 1] first and quantizes with a fixed grid, which makes the quantization
per row: this linear computes a row the same whatever other rows share the step.

Per-row quantization alone still loses to the outlier channels of a row (a few features 10-100x the rest flatten
the others): on the default model it cost 2.4% (8 bits) and 6.3% (7 bits) of the reference solutions'
log-likelihood, and almost all of it came from the activations (int8 weights alone lost nothing). So every row is
first rotated by an orthonormal Hadamard matrix over blocks of 64 features, which spreads an outlier over its block,
and the weight's input columns are rotated the same way before quantizing (x W^T = (x H)(W H)^T): the loss drops to
0.2-0.4% (8 bits) and 0.5-1.0% (7 bits), for one small matmul per linear.

Without VNNI, fbgemm's AVX2 kernel adds pairs of uint8 x int8 products in int16, which saturates for 8-bit
activations; there activations use 7 bits (0..127), as fbgemm's own `reduce_range` does.

4-bit weights (`Int4Linear`) take the other road: weight-only, groups of 32 input features with a scale and an
offset each (asymmetric, 16 levels), bf16 activations, through aten's CPU int4 kernel. They read a quarter of bf16's
bytes, need no activation quantization (so nothing is rotated or scaled per row), and the default model's GGUF
stores its layers in exactly this form (Q4_1: blocks of 32, d * q + m), so its 4-bit weights are the published
weights again, not a further rounding of them. The vocabulary projection stays int8 (`Int8Linear`).

Quantized weights are cached (`cache_dir()/quantized/`) so a start reads them instead of quantizing again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

QUANT_VERSION = 2  # part of the cache key: bump it when the quantized bytes change
_ZERO_ROW = 1e-30  # a row of zeros keeps scale 1e-30 instead of dividing by zero
ROTATION = 64  # features per Hadamard block (smaller where the width is not a multiple of it)


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def fbgemm_isa_limit() -> str | None:
    """FBGEMM_ENABLE_INSTRUCTIONS (AVX2, AVX512, ...): the widest instructions fbgemm may use, when set."""
    return os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper() or None


def activation_bits(flags: frozenset[str], capability: str, limit: str | None = None) -> int:
    """8 where fbgemm runs its VNNI kernel (int32 accumulation), else 7 (its AVX2 kernel's int16 pair sums).
    `limit`: fbgemm's instruction limit (`fbgemm_isa_limit`)."""
    vnni = "avx512_vnni" in flags and capability.startswith("AVX512") and limit in (None, "AVX512", "AVX512_E1")
    return 8 if vnni else 7


def hadamard(size: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [size, size] (size a power of two); symmetric, its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / size**0.5


def rotation_block(features: int) -> int:
    """The largest power of two up to ROTATION that divides `features`."""
    return min(features & -features, ROTATION)


def rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [..., features] with each block of h.shape[0] features multiplied by h: a new float32 tensor."""
    block = h.shape[0]
    return (x.reshape(-1, x.shape[-1] // block, block) @ h).view(x.shape)


def quantize_linear(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> its input columns rotated (see `rotate`), then `quantize_rows`: what `Int8Linear` takes."""
    return quantize_rows(rotate(weight.float(), hadamard(rotation_block(weight.shape[1]))))


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (int8 [out, in], float32 scale [out]), symmetric, one scale per
    output channel: weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp_min(_ZERO_ROW) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear:
    """y = x @ W.T (+ b) for float32 x [..., in], with W stored as int8 and one float32 scale per output channel,
    its input columns rotated (`quantize_linear` makes `qweight` and `scale`)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int = 7) -> None:
        assert qweight.dtype == torch.int8 and qweight.dim() == 2, "Int8Linear takes an int8 [out, in] weight"
        self.shape = qweight.shape
        self.nbytes = qweight.numel() + 4 * scale.numel()  # what a decode step reads
        self.hadamard = hadamard(rotation_block(qweight.shape[1]))
        self.bias = None if bias is None else bias.float()
        levels = (1 << bits) - 1  # 255 or 127 uint8 levels; [-1, 1] maps onto them around the middle
        self.x_scale = 2.0 / levels
        self.x_zero = (levels + 1) // 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks its quantized tensor constructors deprecated
            packed = torch._make_per_channel_quantized_tensor(
                qweight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
            )
            self.packed = torch.ops.quantized.linear_prepack(packed, None)
        # the operator's C++ entry: the Python OpOverload wrapper checks its arguments for fake objects at every
        # call, ~8 us, a millisecond a step over the default model's 121 linears
        self._linear = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default._op

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = rotate(x.reshape(-1, x.shape[-1]), self.hadamard)
        # each row scaled to [-1, 1]: the fixed grid below is then that row's own 8-bit (7-bit) quantization
        peak = flat.abs().amax(dim=-1, keepdim=True).clamp_min_(_ZERO_ROW)  # 2-4x vector_norm(inf)'s speed
        y = self._linear(flat.div_(peak), self.x_scale, self.x_zero, self.packed).mul_(peak)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.shape[0])


INT4_GROUP = 32  # input features per scale and offset (Q4_0 / Q4_1's block)
INT4_VERSION = 2  # part of the int4 cache key: bump it when the quantized bytes change


def int4_fits(shape: torch.Size | tuple[int, int]) -> bool:
    """Whether aten's int4 kernel takes a weight [out, in] of this shape (out a multiple of 16, in of the group)."""
    out, features = shape
    return out % 16 == 0 and features % INT4_GROUP == 0


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (levels uint8 [out, in / 2], two 0..15 levels a byte, low nibble first; float32
    scale_zero [in / 32, out, 2]): weight ~= (level - 8) * scale + zero, per group of 32 input features.

    Each group's lowest value is level 0 and its highest level 15, which gives back weights that already were
    4-bit with one scale and offset per group (Q4_1, Q4_0) up to float rounding."""
    w = weight.float()
    out, features = w.shape
    groups = w.view(out, features // INT4_GROUP, INT4_GROUP)
    low = groups.amin(dim=-1)
    scale = ((groups.amax(dim=-1) - low) / 15).clamp_min(_ZERO_ROW)
    levels = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(out, -1)
    packed = levels[:, 0::2] | (levels[:, 1::2] << 4)
    scale_zero = torch.stack((scale, low + 8 * scale), dim=-1).transpose(0, 1).contiguous()
    return packed, scale_zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in / 2] -> the levels as int32 [out, in]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """`quantize_int4`'s output -> the float32 weight [out, in] it stands for."""
    levels = unpack_int4(packed).float().view(packed.shape[0], -1, INT4_GROUP)
    scale, zero = (scale_zero[..., i].T[..., None] for i in (0, 1))
    return ((levels - 8) * scale + zero).view(packed.shape[0], -1)


def on_int4_grid(weights: Mapping[str, torch.Tensor], prefix: str = "model.layers.0.", rows: int = 64) -> bool:
    """Whether the first layer's projections are already 4-bit per group of 32, as a GGUF Q4_0 or Q4_1 stores
    them (every weight within a thousandth of a level of `quantize_int4`'s grid): int4 then holds them exactly.

    A GGUF tensor has one type for all its rows, so the first `rows` rows of each projection decide (it runs at
    every start: the whole of the default model's first layer took a quarter of its start). `weights`: a dict, or a
    model's tensors as `hogwild.model.loading.open_weights` reads them."""
    names = [name for name in weights if name.startswith(prefix) and name.endswith("proj.weight")]
    for name in names:
        weight = weights.get(name)
        if weight.dim() != 2 or not int4_fits(weight.shape):
            return False
        weight = weight[:rows].float()
        packed, scale_zero = quantize_int4(weight)
        error = (dequantize_int4(packed, scale_zero) - weight).abs().view(weight.shape[0], -1, INT4_GROUP)
        if (error.amax(dim=-1) > 1e-3 * scale_zero[..., 0].T).any():
            return False
    return bool(names)


class Int4Linear:
    """y = x @ W.T (+ b) for x [..., in] in bf16 (`dtype`), W 4-bit per group of 32 (`quantize_int4`)."""

    def __init__(
        self, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> None:
        self.shape = torch.Size((packed.shape[0], packed.shape[1] * 2))
        self.nbytes = packed.numel() + scale_zero.numel() * torch.finfo(dtype).bits // 8  # what a decode step reads
        assert int4_fits(self.shape), f"Int4Linear cannot take a weight of shape {tuple(self.shape)}"
        # the kernel's own layout (it differs between CPU kinds), made at each start from the portable levels
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed), 2)
        self.scale_zero = scale_zero.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default._op  # C++ entry, as in Int8Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_contiguous():  # the decoder's rows: no reshapes (a few us each, 120 calls a step)
            y = self._mm(x, self.weight, INT4_GROUP, self.scale_zero)
            return y if self.bias is None else y.add_(self.bias)
        y = self._mm(x.reshape(-1, self.shape[1]).contiguous(), self.weight, INT4_GROUP, self.scale_zero)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.shape[0])


def cache_key(files: list[Path], weights: str = "int8") -> str:
    """Names the quantization of these weight files to `weights` (int8, int4): their paths, sizes and
    modification times."""
    version = QUANT_VERSION if weights == "int8" else INT4_VERSION
    digest = hashlib.sha256(f"{weights}-v{version}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached quantized weights at `path`, or None when there are none (or they cannot be read: requantize)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


def save_cached(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Write the quantized weights atomically; False (and nothing written) where the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return False
    return True
