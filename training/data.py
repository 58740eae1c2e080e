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
Do not pass the loader through `accelerator.prepare`: it splits shards by node itself (RANK /
WORLD_SIZE or torch.distributed), and accelerate would dispatch rank 0's batches instead.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 PIL -> CHW float in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


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
        self.templates = tuple(config.templates) or IMAGENET_TEMPLATES

    def _latent(self, mask: torch.Tensor, all_set: bool) -> torch.Tensor:
        """[1, R, R] {0,1} -> [1, R/f, R/f]: all pixels set (`all_set`) or any pixel set."""
        if self.factor == 1:
            return mask
        if all_set:
            return 1.0 - F.max_pool2d(1.0 - mask[None], self.factor)[0]
        return F.max_pool2d(mask[None], self.factor)[0]

    def __call__(self, image: Image.Image, mask: Image.Image, meta: dict, rng: random.Random) -> dict:
        cfg, f = self.config, self.factor
        size = cfg.resolution
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        if mask.size != (size, size):
            mask = mask.resize((size, size), Image.NEAREST)

        # The diffusion target, optionally shrunk onto a grey canvas (sizes and offsets on the latent grid).
        side, ox, oy = size, 0, 0
        if cfg.scale_prob > 0 and rng.random() < cfg.scale_prob:
            scale = rng.uniform(*cfg.scale_range)
            side = max(f, int(round(size * scale / f)) * f)
            ox = rng.randrange(0, (size - side) // f + 1) * f
            oy = rng.randrange(0, (size - side) // f + 1) * f
        placed = image if side == size else image.resize((side, side), Image.BICUBIC)
        placed_mask = mask if side == size else mask.resize((side, side), Image.NEAREST)
        pixel_values = torch.zeros(3, size, size)
        pixel_values[:, oy : oy + side, ox : ox + side] = _to_tensor(placed).mul_(2.0).sub_(1.0)
        object_mask = torch.zeros(1, size, size)
        object_mask[:, oy : oy + side, ox : ox + side] = (_to_tensor(placed_mask) > 0.5).float()
        valid = torch.zeros(1, size, size)
        vx0, vy0, vx1, vy1 = meta.get("valid_in_crop", (0.0, 0.0, 1.0, 1.0))
        valid[:, oy + int(round(vy0 * side)) : oy + int(round(vy1 * side)), ox + int(round(vx0 * side)) : ox + int(round(vx1 * side))] = 1.0
        bx0, by0, bx1, by1 = meta["box_in_crop"]
        box = torch.tensor([(bx0 * side + ox) / size, (by0 * side + oy) / size, (bx1 * side + ox) / size, (by1 * side + oy) / size])

        # The CLIP views: whole crop (global stage) and object on black (local stage), same geometry.
        c = cfg.clip_size
        small = image
        while small.width >= 2 * c:  # fast box-filter halving before the final resize
            small = small.reduce(2)
        clip_image = small.resize((c, c), Image.BICUBIC)
        clip_mask = mask.resize((c, c), Image.NEAREST)
        if rng.random() < cfg.clip_flip_prob:
            clip_image = clip_image.transpose(Image.FLIP_LEFT_RIGHT)
            clip_mask = clip_mask.transpose(Image.FLIP_LEFT_RIGHT)
        if cfg.clip_rotation_degrees > 0:
            angle = rng.uniform(-cfg.clip_rotation_degrees, cfg.clip_rotation_degrees)
            clip_image = clip_image.rotate(angle, Image.BICUBIC, fillcolor=_CLIP_FILL)
            clip_mask = clip_mask.rotate(angle, Image.NEAREST, fillcolor=0)
        if rng.random() < cfg.clip_blur_prob:
            clip_image = clip_image.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.clip_blur_radius)))
        clip01 = _to_tensor(clip_image)
        mask_clip = (_to_tensor(clip_mask) > 0.5).float()

        caption = fill_template(rng.choice(self.templates), cfg.placeholder_token)
        out = {
            "pixel_values": pixel_values,
            "valid_mask": self._latent(valid, all_set=True),
            "object_mask_latent": self._latent(object_mask, all_set=False),
            "clip_pixel_values": (clip01 - self.mean) / self.std,
            "clip_object_pixel_values": (clip01 * mask_clip - self.mean) / self.std,
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


def collate_crops(samples: list[dict]) -> dict:
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
    stages.append(wds.batched(batch_size, collation_fn=collate_crops, partial=False))
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
            yield from pipeline
            return
        import webdataset as wds

        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers, persistent_workers=False)
        yield from loader


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

