"""GGUF files as data: block dequantizers, the config in their metadata, and the one-time conversion to safetensors.

A GGUF file (llama.cpp's format) holds a model's hyperparameters, its tokenizer and chat template as metadata, and
its weights as tensors in one of several block formats. `write_converted` turns one into a Hugging Face folder that
hogwild loads like any other: config.json from the metadata, tokenizer.json and the chat template through
transformers' GGUF tokenizer reader, and model.safetensors with every tensor dequantized to float32 by the numpy
dequantizers here, streamed to disk one slice at a time. The file is read with `gguf.GGUFReader` (memory-mapped, no
code execution); the weights are never more than one tensor in memory. Architectures and tensor types that hogwild
cannot run are refused, naming them, before any work is done.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hogwild.errors import HogwildError

QK_K = 256  # elements per K-quant super-block

# llama.cpp architecture -> (transformers model_type, class name); Mistral GGUFs are written as "llama"
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp stores llama-family q/k rows permuted for its rotary kernel; Qwen GGUFs keep Hugging Face's order
PERMUTED_QK = ("llama",)

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

SLICE_ELEMENTS = 1 << 24  # float32 elements dequantized at a time: 64 MiB of output


# Each dequantizer takes raw blocks, uint8 [n, type_size], and returns float32 [n, block_size]. The layouts are
# llama.cpp's (ggml-common.h); the arithmetic is done in the same order as its reference dequantize_row_* so the
# results are bit-identical. Scales are float16 stored little-endian at fixed byte offsets in each block.


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [n, 1]."""
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] values: the low nibbles are elements 0-15, the high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes = one little-endian uint32 per block -> [n, 32] bits, bit j for element j."""
    return (qh.copy().view("<u4") >> np.arange(32, dtype=np.uint32)).astype(np.uint8) & 1


def dequant_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view("<f4")


def dequant_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.copy().view("<f2").astype(np.float32)


def dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (blocks.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qs: 16 bytes of 4-bit values, offset by 8
    q = _nibbles(blocks[:, 2:18]).astype(np.int8) - 8
    return _f16(blocks, 0) * q.astype(np.float32)


def dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qs: 16 bytes of 4-bit values; x = d * q + m
    q = _nibbles(blocks[:, 4:20]).astype(np.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qh: 32 fifth bits | qs: 16 bytes of low 4 bits; offset by 16
    q = (_nibbles(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << 4)).astype(np.int8) - 16
    return _f16(blocks, 0) * q.astype(np.float32)


def dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qh: 32 fifth bits | qs: 16 bytes of low 4 bits; x = d * q + m
    q = (_nibbles(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << 4)).astype(np.float32)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qs: 32 int8
    return _f16(blocks, 0) * blocks[:, 2:34].view(np.int8).astype(np.float32)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8] float32.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits
    from bytes 8-11 (low and high nibble) and their top 2 bits from the spare top bits of bytes 0-3 and 4-7.
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_dequant(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = (d * scale) * q - (dmin * min) for 8 sub-blocks of 32; q: [n, 8, 32]."""
    sc, m = _k_scales(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc)[:, :, None]
    offset = (_f16(blocks, 2) * m)[:, :, None]
    return (scale * q.astype(np.float32) - offset).reshape(-1, QK_K)


def dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | dmin: f16 | scales: 12 | qs: 128 = four 32-byte chunks, each chunk's low nibbles one sub-block and
    # its high nibbles the next
    qs = blocks[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    return _k_dequant(blocks, q)


def dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | dmin: f16 | scales: 12 | qh: 32 (bit s of byte l: fifth bit of sub-block s, element l) | qs: 128
    qs = blocks[:, 48:176].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return _k_dequant(blocks, low | (high << 4))


def dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql: 128 (low 4 bits) | qh: 64 (top 2 bits) | scales: 16 int8, one per 16 elements | d: f16; offset by 32.
    # Each half of 128 elements reads 64 ql bytes as two 32-byte chunks (low nibbles: quarters 0-1, high: 2-3) and
    # 32 qh bytes whose bit pairs 0-1, 2-3, 4-5, 6-7 go to quarters 0, 1, 2, 3.
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3  # [n, 2, 4, 32]
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16).astype(np.float32)
    scale = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return (scale[:, :, None] * q).reshape(-1, QK_K)


@dataclass(frozen=True)
class BlockFormat:
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]


FORMATS = {
    "F32": BlockFormat(1, 4, dequant_f32),
    "F16": BlockFormat(1, 2, dequant_f16),
    "BF16": BlockFormat(1, 2, dequant_bf16),
    "Q4_0": BlockFormat(32, 18, dequant_q4_0),
    "Q4_1": BlockFormat(32, 20, dequant_q4_1),
    "Q5_0": BlockFormat(32, 22, dequant_q5_0),
    "Q5_1": BlockFormat(32, 24, dequant_q5_1),
    "Q8_0": BlockFormat(32, 34, dequant_q8_0),
    "Q4_K": BlockFormat(QK_K, 144, dequant_q4_k),
    "Q5_K": BlockFormat(QK_K, 176, dequant_q5_k),
    "Q6_K": BlockFormat(QK_K, 210, dequant_q6_k),
}


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Raw tensor bytes (any shape, viewed as uint8) of GGML type `type_name` -> float32, flat."""
    fmt = FORMATS.get(type_name)
    if fmt is None:
        raise HogwildError(f"GGUF tensor type {type_name} is not supported: hogwild reads {', '.join(FORMATS)}")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    assert data.size % fmt.type_size == 0, f"{data.size} bytes is not a whole number of {type_name} blocks"
    return fmt.dequantize(data.reshape(-1, fmt.type_size)).reshape(-1)


@dataclass(frozen=True)
class GgufTensor:
    """One tensor to write: its Hugging Face name and shape, where its bytes are, and how to undo llama.cpp's q/k
    row permutation (the head count, or 0 when the rows are in Hugging Face's order)."""

    name: str
    shape: tuple[int, ...]  # Hugging Face order: [out, in] for a weight matrix
    type_name: str
    raw: np.ndarray  # memory-mapped bytes from the file
    permute_heads: int = 0

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def slices(self) -> Iterator[np.ndarray]:
        """float32 [rows, *shape[1:]] slices in row order, about SLICE_ELEMENTS each."""
        cols = self.n_elements // self.shape[0]
        raw = np.asarray(self.raw).reshape(-1).view(np.uint8).reshape(self.shape[0], -1)  # one row of blocks each
        rows = self.shape[0] if self.permute_heads else max(1, SLICE_ELEMENTS // cols)
        for start in range(0, self.shape[0], rows):
            values = dequantize(raw[start : start + rows], self.type_name).reshape(-1, *self.shape[1:])
            yield unpermute_qk(values, self.permute_heads) if self.permute_heads else values


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q/k rows (weight [heads * head_dim, in] or bias [heads * head_dim]).

    llama.cpp's converter regroups each head's rows from [2, head_dim / 2] (Hugging Face's rotate-half order) to
    [head_dim / 2, 2] (interleaved pairs); this swaps them back.
    """
    rest = w.shape[1:]
    return w.reshape(heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


class GgufFile:
    """An open GGUF file: its metadata, and its tensors mapped to a Hugging Face decoder's names."""

    def __init__(self, path: Path) -> None:
        try:
            from gguf import GGUFReader
        except ImportError as e:
            raise HogwildError("reading a .gguf file needs the gguf package: pip install 'hogwild[convert]'") from e
        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise HogwildError(f"{path} is not a readable GGUF file ({e})") from e
        if self.reader.byte_order != "I":
            raise HogwildError(f"{path} is a big-endian GGUF file; hogwild reads little-endian GGUF files")
        self.architecture = str(self.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise HogwildError(
                f"{path.name}: GGUF architecture {self.architecture!r} is not supported: hogwild converts "
                f"{', '.join(ARCHITECTURES)} GGUF files"
            )
        for t in self.reader.tensors:
            if t.tensor_type.name not in FORMATS:
                raise HogwildError(
                    f"{path.name}: tensor {t.name} has type {t.tensor_type.name}, which hogwild cannot dequantize "
                    f"(supported: {', '.join(FORMATS)})"
                )

    def get(self, key: str, default: object = None) -> object:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch(self, key: str, default: object = None) -> object:
        """A hyperparameter stored under the architecture's prefix, e.g. `qwen2.block_count`."""
        value = self.get(f"{self.architecture}.{key}", default)
        if value is None:
            raise HogwildError(f"{self.path.name} has no {self.architecture}.{key} in its metadata")
        return value

    def hf_config(self) -> dict:
        """A Hugging Face config.json dict for this file's decoder."""
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise HogwildError(
                f"{self.path.name} carries per-frequency RoPE factors (rope_freqs, Llama 3.1+ long-context scaling), "
                "which hogwild does not read yet"
            )
        heads = int(self.arch("attention.head_count"))
        hidden = int(self.arch("embedding_length"))
        head_dim = int(self.arch("attention.key_length", hidden // heads))
        rotary = self.get(f"{self.architecture}.rope.dimension_count")
        if rotary is not None and int(rotary) != head_dim:
            raise HogwildError(f"{self.path.name} rotates {rotary} of {head_dim} head dimensions; hogwild rotates all")
        embed = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise HogwildError(f"{self.path.name} has no token_embd.weight tensor")
        model_type, class_name = ARCHITECTURES[self.architecture]
        rope: dict = {"rope_theta": float(self.arch("rope.freq_base", 10000.0)), "rope_type": "default"}
        scaling = self.get(f"{self.architecture}.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise HogwildError(f"{self.path.name} uses {scaling} RoPE scaling; hogwild supports linear scaling")
            rope |= {"rope_type": "linear", "factor": float(self.arch("rope.scaling.factor"))}
        eos = [self.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
        config = {
            "architectures": [class_name],
            "model_type": model_type,
            "vocab_size": int(embed.shape[1]),
            "hidden_size": hidden,
            "intermediate_size": int(self.arch("feed_forward_length")),
            "num_hidden_layers": int(self.arch("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(self.arch("context_length")),
            "rms_norm_eps": float(self.arch("attention.layer_norm_rms_epsilon")),
            "rope_parameters": rope,
            "hidden_act": "silu",
            "attention_bias": "blk.0.attn_q.bias" in names,
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id"),
            "dtype": "float32",
        }
        if model_type != "llama":
            config["use_sliding_window"] = False
        return config

    def tensors(self, config: dict) -> list[GgufTensor]:
        """Every tensor under its Hugging Face name, in file order; a tensor with no place in the decoder is an
        error rather than silently dropped."""
        permute = self.architecture in PERMUTED_QK
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        out = []
        for t in self.reader.tensors:
            name = GLOBAL_TENSORS.get(t.name)
            layer_heads = 0
            parts = t.name.split(".")
            if name is None and len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
                name = f"model.layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
                layer_heads = heads.get(parts[2], 0) if permute else 0
            if name is None:
                raise HogwildError(f"{self.path.name}: tensor {t.name} has no place in a {self.architecture} decoder")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
            out.append(GgufTensor(name, shape, t.tensor_type.name, t.data, layer_heads))
        return out


def write_converted(path: Path, out: Path) -> None:
    """Write config.json, the tokenizer (with the chat template) and float32 model.safetensors for `path` into
    `out`. Unsupported files are refused before anything is written."""
    gguf = GgufFile(path)
    config = gguf.hf_config()
    tensors = gguf.tensors(config)
    print(f"hogwild: converting {path.name} to safetensors (once) ...", file=sys.stderr, flush=True)
    write_tokenizer(path, out)
    write_safetensors(out / "model.safetensors", tensors, f"converting {path.name}")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer(path: Path, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja from the GGUF's tokenizer metadata."""
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError as e:
        raise HogwildError("converting a .gguf file needs transformers: pip install 'hogwild[convert]'") from e

    transformers.utils.logging.set_verbosity_error()
    noise = io.StringIO()  # the GGUF reader's own progress bar writes straight to stderr
    try:
        with contextlib.redirect_stderr(noise):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as e:
        raise HogwildError(f"cannot read the tokenizer in {path} ({e})") from e
    tokenizer.save_pretrained(out)


def write_safetensors(path: Path, tensors: list[GgufTensor], label: str) -> None:
    """Stream `tensors` as float32 into one safetensors file, a slice at a time, with a progress bar."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        size = 4 * t.n_elements
        header[t.name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with progress_bar() as progress, open(path, "wb") as f:
        task = progress.add_task(label, total=offset)
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors:
            for values in t.slices():
                f.write(np.ascontiguousarray(values, dtype="<f4").tobytes())
                progress.advance(task, values.nbytes)


def progress_bar():
    """A byte-counting progress bar on stderr that disappears when done; none when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    return Progress(
        TextColumn("hogwild: {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
