"""Shared fixtures: the real default model (SmolLM2-135M-Instruct), converted to safetensors once per machine."""

from pathlib import Path

import pytest

from hogwild.model.loading import resolve_model_dir


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model_dir(None)
