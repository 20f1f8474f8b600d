"""Shared fixtures: the real default model (SmolLM2-135M-Instruct), converted to safetensors once per machine."""

from pathlib import Path

import pytest
import torch

from hogwild import native
from hogwild.model.registry import resolve_model_dir
from hogwild.model.tokenizer import Tokenizer

torch.set_num_threads(1)  # stable timings and no oversubscription on small machines


@pytest.fixture(scope="session", autouse=True)
def fused_kernels_built() -> None:
    """Build (or find) the fused CPU kernels and the GGUF block kernels once, in the real cache, before any test
    points HOGWILD_CACHE at a temporary folder (the first build takes about 30 s each)."""
    native.load()
    native.load_gguf()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    """The default model's tokenizer (the tests' text goes through it)."""
    return Tokenizer.from_folder(default_model_dir)
