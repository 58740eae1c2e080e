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
* `box_in_crop` [4] (0..1, on the target), `category`, `key`;
* with `cached_latents`: `latent_moments` [2C, R/f, R/f] float16, the VAE posterior of the target
  (`FrozenStableDiffusion.sample_latents` draws the latent from it).

All randomness comes from RNGs seeded by (`seed`, epoch, rank, worker, position), so batches are the
same on every run with the same seed and worker count, and a resumed run continues with exactly the
batches an uninterrupted one would have had.
Per sample (in the DataLoader workers) there is only PIL decoding, the random draws, a 2x box
filter for the CLIP source and the tiny latent masks; samples stay uint8 until a whole batch is
stacked. `CropSampleTransform.finalize_batch` then does the float work once per batch, in the
main process (4x less data between workers): uint8 -> [-1, 1], the CLIP views of every sample by
one `grid_sample` (flip + rotation + resize, the mask through the same grids), the blur as one
depthwise convolution with per-sample kernels, the normalisation, and the tokens (each template's
ids are computed once). The shard path thus costs little more than decoding one JPEG and one PNG.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.clip_features import CLIP_MEAN, CLIP_STD
from encoders.common.config import keyed_field
from encoders.common.shards import LATENT_MEMBER, MANIFEST_NAME

from .shard_reader import ReaderPlan, ShardSet, reader_positions
from .templates import IMAGENET_TEMPLATES, fill_template

logger = logging.getLogger(__name__)

# 2 / 255 rounded down to float32, so the fused `x * alpha - 1` of 255 stays <= 1 (at most 1.2e-7 off).
_TO_UNIT = float(np.nextafter(np.float32(2.0 / 255.0), np.float32(0.0)))


@dataclass
class CropDataConfig:
    """Loader settings; trainers nest it as `data` (`data.resolution=64`, `data.scale_prob=0.5`)."""

    resolution: int = keyed_field("side of the diffusion target in pixels (crops are resized to it)", 512)
    placeholder_token: str = keyed_field("the pseudo-word put into the caption templates", "S*")
    resampled: bool = keyed_field("sample shards with replacement, endlessly (multi-node friendly); else one pass per epoch", True)
    shuffle_shards: int = keyed_field(
        "shards whose samples are shuffled together, per round of a reader (0: shard order, no sample shuffle)", 4
    )
    max_consecutive_failures: int = keyed_field(
        "stop with an error after this many unreadable samples in a row (broken shards never make training spin)", 64
    )
    scale_prob: float = keyed_field("probability of the target's scale augmentation (object shrunk onto a canvas)", 0.0)
    scale_range: tuple[float, float] = keyed_field("range of the shrink factor", factory=lambda: (0.5, 1.0))
    clip_size: int = keyed_field("side of the CLIP inputs (the image encoder's image_size)", 224)
    clip_flip_prob: float = keyed_field("probability of a horizontal flip of the CLIP inputs", 0.5)
    clip_rotation_degrees: float = keyed_field("CLIP inputs are rotated by up to this many degrees", 10.0)
    clip_blur_prob: float = keyed_field("probability of a Gaussian blur of the CLIP crop", 0.3)
    clip_blur_radius: tuple[float, float] = keyed_field("range of the blur radius in pixels", factory=lambda: (0.1, 1.5))
    templates: list[str] = keyed_field("caption templates with {} for the placeholder (empty: the 80 CLIP ImageNet ones)", factory=list)
    cached_latents: bool = keyed_field(
        "read each crop's VAE posterior from KEY.latent.npy (shards from `python -m data_prep latents`) "
        "instead of encoding the target every step; needs scale_prob=0", False
    )

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"data.resolution must be >= 8, got {self.resolution}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.scale_range must satisfy 0 < low <= high <= 1, got {self.scale_range}")
        if not 0 <= self.scale_prob <= 1:
            raise ValueError(f"data.scale_prob must be in [0, 1], got {self.scale_prob}")
        if self.cached_latents and self.scale_prob > 0:
            raise ValueError(
                f"data.cached_latents=true needs data.scale_prob=0 (got {self.scale_prob}): "
                "the cached latents are of the crop as it is, not of a scale-augmented target"
            )
        if any("{}" not in t for t in self.templates):
            raise ValueError("every entry of data.templates needs a {} slot for the placeholder")
        if self.shuffle_shards < 0 or self.max_consecutive_failures < 1:
            raise ValueError("data.shuffle_shards must be >= 0 and data.max_consecutive_failures >= 1")


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


def clip_view_grids(flip: torch.Tensor, angle_degrees: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grids [B, size, size, 2] of the CLIP views: mirrored where `flip`, rotated about the centre.

    The same as `F.affine_grid(theta, (B, 1, size, size), align_corners=False)` with theta =
    R(angle) @ diag(mirror, 1) (y down, PIL's affine convention), built as one broadcast sum.
    Coordinates are normalised, so one grid samples a view from a square source of any size.
    """
    a = torch.deg2rad(angle_degrees.double())
    cos, sin = torch.cos(a), torch.sin(a)
    mirror = 1.0 - 2.0 * flip.double()
    col_x = torch.stack([cos * mirror, -sin * mirror], -1).float()  # d(source x, y) / d(output x)
    col_y = torch.stack([sin, cos], -1).float()  # d(source x, y) / d(output y)
    centres = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    along_x = centres[None, :, None] * col_x[:, None, :]  # [B, W, 2]
    along_y = centres[None, :, None] * col_y[:, None, :]  # [B, H, 2]
    return along_y[:, :, None, :] + along_x[:, None, :, :]


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
            raise ValueError(f"data.resolution {config.resolution} must be a multiple of the VAE factor {vae_scale_factor}")
        self.config = config
        self.factor = int(vae_scale_factor)
        self.tokenizer = tokenizer
        mean = torch.tensor(clip_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(clip_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.black = -mean / std  # normalised black: the local stage's background
        self.clip_scale = 1.0 / (255.0 * std)  # uint8 -> (x / 255 - mean) / std = x * scale - shift
        self.clip_shift = mean / std
        self._minus_one = torch.tensor(-1.0)
        self.templates = tuple(config.templates) or IMAGENET_TEMPLATES
        self._token_cache: dict[str, list[int]] = {}
        self._token_cache_vocab = -1

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
        if side == size:
            pixels = _planar(image)  # [3, R, R] uint8; made float per batch
        else:
            pixels = torch.full((3, size, size), 128, dtype=torch.uint8)  # the grey canvas (0 after finalize)
            pixels[:, oy : oy + side, ox : ox + side] = _planar(image.resize((side, side), Image.BICUBIC))
        placed_mask = mask if side == size else mask.resize((side, side), Image.NEAREST)
        object_latent = np.zeros((1, cells, cells), np.float32)  # a latent cell holding any object pixel
        object_latent[0, oy // f : (oy + side) // f, ox // f : (ox + side) // f] = _any_pixel_cells(placed_mask, f)
        vx0, vy0, vx1, vy1 = meta.get("valid_in_crop", (0.0, 0.0, 1.0, 1.0))
        px0, py0 = ox + int(round(vx0 * side)), oy + int(round(vy0 * side))
        px1, py1 = ox + int(round(vx1 * side)), oy + int(round(vy1 * side))
        valid_latent = np.zeros((1, cells, cells), np.float32)  # a latent cell made only of real pixels
        valid_latent[0, -(-py0 // f) : py1 // f, -(-px0 // f) : px1 // f] = 1.0
        bx0, by0, bx1, by1 = meta["box_in_crop"]
        box = torch.tensor([(bx0 * side + ox) / size, (by0 * side + oy) / size, (bx1 * side + ox) / size, (by1 * side + oy) / size])

        # The CLIP views' random flip, rotation and blur are drawn here and applied per batch
        # (`finalize_batch`) to a copy of the crop box-filtered to no less than the view (its
        # antialiasing) and the mask subsampled as much (nearest, as the view samples it).
        flip = rng.random() < cfg.clip_flip_prob
        angle = rng.uniform(-cfg.clip_rotation_degrees, cfg.clip_rotation_degrees) if cfg.clip_rotation_degrees > 0 else 0.0
        blur = rng.uniform(*cfg.clip_blur_radius) if rng.random() < cfg.clip_blur_prob else 0.0
        reduce = 1
        while size // (2 * reduce) >= cfg.clip_size:
            reduce *= 2
        small_image = image.reduce(reduce) if reduce > 1 else image
        small_mask = mask.resize(small_image.size, Image.NEAREST) if reduce > 1 else mask

        return {
            "pixel_values": pixels,  # uint8 [3, R, R] until finalize_batch
            "canvas": torch.tensor([ox, oy, ox + side, oy + side]),
            "valid_mask": torch.from_numpy(valid_latent),
            "object_mask_latent": torch.from_numpy(object_latent),
            "clip_source": _planar(small_image),  # uint8 [3, S, S], C <= S < 2C
            "clip_source_mask": torch.from_numpy(np.asarray(small_mask) > 127)[None],  # bool [1, S, S]
            "clip_aug": torch.tensor([float(flip), angle, blur]),
            "caption": fill_template(rng.choice(self.templates), cfg.placeholder_token),
            "box_in_crop": box,
            "category": str(meta.get("category", "")),
            "key": str(meta.get("key", "")),
        }

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

        # CLIP views: normalise the box-filtered crop, then one bilinear grid_sample for the whole
        # batch (outside the photo: 0, CLIP's mean colour); the mask through the same grids (nearest).
        aug = batch.pop("clip_aug")
        grids = clip_view_grids(aug[:, 0] > 0.5, aug[:, 1], self.config.clip_size)
        clip = batch.pop("clip_source").to(torch.float32).mul_(self.clip_scale).sub_(self.clip_shift)
        clip = F.grid_sample(clip, grids, mode="bilinear", padding_mode="zeros", align_corners=False)
        blurred = [i for i, sigma in enumerate(aug[:, 2].tolist()) if sigma > 0]
        if blurred:
            clip[blurred] = gaussian_blur(clip[blurred], aug[blurred, 2].tolist())
        mask = batch.pop("clip_source_mask").to(torch.float32)  # 0/1; nearest sampling keeps it 0/1
        mask = F.grid_sample(mask, grids, mode="nearest", padding_mode="zeros", align_corners=False)
        batch["pixel_values"] = pixels
        batch["clip_pixel_values"] = clip
        # the object on black: clip * m + black * (1 - m), exact on both sides of the mask (and 3x
        # faster than torch.where broadcasting a [B, 1] mask over the channels)
        batch["clip_object_pixel_values"] = torch.addcmul(self.black * (1.0 - mask), clip, mask)
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
        raise ValueError(f"{where} has no {LATENT_MEMBER}: make the shards with `python -m data_prep latents` "
                         "or set data.cached_latents=false")
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


class _ReaderBatches(torch.utils.data.IterableDataset):
    """Raw (uint8, stacked) batches of one reader per DataLoader worker, each tagged with the reader and
    the position after it; `first_reader` rotates which reader worker 0 serves (resume mid-cycle)."""

    def __init__(self, shards: ShardSet, transform: CropSampleTransform, plans: list[ReaderPlan], batch_size: int,
                 epoch: int, starts: list[int], first_reader: int):
        self.shards, self.transform, self.plans = shards, transform, plans
        self.batch_size, self.epoch, self.starts, self.first_reader = batch_size, epoch, starts, first_reader

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        reader = ((info.id if info is not None else 0) + self.first_reader) % len(self.plans)
        plan, cfg = self.plans[reader], self.transform.config
        cells = cfg.resolution // self.transform.factor
        samples, failures, skipped = [], 0, 0
        for position, shard, index in reader_positions(self.shards, plan, self.epoch, self.starts[reader]):
            try:
                raw = self.shards.read(shard, index)
                image, mask, meta = decode_crop_sample(raw)
                out = self.transform(image, mask, meta, random.Random(plan.sample_seed(self.epoch, position)))
                if cfg.cached_latents:
                    out["latent_moments"] = decode_cached_latent(raw, cells)
            except Exception as err:  # one bad sample must not stop training; a run of them must
                failures, skipped = failures + 1, skipped + 1
                where = f"{self.shards.urls[shard]}: sample {index}"
                if skipped <= 5:
                    logger.warning("skipping %s: %s", where, err)
                if failures >= cfg.max_consecutive_failures:
                    raise RuntimeError(
                        f"{failures} crop samples in a row could not be read (last: {where}: {err}); "
                        "are the shards crop shards of `python -m data_prep`, and intact?"
                    ) from err
                continue
            failures = 0
            samples.append(out)
            if len(samples) == self.batch_size:
                batch = stack_samples(samples)
                batch["_reader"], batch["_next"], batch["_skipped"] = reader, position + 1, skipped
                samples, skipped = [], 0
                yield batch


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
                len(self.urls), world, self.num_readers,
            )
        self.epoch = 0
        self.positions = [0] * self.num_readers
        self.next_reader = 0
        self.skipped = 0
        self._fresh = True  # the next iteration continues the current epoch (start, or just restored)

    def state_dict(self) -> dict:
        """Where the next batch comes from: epoch, each reader's next position, which reader is next."""
        return {"epoch": self.epoch, "positions": list(self.positions), "next_reader": self.next_reader,
                "num_workers": self.num_workers, "skipped": self.skipped}

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
        dataset = _ReaderBatches(self.shards, self.transform, self.plans, self.batch_size, self.epoch,
                                 list(self.positions), self.next_reader)
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


def build_crop_dataloader(shards: str | Sequence[str] | ShardSet, config: CropDataConfig, **kwargs: Any) -> CropDataLoader:
    """The loader trainers use (keyword arguments as `CropDataLoader`'s): `build_crop_dataloader(cfg.train_shards,
    cfg.data, batch_size=cfg.train_batch_size, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    tokenizer=tok, num_workers=cfg.dataloader_num_workers, seed=cfg.seed)`."""
    return CropDataLoader(shards, config, **kwargs)

