"""Shared fixtures: the real default model (SmolLM2-135M-Instruct), converted to safetensors once per machine."""

from pathlib import Path

import pytest
import torch

from hogwild.model.loading import resolve_model_dir

torch.set_num_threads(1)  # stable timings and no oversubscription on small machines


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model_dir(None)
