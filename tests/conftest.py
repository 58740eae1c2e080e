"""Shared fixtures: the tiny offline models, built once per test worker, and the bundled sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Folder with `sd/` (diffusers pipeline) and `image_encoder/` (CLIP vision), from `encoders.tiny`."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    build_tiny_models(root, ["sd", "image_encoder"])
    return root


@pytest.fixture(scope="session")
def tiny_sd_path(tiny_models) -> Path:
    return tiny_models / "sd"


@pytest.fixture(scope="session")
def tiny_image_encoder_path(tiny_models) -> Path:
    return tiny_models / "image_encoder"
