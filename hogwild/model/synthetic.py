"""GGUF files of a real model's shape filled with random weights, to measure memory and decode speed at sizes whose
real weights this machine cannot get.

`write_synthetic_gguf` writes a qwen2 GGUF with the metadata llama.cpp's converter writes, the tokenizer of another
GGUF, and random blocks in the types llama.cpp's Q4_K_M recipe gives each tensor: the file has the real model's
size, tensor types and byte layout, so hogwild and llama.cpp load it and decode it at the real model's speed (the
text is noise). Each block's float16 scales are set so that a matrix of `columns` inputs has weights of standard
deviation 1/sqrt(columns), which keeps activations finite through every layer. The file is streamed one tensor at a
time under a temporary name and renamed into place when complete. `hogwild bench shape NAME` writes one once into
`cache_dir()/synthetic/` and prints its path.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hogwild.errors import HogwildError
from hogwild.model.gguf import TYPES, progress_bar, row_bytes
from hogwild.model.loading import cache_dir

ARCH = "qwen2"
QK_K = 256  # elements of a K-quant super-block: every row of a K-quant matrix is a whole number of them
MARK = "hogwild.synthetic"  # metadata key naming the shape a file was written for
FILE_TYPE_Q4_K_M = 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M, its general.file_type
PAD_TOKEN_TYPE = 5  # llama.cpp's UNUSED token type, which its converter gives the [PADn] tokens that fill a vocabulary

# Standard deviation of a block's weights over uniform random bytes with its float16 scale d = 1:
# Q4_K: w = d * sc * q - dmin * m, 6-bit sc and m, 4-bit q; dmin = 7.5 d centres it (E[sc q] = 7.5 E[m]), and then
#   var = E[sc^2] E[q^2] - 15 E[sc] E[q] E[m] + 56.25 E[m^2] = 1333.5 * 77.5 - 111628 + 56.25 * 1333.5
# Q6_K: w = d * s * (q - 32), int8 s and 6-bit q: var = E[s^2] E[(q - 32)^2] = 5461.5 * 341.5
UNIT_STD = {"Q4_K": 258.3, "Q6_K": 1365.7}
DMIN_RATIO = 7.5
BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}  # Q4_K: d at bytes 0-1, dmin at 2-3; Q6_K: d at bytes 208-209


@dataclass(frozen=True)
class Shape:
    """A qwen2 decoder's dimensions (q/k/v biases, SwiGLU, RMSNorm, an output matrix of its own), as its Hugging
    Face config.json gives them."""

    name: str
    title: str  # the model whose shape this is
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int  # rows of the embedding and output matrices
    context: int
    rope_theta: float
    rms_eps: float
    tokenizer: str | None  # the named model whose tokenizer `hogwild bench shape` copies by default

    def __post_init__(self) -> None:
        assert self.hidden % self.heads == 0 and self.heads % self.kv_heads == 0, f"{self.name}: heads do not divide"
        assert self.hidden % QK_K == 0 and self.intermediate % QK_K == 0, f"{self.name}: rows of whole K-quant blocks"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    s.name: s
    for s in [
        Shape(
            name="qwen2.5-7b",
            title="Qwen2.5-7B-Instruct",
            layers=28,
            hidden=3584,
            intermediate=18944,
            heads=28,
            kv_heads=4,
            vocab=152_064,
            context=32768,
            rope_theta=1e6,
            rms_eps=1e-6,
            tokenizer="qwen2.5-coder-1.5b",  # Qwen2.5's tokenizer, padded from 151,936 tokens
        ),
        Shape(
            name="tiny",  # for tests, with a tokenizer of at most 512 tokens
            title="a tiny qwen2",
            layers=8,
            hidden=256,
            intermediate=512,
            heads=4,
            kv_heads=2,
            vocab=512,
            context=4096,
            rope_theta=1e6,
            rms_eps=1e-6,
            tokenizer=None,
        ),
    ]
}


@dataclass(frozen=True)
class Planned:
    """One tensor of a synthetic file: llama.cpp's name, shape ([rows, columns] or [n]) and block type."""

    name: str
    shape: tuple[int, ...]
    type_name: str

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return self.rows * row_bytes(self.type_name, self.shape[-1])


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's `use_more_bits`: whether Q4_K_M stores this layer's attn_v and ffn_down as Q6_K (the first and
    last eighth of the layers and every third one between). llama.cpp counts layers in file order, so a file whose
    tensors are sorted by name (blk.0, blk.1, blk.10, ...) gets other layers; here file order is layer order, as
    llama.cpp's converter writes it."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_plan(shape: Shape) -> list[Planned]:
    """Every tensor of `shape`'s file in file order, typed as llama.cpp's Q4_K_M recipe types them: Q4_K matrices,
    Q6_K for the output and for attn_v and ffn_down on the layers `more_bits` picks, F32 norms and biases."""
    h, kv, ffn = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    plan = [Planned("token_embd.weight", (shape.vocab, h), "Q4_K")]
    for i in range(shape.layers):
        wide = "Q6_K" if more_bits(i, shape.layers) else "Q4_K"
        plan += [
            Planned(f"blk.{i}.attn_norm.weight", (h,), "F32"),
            Planned(f"blk.{i}.attn_q.weight", (h, h), "Q4_K"),
            Planned(f"blk.{i}.attn_q.bias", (h,), "F32"),
            Planned(f"blk.{i}.attn_k.weight", (kv, h), "Q4_K"),
            Planned(f"blk.{i}.attn_k.bias", (kv,), "F32"),
            Planned(f"blk.{i}.attn_v.weight", (kv, h), wide),
            Planned(f"blk.{i}.attn_v.bias", (kv,), "F32"),
            Planned(f"blk.{i}.attn_output.weight", (h, h), "Q4_K"),
            Planned(f"blk.{i}.ffn_norm.weight", (h,), "F32"),
            Planned(f"blk.{i}.ffn_gate.weight", (ffn, h), "Q4_K"),
            Planned(f"blk.{i}.ffn_up.weight", (ffn, h), "Q4_K"),
            Planned(f"blk.{i}.ffn_down.weight", (h, ffn), wide),
        ]
    return plan + [Planned("output_norm.weight", (h,), "F32"), Planned("output.weight", (shape.vocab, h), "Q6_K")]


def random_tensor(rng: np.random.Generator, t: Planned) -> np.ndarray:
    """`t`'s bytes: float32 norms near 1 and biases near 0, or uniform random blocks (uint8 [rows, row bytes]) whose
    float16 scales give weights of standard deviation 1/sqrt(columns)."""
    if t.type_name == "F32":
        centre = 1.0 if t.name.endswith("norm.weight") else 0.0
        return (centre + 0.02 * rng.standard_normal(t.shape[0])).astype(np.float32)
    # PCG64's raw words: about ten times faster than rng.bytes, and writable in place
    data = rng.bit_generator.random_raw(-(-t.nbytes // 8)).view(np.uint8)[: t.nbytes]
    blocks = data.reshape(-1, BLOCK_BYTES[t.type_name])  # [blocks, block bytes]
    d = 1 / (math.sqrt(t.shape[-1]) * UNIT_STD[t.type_name])
    if t.type_name == "Q4_K":
        blocks[:, 0:4].view(np.float16)[:] = (d, DMIN_RATIO * d)
    else:
        blocks[:, 208:210].view(np.float16)[:] = d
    return data.reshape(t.rows, -1)


def tokenizer_metadata(source: Path, vocab: int) -> dict[str, tuple[object, int, int | None]]:
    """The `tokenizer.*` metadata of the GGUF at `source` (tokens, merges, special ids, chat template) as
    {key: (value, GGUF value type, array item type)}, its token list padded to `vocab` with unused `[PADn]` tokens
    as llama.cpp's converter pads a vocabulary smaller than the embedding."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(source)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise HogwildError(f"{source} is not a readable GGUF file ({e})") from e
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            out[key] = (field.contents(), kind, field.types[-1] if kind == GGUFValueType.ARRAY else None)
    if "tokenizer.ggml.tokens" not in out:
        raise HogwildError(f"{source.name} carries no tokenizer (no tokenizer.ggml.tokens in its metadata)")
    count = len(out["tokenizer.ggml.tokens"][0])
    if count > vocab:
        raise HogwildError(f"the tokenizer of {source.name} has {count:,} tokens, more than this shape's {vocab:,}")
    padding = {"tokenizer.ggml.tokens": [f"[PAD{i}]" for i in range(count, vocab)]}
    padding["tokenizer.ggml.token_type"] = [PAD_TOKEN_TYPE] * (vocab - count)
    padding["tokenizer.ggml.scores"] = [-1000.0] * (vocab - count)  # sentencepiece vocabularies score each token
    for key, extra in padding.items():
        if key in out:
            value, kind, item = out[key]
            out[key] = (value + extra, kind, item)
    return out


def write_synthetic_gguf(path: Path, shape: Shape, tokenizer_source: Path, seed: int = 0) -> Path:
    """Write `shape` with random Q4_K_M-like weights and the tokenizer of the GGUF `tokenizer_source` to `path`,
    one tensor in memory at a time. The file appears at `path` only when complete: an interrupted write leaves
    nothing behind."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    tokenizer = tokenizer_metadata(tokenizer_source, shape.vocab)
    writer = GGUFWriter(None, ARCH)
    writer.add_string("general.type", "model")
    writer.add_string("general.name", f"{shape.title} shape, random weights")
    for key, value in [
        ("block_count", shape.layers),
        ("context_length", shape.context),
        ("embedding_length", shape.hidden),
        ("feed_forward_length", shape.intermediate),
        ("attention.head_count", shape.heads),
        ("attention.head_count_kv", shape.kv_heads),
    ]:
        writer.add_uint32(f"{ARCH}.{key}", value)
    writer.add_float32(f"{ARCH}.rope.freq_base", shape.rope_theta)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", shape.rms_eps)
    writer.add_uint32("general.file_type", FILE_TYPE_Q4_K_M)
    for key, (value, kind, item) in tokenizer.items():
        writer.add_key_value(key, value, GGUFValueType(kind), None if item is None else GGUFValueType(item))
    writer.add_uint32("general.quantization_version", 2)
    writer.add_string(MARK, shape.name)

    plan = tensor_plan(shape)
    for t in plan:
        if t.type_name == "F32":
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes)
        else:  # a byte shape [rows, row bytes], which gguf turns into elements
            byte_shape = (t.rows, t.nbytes // t.rows)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, GGMLQuantizationType[t.type_name])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rng = np.random.default_rng(seed)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar() as progress:
            task = progress.add_task(f"writing {shape.name} (random weights)", total=sum(t.nbytes for t in plan))
            for t in plan:
                writer.write_tensor_data(random_tensor(rng, t))
                progress.advance(task, t.nbytes)
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise HogwildError(f"cannot write {path} ({e})") from e
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path


def default_path(shape: Shape) -> Path:
    return cache_dir() / "synthetic" / f"{shape.name}-q4_k_m.gguf"


# GGUF metadata value types of fixed size -> struct format; 8 is a string, 9 an array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def written_shape(path: Path) -> str | None:
    """The shape a synthetic file at `path` was written for, when every tensor lies within the file; else None.
    A walk over the header alone: gguf's reader takes most of a minute over a 152k-token vocabulary."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                return None
            _, tensors, keys = struct.unpack_from("<IQQ", buf, 4)
            pos, metadata = 24, {}
            for _ in range(keys):
                key, pos = _value(buf, pos, 8)
                (kind,) = struct.unpack_from("<I", buf, pos)
                metadata[key], pos = _value(buf, pos + 4, kind)
            end = 0
            for _ in range(tensors):
                _, pos = _value(buf, pos, 8)
                (dims,) = struct.unpack_from("<I", buf, pos)
                shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)  # fastest dimension first
                type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * dims)
                pos += 16 + 8 * dims
                end = max(end, offset + row_bytes(TYPES[type_id][0], shape[0]) * math.prod(shape[1:]))
            alignment = metadata.get("general.alignment", 32)
            complete = -(-pos // alignment) * alignment + end <= len(buf)
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError, HogwildError):
        return None
    return metadata.get(MARK) if complete else None


def _value(buf: mmap.mmap, pos: int, kind: int) -> tuple[object, int]:
    """The metadata value of type `kind` at `pos` (None for an array, which is skipped) and where the next begins."""
    if kind in SCALARS:
        return struct.unpack_from(SCALARS[kind], buf, pos)[0], pos + struct.calcsize(SCALARS[kind])
    if kind == 8:
        (size,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8 : pos + 8 + size].decode(), pos + 8 + size
    if kind == 9:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in SCALARS:
            return None, pos + count * struct.calcsize(SCALARS[item])
        for _ in range(count):
            _, pos = _value(buf, pos, item)
        return None, pos
    raise ValueError(f"GGUF metadata value type {kind}")


def synthetic_gguf(shape: Shape, path: Path | None = None, tokenizer: str | None = None) -> Path:
    """The synthetic GGUF of `shape` at `path` (default: `default_path`), written once: a complete one already
    there is returned as it is. `tokenizer`: a named model or a .gguf file (default: the shape's own)."""
    from hogwild.llamacpp import gguf_for

    path = path or default_path(shape)
    source = tokenizer or shape.tokenizer
    if path.exists():
        if written_shape(path) == shape.name:
            return path
        raise HogwildError(f"{path} exists and is not a complete synthetic {shape.name}; delete it to write it again")
    if source is None:
        raise HogwildError(f"the {shape.name} shape has no tokenizer of its own: name one with --tokenizer")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=path.parent))
    except OSError as e:
        raise HogwildError(f"cannot write to {path.parent} ({e})") from e
    try:
        # a split named model is assembled into `work`
        write_synthetic_gguf(path, shape, gguf_for(source, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"hogwild: wrote {path} ({path.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    return path


def add_parser(benches: argparse._SubParsersAction) -> None:
    """Register `hogwild bench shape`."""
    parser = benches.add_parser(
        "shape",
        help="write a GGUF of a real model's shape with random weights; print its path",
        description="Write, once, a GGUF with a real model's shape, tokenizer and Q4_K_M block types but random "
        "weights, for measuring memory and decode speed at that size (its text is noise), and print its path: "
        "hogwild bench decode --model $(hogwild bench shape qwen2.5-7b) --against llama.cpp",
    )
    parser.add_argument("name", choices=SHAPES, help="the shape")
    parser.add_argument("--out", type=Path, help="where to write it (default: <cache>/synthetic/NAME-q4_k_m.gguf)")
    parser.add_argument("--tokenizer", help="a named model or .gguf file whose tokenizer to copy (default: by shape)")
    parser.set_defaults(func=cmd_shape)


def cmd_shape(args: argparse.Namespace) -> int:
    print(synthetic_gguf(SHAPES[args.name], args.out, args.tokenizer))
    return 0
