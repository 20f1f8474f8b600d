"""Finding and reading model weights.

hogwild reads Hugging Face model folders (config.json, tokenizer files, `*.safetensors` weights). A `.gguf` file,
including the named models of `registry` (the default SmolLM2-135M-Instruct among them), is converted once into such
a folder under `cache_dir()/models/<sha256 prefix>-v<converter version>/` (see `gguf.write_converted`), and that
folder is reused afterwards. Everything here turns a bad path or a damaged file into a one-line `HogwildError`.
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
from hogwild.model.gguf import write_converted

SHARD_INDEX = "model.safetensors.index.json"
COMPLETE_MARKER = ".hogwild-complete"
CONVERTER_VERSION = 2  # part of the cache folder name: bump it when the converted bytes change
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


def resolve_model_dir(model: str | None) -> Path:
    """A validated Hugging Face model folder for `model`: None (the default model), a name from `hogwild models`,
    a `.gguf` file, or a folder. Names win over paths; write `./name` for a folder that shares a model's name."""
    from hogwild.model import registry

    named = registry.find(registry.DEFAULT if model is None else model)
    if named is not None:
        return registry.prepare(named)
    path = Path(model).expanduser()
    if not path.exists():
        raise HogwildError(f"model path {path} does not exist ({SUPPORTED})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise HogwildError(f"model path {path} is a file but not a .gguf file ({SUPPORTED})")
        return convert_gguf(path, file_sha256(path))
    check_model_dir(path)
    return path


def check_model_dir(folder: Path) -> None:
    """Raise a `HogwildError` unless `folder` has a config.json and safetensors weights."""
    if not (folder / "config.json").is_file():
        raise HogwildError(f"model folder {folder} has no config.json ({SUPPORTED})")
    if not any(folder.glob("*.safetensors")):
        raise HogwildError(f"model folder {folder} has no *.safetensors weights ({SUPPORTED})")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(digest: str) -> Path:
    """Where the conversion of the GGUF file with this sha256 lives."""
    return cache_dir() / "models" / f"{digest[:16]}-v{CONVERTER_VERSION}"


def is_converted(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def convert_gguf(path: Path, digest: str) -> Path:
    """Convert a `.gguf` file to a safetensors folder once; later calls return the cached folder immediately.

    The folder is built under a temporary name next to its final place and renamed into place at the end, so an
    interrupted conversion never leaves a half-written cache behind.
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
        write_converted(path, tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{path.name} sha256 {digest}\n")
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)  # left by something other than this function, which only renames finished folders
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_converted(target):
                raise
            # another process finished the same conversion first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def weight_files(folder: Path) -> list[Path]:
    index = folder / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HogwildError(f"{index} is not a valid safetensors index ({e})") from e
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, in its stored dtype, keyed by its name in the checkpoint."""
    files = weight_files(folder)
    if not files:
        raise HogwildError(f"model folder {folder} has no *.safetensors weights ({SUPPORTED})")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise HogwildError(f"weight file {file} listed in {SHARD_INDEX} does not exist")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    state[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise HogwildError(f"weight file {file} is truncated or corrupt ({e}); re-download it") from e
    return state


def read_config(folder: Path) -> dict:
    """config.json as a dict, with generation_config.json's `eos_token_id` under `generation_eos_token_id`."""
    config = read_json(folder / "config.json")
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = read_json(generation).get("eos_token_id")
        if eos is not None:
            config["generation_eos_token_id"] = eos
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
