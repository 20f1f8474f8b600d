"""Finding and reading model weights.

hogwild reads Hugging Face model folders (config.json, tokenizer files, `*.safetensors` weights) and `.gguf` files;
`registry.resolve_model_dir` turns a `--model` (a name, a folder or a file) into one. A GGUF's metadata is read
once into a small folder under `cache_dir()/models/` (config.json, the tokenizer and a tensor index, see
`gguf.write_prepared`); its weights stay in the GGUF, mapped (and read into memory, see `gguf.Mapping`) at every
start. `open_weights` gives the decoder a model's tensors one at a time, so loading holds one float tensor at most
beside the weights it keeps. Everything here turns a bad path or a damaged file into a one-line `HogwildError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hogwild.errors import HogwildError
from hogwild.model.gguf import INDEX, GgufWeights, write_prepared

SHARD_INDEX = "model.safetensors.index.json"
COMPLETE_MARKER = ".hogwild-complete"
CONVERTER_VERSION = 3  # part of the cache folder name: bump it when the prepared folder changes
SUPPORTED = (
    "hogwild reads a named model (see `hogwild models`), a Hugging Face model folder with config.json and "
    "*.safetensors weights, or a .gguf file"
)


def cache_dir() -> Path:
    """Where converted models live: `$HOGWILD_CACHE`, else `$XDG_CACHE_HOME/hogwild`, else `~/.cache/hogwild`."""
    if os.environ.get("HOGWILD_CACHE"):
        return Path(os.environ["HOGWILD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hogwild"
    return Path.home() / ".cache" / "hogwild"


def check_model_dir(folder: Path) -> None:
    """Raise a `HogwildError` unless `folder` has a config.json and safetensors weights (or is a GGUF's prepared
    folder)."""
    if not (folder / "config.json").is_file():
        raise HogwildError(f"model folder {folder} has no config.json ({SUPPORTED})")
    if not any(folder.glob("*.safetensors")) and not is_gguf_folder(folder):
        raise HogwildError(f"model folder {folder} has no *.safetensors weights ({SUPPORTED})")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_key(path: Path) -> str:
    """Names a GGUF file by its path, size and modification time: a start needs no pass over its bytes."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def converted_dir(digest: str) -> Path:
    """Where the prepared folder of the GGUF named `digest` (a sha256 or `file_key`) lives."""
    return cache_dir() / "models" / f"{digest[:16]}-v{CONVERTER_VERSION}"


def is_converted(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def prepare_gguf(path: Path, files: list[Path], digest: str) -> Path:
    """Read the GGUF at `path` into its prepared folder once (config, tokenizer, tensor index); later calls return
    the folder at once. `files` are where its bytes are mapped from at each start: the file itself, or the
    installed parts of a split model (then `path` is their temporary concatenation).

    The folder is built under a temporary name next to its final place and renamed into place at the end, so an
    interrupted preparation never leaves a half-written cache behind.
    """
    target = converted_dir(digest)
    models = target.parent
    if is_converted(target):
        return target
    try:
        models.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
    except OSError as e:
        hint = "set HOGWILD_CACHE to a writable folder"
        raise HogwildError(f"cannot write the model cache {models} ({e}); {hint}") from e
    try:
        files = [f.resolve() for f in files]
        write_prepared(path, tmp, {"files": [str(f) for f in files], "sizes": [f.stat().st_size for f in files]})
        (tmp / COMPLETE_MARKER).write_text(f"{path.name} {digest}\n")
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)  # left by something other than this function, which only renames finished folders
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_converted(target):
                raise
            # another process finished the same preparation first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_gguf_folder(folder: Path) -> bool:
    return (folder / INDEX).is_file()


def weight_files(folder: Path) -> list[Path]:
    """The files a model's weights are read from: its safetensors files, or the GGUF (parts) it maps."""
    if is_gguf_folder(folder):
        return GgufWeights.open(folder).mapping.files
    index = folder / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HogwildError(f"{index} is not a valid safetensors index ({e})") from e
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


class SafetensorsWeights:
    """A Hugging Face folder's tensors, read one at a time from the memory-mapped safetensors files in their stored
    dtype: loading never holds the whole model in float32 beside the weights the decoder keeps."""

    def __init__(self, folder: Path) -> None:
        files = weight_files(folder)
        if not files:
            raise HogwildError(f"model folder {folder} has no *.safetensors weights ({SUPPORTED})")
        self.handles = []
        self.where: dict[str, object] = {}
        for file in files:
            if not file.is_file():
                raise HogwildError(f"weight file {file} listed in {SHARD_INDEX} does not exist")
            try:
                handle = safe_open(str(file), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise HogwildError(f"weight file {file} is truncated or corrupt ({e}); re-download it") from e
            self.handles.append((file, handle))
            self.where.update(dict.fromkeys(names, (file, handle)))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self):
        return iter(self.names())

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor | None:
        if name not in self.where:
            return None
        file, handle = self.where[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise HogwildError(f"weight file {file} is truncated or corrupt ({e}); re-download it") from e


def open_weights(folder: Path) -> GgufWeights | SafetensorsWeights:
    """The tensors of a model folder `registry.resolve_model_dir` returned, read on demand: a GGUF's (mapped, its own
    blocks available through `blocks`) or a safetensors folder's."""
    return GgufWeights.open(folder) if is_gguf_folder(folder) else SafetensorsWeights(folder)


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model at once, keyed by its name in the checkpoint: a safetensors folder's in their
    stored dtype, a GGUF's dequantized to float32 (for tests and float references; the engine reads
    `open_weights`)."""
    weights = open_weights(folder)
    return {name: weights.get(name) for name in weights.names()}


def read_config(folder: Path) -> dict:
    """config.json as a dict, with generation_config.json's `eos_token_id` under `generation_eos_token_id` and its
    sampling settings (temperature, top_p, top_k, when it samples) under `generation_sampling`."""
    config = read_json(folder / "config.json")
    generation = folder / "generation_config.json"
    if generation.is_file():
        settings = read_json(generation)
        eos = settings.get("eos_token_id")
        if eos is not None:
            config["generation_eos_token_id"] = eos
        if settings.get("do_sample", True):
            keys = ("temperature", "top_p", "top_k")
            config["generation_sampling"] = {k: settings[k] for k in keys if isinstance(settings.get(k), int | float)}
    return config


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise HogwildError(f"{path} does not exist ({SUPPORTED})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HogwildError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise HogwildError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
