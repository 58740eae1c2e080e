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


@pytest.fixture(scope="session")
def tiny_eval_models(tmp_path_factory) -> Path:
    """Folder with the metric models `eval_clip/`, `dino/` (and `detector/` once registered), from `encoders.tiny`."""
    from encoders.tiny import TINY_MODELS, build_tiny_models

    root = tmp_path_factory.mktemp("tiny_eval_models")
    build_tiny_models(root, [n for n in ("eval_clip", "dino", "detector") if n in TINY_MODELS])
    return root


@pytest.fixture(scope="session")
def tiny_detector_path(tmp_path_factory) -> Path:
    """A tiny `DetrForObjectDetection` (COCO's 80 labels) + its image processor, from `encoders.tiny`."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_detector")
    build_tiny_models(root, ["detector"])
    return root / "detector"
