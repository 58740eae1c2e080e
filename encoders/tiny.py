"""The embedded tiny default: offline, deterministic stand-ins for SD v1-4 and CLIP ViT-L/14.

They keep the structure that our code depends on (a UNet with cross-attention, a KL VAE, a CLIP
text encoder with the real CLIP tokenizer, a 24-layer CLIP vision tower with 16x16 patches) at a
size that trains in seconds on a CPU. Each is written with `save_pretrained` in the Hub layout and
must be read back with `from_pretrained(path)`, so tests exercise the same loading code a Hub id
takes. The shapes are fixed project-wide so benchmarks compare like with like.

    python -m encoders.tiny --out outputs/demo/models      # writes sd/ and image_encoder/
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from .common.config import parse_keyed_args, program_name
from .common.files import atomic_directory

TINY_SEED = 0
TINY_RESOLUTION = 64  # demo image size: 32x32 latents with the tiny VAE's factor of 2

UNET_KWARGS = dict(
    sample_size=32,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_KWARGS = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
    sample_size=TINY_RESOLUTION,
)
TEXT_KWARGS = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
VISION_KWARGS = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=24,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
)
# Stable Diffusion v1-4's scheduler settings, so sampling code sees the real noise schedule.
SCHEDULER_KWARGS = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def _seeded(seed: int, *makers):
    """Each model built right after `torch.manual_seed(seed)`, so every part is seeded alike."""
    models = []
    for make in makers:
        torch.manual_seed(seed)
        models.append(make())
    return models


def _build_pipeline(unet_kwargs: dict, text_kwargs: dict, scheduler, seed: int):
    """A randomly initialised `StableDiffusionPipeline` (each part seeded alike) with the shipped tokenizer."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_clip_tokenizer

    unet, vae, text_encoder = _seeded(
        seed,
        lambda: UNet2DConditionModel(**unet_kwargs),
        lambda: AutoencoderKL(**VAE_KWARGS),
        lambda: CLIPTextModel(CLIPTextConfig(**text_kwargs)),
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd_pipeline(seed: int = TINY_SEED):
    """A randomly initialised (fixed seed) `StableDiffusionPipeline` with the tiny shapes."""
    from diffusers import PNDMScheduler

    return _build_pipeline(UNET_KWARGS, TEXT_KWARGS, PNDMScheduler(**SCHEDULER_KWARGS), seed)


# SD 2.x's structure (stabilityai/stable-diffusion-2-1-base): an OpenCLIP-shaped text encoder wider
# than the image encoder (1024 vs ViT-L/14's 1024 there; here 48 vs 32, so code that confuses the two
# widths fails), linear projections in the transformer blocks, per-level head counts, v-prediction.
SD2_TEXT_KWARGS = dict(
    TEXT_KWARGS, hidden_size=48, intermediate_size=64, num_attention_heads=4, hidden_act="gelu", projection_dim=48
)
SD2_UNET_KWARGS = dict(UNET_KWARGS, cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True)
SD2_SCHEDULER_KWARGS = dict(SCHEDULER_KWARGS, prediction_type="v_prediction")


def build_tiny_sd2_pipeline(seed: int = TINY_SEED):
    """A randomly initialised SD 2.x-style `StableDiffusionPipeline` (v-prediction, 48-wide text)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        **{k: v for k, v in SD2_SCHEDULER_KWARGS.items() if k != "skip_prk_steps"}, clip_sample=False
    )
    return _build_pipeline(SD2_UNET_KWARGS, SD2_TEXT_KWARGS, scheduler, seed)


# SDXL's structure (stabilityai/stable-diffusion-xl-base-1.0): two text encoders (CLIP-L's and OpenCLIP-G's
# shapes, here 32 and 48 wide) whose penultimate states are concatenated (cross_attention_dim = 80), the
# second one's pooled, projected embedding and the six size/crop numbers as added conditioning
# ("text_time"), three UNet levels with the first plain and two transformer layers on the last.
SDXL_TEXT_2_KWARGS = dict(SD2_TEXT_KWARGS, projection_dim=32)
SDXL_UNET_KWARGS = dict(
    sample_size=32,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    cross_attention_dim=TEXT_KWARGS["hidden_size"] + SDXL_TEXT_2_KWARGS["hidden_size"],
    norm_num_groups=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + SDXL_TEXT_2_KWARGS["projection_dim"],
)


def build_tiny_sdxl_pipeline(seed: int = TINY_SEED):
    """A randomly initialised `StableDiffusionXLPipeline` with SDXL's structure at the tiny size."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import build_clip_tokenizer

    unet, vae, text_encoder, text_encoder_2 = _seeded(
        seed,
        lambda: UNet2DConditionModel(**SDXL_UNET_KWARGS),
        lambda: AutoencoderKL(**VAE_KWARGS),
        lambda: CLIPTextModel(CLIPTextConfig(**TEXT_KWARGS)),
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2_KWARGS)),
    )
    scheduler = EulerDiscreteScheduler(
        **{k: v for k, v in SCHEDULER_KWARGS.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_image_encoder(seed: int = TINY_SEED):
    """A randomly initialised 24-layer `CLIPVisionModel` and its `CLIPImageProcessor` (224 px)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION_KWARGS))
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return model, processor


def save_tiny_sd_pipeline(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny pipeline as a diffusers folder (model_index.json + component folders)."""
    from .tokenizer import save_clip_tokenizer

    out_dir = Path(out_dir)
    pipe = build_tiny_sd_pipeline(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_clip_tokenizer(out_dir / "tokenizer")  # also writes vocab.json/merges.txt like SD's folder
    return out_dir


def save_tiny_sd2_pipeline(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny SD 2.x-style pipeline as a diffusers folder."""
    from .tokenizer import save_clip_tokenizer

    out_dir = Path(out_dir)
    build_tiny_sd2_pipeline(seed).save_pretrained(out_dir, safe_serialization=True)
    save_clip_tokenizer(out_dir / "tokenizer")
    return out_dir


def save_tiny_sdxl_pipeline(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny SDXL-style pipeline as a diffusers folder (both tokenizers in the Hub layout)."""
    from .tokenizer import save_clip_tokenizer

    out_dir = Path(out_dir)
    build_tiny_sdxl_pipeline(seed).save_pretrained(out_dir, safe_serialization=True)
    save_clip_tokenizer(out_dir / "tokenizer")
    save_clip_tokenizer(out_dir / "tokenizer_2")
    return out_dir


def save_tiny_image_encoder(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny vision tower as a transformers folder (config, safetensors, preprocessor)."""
    out_dir = Path(out_dir)
    model, processor = build_tiny_image_encoder(seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


# IP-Adapter's image encoder: a vision tower WITH its projection (IP-Adapter reads `image_embeds`), 32 px.
IP_IMAGE_ENCODER_KWARGS = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def save_tiny_ip_image_encoder(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny `CLIPVisionModelWithProjection` and its processor (the layout of IP-Adapter's image encoder)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**IP_IMAGE_ENCODER_KWARGS)).save_pretrained(
        out_dir, safe_serialization=True
    )
    size = IP_IMAGE_ENCODER_KWARGS["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out_dir)
    return out_dir


# Evaluation models (finetune engineer): a CLIP with projections for CLIP-T/CLIP-I (ViT-B/32 layout,
# like the `openai/clip-vit-base-patch32` that DreamBooth's metrics use) and a DINO-style ViT-S/16.
EVAL_CLIP_VISION_KWARGS = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32
)
EVAL_CLIP_TEXT_KWARGS = dict(TEXT_KWARGS)
DINO_KWARGS = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=16
)


def save_tiny_eval_clip(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny `CLIPModel` (both towers + projections) and its `CLIPProcessor` with the shipped tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .tokenizer import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=EVAL_CLIP_TEXT_KWARGS, vision_config=EVAL_CLIP_VISION_KWARGS, projection_dim=16)
    CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(out_dir)
    return out_dir


def save_tiny_dino(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny `ViTModel` (no pooler, CLS embedding like DINO's) and a 224 px `ViTImageProcessor`."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    ViTModel(ViTConfig(**DINO_KWARGS), add_pooling_layer=False).save_pretrained(out_dir, safe_serialization=True)
    ViTImageProcessor(
        size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(out_dir)
    return out_dir


# Object detector (comp engineer): a DETR with a tiny ResNet backbone from transformers (no timm), with
# COCO's 80 names in id2label, standing in for `facebook/detr-resnet-50` in `data_prep pairs generate`.
DETR_KWARGS = dict(
    num_queries=16,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
)
DETR_BACKBONE_KWARGS = dict(
    embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"]
)


def save_tiny_detector(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny `DetrForObjectDetection` (COCO labels) and its DETR image processor (64-128 px)."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    from .anchors import coco_class_names

    out_dir = Path(out_dir)
    names = coco_class_names()
    config = DetrConfig(
        backbone_config=ResNetConfig(**DETR_BACKBONE_KWARGS),
        use_timm_backbone=False,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        **DETR_KWARGS,
    )
    torch.manual_seed(seed)
    DetrForObjectDetection(config).save_pretrained(out_dir, safe_serialization=True)
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(out_dir)
    return out_dir


# Automatic masks: a CLIPSeg (text-prompted segmentation, `CIDAS/clipseg-rd64-refined`'s layout) at 64 px.
CLIPSEG_VISION_KWARGS = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=16
)
CLIPSEG_KWARGS = dict(
    projection_dim=32,
    extract_layers=[1, 2, 3],
    reduce_dim=16,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)


def save_tiny_clipseg(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a tiny `CLIPSegForImageSegmentation` and its `CLIPSegProcessor` (shipped tokenizer, 64 px)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from .tokenizer import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPSegConfig(text_config=dict(TEXT_KWARGS), vision_config=CLIPSEG_VISION_KWARGS, **CLIPSEG_KWARGS)
    CLIPSegForImageSegmentation(config).save_pretrained(out_dir, safe_serialization=True)
    image_processor = ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(out_dir)
    return out_dir


# name -> writer. Other parts of the project register their tiny models here (detector, eval CLIP...).
TINY_MODELS: dict[str, Callable[[Path], Path]] = {
    "sd": save_tiny_sd_pipeline,
    "image_encoder": save_tiny_image_encoder,
    "ip_image_encoder": save_tiny_ip_image_encoder,
    "eval_clip": save_tiny_eval_clip,
    "dino": save_tiny_dino,
    "detector": save_tiny_detector,
    "clipseg": save_tiny_clipseg,
}


def write_atomically(writer: Callable[[Path], Path], target: str | Path, force: bool = False) -> bool:
    """Run `writer` into a temporary sibling folder and rename it to `target` when complete.

    Returns False (and writes nothing) when `target` already exists and `force` is off, so
    repeated `make demo` runs are quick and an interrupted build never looks finished.
    """
    target = Path(target)
    if target.exists() and not force:
        return False
    with atomic_directory(target) as tmp:
        writer(tmp)
    return True


# The base pipeline each --kind writes as `sd/` (the other models are the same for every kind).
BASE_KINDS: dict[str, Callable[[Path], Path]] = {
    "sd1": save_tiny_sd_pipeline,
    "sd2": save_tiny_sd2_pipeline,
    "sdxl": save_tiny_sdxl_pipeline,
}


def build_tiny_models(
    out_root: str | Path, names: list[str] | None = None, force: bool = False, kind: str = "sd1"
) -> dict[str, Path]:
    """Write the named tiny models (default: all registered) under `out_root/<name>/`; `kind` picks the
    base pipeline's structure written as `sd/` (sd1: SD v1-4's, sd2: SD 2.x's)."""
    if kind not in BASE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(BASE_KINDS)}")
    out_root = Path(out_root)
    written = {}
    for name in names or list(TINY_MODELS):
        if name not in TINY_MODELS:
            raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
        target = out_root / name
        writer = BASE_KINDS[kind] if name == "sd" else TINY_MODELS[name]
        made = write_atomically(writer, target, force=force)
        print(f"{'built ' if made else 'kept  '} {name:<14} {target}")
        written[name] = target
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m encoders.tiny"),
        description="Build the offline tiny models (random init, fixed seed) in their Hub on-disk formats.",
    )
    parser.add_argument("--out", default="outputs/demo/models", help="folder that receives one subfolder per model")
    parser.add_argument(
        "--only", action="append", choices=sorted(TINY_MODELS), help="build only this model (repeatable); default all"
    )
    parser.add_argument(
        "--kind",
        choices=sorted(BASE_KINDS),
        default="sd1",
        help="structure of the base pipeline written as sd/: sd1 (SD v1-4), sd2 (SD 2.x: "
        "48-wide text encoder, linear projections, v-prediction) or sdxl (two text encoders, pooled "
        "and size conditioning; loads with StableDiffusionXLPipeline); default sd1",
    )
    parser.add_argument("--force", action="store_true", help="rebuild models whose folder already exists")
    args = parse_keyed_args(parser, argv)
    build_tiny_models(args.out, args.only, force=args.force, kind=args.kind)


if __name__ == "__main__":
    main()
