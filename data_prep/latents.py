"""Cache the VAE posterior of every crop: `python -m data_prep latents SHARDS --model PATH_OR_ID --out DIR`.

Reads crop shards (any folder, glob or brace pattern `data_prep coco/openimages` wrote) and writes
copies with one more member per sample, `KEY.latent.npy`: the Stable Diffusion VAE's posterior
moments of the crop, mean and log-variance stacked, float16 `[2 x 4, R/f, R/f]` (as diffusers'
`latent_dist.parameters`). A trainer with `data.cached_latents=true` then draws the latent from
them (`training.diffusion.FrozenStableDiffusion.sample_latents`, the same draw `vae.encode` makes)
instead of running the VAE encoder every step. What it saves, measured in benchmarks/bench_train.py:
5-6% of a tiny CPU step, 13-26% of an SD v1-4-size step on an H100. The price: a shard grows by
2 x 4 x (R/f)^2 x 2 bytes (64 KB at 512 px), and the target cannot be scale-augmented (the loader
refuses `data.scale_augment` other than none with cached latents).

Same writer as the crop shards (data_prep.writer): deterministic, resumable, `--workers`,
`--node-rank/--num-nodes`, a bad sample is counted and skipped. Each process encodes one input
shard at a time in batches of `--batch-size` (on the GPU when there is one).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders.common.shards import CROP_MEMBERS, LATENT_MEMBER, expand_shard_spec

from .cli import register_subcommand
from .writer import Skip, write_shards


@dataclass(frozen=True)
class LatentItem:
    """One sample of an input shard."""

    shard: str
    key: str

    def describe(self) -> str:
        return f"{self.shard}: {self.key}"


def plan_items(shards: list[str]) -> list[LatentItem]:
    """Every sample key of the input shards, in shard order then member order."""
    items = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                names = tar.getnames()
        except (OSError, tarfile.TarError) as err:
            raise ValueError(f"{shard} is not a readable tar shard: {err}") from err
        seen = []
        for name in names:
            key = Path(name).name.split(".", 1)[0]
            if key and (not seen or seen[-1] != key):
                seen.append(key)
        items.extend(LatentItem(shard, key) for key in dict.fromkeys(seen))
    return items


@dataclass
class LatentSettings:
    model: str
    subfolder: str = "vae"
    resolution: int = 512
    batch_size: int = 16
    device: str | None = None
    dtype: str = "auto"

    def to_dict(self) -> dict:
        return {"kind": "crop-latents", "model": self.model, "subfolder": self.subfolder, "resolution": self.resolution}


_VAE: dict = {}  # per process: (model, subfolder, device, dtype) -> vae
_SHARD_CACHE: dict = {}  # per process: the input shard being encoded -> {key: sample or Skip}


def _load_vae(settings: LatentSettings):
    from diffusers import AutoencoderKL

    from encoders.common.device import dtype_kwargs, resolve_device, resolve_dtype

    device = resolve_device(settings.device or "auto")
    dtype = resolve_dtype(settings.dtype, device)
    cache_key = (settings.model, settings.subfolder, str(device), str(dtype))
    if cache_key not in _VAE:
        vae = AutoencoderKL.from_pretrained(settings.model, subfolder=settings.subfolder or None, **dtype_kwargs(dtype))
        _VAE.clear()
        _VAE[cache_key] = vae.to(device).eval().requires_grad_(False)
    return _VAE[cache_key]


def _pixels(jpg: bytes, resolution: int) -> np.ndarray:
    """The crop as the loader feeds it to the VAE: RGB, resized to `resolution` (bicubic), uint8 HWC."""
    from PIL import Image

    image = Image.open(io.BytesIO(jpg))
    image = image.convert("RGB") if image.mode != "RGB" else image
    if image.width != image.height:
        raise Skip("not_square", f"crop is {image.size}")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image)


def _latent_bytes(moments) -> bytes:
    buf = io.BytesIO()
    np.save(buf, moments.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


class _AllSkipped(dict):
    """Results of a shard that could not be read: every key gets the same Skip."""

    def __init__(self, skip: Skip):
        super().__init__()
        self.skip = skip

    def get(self, key, default=None):
        return self.skip


class LatentSampleMaker:
    """`process(item)` for the writer: the input sample's members plus `latent.npy` (picklable)."""

    def __init__(self, settings: LatentSettings):
        self.settings = settings

    def _encode_shard(self, shard: str) -> dict:
        import torch

        samples: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = Path(member.name).name.partition(".")
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        results: dict[str, dict | Skip] = {}
        ready = []
        for key, sample in samples.items():
            missing = [m for m in CROP_MEMBERS if m not in sample]
            if missing:
                results[key] = Skip("missing_member", f"lacks {', '.join(missing)} (not a crop shard?)")
                continue
            try:
                ready.append((key, _pixels(sample["jpg"], self.settings.resolution)))
            except Skip as bad:
                results[key] = bad
            except Exception as err:  # a corrupt JPEG: count it, keep going
                results[key] = Skip("undecodable_image", str(err))
        vae = _load_vae(self.settings)
        step = max(1, self.settings.batch_size)
        for start in range(0, len(ready), step):
            chunk = ready[start : start + step]
            batch = torch.from_numpy(np.stack([p for _, p in chunk])).permute(0, 3, 1, 2)
            batch = batch.to(device=vae.device, dtype=torch.float32).mul_(2.0 / 255.0).sub_(1.0).to(vae.dtype)
            with torch.inference_mode():
                moments = vae.encode(batch).latent_dist.parameters.float().cpu().numpy()
            for (key, _), row in zip(chunk, moments):
                results[key] = {**samples[key], LATENT_MEMBER: _latent_bytes(row)}
        return results

    def __call__(self, item: LatentItem):
        if _SHARD_CACHE.get("shard") != item.shard:
            _SHARD_CACHE.clear()
            try:
                results = self._encode_shard(item.shard)
            except (OSError, tarfile.TarError) as err:  # the shard broke since it was planned: skip its samples
                results = _AllSkipped(Skip("unreadable_shard", str(err)))
            _SHARD_CACHE.update(shard=item.shard, results=results)
        result = _SHARD_CACHE["results"].get(item.key)
        if result is None:
            return Skip("missing_sample", "not found when the shard was read again")
        return result if isinstance(result, Skip) else dict(result)


def check_vae(settings: LatentSettings) -> None:
    """Fail before any shard when the model has no loadable VAE (a typo'd --base must not give empty shards)."""
    from diffusers import AutoencoderKL

    try:
        AutoencoderKL.load_config(settings.model, subfolder=settings.subfolder or None)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--base {settings.model}: no VAE to load ({settings.subfolder or 'no'} subfolder): {err}"
        ) from None


def write_latent_shards(shards_spec: str, settings: LatentSettings, job) -> dict:
    """Plan the samples of the input shards and write the copies with latents (this node's shards)."""
    if settings.resolution < 8 or settings.batch_size < 1:
        raise ValueError(
            f"resolution must be >= 8 and batch size >= 1, got {settings.resolution}, {settings.batch_size}"
        )
    shards = expand_shard_spec(shards_spec)
    out = Path(job.out_dir).resolve()
    if any(Path(s).resolve().parent == out for s in shards):
        raise ValueError(f"--out {out} holds the input shards; write the shards with latents to another folder")
    items = plan_items(shards)
    if not items:
        raise ValueError(f"the shards {shards_spec!r} hold no samples")
    check_vae(settings)
    return write_shards(
        items,
        LatentSampleMaker(settings),
        job,
        settings=settings.to_dict(),
        source={"shards": [str(s) for s in shards]},
        item_key=lambda item: item.key,
    )


# ---- `python -m data_prep latents` ------------------------------------------------------------------


def _configure(parser) -> None:
    from .cli import add_writer_arguments

    parser.add_argument("shards", help="input crop shards: a folder, glob or brace pattern")
    parser.add_argument(
        "--base",
        "--model",
        dest="model",
        required=True,
        help="the Stable Diffusion pipeline the trainer uses (folder or Hub id; --model is the same option)",
    )
    parser.add_argument(
        "--subfolder", default="vae", help="the VAE's subfolder in --model (default vae; '' for a bare VAE)"
    )
    parser.add_argument("--resolution", type=int, default=512, help="the trainer's data.resolution (default 512)")
    parser.add_argument("--batch-size", type=int, default=16, help="crops encoded together (default 16)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="auto: fp16 on GPU, fp32 on CPU"
    )
    add_writer_arguments(parser, default_name="latents")
    parser.set_defaults(workers=1)  # one VAE per process


@register_subcommand(
    "latents",
    help="copy crop shards with each crop's VAE latent distribution added (data.cached_latents=true)",
    configure=_configure,
    description="Encode every crop with the base model's VAE once and store its posterior moments as KEY.latent.npy.",
)
def _run(args) -> int:
    from .cli import shard_job_from_args
    from .sources import SourceError

    settings = LatentSettings(
        model=args.model,
        subfolder=args.subfolder,
        resolution=args.resolution,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    try:
        write_latent_shards(args.shards, settings, shard_job_from_args(args, unit="crops"))
    except ValueError as err:
        raise SourceError(str(err)) from None
    return 0
