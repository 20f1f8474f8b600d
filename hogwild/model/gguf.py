"""GGUF files as they lie: the config and tokenizer in their metadata, and their tensors in their own bytes.

A GGUF file (llama.cpp's format) holds a model's hyperparameters, its tokenizer and chat template as metadata, and
its weights as tensors in one of several block formats. `write_prepared` reads the metadata once (with
`gguf.GGUFReader`: memory-mapped, no code execution) into a small Hugging Face style folder: config.json, the
tokenizer through transformers' GGUF reader, and `gguf.json`, an index of every tensor (its Hugging Face name,
shape, block type and byte range in the file). At every start `GgufWeights` maps the file (or the installed parts
of a split model, back to back in one address range; `Mapping.read_into_memory` then reads the bytes into private
2 MB pages, as the engine does when the block kernels run) and hands the decoder each tensor's own blocks; nothing is
converted to float on disk. Float copies are made only where asked for, a tensor at a time, by gguf's own
dequantizer (`float_tensor`). Architectures and tensor types that hogwild cannot run are refused, naming them,
before any work is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hogwild.errors import HogwildError

INDEX = "gguf.json"  # the tensor index `write_prepared` writes beside config.json
INDEX_VERSION = 1

# llama.cpp architecture -> (transformers model_type, class name); Mistral GGUFs are written as "llama"
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
# llama.cpp stores llama-family q/k rows permuted for its rotary kernel; Qwen GGUFs keep Hugging Face's order
PERMUTED_QK = ("llama",)

# the block types hogwild runs: GGML type id -> (name, elements per block, bytes per block), as ggml-common.h
TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
TYPE_IDS = {name: type_id for type_id, (name, _, _) in TYPES.items()}

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


def type_id(type_name: str) -> int:
    if type_name not in TYPE_IDS:
        raise HogwildError(f"GGUF tensor type {type_name} is not supported: hogwild reads {', '.join(TYPE_IDS)}")
    return TYPE_IDS[type_name]


def row_bytes(type_name: str, columns: int) -> int:
    """Bytes of one row of `columns` elements stored as `type_name`."""
    _, block, size = TYPES[type_id(type_name)]
    if columns % block:
        raise HogwildError(f"a row of {columns} elements is not a whole number of {type_name} blocks of {block}")
    return columns // block * size


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Raw tensor bytes (uint8 [rows, row bytes]) of GGML type `type_name` -> float32 [rows, columns], by gguf's
    own dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as reference

    type_id(type_name)  # refuse what hogwild does not run before gguf is asked
    return np.asarray(reference(np.ascontiguousarray(raw), GGMLQuantizationType[type_name]), dtype=np.float32)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q/k rows (weight [heads * head_dim, in] or bias [heads * head_dim]).

    llama.cpp's converter regroups each head's rows from [2, head_dim / 2] (Hugging Face's rotate-half order) to
    [head_dim / 2, 2] (interleaved pairs); this swaps them back.
    """
    rest = w.shape[1:]
    return w.reshape(heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file under its Hugging Face name: shape, block type, where its bytes lie, and how to
    undo llama.cpp's q/k row permutation (the head count, or 0 when the rows are in Hugging Face's order)."""

    name: str
    shape: tuple[int, ...]  # Hugging Face order: [out, in] for a weight matrix
    type_name: str
    offset: int  # of its first byte in the file
    nbytes: int
    permute_heads: int = 0

    @property
    def type_id(self) -> int:
        return TYPE_IDS[self.type_name]

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    def to_json(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> GgufTensor:
        return cls(**{**data, "shape": tuple(data["shape"])})


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
                f"{path.name}: GGUF architecture {self.architecture!r} is not supported: hogwild runs "
                f"{', '.join(ARCHITECTURES)} GGUF files"
            )
        for t in self.reader.tensors:
            if t.tensor_type.name not in TYPE_IDS:
                raise HogwildError(
                    f"{path.name}: tensor {t.name} has type {t.tensor_type.name}, which hogwild cannot run "
                    f"(supported: {', '.join(TYPE_IDS)})"
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
            type_name = t.tensor_type.name
            expected = row_bytes(type_name, shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64))
            if int(t.n_bytes) != expected or t.data_offset + expected > self.path.stat().st_size:
                raise HogwildError(f"{self.path.name}: tensor {t.name} does not fit the file; is it truncated?")
            out.append(GgufTensor(name, shape, type_name, int(t.data_offset), expected, layer_heads))
        return out


def write_prepared(path: Path, out: Path, source: dict) -> None:
    """Write config.json, the tokenizer (with the chat template) and the tensor index for the GGUF at `path` into
    `out`. `source` says where the weights are read from at every start (see `GgufWeights.open`). Unsupported
    files are refused before anything is written."""
    gguf = GgufFile(path)
    config = gguf.hf_config()
    tensors = gguf.tensors(config)
    print(f"hogwild: reading {path.name}'s metadata (once) ...", file=sys.stderr, flush=True)
    write_tokenizer(path, out)
    index = {"version": INDEX_VERSION, "source": source, "tensors": [t.to_json() for t in tensors]}
    (out / INDEX).write_text(json.dumps(index) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer(path: Path, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja from the GGUF's tokenizer metadata."""
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError as e:
        raise HogwildError("reading a .gguf file's tokenizer needs transformers: pip install 'hogwild[convert]'") from e

    transformers.utils.logging.set_verbosity_error()
    noise = io.StringIO()  # the GGUF reader's own progress bar writes straight to stderr
    try:
        with contextlib.redirect_stderr(noise):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as e:
        raise HogwildError(f"cannot read the tokenizer in {path} ({e})") from e
    tokenizer.save_pretrained(out)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


class Mapping:
    """Files mapped back to back into one read-only address range (copy-on-write, never written), kept mapped for
    as long as this object lives. One file is one `mmap`; the parts of a split model are mapped at consecutive
    addresses, which needs every part but the last to be a whole number of pages, else they are read into
    memory. `read_into_memory` swaps the mapping for a private copy of the same bytes."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._maps: list[mmap.mmap] = []
        self._regions: list[tuple[int, int]] = []  # what __del__ unmaps
        self.in_memory = False  # read into private memory (`read_into_memory`), else mapped
        try:
            sizes = [f.stat().st_size for f in files]
        except OSError as e:
            raise HogwildError(f"cannot read the model's GGUF ({e})") from e
        self.size = sum(sizes)
        page = mmap.PAGESIZE
        if len(files) == 1:
            with open(files[0], "rb") as f:
                self._maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
            self.buffer = memoryview(self._maps[0])
        elif all(size % page == 0 for size in sizes[:-1]) and hasattr(os, "sysconf"):
            self.buffer = self._map_fixed(files, sizes)
        else:
            data = bytearray(self.size)  # parts that cannot be mapped side by side: read once into memory
            at = 0
            for file, size in zip(files, sizes, strict=True):
                with open(file, "rb") as f:
                    f.readinto(memoryview(data)[at : at + size])
                at += size
            self.buffer = memoryview(data)
        self.array = np.frombuffer(self.buffer, dtype=np.uint8)

    def _map_fixed(self, files: list[Path], sizes: list[int]) -> memoryview:
        libc = _libc()
        prot = mmap.PROT_READ | mmap.PROT_WRITE  # private and never written: writable only so torch takes it
        fixed = 0x10  # MAP_FIXED (Linux and the BSDs)
        base = libc.mmap(None, self.size, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # reserve the range
        if base in (None, ctypes.c_void_p(-1).value):
            raise HogwildError(f"cannot map the model's {len(files)} parts ({os.strerror(ctypes.get_errno())})")
        self._regions.append((base, self.size))
        self._libc = libc
        at = 0
        for file, size in zip(files, sizes, strict=True):
            fd = os.open(file, os.O_RDONLY)
            try:
                got = libc.mmap(base + at, size, prot, mmap.MAP_PRIVATE | fixed, fd, 0)
            finally:
                os.close(fd)  # the mapping keeps the file
            if got != base + at:
                raise HogwildError(f"cannot map {file} ({os.strerror(ctypes.get_errno())})")
            at += size
        view = (ctypes.c_uint8 * self.size).from_address(base)
        view.mapping = self  # every tensor over these bytes keeps the mapping, and so the map, alive
        return memoryview(view).cast("B")

    def read_into_memory(self) -> bool:
        """Read the files' bytes into private anonymous memory, in 2 MB pages where the kernel gives them, and hand
        out views of that from now on: the same bytes, but a step streams them faster than the page cache's 4 KB
        file pages (a 1.5B Q4_K_M step's matrices: 28 ms from 2 MB pages, 31 ms from 4 KB anonymous pages, 37 ms
        mapped, on Zen 4). Call it before any tensor views the buffer. False (and nothing changes) when the memory
        cannot be had."""
        libc = self._libc = _libc()
        huge = 1 << 21
        length = self.size + huge
        region = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if region in (None, ctypes.c_void_p(-1).value):
            return False
        base = (region + huge - 1) & ~(huge - 1)
        libc.madvise(base, self.size, 14)  # MADV_HUGEPAGE; a kernel without transparent huge pages ignores it
        view = (ctypes.c_uint8 * self.size).from_address(base)
        buffer = memoryview(view).cast("B")
        try:
            with progress_bar() as bar:
                task = bar.add_task(f"reading {self.files[0].name} into memory", total=self.size)
                at = 0
                for file in self.files:
                    with open(file, "rb") as f:
                        while True:
                            got = f.readinto(buffer[at : min(self.size, at + (64 << 20))])
                            if not got:
                                break
                            at += got
                            bar.advance(task, got)
            if at != self.size:
                raise HogwildError(f"{self.files[0]} changed while it was read ({at} of {self.size} bytes)")
        except BaseException as e:
            buffer.release()
            libc.munmap(region, length)
            if isinstance(e, OSError):
                raise HogwildError(f"cannot read {self.files[0]} ({e})") from e
            raise
        # the file mapping stays (a view made before this still reads through it); its pages are not touched again
        self._regions.append((region, length))
        view.mapping = self  # every tensor over these bytes keeps this object, and so the memory, alive
        self.buffer = buffer
        self.array = np.frombuffer(buffer, dtype=np.uint8)
        self.in_memory = True
        return True

    def __del__(self) -> None:
        for base, length in getattr(self, "_regions", ()):
            self._libc.munmap(base, length)


@dataclass(frozen=True)
class Blocks:
    """A weight matrix as the GGUF stores it: `data` uint8 [rows, row bytes] of `type_name` blocks (a view into
    the mapped file, or rows reordered where llama.cpp permuted them), `columns` elements a row."""

    data: torch.Tensor
    type_name: str
    columns: int

    @property
    def type_id(self) -> int:
        return TYPE_IDS[self.type_name]

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.columns))

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """float32 [rows, columns] of the chosen rows (all when None), by gguf's dequantizer."""
        data = self.data if rows is None else self.data[rows]
        values = dequantize(data.numpy().reshape(-1, self.data.shape[1]), self.type_name)
        return torch.from_numpy(values.reshape(-1, self.columns))


class GgufWeights:
    """A prepared GGUF model's tensors, read from the mapped file at each start: `blocks(name)` gives a weight
    matrix's own blocks, `get(name)` a float32 copy of any tensor (made now, by gguf's dequantizer)."""

    def __init__(self, mapping: Mapping, tensors: list[GgufTensor], label: str) -> None:
        self.mapping = mapping
        self.tensors = {t.name: t for t in tensors}
        self.label = label
        for t in tensors:
            if t.offset + t.nbytes > mapping.size:
                raise HogwildError(f"{label}: tensor {t.name} lies past the end of the file; is it truncated?")

    @classmethod
    def open(cls, folder: Path) -> GgufWeights:
        """The weights of a folder `write_prepared` wrote."""
        try:
            index = json.loads((folder / INDEX).read_text())
            if index["version"] != INDEX_VERSION:
                raise ValueError(f"index version {index['version']}, this hogwild writes {INDEX_VERSION}")
            tensors = [GgufTensor.from_json(t) for t in index["tensors"]]
            files = [Path(f) for f in index["source"]["files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HogwildError(f"{folder / INDEX} is damaged ({e}); delete {folder} to prepare the model again") from e
        for file, size in zip(files, index["source"]["sizes"], strict=True):
            if not file.is_file() or file.stat().st_size != size:
                raise HogwildError(
                    f"{file} is missing or changed since hogwild prepared it; delete {folder} to prepare it again"
                )
        return cls(Mapping(files), tensors, files[0].name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.names())

    def names(self) -> list[str]:
        return list(self.tensors)

    def describe(self) -> str:
        """The block types of the weight matrices, most bytes first: "Q4_K + Q6_K blocks"."""
        size: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) == 2:
                size[t.type_name] = size.get(t.type_name, 0) + t.nbytes
        return " + ".join(sorted(size, key=size.get, reverse=True)) + " blocks"

    def _raw(self, t: GgufTensor) -> np.ndarray:
        return self.mapping.array[t.offset : t.offset + t.nbytes].reshape(t.rows, -1)

    def blocks(self, name: str) -> Blocks:
        t = self.tensors[name]
        raw = torch.from_numpy(self._raw(t))
        if t.permute_heads:  # llama's q/k rows back in Hugging Face's order: a copy of these rows only
            order = torch.from_numpy(unpermute_qk(np.arange(t.rows), t.permute_heads))
            raw = raw.index_select(0, order)
        return Blocks(raw, t.type_name, t.shape[-1])

    def get(self, name: str) -> torch.Tensor | None:
        """A float32 copy of the tensor in Hugging Face's layout, or None when the file has no such tensor."""
        t = self.tensors.get(name)
        if t is None:
            return None
        values = dequantize(self._raw(t), t.type_name).reshape(t.shape)
        if t.permute_heads:
            values = unpermute_qk(values, t.permute_heads)
        return torch.from_numpy(np.array(values, copy=True))  # F32 tensors come back as views of the map


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
