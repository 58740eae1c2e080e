"""The trained miniature world, shipped: its base models as small fp16 files, written out in the real formats.

`encoders/assets/world/` holds what `python -m training.world` trained (see its README.md, the
model card: command, seed, steps, time, metrics and each file's sha256), as one fp16 safetensors
file and one config per model. `write_world_models(out)` turns them into the folders every command
reads with the real `from_pretrained(path)` code, in fp32:

    python -m encoders.world --out outputs/demo/models     # sd/, image_encoder/, clip/, classifier/

- `sd/`: a `StableDiffusionPipeline` folder (UNet, KL VAE, the CLIP text tower, or `text_encoder` where the UNet
  stage trained its own copy of it, SD v1-4's PNDM schedule with the UNet's prediction type, the real CLIP
  tokenizer);
- `image_encoder/`: the same CLIP's vision tower as a `CLIPVisionModel` (ELITE's image encoder);
- `clip/`: the whole `CLIPModel` (both towers and projections) with its processor;
- `classifier/`: the world's attribute classifier (`ResNetForImageClassification`, multi-label over
  background, colour, shape and pattern), used only to measure what generated images show.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .common.config import parse_keyed_args, program_name
from .common.files import atomic_directory, atomic_write_bytes, sha256_file

ASSETS = Path(__file__).resolve().parent / "assets" / "world"
PARTS = ("unet", "vae", "clip", "classifier")
# shipped only where the unet stage trained the text tower with it (`train_text_encoder=true`): the pipeline's own
OPTIONAL_PARTS = ("text_encoder",)


class WorldAssetsError(RuntimeError):
    """The shipped world files are missing or do not match their card."""


def card_hashes(folder: Path = ASSETS) -> dict[str, str]:
    """file name -> sha256 as the card (README.md) lists them in its `| file | sha256 |` table."""
    card = folder / "README.md"
    if not card.is_file():
        raise WorldAssetsError(f"{card} is missing: the world's models have not been shipped in this checkout")
    return dict(re.findall(r"^\|\s*`([\w.\-]+)`\s*\|\s*`([0-9a-f]{64})`\s*\|", card.read_text(), flags=re.M))


def check_assets(folder: Path = ASSETS) -> dict[str, str]:
    """Every file the card lists is there with its hash; returns the table. Raises `WorldAssetsError`."""
    hashes = card_hashes(folder)
    if not hashes:
        raise WorldAssetsError(f"{folder / 'README.md'} lists no file hashes")
    for name, expected in hashes.items():
        path = folder / name
        if not path.is_file():
            raise WorldAssetsError(f"{path} is missing (listed in the card)")
        if sha256_file(path) != expected:
            raise WorldAssetsError(
                f"{path} does not match the sha256 in the card: damaged, or changed without a new card"
            )
    return hashes


def _state(folder: Path, part: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((folder / f"{part}.json").read_text())
    state = {k: v.float() for k, v in load_file(str(folder / f"{part}.safetensors")).items()}
    return config, state


def load_part(part: str, folder: Path = ASSETS):
    """One shipped model, built from its config and loaded in fp32 (strictly: every weight must be there)."""
    config, state = _state(folder, part)
    if part == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_config(config)
    elif part == "vae":
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_config(config)
    elif part == "clip":
        from transformers import CLIPConfig, CLIPModel

        model = CLIPModel(CLIPConfig.from_dict(config))
    elif part == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    elif part == "classifier":
        from transformers import ResNetConfig, ResNetForImageClassification

        model = ResNetForImageClassification(ResNetConfig.from_dict(config))
    else:
        raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS + OPTIONAL_PARTS)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def shipped_scheduler(folder: Path = ASSETS):
    """The pipeline's PNDM scheduler as shipped (`scheduler.json`: SD v1-4's schedule and the prediction type the
    UNet was trained for); SD v1-4's own, epsilon, for a set shipped before the file existed."""
    from diffusers import PNDMScheduler

    from .tiny import SCHEDULER_KWARGS

    path = folder / "scheduler.json"
    if not path.is_file():
        return PNDMScheduler(**SCHEDULER_KWARGS)
    return PNDMScheduler.from_config(json.loads(path.read_text()))


def write_world_models(out: str | Path, folder: Path = ASSETS, force: bool = False) -> dict[str, Path]:
    """Write sd/, image_encoder/, clip/ and classifier/ under `out` from the shipped files (checked first)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTextModel, CLIPVisionModel, ViTImageProcessor

    from .clip_features import CLIP_MEAN, CLIP_STD
    from .tokenizer import build_clip_tokenizer, save_clip_tokenizer

    check_assets(folder)
    out = Path(out)
    written = {name: out / name for name in ("sd", "image_encoder", "clip", "classifier")}
    # folders written from another shipped set (an older checkout's) are written again, not reused
    stamp, card = out / "world_card.sha256", sha256_file(folder / "README.md")
    current = stamp.is_file() and stamp.read_text().strip() == card
    if not force and current and all(p.exists() for p in written.values()):
        return written
    clip = load_part("clip", folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    with atomic_directory(written["clip"]) as tmp:
        clip.save_pretrained(tmp, safe_serialization=True)
        CLIPProcessor(image_processor=processor, tokenizer=build_clip_tokenizer()).save_pretrained(tmp)
    # the two towers as the real models read them out of a CLIP folder (SD's text encoder, ELITE's image encoder);
    # the pipeline's text encoder is its own where the unet stage trained it
    if (folder / "text_encoder.safetensors").is_file():
        text_encoder = load_part("text_encoder", folder)
    else:
        text_encoder = CLIPTextModel.from_pretrained(written["clip"])
    pipe = StableDiffusionPipeline(
        unet=load_part("unet", folder),
        vae=load_part("vae", folder),
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        scheduler=shipped_scheduler(folder),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_directory(written["sd"]) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_clip_tokenizer(Path(tmp) / "tokenizer")
    vision = CLIPVisionModel.from_pretrained(written["clip"])
    with atomic_directory(written["image_encoder"]) as tmp:
        vision.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    with atomic_directory(written["classifier"]) as tmp:
        load_part("classifier", folder).save_pretrained(tmp, safe_serialization=True)
        ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
            tmp
        )
    atomic_write_bytes(stamp, (card + "\n").encode())
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m encoders.world"),
        description="Write the shipped miniature-world models as real model folders (fp32).",
    )
    parser.add_argument(
        "--out", default="outputs/demo/models", help="folder that receives sd/, image_encoder/, clip/, classifier/"
    )
    parser.add_argument("--assets", default=str(ASSETS), help="the shipped files (default: the package's own)")
    parser.add_argument("--force", action="store_true", help="rewrite folders that exist")
    args = parse_keyed_args(parser, argv)
    try:
        written = write_world_models(args.out, Path(args.assets), force=args.force)
    except WorldAssetsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"world {name:<14} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
