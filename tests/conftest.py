"""Shared fixtures: the tiny offline models, built once per test worker, and the bundled sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one torch thread each (and in the processes tests launch)
    # is faster than oversubscribing the cores with the tiny models' small matrices.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

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
def tiny_sd2_path(tmp_path_factory) -> Path:
    """An SD 2.x-style tiny pipeline (`encoders.tiny --kind sd2`): 48-wide text encoder, linear
    projections, per-level heads, v-prediction."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_sd2")
    build_tiny_models(root, ["sd"], kind="sd2")
    return root / "sd"


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    """An SDXL-style tiny pipeline (`encoders.tiny --kind sdxl`): two text encoders, pooled and size conditioning."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_models(root, ["sd"], kind="sdxl")
    return root / "sd"


@pytest.fixture(scope="session")
def tiny_image_encoder_path(tiny_models) -> Path:
    return tiny_models / "image_encoder"


@pytest.fixture(scope="session")
def tiny_ip_image_encoder_path(tmp_path_factory) -> Path:
    """IP-Adapter's image encoder layout: a tiny `CLIPVisionModelWithProjection` (32 px, projection 16)."""
    from encoders.tiny import save_tiny_ip_image_encoder

    return save_tiny_ip_image_encoder(tmp_path_factory.mktemp("tiny_ip_image_encoder"))


@pytest.fixture(scope="session")
def tiny_eval_models(tmp_path_factory) -> Path:
    """Folder with the metric models `eval_clip/`, `dino/` and `detector/`, from `encoders.tiny`."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_eval_models")
    build_tiny_models(root, ["eval_clip", "dino", "detector"])
    return root


@pytest.fixture(scope="session")
def tiny_detector_path(tmp_path_factory) -> Path:
    """A tiny `DetrForObjectDetection` (COCO's 80 labels) + its image processor, from `encoders.tiny`."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_detector")
    build_tiny_models(root, ["detector"])
    return root / "detector"


@pytest.fixture(scope="session")
def tiny_clipseg_path(tmp_path_factory) -> Path:
    """A tiny `CLIPSegForImageSegmentation` + processor (automatic masks), from `encoders.tiny`."""
    from encoders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny_clipseg")
    build_tiny_models(root, ["clipseg"])
    return root / "clipseg"


@pytest.fixture(scope="session")
def tiny_encoders_path(tmp_path_factory, tiny_sd_path, tiny_image_encoder_path) -> Path:
    """An ELITE encoders folder (`global_mapping/`, `local_mapping/`) for the tiny bundle: random init
    (fixed seed), saved with `save_pretrained`, recording the tiny base model and image encoder. For
    inference tests that need encoders without running the training stack."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from encoders.global_mapping import GlobalMapping
    from encoders.local_mapping import LocalMapping

    root = tmp_path_factory.mktemp("tiny_encoders")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    width = CLIPVisionConfig.from_pretrained(tiny_image_encoder_path).hidden_size
    recorded = dict(
        hidden_dim=32,
        pretrained_model_name_or_path=str(tiny_sd_path),
        image_encoder_name_or_path=str(tiny_image_encoder_path),
    )
    for seed, (cls, sub) in enumerate(((GlobalMapping, "global_mapping"), (LocalMapping, "local_mapping"))):
        torch.manual_seed(seed)
        cls.from_unet(unet, input_dim=width, **recorded).save_pretrained(root / sub)
    return root


@pytest.fixture(scope="session")
def encoders_with_location_mlp(tmp_path_factory, tiny_sd_path, tiny_encoders_path) -> Path:
    """The tiny encoders plus a location MLP that knows a few nouns (random weights, a non-zero box
    head, so boxes differ by word): for guidance from predicted boxes."""
    import shutil

    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from encoders.anchors import embed_words
    from encoders.location_mlp import LocationMLP

    root = tmp_path_factory.mktemp("with_location_mlp") / "encoders"
    shutil.copytree(tiny_encoders_path, root)
    vocabulary = ["dog", "cat", "person", "teddy bear"]
    torch.manual_seed(0)
    mlp = LocationMLP(embedding_dim=32, hidden_dim=16, vocabulary=vocabulary)
    with torch.no_grad():
        mlp.box_out.weight.normal_(0, 1.0)
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
        mlp.set_vocabulary_embeddings(embed_words(vocabulary, tokenizer, text_encoder))
    mlp.save_pretrained(root / "location_mlp")
    return root


@pytest.fixture(scope="session")
def crop_shards(tmp_path_factory) -> Path:
    """Crop shards of the bundled COCO and OpenImages samples at 64 px (`sample_shards.build_sample_crop_shards`)."""
    from sample_shards import build_sample_crop_shards

    return build_sample_crop_shards(tmp_path_factory.mktemp("crop_shards"))


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's process-wide singletons after a test that built an `Accelerator`."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
