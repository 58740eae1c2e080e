"""The crop-shard loader for both ELITE stages: WebDataset shards from `data_prep` -> dict batches.

One readable stage per line (`training.shard_reader` explains the order and why it is not WebDataset's
streaming pipeline: a resumed run restarts at its position without reading what came before):

    shard list (path / glob / brace pattern; a missing file or a set of unreadable shards stops at start-up)
      -> one reader per rank and DataLoader worker: rounds of `shuffle_shards` shards, resampled (endless)
         or one pass per epoch split by node and worker, their samples in a seeded permutation
      -> read the sample's members by their offsets -> decode + augment (seeded by the sample's position;
         a bad sample is logged, counted and skipped; `max_consecutive_failures` in a row is an error)
      -> batched per reader; the loader remembers each reader's position (`state_dict`)

Each sample becomes (R = `resolution`, f = the VAE's downsampling factor, passed in, never assumed):

* `pixel_values` [3, R, R] in [-1, 1]: the diffusion target, the crop; `scale_augment=elite` (ELITE
  stage 2) shrinks it onto a grey canvas or zooms into it, `shrink` shrinks it by `scale_range`;
* `valid_mask` [1, R/f, R/f]: 1 where the target holds real pixels (not the scale-augmentation
  canvas, not the letterbox fill of crops cut at an image edge); weight the loss with it;
* `object_mask_latent` [1, R/f, R/f]: the object's mask on the target (any pixel set -> 1);
* `clip_pixel_values` [3, C, C]: the image view (w0's input), CLIP-normalised, with the `clip_*`
  augmentation (ELITE stage 1's: flip, rotation, box blur, random affine); C = `clip_size`;
* `clip_object_pixel_values` [3, C, C]: the object view, the crop times its mask (before resizing by
  default: `object_view`) with the `object_*` warps (ELITE stage 2's), black outside the object;
* `object_mask_clip` [1, C, C]: the mask under the object view's warps;
* `caption`: a random template holding the placeholder ("a photo of a S*"), started by the scale
  augmentation's prefix (`caption_prefix_rule`);
  `input_ids` [L] when a tokenizer is given;
* `box_in_crop` [4] (0..1, on the target), `category`, `key`;
* with `cached_latents`: `latent_moments` [2C, R/f, R/f] float16, the VAE posterior of the target
  (`FrozenStableDiffusion.sample_latents` draws the latent from it).

All randomness comes from RNGs seeded by (`seed`, epoch, rank, worker, position), so batches are the
same on every run with the same seed and worker count, and a resumed run continues with exactly the
batches an uninterrupted one would have had.
Per sample (in the DataLoader workers) there is only PIL decoding, the random draws, a 2x box
filter for the CLIP source and the tiny latent masks; samples stay uint8 until a whole batch is
stacked. `CropSampleTransform.finalize_batch` then does the float work once per batch, in the
main process (4x less data between workers): uint8 -> [-1, 1], each CLIP view of every sample by
one `grid_sample` (all its warps and the resize as one affine map; the mask through the object
view's grids), the blur as one depthwise convolution with per-sample kernels, the normalisation,
and the tokens (each template's ids are computed once). The shard path thus costs little more than decoding one JPEG
and one PNG.
Do not pass the loader through `accelerator.prepare`: it splits shards by node itself (RANK /
WORLD_SIZE or torch.distributed), and accelerate would dispatch rank 0's batches instead.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.clip_features import CLIP_MEAN, CLIP_STD
from encoders.common.config import keyed_field
from encoders.common.shards import LATENT_MEMBER, MANIFEST_NAME, ShardSpecError

from .shard_reader import ReaderPlan, ShardSet, reader_positions
from .templates import OBJECT_TEMPLATES, TEMPLATES, fill_template

logger = logging.getLogger(__name__)

# 2 / 255 rounded down to float32, so the fused `x * alpha - 1` of 255 stays <= 1 (at most 1.2e-7 off).
_TO_UNIT = float(np.nextafter(np.float32(2.0 / 255.0), np.float32(0.0)))


SCALE_AUGMENTS = ("none", "shrink", "elite")
CAPTION_PREFIX_RULES = ("first_char", "first_word")
BLUR_KINDS = ("box", "gaussian")
BORDERS = ("reflect", "mean")
OBJECT_VIEWS = ("mask_then_resize", "resize_then_mask")
# The caption prefixes of ELITE's stage-2 scale augmentation ("a" when the target keeps its scale).
SHRINK_PREFIXES = ("a far away", "very small")
ZOOM_PREFIXES = ("zoomed in", "close up")


CROP_GEOMETRIES = ("stored", "box")
# the key=value settings that train on the shards' crops as stored, every box (the demo's and the benchmarks'
# small scenes, far under the official stages' 100 px boxes)
STORED_CROP_KEYS = (
    "data.crop_geometry=stored",
    "data.min_box_area=0",
    "data.max_box_area=1",
    "data.min_box_side=0",
    "data.max_box_aspect=0",
)
FILTER_PATIENCE = 5000  # crops left out in a row, none kept yet, before the loader says the filters drop them all


@dataclass
class CropDataConfig:
    """Loader settings; trainers nest it as `data` (`data.resolution=64`, `data.scale_augment=elite`).

    The defaults are the official ELITE data pipeline's where it has one (each ELITE stage's own
    defaults are set by its trainer: stage 2 turns on the scale augmentation and leaves the image
    view unaugmented); the other values are this repository's options.
    """

    resolution: int = keyed_field("side of the diffusion target in pixels (crops are resized to it)", 512)
    placeholder_token: str = keyed_field("the pseudo-word put into the caption templates", "S*")
    resampled: bool = keyed_field(
        "sample shards with replacement, endlessly (multi-node friendly); else one pass per epoch", True
    )
    shuffle_shards: int = keyed_field(
        "shards whose samples are shuffled together, per round of a reader (0: shard order, no sample shuffle)", 4
    )
    max_consecutive_failures: int = keyed_field(
        "stop with an error after this many unreadable samples in a row (broken shards never make training spin)", 64
    )
    max_bad_fraction: float = keyed_field(
        "stop with an error naming the shards when more than this fraction of the samples read is unreadable "
        "(checked once 100 samples, or a whole pass, have been read)",
        0.01,
    )
    scale_augment: str = keyed_field(
        "the target's scale augmentation: none; elite (official stage 2: with p 2/3 a side drawn from R/3..R, objects "
        "under 0.6 R shrunk onto a grey canvas with 'a far away' / 'very small' captions, else 1.2-1.4 R zoomed in "
        "with 'zoomed in' / 'close up'); shrink (scale_prob, scale_range, no caption change)",
        "none",
    )
    scale_prob: float = keyed_field("scale_augment=shrink: probability of shrinking the object onto a canvas", 0.0)
    scale_range: tuple[float, float] = keyed_field(
        "scale_augment=shrink: range of the shrink factor", factory=lambda: (0.5, 1.0)
    )
    caption_prefix_rule: str = keyed_field(
        "how the scale prefix ('a' without one) starts the caption: first_char (official: prefix + caption[1:], so "
        "'the photo of a S*' reads 'ahe photo of a S*'), first_word (the prefix replaces a leading a/an/the)",
        "first_char",
    )
    templates: list[str] = keyed_field(
        "caption templates with {} for the placeholder; empty: the 27 of ELITE and Textual Inversion; [imagenet]: the "
        "80 CLIP ImageNet ones",
        factory=list,
    )
    clip_size: int = keyed_field("side of the CLIP inputs (the image encoder's image_size)", 224)
    # the image view (clip_pixel_values): official stage 1 = albumentations 1.3 Resize, HorizontalFlip,
    # Rotate(limit=20), Blur(p=0.3), ElasticTransform(p=0.3)
    clip_flip_prob: float = keyed_field("image view: probability of a horizontal flip", 0.5)
    clip_rotation_prob: float = keyed_field("image view: probability of a rotation", 0.5)
    clip_rotation_degrees: float = keyed_field("image view: rotations are drawn from -this..this degrees", 20.0)
    clip_blur_prob: float = keyed_field("image view: probability of a blur", 0.3)
    clip_blur: str = keyed_field("image view: box (official: cv2 box filter of 3, 5 or 7 px) or gaussian", "box")
    clip_blur_box_sizes: tuple[int, int] = keyed_field(
        "image view: odd box sizes drawn from this range (at 224 px)", factory=lambda: (3, 7)
    )
    clip_blur_radius: tuple[float, float] = keyed_field(
        "image view: gaussian sigma range in pixels", factory=lambda: (0.1, 1.5)
    )
    clip_affine_prob: float = keyed_field(
        "image view: probability of ElasticTransform's random affine (albumentations 1.3 alpha_affine: three control "
        "points moved by up to clip_affine_shift px; its elastic field at alpha=1 moves pixels by well under 0.1 px "
        "and is left out)",
        0.3,
    )
    clip_affine_shift: float = keyed_field("image view: the control points' largest shift, in px at 224", 50.0)
    clip_border: str = keyed_field(
        "image view: outside the photo, reflect (official) or mean (CLIP's mean colour)", "reflect"
    )
    # the object view (clip_object_pixel_values, object_mask_clip): official stage 2's aug_cv2, the mask jointly
    object_view: str = keyed_field(
        "object view: mask_then_resize (official: x * m at the crop's size, then resized) or resize_then_mask",
        "mask_then_resize",
    )
    object_resize_crop_prob: float = keyed_field(
        "object view: probability of a resize to 224..object_resize_max px and a random 224 px crop", 0.5
    )
    object_resize_max: int = keyed_field("object view: the largest resize, in px at 224", 256)
    object_rotation_prob: float = keyed_field("object view: probability of a rotation", 0.5)
    object_rotation_degrees: int = keyed_field("object view: whole degrees drawn from -this..this", 30)
    object_translate_prob: float = keyed_field("object view: probability of a shift", 0.5)
    object_translate_px: int = keyed_field("object view: shifts drawn from -this..this px (at 224) on each axis", 60)
    cached_latents: bool = keyed_field(
        "read each crop's VAE posterior from KEY.latent.npy (shards from `python -m data_prep latents`) "
        "instead of encoding the target every step; needs scale_augment=none",
        False,
    )
    # which crops and what region of them: the official dataset's filters and geometry, from the stored metadata
    min_box_area: float = keyed_field(
        "keep objects whose box covers at least this fraction of the original image (official stage 1: 0.02)", 0.0
    )
    max_box_area: float = keyed_field(
        "keep objects whose box covers at most this fraction of the original image (official stage 1: 0.8)", 1.0
    )
    min_box_side: int = keyed_field(
        "keep objects whose box is at least this many pixels wide and high in the original image (official stage 2: "
        "100)",
        0,
    )
    max_box_aspect: float = keyed_field(
        "keep objects whose box's longer side is at most this many times its shorter (official stage 2: 2; 0: any)",
        0.0,
    )
    crop_geometry: str = keyed_field(
        "stored: the shard's square crop as it is; box: the object's tight box plus box_margin pixels (of the "
        "original image) on each side, squashed to the square (the official datasets), cut from the stored crop",
        "stored",
    )
    box_margin: tuple[int, int] = keyed_field(
        "crop_geometry=box: each side's margin drawn from low..high pixels (official: stage 1 10, stage 2 10..19)",
        factory=lambda: (10, 10),
    )

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"data.resolution must be >= 8, got {self.resolution}")
        choices = {
            "scale_augment": SCALE_AUGMENTS,
            "caption_prefix_rule": CAPTION_PREFIX_RULES,
            "clip_blur": BLUR_KINDS,
            "clip_border": BORDERS,
            "object_view": OBJECT_VIEWS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.scale_range must satisfy 0 < low <= high <= 1, got {self.scale_range}")
        probabilities = (
            "scale_prob",
            "clip_flip_prob",
            "clip_rotation_prob",
            "clip_blur_prob",
            "clip_affine_prob",
            "object_resize_crop_prob",
            "object_rotation_prob",
            "object_translate_prob",
        )
        for key in probabilities:
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.scale_prob > 0 and self.scale_augment != "shrink":
            raise ValueError(
                f"data.scale_prob={self.scale_prob} needs data.scale_augment=shrink (it is {self.scale_augment})"
            )
        if self.cached_latents and self.scale_augment != "none":
            raise ValueError(
                f"data.cached_latents=true needs data.scale_augment=none (got {self.scale_augment}): "
                "the cached latents are of the crop as it is, not of a scale-augmented target"
            )
        lo_box, hi_box = self.clip_blur_box_sizes
        if lo_box < 1 or hi_box < lo_box or not lo_box % 2 or not hi_box % 2:
            raise ValueError(f"data.clip_blur_box_sizes must be odd sizes low <= high, got {self.clip_blur_box_sizes}")
        if self.object_resize_max < 224:
            raise ValueError(f"data.object_resize_max must be >= 224 (px at 224), got {self.object_resize_max}")
        if not (len(self.templates) == 1 and self.templates[0] in TEMPLATES) and any(
            "{}" not in t for t in self.templates
        ):
            raise ValueError(
                "every entry of data.templates needs a {} slot for the placeholder (or name one set: "
                f"{', '.join(TEMPLATES)})"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.min_box_area <= self.max_box_area <= 1.0:
            raise ValueError(
                f"data.min_box_area and data.max_box_area must satisfy 0 <= min <= max <= 1, got "
                f"{self.min_box_area} and {self.max_box_area}"
            )
        if self.min_box_side < 0 or (self.max_box_aspect and self.max_box_aspect < 1.0):
            raise ValueError("data.min_box_side must be >= 0 and data.max_box_aspect 0 (any) or >= 1")
        if self.crop_geometry not in CROP_GEOMETRIES:
            raise ValueError(
                f"data.crop_geometry must be one of {', '.join(CROP_GEOMETRIES)}; got {self.crop_geometry!r}"
            )
        if not 0 <= self.box_margin[0] <= self.box_margin[1]:
            raise ValueError(f"data.box_margin must be 0 <= low <= high pixels, got {self.box_margin}")
        if self.cached_latents and self.crop_geometry != "stored":
            raise ValueError(
                "data.cached_latents=true needs data.crop_geometry=stored: the cached latents are of the stored crop"
            )

    @property
    def filters_crops(self) -> bool:
        return bool(self.min_box_area or self.max_box_area < 1.0 or self.min_box_side or self.max_box_aspect)
        if self.shuffle_shards < 0 or self.max_consecutive_failures < 1:
            raise ValueError("data.shuffle_shards must be >= 0 and data.max_consecutive_failures >= 1")


def crop_filter_reason(meta: dict, cfg: CropDataConfig) -> str | None:
    """Why the official dataset would leave this object out (box area, side, aspect), or None to keep it; from the
    sample's `bbox_xyxy` and `image_size` (original pixels)."""
    x0, y0, x1, y1 = (float(v) for v in meta["bbox_xyxy"])
    width, height = (float(v) for v in meta["image_size"])
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    area = w * h / max(width * height, 1.0)
    if area < cfg.min_box_area or area > cfg.max_box_area:
        return f"box area {area:.3f} of the image outside {cfg.min_box_area}..{cfg.max_box_area}"
    if min(w, h) < cfg.min_box_side:
        return f"box {w:.0f} x {h:.0f} px under {cfg.min_box_side} px"
    if cfg.max_box_aspect and max(w, h) > cfg.max_box_aspect * max(min(w, h), 1e-6):
        return f"box aspect {max(w, h) / max(min(w, h), 1e-6):.2f} over {cfg.max_box_aspect}"
    return None


def box_view(
    image: Image.Image, mask: Image.Image, meta: dict, margin: tuple[int, int], rng: random.Random
) -> tuple[Image.Image, Image.Image, dict]:
    """The official datasets' crop: the object's tight box plus a margin (drawn per side from `margin`, original
    pixels), clipped to the image, squashed to the stored crop's square size. Cut from the stored crop (mapped
    through its `crop_xyxy`), and clipped to it where the stored crop holds less than the margin."""
    x0, y0, x1, y1 = (float(v) for v in meta["bbox_xyxy"])
    width, height = (float(v) for v in meta["image_size"])
    cx0, cy0, cx1, cy1 = (float(v) for v in meta["crop_xyxy"])
    m = [rng.randint(margin[0], margin[1]) for _ in range(4)]
    region = (max(x0 - m[0], 0.0), max(y0 - m[1], 0.0), min(x1 + m[2], width), min(y1 + m[3], height))
    sx, sy = image.width / max(cx1 - cx0, 1e-6), image.height / max(cy1 - cy0, 1e-6)
    vx0, vy0, vx1, vy1 = meta.get("valid_in_crop", (0.0, 0.0, 1.0, 1.0))
    px0 = min(max((region[0] - cx0) * sx, vx0 * image.width), image.width - 1)
    py0 = min(max((region[1] - cy0) * sy, vy0 * image.height), image.height - 1)
    px1 = max(min((region[2] - cx0) * sx, vx1 * image.width), px0 + 1)
    py1 = max(min((region[3] - cy0) * sy, vy1 * image.height), py0 + 1)
    box = (int(round(px0)), int(round(py0)), int(round(px1)), int(round(py1)))
    size = image.size
    image = image.crop(box).resize(size, Image.BICUBIC)
    mask = mask.crop(box).resize(size, Image.NEAREST)
    # the object box inside the new crop, in 0..1 (the stored crop's pixels back to the original's)
    ox0, oy0 = cx0 + box[0] / sx, cy0 + box[1] / sy
    ow, oh = (box[2] - box[0]) / sx, (box[3] - box[1]) / sy
    inside = ((x0 - ox0) / ow, (y0 - oy0) / oh, (x1 - ox0) / ow, (y1 - oy0) / oh)
    meta = {
        **meta,
        "box_in_crop": [min(max(v, 0.0), 1.0) for v in inside],
        "valid_in_crop": [0.0, 0.0, 1.0, 1.0],
        "crop_xyxy": [ox0, oy0, ox0 + ow, oy0 + oh],
    }
    return image, mask, meta


def caption_with_prefix(caption: str, prefix: str, rule: str = "first_char") -> str:
    """ELITE's captions: the scale prefix ("a" when none) starts the filled template.

    "first_char" is the official `prefix + caption[1:]` (exact for templates that start with "a ");
    "first_word" replaces a leading article ("a", "an", "the") with the prefix, or puts it before.
    """
    if rule == "first_char":
        return prefix + caption[1:]
    first, _, rest = caption.partition(" ")
    return f"{prefix} {rest}" if first.lower() in ("a", "an", "the") and rest else f"{prefix} {caption}"


def _any_pixel_cells(mask: Image.Image, f: int) -> np.ndarray:
    """[h/f, w/f] float: 1 where an f x f cell of a 0/255 L mask holds any set pixel."""
    if f == 1:
        return (np.asarray(mask) > 127).astype(np.float32)
    if f <= 16:  # a box average of 0/255 values stays > 0 (after rounding) iff any pixel is set
        return (np.asarray(mask.reduce(f)) > 0).astype(np.float32)
    h, w = mask.height // f, mask.width // f
    return (np.asarray(mask) > 127).reshape(h, f, w, f).any(axis=(1, 3)).astype(np.float32)


def _planar(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] uint8 tensor, each band packed by PIL (no HWC -> CHW transpose)."""
    w, h = image.size
    out = torch.empty((3, h, w), dtype=torch.uint8)
    planes = out.numpy()
    for i, band in enumerate("RGB"):
        planes[i] = np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(h, w)
    return out


def affine_grids(theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grids [B, size, size, 2] of 2x3 maps `theta` [B, 2, 3] from output to source coordinates.

    The same as `F.affine_grid(theta, (B, 1, size, size), align_corners=False)`, built as one broadcast
    sum. Coordinates are normalised (-1..1 over the image, pixel centres at (2i + 1) / size - 1), so one
    grid samples a view from a square source of any size.
    """
    theta = theta.float()
    centres = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    along_x = centres[None, :, None] * theta[:, None, :, 0]  # [B, W, 2]: d(source) / d(output x)
    along_y = centres[None, :, None] * theta[:, None, :, 1]  # [B, H, 2]
    return along_y[:, :, None, :] + along_x[:, None, :, :] + theta[:, None, None, :, 2]


def _flip_rotation(flip: bool, angle_degrees: float) -> np.ndarray:
    """3x3 output -> source map (normalised coordinates) of a view mirrored when `flip`, rotated about the
    centre (y down, PIL's affine convention)."""
    a = math.radians(angle_degrees)
    m = -1.0 if flip else 1.0
    return np.array([[math.cos(a) * m, math.sin(a), 0.0], [-math.sin(a) * m, math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _pixels_to_normalised(size: int) -> np.ndarray:
    """3x3 map from pixel coordinates (pixel centres at i) to normalised ones ((2i + 1) / size - 1)."""
    return np.array([[2.0 / size, 0.0, 1.0 / size - 1.0], [0.0, 2.0 / size, 1.0 / size - 1.0], [0.0, 0.0, 1.0]])


def _sampling_theta(forward_pixels: np.ndarray, size: int) -> np.ndarray:
    """The 3x3 output -> source map in normalised coordinates of a warp given as its forward (source ->
    output) map in pixel coordinates of a size x size image (cv2's convention)."""
    to_norm = _pixels_to_normalised(size)
    return to_norm @ np.linalg.inv(forward_pixels) @ np.linalg.inv(to_norm)


def clip_view_grids(flip: torch.Tensor, angle_degrees: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grids [B, size, size, 2] of views mirrored where `flip`, rotated about the centre."""
    theta = torch.tensor(np.stack([_flip_rotation(bool(f), float(a))[:2] for f, a in zip(flip, angle_degrees)]))
    return affine_grids(theta, size)


def elastic_affine(rng: random.Random, size: int, shift: float) -> np.ndarray:
    """The random affine of albumentations 1.3's ElasticTransform as a forward 3x3 pixel map: the three
    points centre + (s, s), (s, -s), (-s, -s) (s = size // 3) each moved by U(-shift, shift) per axis."""
    c, half = size // 2, size // 3
    src = np.array([[c + half, c + half], [c + half, c - half], [c - half, c - half]], dtype=np.float64)
    dst = src + np.array([[rng.uniform(-shift, shift) for _ in range(2)] for _ in range(3)])
    solved = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst)  # [3, 2]: dst = [x, y, 1] @ solved
    return np.vstack([solved.T, [0.0, 0.0, 1.0]])


def object_view_warp(rng: random.Random, cfg: CropDataConfig, size: int) -> np.ndarray:
    """Forward 3x3 pixel map of official ELITE stage 2's object-view augmentation (its `aug_cv2`), at
    `size` px (amounts given at 224 px are scaled): each with p 0.5 a resize to 224..256 and a random
    224 crop, a rotation by whole degrees about the centre, a shift by whole pixels."""
    unit = size / 224.0
    warp = np.eye(3)
    if rng.random() < cfg.object_resize_crop_prob:
        new = rng.randint(size, max(size, int(round(cfg.object_resize_max * unit))))
        start_row, start_col = rng.randint(0, new - size), rng.randint(0, new - size)
        k = new / size  # cv2.resize's pixel-centre mapping, then the crop
        warp = (
            np.array([[k, 0.0, 0.5 * k - 0.5 - start_col], [0.0, k, 0.5 * k - 0.5 - start_row], [0.0, 0.0, 1.0]]) @ warp
        )
    if rng.random() < cfg.object_rotation_prob:
        angle = math.radians(rng.randint(-cfg.object_rotation_degrees, cfg.object_rotation_degrees))
        cx = cy = size / 2.0  # cv2.getRotationMatrix2D((112, 112), angle, 1) at 224 px
        cos, sin = math.cos(angle), math.sin(angle)
        warp = (
            np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy], [0.0, 0.0, 1.0]])
            @ warp
        )
    if rng.random() < cfg.object_translate_prob:
        px = int(round(cfg.object_translate_px * unit))
        tx, ty = rng.randint(-px, px), rng.randint(-px, px)
        warp = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]]) @ warp
    return warp


def box_blur(images: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """`images` [N, C, H, W] each blurred by a box filter of its own odd size (cv2.blur: edges reflect
    without repeating the border pixel); one separable depthwise convolution over all planes."""
    n, c, h, w = images.shape
    radius = max(sizes) // 2
    taps = torch.arange(-radius, radius + 1)
    kernel = (taps.abs()[None] <= torch.tensor(sizes)[:, None] // 2).to(images.dtype)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, k]
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    return x.reshape(n, c, h, w)


def gaussian_blur(images: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """`images` [N, C, H, W] each blurred with its own Gaussian sigma (in pixels), as PIL's GaussianBlur.

    A separable depthwise convolution over all N * C planes at once, channels-last (which CPU
    kernels run several times faster; the result keeps that memory layout); edges repeat the
    border pixel.
    """
    n, c, h, w = images.shape
    radius = max(1, math.ceil(3.0 * max(sigmas)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    sigma = torch.tensor(sigmas, dtype=torch.float64).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (taps[None] / sigma) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype).repeat_interleave(c, 0)  # [n*c, k]
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    x = x.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    return x.reshape(n, c, h, w)  # a view: [1, N*C, H, W] channels-last splits into [N, C] without a copy


class CropSampleTransform:
    """(crop, mask, metadata) -> the training tensors listed in the module docstring.

    Shared by the shard loader and the on-the-fly baseline of `benchmarks/bench_data.py`, so both
    produce the same tensors from the same crop. Two halves: `__call__` runs per sample (in the
    DataLoader workers) and keeps uint8 arrays, drawing every random choice from the sample's
    seeded RNG; `finalize_batch` runs once per stacked batch and does the float work for the whole
    batch at once in torch (conversion, CLIP views by `grid_sample`, blur, normalisation, tokens).
    """

    def __init__(
        self,
        config: CropDataConfig,
        vae_scale_factor: int,
        tokenizer: Any = None,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
    ):
        if vae_scale_factor < 1 or config.resolution % vae_scale_factor:
            raise ValueError(
                f"data.resolution {config.resolution} must be a multiple of the VAE factor {vae_scale_factor}"
            )
        self.config = config
        self.factor = int(vae_scale_factor)
        self.tokenizer = tokenizer
        mean = torch.tensor(clip_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(clip_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.black = -mean / std  # normalised black: the local stage's background
        self.clip_scale = 1.0 / (255.0 * std)  # uint8 -> (x / 255 - mean) / std = x * scale - shift
        self.clip_shift = mean / std
        self._minus_one = torch.tensor(-1.0)
        if len(config.templates) == 1 and config.templates[0] in TEMPLATES:
            self.templates = TEMPLATES[config.templates[0]]
        else:
            self.templates = tuple(config.templates) or OBJECT_TEMPLATES
        self._token_cache: dict[str, list[int]] = {}
        self._token_cache_vocab = -1

    def _placement(self, rng: random.Random) -> tuple[int, int, int, str, bool]:
        """The target's scale augmentation: (side, x offset, y offset, caption prefix, shrink cells) of the
        crop resized to side x side and placed at the offset of the R x R target (negative: zoomed in)."""
        cfg, f, size = self.config, self.factor, self.config.resolution
        if cfg.scale_augment == "shrink" and rng.random() < cfg.scale_prob:
            side = max(f, int(round(size * rng.uniform(*cfg.scale_range) / f)) * f)  # on the latent grid
            ox = rng.randrange(0, (size - side) // f + 1) * f
            oy = rng.randrange(0, (size - side) // f + 1) * f
            return side, ox, oy, "a", False
        if cfg.scale_augment == "elite":  # official stage 2's custom_aug, draw for draw
            if rng.randrange(3) < 2:
                side = rng.randrange(size // 3, size + 1)
            else:
                side = rng.randrange(int(1.2 * size), int(1.4 * size))
            side += side % 2
            if side < 0.6 * size:
                prefix = rng.choice(SHRINK_PREFIXES)
                row = rng.randrange(side // 2, size - side // 2 + 1)
                col = rng.randrange(side // 2, size - side // 2 + 1)
                return side, col - side // 2, row - side // 2, prefix, True
            if side > size:
                prefix = rng.choice(ZOOM_PREFIXES)
                row = rng.randrange(size // 2, side - size // 2 + 1)
                col = rng.randrange(size // 2, side - size // 2 + 1)
                return side, size // 2 - col, size // 2 - row, prefix, False
        return size, 0, 0, "a", False

    def __call__(self, image: Image.Image, mask: Image.Image, meta: dict, rng: random.Random) -> dict:
        cfg, f = self.config, self.factor
        size = cfg.resolution
        cells = size // f
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        if mask.size != (size, size):
            mask = mask.resize((size, size), Image.NEAREST)

        # The diffusion target: the crop, or (scale augmentation) resized to side x side and placed at
        # (ox, oy) on a grey canvas, or zoomed in (negative offsets crop it).
        side, ox, oy, prefix, shrink_cells = self._placement(rng)
        canvas = (max(ox, 0), max(oy, 0), min(ox + side, size), min(oy + side, size))
        if (side, ox, oy) == (size, 0, 0):
            pixels, placed_mask = _planar(image), mask  # [3, R, R] uint8; made float per batch
        else:
            placed = Image.new("RGB", (size, size), (128, 128, 128))  # the grey canvas (0 after finalize)
            placed.paste(image.resize((side, side), Image.BICUBIC), (ox, oy))
            pixels = _planar(placed)
            placed_mask = Image.new("L", (size, size), 0)
            placed_mask.paste(mask.resize((side, side), Image.NEAREST), (ox, oy))
        object_latent = _any_pixel_cells(placed_mask, f)[None]  # a latent cell holding any object pixel
        vx0, vy0, vx1, vy1 = meta.get("valid_in_crop", (0.0, 0.0, 1.0, 1.0))
        px0, py0 = max(ox + int(round(vx0 * side)), canvas[0]), max(oy + int(round(vy0 * side)), canvas[1])
        px1, py1 = min(ox + int(round(vx1 * side)), canvas[2]), min(oy + int(round(vy1 * side)), canvas[3])
        valid_latent = np.zeros((1, cells, cells), np.float32)  # a latent cell made only of real pixels
        valid_latent[0, -(-py0 // f) : max(py1 // f, 0), -(-px0 // f) : max(px1 // f, 0)] = 1.0
        if shrink_cells:  # the official loss mask leaves out one latent cell along each edge of the shrunk crop
            keep = np.zeros_like(valid_latent)
            keep[0, oy // f + 1 : (oy + side) // f - 1, ox // f + 1 : (ox + side) // f - 1] = 1.0
            valid_latent *= keep
        bx0, by0, bx1, by1 = meta["box_in_crop"]
        box = torch.tensor(
            [(bx0 * side + ox) / size, (by0 * side + oy) / size, (bx1 * side + ox) / size, (by1 * side + oy) / size]
        ).clamp(0.0, 1.0)

        # The CLIP views are sampled per batch (`finalize_batch`) from copies box-filtered to no less than
        # the view (their antialiasing); here only their random warps and blur are drawn.
        reduce = 1
        while size // (2 * reduce) >= cfg.clip_size:
            reduce *= 2
        small_image = image.reduce(reduce) if reduce > 1 else image
        small_mask = mask.resize(small_image.size, Image.NEAREST) if reduce > 1 else mask

        flip = rng.random() < cfg.clip_flip_prob
        angle = (
            rng.uniform(-cfg.clip_rotation_degrees, cfg.clip_rotation_degrees)
            if rng.random() < cfg.clip_rotation_prob
            else 0.0
        )
        blur = 0.0
        if rng.random() < cfg.clip_blur_prob:
            if cfg.clip_blur == "box":
                lo, hi = cfg.clip_blur_box_sizes
                blur = float(rng.choice(range(lo, hi + 1, 2)))
            else:
                blur = rng.uniform(*cfg.clip_blur_radius)
        clip_theta = _flip_rotation(flip, angle)
        affine = rng.random() < cfg.clip_affine_prob
        if affine:
            shift = cfg.clip_affine_shift * cfg.clip_size / 224.0
            clip_theta = clip_theta @ _sampling_theta(elastic_affine(rng, cfg.clip_size, shift), cfg.clip_size)
        object_theta = _sampling_theta(object_view_warp(rng, cfg, cfg.clip_size), cfg.clip_size)

        out = {
            "pixel_values": pixels,  # uint8 [3, R, R] until finalize_batch
            "canvas": torch.tensor(canvas),
            "valid_mask": torch.from_numpy(valid_latent),
            "object_mask_latent": torch.from_numpy(object_latent),
            "clip_source": _planar(small_image),  # uint8 [3, S, S], C <= S < 2C
            "clip_source_mask": torch.from_numpy(np.asarray(small_mask) > 127)[None],  # bool [1, S, S]
            "clip_theta": torch.from_numpy(clip_theta[:2]).float(),
            "object_theta": torch.from_numpy(object_theta[:2]).float(),
            "clip_aug": torch.tensor([float(flip), angle, blur, float(affine)]),
            "caption": caption_with_prefix(
                fill_template(rng.choice(self.templates), cfg.placeholder_token), prefix, cfg.caption_prefix_rule
            ),
            "box_in_crop": box,
            "category": str(meta.get("category", "")),
            "key": str(meta.get("key", "")),
        }
        if cfg.object_view == "mask_then_resize":  # x * m at the crop's size, then reduced: edges blend with black
            black = Image.new("RGB", image.size, (0, 0, 0))
            masked = Image.composite(image, black, mask.point(lambda v: 255 if v > 127 else 0))
            out["object_source"] = _planar(masked.reduce(reduce) if reduce > 1 else masked)
        return out

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        """[B, L] ids of `captions`; the few distinct captions (one per template) are tokenised once."""
        tok = self.tokenizer
        if len(tok) != self._token_cache_vocab:  # placeholder tokens added since: ids may differ
            self._token_cache, self._token_cache_vocab = {}, len(tok)
        missing = sorted({c for c in captions if c not in self._token_cache})
        if missing:
            ids = tok(missing, padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
            self._token_cache.update(zip(missing, ids))
        return torch.tensor([self._token_cache[c] for c in captions], dtype=torch.long)

    def finalize_batch(self, batch: dict) -> dict:
        """A stacked batch of raw samples -> the training batch (the float work, once per batch).

        Samples stay uint8 until here (4x less to stack and to pass between processes); this runs
        once per batch, in the main process when the loader has workers. Deterministic: all the
        randomness was drawn per sample.
        """
        batch = dict(batch)
        pixels = batch.pop("pixel_values").to(torch.float32)  # [B, 3, R, R] uint8 -> float
        torch.add(self._minus_one, pixels, alpha=_TO_UNIT, out=pixels)  # -> [-1, 1] in place, one pass
        size = pixels.shape[-1]
        for i, (x0, y0, x1, y1) in enumerate(batch.pop("canvas").tolist()):
            if (x0, y0, x1, y1) != (0, 0, size, size):  # exact 0 (grey) around a scale-augmented crop
                pixels[i, :, :y0] = 0.0
                pixels[i, :, y1:] = 0.0
                pixels[i, :, :, :x0] = 0.0
                pixels[i, :, :, x1:] = 0.0

        # The object view first (its source is raw pixels, so outside the warped image is black): one
        # bilinear grid_sample for the whole batch, the mask through the same grids (nearest).
        size = self.config.clip_size
        object_grids = affine_grids(batch.pop("object_theta"), size)
        source_mask = batch.pop("clip_source_mask").to(torch.float32)  # 0/1; nearest sampling keeps it 0/1
        mask = F.grid_sample(source_mask, object_grids, mode="nearest", padding_mode="zeros", align_corners=False)
        object_source = batch.pop("object_source", None)
        raw = batch.pop("clip_source").to(torch.float32)
        sampled = F.grid_sample(
            raw if object_source is None else object_source.to(torch.float32),
            object_grids,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        objects = sampled.mul_(self.clip_scale).sub_(self.clip_shift)
        if object_source is None:  # resize_then_mask: the view first, then black outside its mask
            # clip * m + black * (1 - m), exact on both sides of the mask
            objects = torch.addcmul(self.black * (1.0 - mask), objects, mask)

        # The image view: normalised first, so a "mean" border is CLIP's mean colour (0).
        aug = batch.pop("clip_aug")
        clip = raw.mul_(self.clip_scale).sub_(self.clip_shift)
        padding = "reflection" if self.config.clip_border == "reflect" else "zeros"
        clip = F.grid_sample(
            clip,
            affine_grids(batch.pop("clip_theta"), size),
            mode="bilinear",
            padding_mode=padding,
            align_corners=False,
        )
        blurred = [i for i, value in enumerate(aug[:, 2].tolist()) if value > 0]
        if blurred:
            values = aug[blurred, 2].tolist()
            if self.config.clip_blur == "box":
                unit = size / 224.0  # box sizes are given at 224 px
                sizes = [max(1, int(round(v * unit)) | 1) for v in values]
                clip[blurred] = box_blur(clip[blurred], sizes)
            else:
                clip[blurred] = gaussian_blur(clip[blurred], values)
        batch["pixel_values"] = pixels
        batch["clip_pixel_values"] = clip
        batch["clip_object_pixel_values"] = objects
        batch["object_mask_clip"] = mask
        if self.tokenizer is not None:
            batch["input_ids"] = self.token_ids(batch["caption"])
        return batch

    def collate(self, samples: list[dict]) -> dict:
        """Raw samples -> training batch (`stack_samples` then `finalize_batch`)."""
        return self.finalize_batch(stack_samples(samples))


def decode_crop_sample(sample: dict) -> tuple[Image.Image, Image.Image, dict]:
    """A raw WebDataset sample ({"jpg": bytes, "mask.png": bytes, "json": bytes}) -> (RGB, L mask, meta)."""
    where = f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}"
    missing = [k for k in ("jpg", "mask.png", "json") if k not in sample]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (not a crop shard?)")
    image = Image.open(io.BytesIO(sample["jpg"]))
    image = image.convert("RGB") if image.mode != "RGB" else image
    mask = Image.open(io.BytesIO(sample["mask.png"]))
    mask = mask.convert("L") if mask.mode != "L" else mask
    meta = json.loads(sample["json"])
    if image.size != mask.size or image.width != image.height:
        raise ValueError(f"{where}: crop {image.size} and mask {mask.size} must be equal squares")
    meta.setdefault("key", sample.get("__key__", ""))
    return image, mask, meta


def first_crop_samples(shards: ShardSet, count: int) -> list[tuple[Image.Image, Image.Image, dict]]:
    """The first `count` readable crop samples of the shards, in shard order: (RGB crop, L mask, metadata).

    Read apart from the training stream (validation pictures), so the training data order is untouched.
    """
    found: list[tuple[Image.Image, Image.Image, dict]] = []
    for shard in range(len(shards.urls)):
        for index in range(shards.count(shard)):
            try:
                found.append(decode_crop_sample(shards.read(shard, index)))
            except (ValueError, OSError) as err:
                logger.warning("validation crops: skipping a sample: %s", err)
            if len(found) >= count:
                return found
    return found


def decode_cached_latent(sample: dict, cells: int) -> torch.Tensor:
    """The VAE posterior moments `[2C, cells, cells]` (float16) stored by `python -m data_prep latents`."""
    where = f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}"
    if LATENT_MEMBER not in sample:
        raise ValueError(
            f"{where} has no {LATENT_MEMBER}: make the shards with `python -m data_prep latents` "
            "or set data.cached_latents=false"
        )
    moments = np.load(io.BytesIO(sample[LATENT_MEMBER]), allow_pickle=False)
    if moments.ndim != 3 or moments.shape[0] % 2 or moments.shape[1:] != (cells, cells):
        raise ValueError(
            f"{where}: {LATENT_MEMBER} is {moments.shape}, expected [2C, {cells}, {cells}] "
            "(latents made at another data.resolution or for a VAE with another factor?)"
        )
    return torch.from_numpy(moments)


def cached_latents_models(urls: list[str]) -> set[str]:
    """The base models whose VAE made the cached latents, as the shard folders' manifests record them."""
    models = set()
    for folder in sorted({str(Path(u).parent) for u in urls}):
        path = Path(folder) / MANIFEST_NAME
        if path.is_file():
            settings = json.loads(path.read_text()).get("settings", {})
            if settings.get("kind") == "crop-latents":
                models.add(str(settings.get("model")))
    return models


def check_cached_latents(shards: ShardSet, cells: int) -> None:
    """Fail before training when the first sample has no usable cached latent."""
    decode_cached_latent(shards.read(0, 0), cells)


def stack_samples(samples: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def count_manifest_samples(urls: list[str]) -> int | None:
    """Samples the manifests next to the shards promise (None when a folder has no manifest)."""
    total = 0
    for folder in sorted({str(Path(u).parent) for u in urls}):
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        names = {Path(u).name for u in urls if str(Path(u).parent) == folder}
        total += sum(s["samples"] for s in manifest.get("shards", []) if s["file"] in names)
    return total


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when it is up, else RANK / WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _check_bad_fraction(bad: int, attempts: int, shards: set[str], limit: float) -> None:
    """Stop when too many samples were unreadable (a truncated or damaged shard), naming the shards."""
    if attempts and bad / attempts > limit:
        names = ", ".join(sorted(shards)[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
        raise ShardSpecError(
            f"{bad} of {attempts} crop samples read could not be decoded ({bad / attempts:.1%}, more than "
            f"data.max_bad_fraction={limit:g}); damaged shard(s): {names}. Rewrite them with `python -m data_prep` "
            "(a rerun keeps the intact shards), or raise data.max_bad_fraction"
        )


class _ReaderBatches(torch.utils.data.IterableDataset):
    """Raw (uint8, stacked) batches of one reader per DataLoader worker, each tagged with the reader and
    the position after it; `first_reader` rotates which reader worker 0 serves (resume mid-cycle)."""

    def __init__(
        self,
        shards: ShardSet,
        transform: CropSampleTransform,
        plans: list[ReaderPlan],
        batch_size: int,
        epoch: int,
        starts: list[int],
        first_reader: int,
    ):
        self.shards, self.transform, self.plans = shards, transform, plans
        self.batch_size, self.epoch, self.starts, self.first_reader = batch_size, epoch, starts, first_reader

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        reader = ((info.id if info is not None else 0) + self.first_reader) % len(self.plans)
        plan, cfg = self.plans[reader], self.transform.config
        cells = cfg.resolution // self.transform.factor
        samples, failures, skipped = [], 0, 0
        attempts, bad, bad_shards = 0, 0, set()
        filtered, kept = 0, 0  # crops the stage's filters leave out (not failures), and crops used
        for position, shard, index in reader_positions(self.shards, plan, self.epoch, self.starts[reader]):
            attempts += 1
            try:
                raw = self.shards.read(shard, index)
                image, mask, meta = decode_crop_sample(raw)
                reason = crop_filter_reason(meta, cfg) if cfg.filters_crops else None
                if reason is None:
                    rng = random.Random(plan.sample_seed(self.epoch, position))
                    if cfg.crop_geometry == "box":
                        image, mask, meta = box_view(image, mask, meta, cfg.box_margin, rng)
                    out = self.transform(image, mask, meta, rng)
                    if cfg.cached_latents:
                        out["latent_moments"] = decode_cached_latent(raw, cells)
            except Exception as err:  # one bad sample must not stop training; a run of them must
                failures, skipped = failures + 1, skipped + 1
                where = f"{self.shards.urls[shard]}: sample {index}"
                if skipped <= 5:
                    logger.warning("skipping %s: %s", where, err)
                if failures >= cfg.max_consecutive_failures:
                    raise ShardSpecError(
                        f"{failures} crop samples in a row could not be read (last: {where}: {err}); "
                        "are the shards crop shards of `python -m data_prep`, and intact?"
                    ) from err
                bad += 1
                bad_shards.add(self.shards.urls[shard])
                if attempts >= 100:
                    _check_bad_fraction(bad, attempts, bad_shards, cfg.max_bad_fraction)
                continue
            failures = 0
            if reason is not None:  # the stage's filters leave it out: not a failure
                filtered += 1
                if not kept and filtered >= FILTER_PATIENCE:
                    raise ShardSpecError(
                        f"the data filters left out the first {filtered} crops read (last: "
                        f"{self.shards.urls[shard]}: sample {index}: {reason}); loosen data.min_box_area, "
                        "data.max_box_area, data.min_box_side or data.max_box_aspect for these shards"
                    )
                continue
            kept += 1
            samples.append(out)
            if len(samples) == self.batch_size:
                batch = stack_samples(samples)
                batch["_reader"], batch["_next"], batch["_skipped"] = reader, position + 1, skipped
                samples, skipped = [], 0
                yield batch
        _check_bad_fraction(bad, attempts, bad_shards, cfg.max_bad_fraction)  # a whole pass read


class CropDataLoader:
    """Iterable of dict batches of crop shards; each `iter()` is a new epoch (new shuffles).

    With `resampled` (default) one iteration never ends, as `max_steps` training wants; without it,
    one iteration is one pass over this node's share of the shards. `state_dict()` is the position after
    the last batch handed out; `load_state_dict(state)` makes the next iteration continue from there
    without reading anything before it (the training loop checkpoints it).
    """

    def __init__(
        self,
        shards: str | Sequence[str] | ShardSet,
        config: CropDataConfig,
        *,
        batch_size: int,
        vae_scale_factor: int,
        tokenizer: Any = None,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        num_workers: int = 0,
        seed: int = 0,
    ):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.open(shards)
        self.urls = self.shards.urls
        self.config = config
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.transform = CropSampleTransform(config, vae_scale_factor, tokenizer, clip_mean, clip_std)
        self.num_samples = count_manifest_samples(self.urls)
        if config.cached_latents:
            check_cached_latents(self.shards, config.resolution // int(vae_scale_factor))
        rank, world = _rank_and_world()
        self.num_readers = max(1, num_workers)
        self.plans = [
            ReaderPlan(seed, rank, world, reader, self.num_readers, config.shuffle_shards, config.resampled)
            for reader in range(self.num_readers)
        ]
        if not config.resampled and len(self.urls) < world * self.num_readers:
            logger.warning(
                "%d shard(s) for %d node(s) x %d worker(s): some get no data; use data.resampled=true or more shards",
                len(self.urls),
                world,
                self.num_readers,
            )
        self.epoch = 0
        self.positions = [0] * self.num_readers
        self.next_reader = 0
        self.skipped = 0
        self._fresh = True  # the next iteration continues the current epoch (start, or just restored)

    def state_dict(self) -> dict:
        """Where the next batch comes from: epoch, each reader's next position, which reader is next."""
        return {
            "epoch": self.epoch,
            "positions": list(self.positions),
            "next_reader": self.next_reader,
            "num_workers": self.num_workers,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = int(state.get("num_workers", 0))
        if max(1, saved) != self.num_readers:
            raise ValueError(
                f"the data position was saved with dataloader_num_workers={saved}, this run has {self.num_workers}: "
                f"resume with dataloader_num_workers={saved} (each worker reads a stream of its own)"
            )
        self.epoch = int(state["epoch"])
        self.positions = [int(p) for p in state["positions"]]
        self.next_reader = int(state.get("next_reader", 0))
        self.skipped = int(state.get("skipped", 0))
        self._fresh = True

    def __iter__(self) -> Iterator[dict]:
        if not self._fresh:  # the previous iteration ran to its end: a new epoch
            self.epoch += 1
            self.positions, self.next_reader = [0] * self.num_readers, 0
        self._fresh = False
        dataset = _ReaderBatches(
            self.shards, self.transform, self.plans, self.batch_size, self.epoch, list(self.positions), self.next_reader
        )
        if self.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers))
        for batch in batches:
            reader = batch.pop("_reader")
            self.positions[reader] = batch.pop("_next")
            self.skipped += batch.pop("_skipped")
            self.next_reader = (reader + 1) % self.num_readers
            yield self.transform.finalize_batch(batch)


def build_crop_dataloader(
    shards: str | Sequence[str] | ShardSet, config: CropDataConfig, **kwargs: Any
) -> CropDataLoader:
    """The loader trainers use (keyword arguments as `CropDataLoader`'s): `build_crop_dataloader(cfg.train_shards,
    cfg.data, batch_size=cfg.train_batch_size, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    tokenizer=tok, num_workers=cfg.dataloader_num_workers, seed=cfg.seed)`."""
    return CropDataLoader(shards, config, **kwargs)
