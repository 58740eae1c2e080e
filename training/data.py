"""The crop-shard loader for both ELITE stages: WebDataset shards from `data_prep` -> dict batches.

An open_clip-style chain, one readable stage per line:

    shard list (path / glob / brace pattern)
      -> resampled shards (endless, seeded per rank and worker)  |  shuffled shards -> split_by_node -> split_by_worker
      -> tarfile_to_samples (a broken shard or member is logged and skipped, never fatal)
      -> shuffle buffer (seeded) -> decode + augment (seeded, a bad sample is logged and skipped) -> batched

Each sample becomes (R = `resolution`, f = the VAE's downsampling factor, passed in, never assumed):

* `pixel_values` [3, R, R] in [-1, 1]: the diffusion target, the crop; with `scale_prob` > 0 the
  crop is shrunk by a factor from `scale_range` and placed at a random spot of a grey canvas;
* `valid_mask` [1, R/f, R/f]: 1 where the target holds real pixels (not the scale-augmentation
  canvas, not the letterbox fill of crops cut at an image edge); weight the loss with it;
* `object_mask_latent` [1, R/f, R/f]: the object's mask on the target (any pixel set -> 1);
* `clip_pixel_values` [3, C, C]: the crop for the global stage, CLIP-normalised, augmented with a
  flip, a small rotation and a blur; C = `clip_size` (224 for ViT-L/14);
* `clip_object_pixel_values` [3, C, C]: the object on black (x * m, same flip/rotation), CLIP-normalised,
  for the local stage (as `encoders.clip_features.mask_background` does at inference);
* `object_mask_clip` [1, C, C]: the mask under the same flip/rotation;
* `caption`: a random CLIP ImageNet template holding the placeholder ("a photo of a S*.");
  `input_ids` [L] when a tokenizer is given;
* `box_in_crop` [4] (0..1, on the target), `category`, `key`.

All randomness comes from RNGs seeded by (`seed`, epoch, rank, worker), so batches are the same
on every run with the same seed and worker count (the training loop's exact resume relies on it).
Samples stay uint8 until a whole batch is stacked; `CropSampleTransform.finalize_batch` then makes
the float tensors once per batch, in the main process (4x less data between DataLoader workers).
Do not pass the loader through `accelerator.prepare`: it splits shards by node itself (RANK /
WORLD_SIZE or torch.distributed), and accelerate would dispatch rank 0's batches instead.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from data_prep.writer import MANIFEST_NAME, expand_shard_spec
from encoders.clip_features import CLIP_MEAN, CLIP_STD

from .templates import IMAGENET_TEMPLATES, fill_template

logger = logging.getLogger(__name__)

_CLIP_FILL = tuple(int(round(255 * m)) for m in CLIP_MEAN)  # rotation fill: ~0 after normalisation


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class CropDataConfig:
    """Loader settings; trainers nest it as `data` (`data.resolution=64`, `data.scale_prob=0.5`)."""

    resolution: int = _help("side of the diffusion target in pixels (crops are resized to it)", 512)
    placeholder_token: str = _help("the pseudo-word put into the caption templates", "S*")
    resampled: bool = _help("sample shards with replacement, endlessly (multi-node friendly); else one pass per epoch", True)
    shuffle_buffer: int = _help("samples held for shuffling (0: no sample shuffle)", 1000)
    shuffle_initial: int = _help("samples gathered before the first is returned", 100)
    scale_prob: float = _help("probability of the target's scale augmentation (object shrunk onto a canvas)", 0.0)
    scale_range: tuple[float, float] = _help("range of the shrink factor", factory=lambda: (0.5, 1.0))
    clip_size: int = _help("side of the CLIP inputs (the image encoder's image_size)", 224)
    clip_flip_prob: float = _help("probability of a horizontal flip of the CLIP inputs", 0.5)
    clip_rotation_degrees: float = _help("CLIP inputs are rotated by up to this many degrees", 10.0)
    clip_blur_prob: float = _help("probability of a Gaussian blur of the CLIP crop", 0.3)
    clip_blur_radius: tuple[float, float] = _help("range of the blur radius in pixels", factory=lambda: (0.1, 1.5))
    templates: list[str] = _help("caption templates with {c} for the placeholder (empty: the 80 CLIP ImageNet ones)", factory=list)

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"data.resolution must be >= 8, got {self.resolution}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.scale_range must satisfy 0 < low <= high <= 1, got {self.scale_range}")
        if not 0 <= self.scale_prob <= 1:
            raise ValueError(f"data.scale_prob must be in [0, 1], got {self.scale_prob}")
        if any("{c}" not in t for t in self.templates):
            raise ValueError("every entry of data.templates needs a {c} slot for the placeholder")


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + (int(part) & 0xFFFFFFFFFFFFFFFF) + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    return value >> 1


def _worker_info() -> tuple[int, int]:
    """(rank, worker id) of the current process, as WebDataset's node/worker split sees them."""
    from webdataset.utils import pytorch_worker_info

    rank, _, worker, _ = pytorch_worker_info()
    return rank, worker


def _to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 PIL RGB -> contiguous CHW uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def _any_pixel_cells(mask: Image.Image, f: int) -> np.ndarray:
    """[h/f, w/f] float: 1 where an f x f cell of a 0/255 L mask holds any set pixel."""
    if f == 1:
        return (np.asarray(mask) > 127).astype(np.float32)
    if f <= 16:  # a box average of 0/255 values stays > 0 (after rounding) iff any pixel is set
        return (np.asarray(mask.reduce(f)) > 0).astype(np.float32)
    h, w = mask.height // f, mask.width // f
    return (np.asarray(mask) > 127).reshape(h, f, w, f).any(axis=(1, 3)).astype(np.float32)


def _view(image: Image.Image, size: int, angle: float, flip: bool, resample: int, fill) -> Image.Image:
    """`image` resized to `size`, mirrored and rotated about its centre by `angle` degrees: one affine warp."""
    scale = image.width / size
    a = math.radians(angle)
    cos, sin = math.cos(a) * scale, math.sin(a) * scale
    mirror = -1.0 if flip else 1.0
    half_in, half_out = image.width / 2.0, size / 2.0
    # input = centre_in + scale * R(angle) @ diag(mirror, 1) @ (output - centre_out)
    m00, m01, m10, m11 = cos * mirror, sin, -sin * mirror, cos
    coeffs = (m00, m01, half_in - m00 * half_out - m01 * half_out, m10, m11, half_in - m10 * half_out - m11 * half_out)
    return image.transform((size, size), Image.AFFINE, coeffs, resample, fillcolor=fill)


class CropSampleTransform:
    """(crop, mask, metadata) -> the training tensors listed in the module docstring.

    Shared by the shard loader and the on-the-fly baseline of `benchmarks/bench_data.py`, so both
    produce the same tensors from the same crop.
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
            raise ValueError(f"data.resolution {config.resolution} must be a multiple of the VAE factor {vae_scale_factor}")
        self.config = config
        self.factor = int(vae_scale_factor)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(clip_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(clip_std, dtype=torch.float32).view(3, 1, 1)
        self.black = -self.mean / self.std  # normalised black: the local stage's background
        self.clip_scale = 1.0 / (255.0 * self.std)
        self.clip_shift = self.mean / self.std
        self.templates = tuple(config.templates) or IMAGENET_TEMPLATES

    def __call__(self, image: Image.Image, mask: Image.Image, meta: dict, rng: random.Random) -> dict:
        cfg, f = self.config, self.factor
        size = cfg.resolution
        cells = size // f
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        if mask.size != (size, size):
            mask = mask.resize((size, size), Image.NEAREST)

        # The diffusion target, optionally shrunk onto a grey canvas; sizes and offsets sit on the
        # latent grid, so the latent-resolution masks below are exact.
        side, ox, oy = size, 0, 0
        if cfg.scale_prob > 0 and rng.random() < cfg.scale_prob:
            scale = rng.uniform(*cfg.scale_range)
            side = max(f, int(round(size * scale / f)) * f)
            ox = rng.randrange(0, (size - side) // f + 1) * f
            oy = rng.randrange(0, (size - side) // f + 1) * f
        placed = image if side == size else image.resize((side, side), Image.BICUBIC)
        if side == size:
            pixels = _to_uint8_tensor(placed)
        else:
            pixels = torch.full((3, size, size), 128, dtype=torch.uint8)  # the grey canvas (0 after finalize)
            pixels[:, oy : oy + side, ox : ox + side] = _to_uint8_tensor(placed)
        placed_mask = mask if side == size else mask.resize((side, side), Image.NEAREST)
        object_latent = np.zeros((cells, cells), np.float32)  # a latent cell holding any object pixel
        object_latent[oy // f : (oy + side) // f, ox // f : (ox + side) // f] = _any_pixel_cells(placed_mask, f)
        vx0, vy0, vx1, vy1 = meta.get("valid_in_crop", (0.0, 0.0, 1.0, 1.0))
        px0, py0 = ox + int(round(vx0 * side)), oy + int(round(vy0 * side))
        px1, py1 = ox + int(round(vx1 * side)), oy + int(round(vy1 * side))
        valid_latent = np.zeros((cells, cells), np.float32)  # a latent cell made only of real pixels
        valid_latent[-(-py0 // f) : py1 // f, -(-px0 // f) : px1 // f] = 1.0
        bx0, by0, bx1, by1 = meta["box_in_crop"]
        box = torch.tensor([(bx0 * side + ox) / size, (by0 * side + oy) / size, (bx1 * side + ox) / size, (by1 * side + oy) / size])

        # The CLIP views: whole crop (global stage) and object on black (local stage), same flip and
        # rotation, each made by one affine warp from a box-filtered half-size copy.
        c = cfg.clip_size
        flip = rng.random() < cfg.clip_flip_prob
        angle = rng.uniform(-cfg.clip_rotation_degrees, cfg.clip_rotation_degrees) if cfg.clip_rotation_degrees > 0 else 0.0
        small = image
        while small.width >= 2 * c:
            small = small.reduce(2)
        clip_image = _view(small, c, angle, flip, Image.BILINEAR, _CLIP_FILL)
        clip_mask = _view(mask, c, angle, flip, Image.NEAREST, 0)
        if rng.random() < cfg.clip_blur_prob:
            clip_image = clip_image.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.clip_blur_radius)))
        mask_clip = torch.from_numpy(np.asarray(clip_mask) > 127)[None]

        caption = fill_template(rng.choice(self.templates), cfg.placeholder_token)
        out = {
            "pixel_values": pixels,  # uint8 until finalize_batch
            "canvas": torch.tensor([ox, oy, ox + side, oy + side]),
            "valid_mask": torch.from_numpy(valid_latent)[None],
            "object_mask_latent": torch.from_numpy(object_latent)[None],
            "clip_pixel_values": _to_uint8_tensor(clip_image),
            "object_mask_clip": mask_clip,
            "caption": caption,
            "box_in_crop": box,
            "category": str(meta.get("category", "")),
            "key": str(meta.get("key", "")),
        }
        if self.tokenizer is not None:
            ids = self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length).input_ids
            out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        return out

    def finalize_batch(self, batch: dict) -> dict:
        """A stacked batch of raw samples -> the training batch: float images, normalised CLIP views.

        Samples stay uint8 until here (4x less to stack and to pass between processes); this runs
        once per batch, in the main process when the loader has workers.
        """
        batch = dict(batch)
        pixels = batch["pixel_values"].mul(2.0 / 255.0).sub_(1.0)  # uint8 * float -> float32 in one pass
        size = pixels.shape[-1]
        for i, (x0, y0, x1, y1) in enumerate(batch.pop("canvas").tolist()):
            if (x0, y0, x1, y1) != (0, 0, size, size):  # exact 0 (grey) around a scale-augmented crop
                pixels[i, :, :y0] = 0.0
                pixels[i, :, y1:] = 0.0
                pixels[i, :, :, :x0] = 0.0
                pixels[i, :, :, x1:] = 0.0
        clip = batch["clip_pixel_values"].mul(self.clip_scale).sub_(self.clip_shift)  # (x / 255 - mean) / std
        mask = batch["object_mask_clip"]
        batch["pixel_values"] = pixels
        batch["clip_pixel_values"] = clip
        batch["clip_object_pixel_values"] = torch.where(mask, clip, self.black)
        batch["object_mask_clip"] = mask.float()
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


def stack_samples(samples: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def _log_and_continue(exn: Exception) -> bool:
    logger.warning("skipping bad shard data: %r", exn)
    return True


class _SeededShuffle:
    """WebDataset's shuffle buffer with an RNG seeded by (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, initial: int, seed: int, epoch: int):
        self.bufsize, self.initial, self.seed, self.epoch = bufsize, initial, seed, epoch

    def __call__(self, src: Iterator) -> Iterator:
        import webdataset as wds

        rank, worker = _worker_info()
        rng = random.Random(_seed(self.seed, self.epoch, rank, worker, 1))
        return wds.shuffle(self.bufsize, initial=self.initial, rng=rng)(src)


class _DecodeAndTransform:
    """Decode and transform each sample with a seeded RNG; a sample that fails is logged and skipped."""

    def __init__(self, transform: CropSampleTransform, seed: int, epoch: int):
        self.transform, self.seed, self.epoch = transform, seed, epoch

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rank, worker = _worker_info()
        rng = random.Random(_seed(self.seed, self.epoch, rank, worker, 2))
        for sample in src:
            try:
                image, mask, meta = decode_crop_sample(sample)
                yield self.transform(image, mask, meta, rng)
            except Exception as err:  # one bad sample must not stop training
                logger.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)


def build_crop_pipeline(
    urls: list[str], config: CropDataConfig, transform: CropSampleTransform, batch_size: int, seed: int = 0, epoch: int = 0
):
    """The WebDataset pipeline (an IterableDataset of batches); see the module docstring."""
    import webdataset as wds

    if config.resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=_seed(seed, epoch) % (2**31), deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls, seed=_seed(seed, epoch) % (2**31)), wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=_log_and_continue))
    if config.shuffle_buffer > 0:
        stages.append(_SeededShuffle(config.shuffle_buffer, config.shuffle_initial, seed, epoch))
    stages.append(_DecodeAndTransform(transform, seed, epoch))
    stages.append(wds.batched(batch_size, collation_fn=stack_samples, partial=False))
    return wds.DataPipeline(*stages)


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


class CropDataLoader:
    """Iterable of dict batches of crop shards; each `iter()` is a new epoch (new shuffles).

    With `resampled` (default) one iteration never ends, as `max_steps` training wants; without it,
    one iteration is one pass over this node's share of the shards.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
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
        self.urls = expand_shard_spec(shards)
        self.config = config
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.epoch = 0
        self.transform = CropSampleTransform(config, vae_scale_factor, tokenizer, clip_mean, clip_std)
        self.num_samples = count_manifest_samples(self.urls)
        if not config.resampled:
            from webdataset.utils import pytorch_worker_info

            _, world_size, _, _ = pytorch_worker_info()
            if len(self.urls) < world_size * max(1, num_workers):
                logger.warning(
                    "%d shard(s) for %d node(s) x %d worker(s): some get no data; use data.resampled=true or more shards",
                    len(self.urls), world_size, max(1, num_workers),
                )

    def __iter__(self) -> Iterator[dict]:
        pipeline = build_crop_pipeline(self.urls, self.config, self.transform, self.batch_size, self.seed, self.epoch)
        self.epoch += 1
        if self.num_workers == 0:
            batches = iter(pipeline)
        else:
            import webdataset as wds

            batches = iter(wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers, persistent_workers=False))
        for batch in batches:
            yield self.transform.finalize_batch(batch)


def build_crop_dataloader(
    shards: str | Sequence[str],
    config: CropDataConfig,
    *,
    batch_size: int,
    vae_scale_factor: int,
    tokenizer: Any = None,
    clip_mean: Sequence[float] = CLIP_MEAN,
    clip_std: Sequence[float] = CLIP_STD,
    num_workers: int = 0,
    seed: int = 0,
) -> CropDataLoader:
    """The loader trainers use: `build_crop_dataloader(cfg.train_shards, cfg.data, batch_size=cfg.train_batch_size,
    vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1), tokenizer=tok, num_workers=cfg.dataloader_num_workers,
    seed=cfg.seed)`."""
    return CropDataLoader(
        shards, config, batch_size=batch_size, vae_scale_factor=vae_scale_factor, tokenizer=tokenizer,
        clip_mean=clip_mean, clip_std=clip_std, num_workers=num_workers, seed=seed,
    )

