"""Learning benchmark: do ELITE's two trained stages help on crops they never saw?

    .venv/bin/python benchmarks/bench_learning.py [--out results.json] [--steps-global N] [--steps-local N]
        [--eval-shards SPEC] [--options all|none]        # ~20 minutes on 2 cores with the defaults

With `--world` (the default when the trained miniature world ships, `docs/world.md`): its models, ELITE
trained on crops of its training scenes and measured on crops of its held-out objects, plus identity
in generation (the world classifier reads shape, colour and pattern of generated held-out objects);
the fine-tunes part then runs only with `--no-world`. With `--no-world`: tiny models (random init, fixed seed), CPU,
fp32; the tiny VAE gets a near-point posterior and unit-
variance latents first (`calibrate_latent_scale`: a random VAE's posterior noise buries the images).
Crops: the bundled COCO sample and the DreamBooth
concept photos (each photo one object, its box the central 80 %), split by image into a training and
a held-out set (`--eval-shards` replaces the held-out set). Stage 1 and stage 2 are trained by their
trainers (`python -m training.global_mapping`, `training.local_mapping`: the official defaults,
64 px, batch 4), then every held-out crop is denoised at `--draws` (noise, timestep) draws, each draw
under every condition (paired), with the caption "a photo of a S*":

- stage 1: the crop's own w0 vs. another held-out crop's w0 (shuffled) vs. the class word typed, and
  the same for the mapping before training;
- stage 2: the local branch with the crop's own local tokens (lambda 1) vs. without it (lambda 0)
  vs. another crop's local tokens;
- each named stage-2 option (`--options all`) trained the same way: its loss with own tokens minus
  the reference's, and its own-vs-shuffled gain;
- `--parts elite,multiphoto`: with the stage-2 encoders, several photos of a DreamBooth concept
  encoded together vs. each alone, on each of its photos held out in turn (`multiphoto_results`);
- `--parts finetunes`: Textual Inversion, BaTex and Infusion per concept on held-out photos, at every
  quarter of training, and Textual Inversion with and without the anchor loss (`finetune_results`);
- `--parts ip_adapter`: an IP-Adapter (`training.ip_adapter`, official lr and drop rates) trained on the same
  crops, measured like stage 1: the crop's own image prompt vs another held-out crop's vs none, trained vs
  untrained; on the world also identity in generation (`ip_adapter_results`).

Each row is a mean difference of the denoising loss (epsilon MSE) with a paired bootstrap 95 %
interval over the draws; "learned" means the interval excludes zero. Prints a table, writes JSON
(default benchmarks/results/bench_learning.json).

What it shows: on the trained world, both stages learn crop-specific conditioning (own words and
own local tokens beat another crop's, the intervals excluding 0; docs/benchmarks.md has the rows).
On the random tiny models (`--no-world`) both stages only learn conditioning that lowers the loss in
general (trained vs. initialised, lambda 1 vs. 0): a frozen random UNet and CLIP tower give the
mappings nothing crop-specific to use, so own vs. shuffled straddles 0 there. Pretrained weights
(`--base CompVis/stable-diffusion-v1-4 --image-encoder openai/clip-vit-large-patch14 --resolution 512`)
need a GPU machine that has them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

RESULTS = REPO / "benchmarks/results/bench_learning.json"
DATA = REPO / "tests/data"
CAPTION = "a photo of a S*"
EVAL_EVERY = 3  # every third DreamBooth photo of each concept, and the COCO images with an odd id, are held out
# Stage-2 options that depart from the official computation: (name, key=value overrides of the trainer).
OPTIONS = [
    ("w0_map_norm=sample_head", ["w0_map_norm=sample_head"]),
    ("local_mask_mode=exclude", ["local_mask_mode=exclude"]),
    ("w0_source=object", ["w0_source=object"]),
    ("data.object_view=resize_then_mask", ["data.object_view=resize_then_mask"]),
    ("mse_reduction=mean", ["mse_reduction=mean"]),
]


# ---- data ---------------------------------------------------------------------------------------------


def _coco_split(work: Path) -> dict[str, Path]:
    """The COCO sample's annotations split by image id (odd ids held out)."""
    full = json.loads((DATA / "coco_sample/annotations.json").read_text())
    out = {}
    for split, keep in (("train", lambda i: i % 2 == 0), ("eval", lambda i: i % 2 == 1)):
        images = [im for im in full["images"] if keep(im["id"])]
        ids = {im["id"] for im in images}
        part = dict(full, images=images, annotations=[a for a in full["annotations"] if a["image_id"] in ids])
        out[split] = work / f"coco_{split}.json"
        out[split].write_text(json.dumps(part))
    return out


def _dreambooth_split(work: Path) -> dict[str, Path]:
    """COCO-format annotations of the DreamBooth photos: one object per photo, the central 80 % box."""
    from PIL import Image

    root = DATA / "concepts/dreambooth"
    concepts = sorted(p for p in root.iterdir() if p.is_dir())
    splits = {"train": {"images": [], "annotations": []}, "eval": {"images": [], "annotations": []}}
    categories = [{"id": k + 1, "name": c.name.replace("_", " ")} for k, c in enumerate(concepts)]
    next_id = 1
    for k, concept in enumerate(concepts):
        for n, photo in enumerate(sorted(concept.glob("*.jpg"))):
            with Image.open(photo) as im:
                width, height = im.size
            x0, y0, w, h = 0.1 * width, 0.1 * height, 0.8 * width, 0.8 * height
            split = splits["eval" if n % EVAL_EVERY == 0 else "train"]
            split["images"].append(
                {"id": next_id, "file_name": f"{concept.name}/{photo.name}", "width": width, "height": height}
            )
            split["annotations"].append(
                {
                    "id": next_id,
                    "image_id": next_id,
                    "category_id": k + 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
                }
            )
            next_id += 1
    out = {}
    for name, split in splits.items():
        out[name] = work / f"dreambooth_{name}.json"
        out[name].write_text(json.dumps({**split, "categories": categories}))
    return out


def build_world_inputs(
    work: Path, models: str | None, train_images: int, eval_images: int
) -> tuple[str, str, str, str]:
    """The trained miniature world: its models (a folder, else the shipped ones written out under `work`)
    and crop shards of its train split and of its held-out split (triples no model saw)."""
    from data_prep.crop_commands import build_coco_shards
    from data_prep.records import CropSettings
    from data_prep.world import write_world
    from encoders.common.config import load_config
    from encoders.world import write_world_models

    folder = Path(models) if models else work / "models"
    if not models:
        write_world_models(folder)
    settings = load_config(CropSettings, REPO / "configs/data/world.yaml")
    specs = {}
    for split, count, seed in (("train", train_images, 0), ("heldout", eval_images, 7)):
        scenes = work / f"world/{split}"
        write_world(scenes, count, seed=seed, split=split, progress=False)
        build_coco_shards(
            scenes / "instances.json",
            scenes / "images",
            work / f"shards/{split}",
            settings,
            shard_size=256,
            workers=1,
            progress=False,
        )
        specs[split] = str(work / f"shards/{split}")
    return str(folder / "sd"), str(folder / "image_encoder"), specs["train"], specs["heldout"]


def build_inputs(
    work: Path, base: str | None = None, image_encoder: str | None = None, resolution: int = 64
) -> tuple[str, str, str, str]:
    """Models (the tiny ones unless `base` / `image_encoder` are given) and the training / held-out crop
    shards under `work`."""
    from data_prep.crop_commands import build_coco_shards
    from data_prep.records import CropSettings
    from encoders.common.config import load_config
    from encoders.tiny import build_tiny_models

    models = {} if base else build_tiny_models(work / "models", ["sd", "image_encoder"])
    settings = load_config(CropSettings, REPO / "configs/data/demo.yaml", [f"resolution={max(128, resolution)}"])
    job = dict(shard_size=16, workers=1, progress=False)
    coco, dreambooth = _coco_split(work), _dreambooth_split(work)
    specs = {}
    for split in ("train", "eval"):
        build_coco_shards(coco[split], DATA / "coco_sample/images", work / f"shards/{split}/coco", settings, **job)
        build_coco_shards(
            dreambooth[split], DATA / "concepts/dreambooth", work / f"shards/{split}/dreambooth", settings, **job
        )
        specs[split] = f"{work / f'shards/{split}/coco'}::{work / f'shards/{split}/dreambooth'}"
    if base:
        return base, image_encoder or "openai/clip-vit-large-patch14", specs["train"], specs["eval"]
    calibrate_latent_scale(models["sd"], specs["train"])
    return str(models["sd"]), str(models["image_encoder"]), specs["train"], specs["eval"]


def calibrate_latent_scale(sd_path: Path, train_spec: str) -> float:
    """Give the random tiny VAE the two properties a trained one has and the comparison depends on: a
    posterior that is nearly a point (its random init draws log-variances around 0, i.e. posterior noise
    of std 1 that buries every image's content; here the log-variance half of `quant_conv` is set to a
    constant -10) and latents of unit variance (`scaling_factor` = 1 / their std over the training
    crops, the way SD v1's 0.18215 was chosen). Saved back in place; returns the factor."""
    import torch
    from diffusers import AutoencoderKL

    from training.crop_data import CropDataConfig, build_crop_dataloader

    vae = AutoencoderKL.from_pretrained(sd_path, subfolder="vae").eval()
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -10.0
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        cfg = CropDataConfig(resolution=64, resampled=False, shuffle_shards=0)
        latents = torch.cat(
            [
                vae.encode(b["pixel_values"]).latent_dist.mean
                for b in build_crop_dataloader(train_spec, cfg, batch_size=8, vae_scale_factor=factor)
            ]
        )
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(Path(sd_path) / "vae")
    return scale


# ---- training -------------------------------------------------------------------------------------------


def train(stage: str, out: Path, keys: list[str], log: Path) -> Path:
    """Run a trainer in its own process (its own accelerate state); returns its encoders folder."""
    command = [
        sys.executable,
        "-m",
        f"training.{stage}",
        "--config",
        str(REPO / f"configs/train/{stage}.yaml"),
        *keys,
        f"output_dir={out}",
        f"export_dir={out / 'encoders'}",
    ]
    with open(log, "w") as handle:
        done = subprocess.run(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
    if done.returncode:
        raise SystemExit(f"{stage} training failed (exit {done.returncode}); see {log}")
    return out / "encoders"


# ---- evaluation -----------------------------------------------------------------------------------------


class Evaluator:
    """Held-out denoising losses of one set of frozen models under several conditions, paired by draw."""

    def __init__(
        self,
        sd_path,
        image_encoder,
        eval_spec: str,
        draws: int,
        seed: int = 0,
        resolution: int = 64,
        clip_size: int = 224,
    ):
        import torch

        from encoders.clip_features import CLIPFeatureExtractor, load_clip_normalization
        from encoders.text_injection import add_placeholder_tokens
        from training.crop_data import CropDataConfig, build_crop_dataloader
        from training.diffusion import FrozenStableDiffusion

        torch.manual_seed(seed)
        self.torch = torch
        self.sd = FrozenStableDiffusion.load(str(sd_path), torch.device("cpu"), torch.float32, False)
        (self.placeholder_id,) = add_placeholder_tokens(self.sd.tokenizer, ["S*"])
        self.clip = CLIPFeatureExtractor.from_pretrained(str(image_encoder), layers=(24, 4, 8, 12, 16))
        mean, std = load_clip_normalization(str(image_encoder))
        self.batches = {}
        for order in ("mask_then_resize", "resize_then_mask"):  # the object view as each model was trained
            cfg = CropDataConfig(
                resolution=resolution,
                resampled=False,
                shuffle_shards=0,
                templates=[CAPTION.replace("S*", "{}")],
                clip_size=clip_size,
                caption_prefix_rule="first_char",
                clip_flip_prob=0,
                clip_rotation_prob=0,
                clip_blur_prob=0,
                clip_affine_prob=0,
                object_resize_crop_prob=0,
                object_rotation_prob=0,
                object_translate_prob=0,
                object_view=order,
            )
            loader = build_crop_dataloader(
                eval_spec,
                cfg,
                batch_size=1,
                vae_scale_factor=self.sd.vae_scale_factor,
                tokenizer=self.sd.tokenizer,
                clip_mean=mean,
                clip_std=std,
                seed=seed,
            )
            self.batches[order] = [b for b in loader]
        first = self.batches["mask_then_resize"]
        self.count = len(first)
        if self.count < 3:
            raise SystemExit(f"the held-out shards hold {self.count} crops; the comparison needs at least 3")
        self.categories = [b["category"][0] for b in first]
        self.shuffle = [(i + 1) % self.count for i in range(self.count)]  # each crop gets its neighbour's words
        # one fixed (latent, noise, timestep) per crop and draw, shared by every condition and model
        self.draws = []
        for i, b in enumerate(first):
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            latents = self.sd.encode_images(b["pixel_values"], generator=g)
            for _ in range(draws):
                noisy, target, t = self.sd.add_noise(latents, g)
                self.draws.append((i, noisy, target, t))

    def features(self, key: str, order: str = "mask_then_resize") -> list[dict]:
        with self.torch.no_grad():
            return [dict(zip(self.clip.layers, self.clip(b[key]))) for b in self.batches[order]]

    def losses(self, conditioning) -> np.ndarray:
        """Per-draw losses; `conditioning(i)` -> (prompt_embeds [1, L, D], cross_attention_kwargs[, added_cond_kwargs])
        for crop i."""
        torch = self.torch
        out = []
        with torch.no_grad():
            cache = {}
            for i, noisy, target, t in self.draws:
                if i not in cache:
                    cache[i] = conditioning(i)
                text, kwargs, *added = cache[i]
                pred = self.sd.unet(
                    noisy, t, text, cross_attention_kwargs=kwargs, added_cond_kwargs=added[0] if added else None
                ).sample
                out.append(float(((pred - target) ** 2).mean()))
        return np.array(out)

    def ids(self, i: int):
        return self.batches["mask_then_resize"][i]["input_ids"]

    def plain_text(self, words: str):
        tok = self.sd.tokenizer
        ids = tok(words, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return self.sd.text_encoder(ids)[0]


def bootstrap(diff: np.ndarray, samples: int = 4000, seed: int = 0) -> dict:
    """Mean of paired differences with a 95 % percentile bootstrap interval over the draws."""
    rng = np.random.default_rng(seed)
    means = rng.choice(diff, size=(samples, diff.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(diff.mean()),
        "ci95": [float(lo), float(hi)],
        "n": int(diff.size),
        "excludes_zero": bool(lo > 0 or hi < 0),
    }


def evaluate_global(ev: Evaluator, encoders: Path) -> dict:
    """Losses with own w0, shuffled w0 and the class word, through the mapping's global K/V."""
    from encoders.attention import set_elite_processors
    from encoders.conditioning import elite_conditioning
    from encoders.global_mapping import GlobalMapping

    gm = GlobalMapping.from_pretrained(encoders, subfolder="global_mapping").eval()
    set_elite_processors(ev.sd.unet, gm)
    feats = ev.features("clip_pixel_values")
    with ev.torch.no_grad():
        w0 = [gm([f[24]], num_words=1) for f in feats]

    def with_words(source):
        def cond(i):
            c = elite_conditioning(ev.sd.text_encoder, ev.ids(i), [ev.placeholder_id], [w0[source(i)]])
            return c.prompt_embeds, None

        return cond

    own = ev.losses(with_words(lambda i: i))
    shuffled = ev.losses(with_words(lambda i: ev.shuffle[i]))
    typed = ev.losses(lambda i: (ev.plain_text(CAPTION.replace("S*", ev.categories[i])), None))
    return {"own": own, "shuffled": shuffled, "class_word": typed}


def evaluate_ip_adapter(ev: Evaluator, checkpoint: Path, image_encoder: str) -> dict:
    """Losses with the crop's own image prompt, another held-out crop's, and none (zero image_embeds, the
    dropped-image condition it trained with); the caption names the class word ("a photo of a cube"), as an
    IP-Adapter is prompted. The adapter comes from its checkpoint folder, installed on the evaluator's UNet
    and taken off again after."""
    from transformers import CLIPVisionModelWithProjection

    from encoders.attention import restore_default_processors
    from encoders.ip_adapter import IPAdapter

    torch = ev.torch
    adapter = IPAdapter.from_pretrained(checkpoint).eval()
    encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder).eval()
    unet = ev.sd.unet
    adapter.install(unet)
    try:
        with torch.no_grad():
            embeds = [encoder(b["clip_pixel_values"]).image_embeds for b in ev.batches["mask_then_resize"]]

        def with_image(source):
            def cond(i):
                image = embeds[source(i)] if source is not None else torch.zeros_like(embeds[i])
                return ev.plain_text(CAPTION.replace("S*", ev.categories[i])), None, {"image_embeds": [image[:, None]]}

            return cond

        return {
            "own": ev.losses(with_image(lambda i: i)),
            "shuffled": ev.losses(with_image(lambda i: ev.shuffle[i])),
            "no_image": ev.losses(with_image(None)),
        }
    finally:
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None
        restore_default_processors(unet)


def ip_adapter_results(args, work: Path, ev: Evaluator, sd: str, train_spec: str) -> dict:
    """IP-Adapter (`training.ip_adapter`, base variant, the official drop rates) trained on the same crops as ELITE,
    with the world's CLIP (its projection gives `image_embeds`), and measured like stage 1: own image vs another
    held-out crop's, own vs none; the adapter before training (its projections copied from to_k / to_v, a random
    image projection) as the control."""
    from training.crop_data import STORED_CROP_KEYS

    image_encoder = str(Path(sd).parent / "clip")
    keys = [
        f"pretrained_model_name_or_path={sd}",
        f"image_encoder_name_or_path={image_encoder}",
        "image_encoder_subfolder=",
        f"train_shards={train_spec}",
        f"data.resolution={args.resolution}",
        f"data.clip_size={_image_size(str(Path(sd).parent / 'image_encoder'))}",  # the same tower
        f"train_batch_size={args.batch}",
        "gradient_accumulation_steps=1",
        "mixed_precision=no",
        *STORED_CROP_KEYS,
        "report_to=none",
        "validation_steps=0",
        "dataloader_num_workers=0",
        f"seed={args.seed}",
    ]
    runs = {}
    for label, steps, lr in (("untrained", 1, 1e-12), ("trained", args.steps_ip, args.lr_ip)):
        out = work / f"ip_adapter_{label}"
        train(
            "ip_adapter",
            out,
            [*keys, f"max_steps={steps}", f"learning_rate={lr}", f"checkpointing_steps={steps}"],
            work / f"ip_adapter_{label}.log",
        )
        runs[label] = evaluate_ip_adapter(ev, out / f"checkpoint-{steps}" / "ip_adapter", image_encoder)
    out = {}
    for label, r in runs.items():
        out[label] = {
            "own_vs_shuffled": bootstrap(r["shuffled"] - r["own"]),
            "own_vs_no_image": bootstrap(r["no_image"] - r["own"]),
            "mean_loss_own": float(r["own"].mean()),
        }
    out["trained_vs_untrained_own"] = bootstrap(runs["untrained"]["own"] - runs["trained"]["own"])
    out["settings"] = {"steps": args.steps_ip, "learning_rate": args.lr_ip, "batch": args.batch}
    if args.world:
        identity = ip_adapter_identity(
            work / "ip_adapter_trained" / "encoders", sd, Path(sd).parent, objects=args.identity_objects
        )
        pictures = identity.pop("_pictures")
        out["identity"] = identity
        _identity_sheet(pictures, Path(args.out).with_name(Path(args.out).stem + "_identity.png"))
    return out


def evaluate_local(ev: Evaluator, encoders: Path) -> dict:
    """Losses with the local branch on own tokens (lambda 1), off (lambda 0), and on shuffled tokens."""
    from encoders.attention import set_elite_processors
    from encoders.conditioning import elite_conditioning
    from encoders.global_mapping import GlobalMapping
    from encoders.local_mapping import LocalMapping

    gm = GlobalMapping.from_pretrained(encoders, subfolder="global_mapping").eval()
    lm = LocalMapping.from_pretrained(encoders, subfolder="local_mapping").eval()
    set_elite_processors(ev.sd.unet, gm, lm)
    order = lm.config.object_view
    objects = ev.features("clip_object_pixel_values", order)
    w0_view = ev.features("clip_pixel_values") if lm.config.w0_source == "image" else objects
    with ev.torch.no_grad():
        w0 = [gm([f[24]], num_words=1) for f in w0_view]
        local = [
            lm([f[layer] for layer in lm.config.feature_layers], b["object_mask_clip"])
            for f, b in zip(objects, ev.batches[order])
        ]

    def with_local(source, scale):
        def cond(i):
            j = source(i)
            c = elite_conditioning(
                ev.sd.text_encoder,
                ev.ids(i),
                [ev.placeholder_id],
                [w0[i]],
                local=[(local[j].tokens, local[j].keep)],
                scale=scale,
            )
            return c.prompt_embeds, c.context.as_kwargs()

        return cond

    return {
        "own": ev.losses(with_local(lambda i: i, 1.0)),
        "off": ev.losses(with_local(lambda i: i, 0.0)),
        "shuffled": ev.losses(with_local(lambda i: ev.shuffle[i], 1.0)),
    }


# ---- per-concept fine-tunes -----------------------------------------------------------------------------

FINETUNE_CONCEPTS = (
    ("dog", "dog"),
    ("cat", "cat"),
    ("teapot", "teapot"),
)  # (DreamBooth folder, initializer / class word)


def _photo_latents(ev: Evaluator, photo: Path, resolution: int, draws: int, seed: int):
    """Draws (noisy, target, t) of one photo: centre square, resized, through the evaluator's VAE."""
    import torch
    from PIL import Image

    from encoders.common.images import to_rgb

    with Image.open(photo) as im:
        image, _ = to_rgb(im)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    g = torch.Generator().manual_seed(seed)
    latents = ev.sd.encode_images(pixels, generator=g)
    return [ev.sd.add_noise(latents, g) for _ in range(draws)]


def _text(pipe, prompt: str):
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return ids, pipe.text_encoder(ids)[0]


def _checkpoint_vector(folder: Path):
    """The word a Textual Inversion / BaTex checkpoint holds (`checkpoint-N/learned_word/`)."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "learned_word" / "diffusion_pytorch_model.safetensors"))
    if "embedding" in weights:  # Textual Inversion's free vector
        return weights["embedding"]
    return weights["weights"] @ weights["basis"]  # BaTex: weights over its vocabulary basis


def _run_finetune(work: Path, method: str, config: str, keys: list[str]) -> Path:
    stage = "infusion" if method.startswith("infusion") else "textual_inversion"
    out = work / method
    command = [
        sys.executable,
        "-m",
        f"training.{stage}",
        "--config",
        str(REPO / f"configs/finetune/{config}.yaml"),
        *keys,
        f"output_dir={out}",
    ]
    with open(work / f"{method}.log", "w") as handle:
        done = subprocess.run(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
    if done.returncode:
        raise SystemExit(f"{method} failed (exit {done.returncode}); see {work / f'{method}.log'}")
    return out


def finetune_results(args, work: Path, common: list[str], ev: Evaluator) -> dict:
    """Textual Inversion, BaTex and Infusion per concept: trained on all photos but the held-out ones
    (every third), evaluated on those; TI / BaTex with the learned token vs. the initializer word they
    start from, at each quarter of training (checkpoints) to see which gets there first; Infusion with
    vs. without its residuals on a class-word prompt, and on a prompt without the class word (where it
    must change nothing); Textual Inversion with the anchor loss vs. without, same seeds: L_anc of the
    final word (how far it sits from its sparse-coded anchors) and its held-out gain."""
    import shutil

    import torch

    from encoders.attention import AttentionContext, restore_default_processors
    from encoders.infusion import InfusionResiduals, dual_stream_call, set_infusion_processors
    from inference.loading import pipeline_from_parts
    from training.textual_inversion import InversionAnchorsConfig

    keys = [
        k
        for k in common
        if not k.startswith(
            (
                "train_shards=",
                "image_encoder_name_or_path=",
                "mapping_hidden_dim=",
                "seed=",
                "data.crop_geometry=",
                "data.min_box",
                "data.max_box",
                "data.clip_size=",
            )
        )
    ]
    pipe = pipeline_from_parts(ev.sd.vae, ev.sd.text_encoder, ev.sd.tokenizer, ev.sd.unet, ev.sd.noise_scheduler)
    restore_default_processors(ev.sd.unet)
    steps = args.steps_finetune
    quarter = max(1, steps // 4)
    checkpoints = [quarter * k for k in range(1, 5) if quarter * k <= steps]  # the trainers' checkpoint-N/
    curves: dict[str, dict[int, list[np.ndarray]]] = {
        m: {c: [] for c in checkpoints} for m in ("textual_inversion", "batex")
    }
    infusion_gain: list[np.ndarray] = []
    anchored_gain: list[np.ndarray] = []
    anchor_pull: list[float] = []  # L_anc(plain word) - L_anc(anchored word), per concept and seed
    anchor_values: list[dict] = []
    untouched = 0.0
    seeds = [args.seed + k for k in range(args.anchor_seeds)]
    regularizer = InversionAnchorsConfig(enabled=True).build_regularizer(pipe.tokenizer, pipe.text_encoder, "cpu")
    sequence_scale = regularizer.sequence_length * pipe.text_encoder.get_input_embeddings().weight.shape[1]
    n_tokens = 0

    def new_token(vector) -> str:
        nonlocal n_tokens
        n_tokens += 1
        token = f"<bench-{n_tokens}>"
        pipe.load_textual_inversion({token: vector.reshape(1, -1).float()}, token=token)
        return token

    for folder, word in FINETUNE_CONCEPTS[: args.finetune_concepts]:
        photos = sorted((DATA / "concepts/dreambooth" / folder).glob("*.jpg"))
        held_out = photos[::EVAL_EVERY]
        train_dir = work / f"concept_{folder}"
        train_dir.mkdir(parents=True, exist_ok=True)
        for photo in photos:
            if photo not in held_out:
                shutil.copy(photo, train_dir / photo.name)
        draws = [
            d
            for k, photo in enumerate(held_out)
            for d in _photo_latents(ev, photo, args.resolution, args.draws, args.seed + k)
        ]
        # one micro-step per update and no CLIPSeg (offline), as when the documented numbers were measured
        concept_keys = [
            *keys,
            f"concept_dir={train_dir}",
            f"max_steps={steps}",
            f"class_word={word}",
            "gradient_accumulation_steps=1",
            "data.soft_masks=none",
        ]
        word_keys = [*concept_keys, f"initializer_token={word}", f"checkpointing_steps={quarter}"]
        batex = ["subspace.enabled=true", "subspace.selection=rank"] + (
            [] if args.base else ["subspace.dim=24"]
        )  # the paper's rank rule, 576 of 768 scaled to 32
        runs = {
            "textual_inversion": _run_finetune(
                work, f"textual_inversion_{folder}", "textual_inversion", [*word_keys, f"seed={args.seed}"]
            ),
            "batex": _run_finetune(work, f"batex_{folder}", "batex", [*word_keys, *batex, f"seed={args.seed}"]),
            "infusion": _run_finetune(work, f"infusion_{folder}", "infusion", [*concept_keys, f"seed={args.seed}"]),
        }
        for seed in seeds:  # the anchor loss on and off, same seed
            plain = (
                runs["textual_inversion"]
                if seed == args.seed
                else _run_finetune(
                    work, f"textual_inversion_{folder}_s{seed}", "textual_inversion", [*word_keys, f"seed={seed}"]
                )
            )
            anchored = _run_finetune(
                work,
                f"textual_inversion_anchors_{folder}_s{seed}",
                "textual_inversion",
                [*word_keys, f"seed={seed}", "anchors.enabled=true", "anchors.mode=sparse"],
            )
            runs[("plain", seed)], runs[("anchored", seed)] = plain, anchored

        def losses(text, kwargs=None, row=None):
            out = []
            with torch.no_grad():
                for noisy, target, t in draws:
                    x, tt = (torch.cat([noisy, noisy]), torch.cat([t, t])) if row is not None else (noisy, t)
                    pred = ev.sd.unet(x, tt, text, cross_attention_kwargs=kwargs).sample
                    pred = pred[row : row + 1] if row is not None else pred
                    out.append(float(((pred - target) ** 2).mean()))
            return np.array(out)

        def gain_of(vector) -> np.ndarray:
            return start - losses(_text(pipe, f"a photo of {new_token(vector)}")[1])

        with torch.no_grad():
            start = losses(_text(pipe, f"a photo of {word}")[1])
            for method in ("textual_inversion", "batex"):
                for step in checkpoints:
                    curves[method][step].append(gain_of(_checkpoint_vector(runs[method] / f"checkpoint-{step}")))
            for seed in seeds:
                plain = _checkpoint_vector(runs[("plain", seed)] / f"checkpoint-{checkpoints[-1]}")
                anchored = _checkpoint_vector(runs[("anchored", seed)] / f"checkpoint-{checkpoints[-1]}")
                l_plain, l_anchored = (float(regularizer(v[None].float())) * sequence_scale for v in (plain, anchored))
                anchor_pull.append(l_plain - l_anchored)
                anchor_values.append(
                    {
                        "concept": folder,
                        "seed": seed,
                        "plain": l_plain,
                        "anchored": l_anchored,
                        "anchors": regularizer.last_code(top=3)[0],
                    }
                )
                anchored_gain.append(gain_of(anchored))
            residuals = InfusionResiduals.from_pretrained(runs["infusion"], subfolder="infusion").eval()
            set_infusion_processors(ev.sd.unet, [residuals])
            for prompt, key in ((f"a photo of a {word}", "with"), ("a photo of a bicycle", "without")):
                _, text = _text(pipe, prompt)
                ctx = AttentionContext(extras={"infusion": dual_stream_call(pipe.tokenizer, [prompt], [residuals])})
                base = losses(torch.cat([text, text]), ctx.as_kwargs(), row=0)
                tuned = losses(torch.cat([text, text]), ctx.as_kwargs(), row=1)
                if key == "with":
                    infusion_gain.append(base - tuned)
                else:
                    untouched = max(untouched, float(np.abs(base - tuned).max()))
            restore_default_processors(ev.sd.unet)

    final = checkpoints[-1]
    curve = {m: {step: bootstrap(np.concatenate(g)) for step, g in by_step.items()} for m, by_step in curves.items()}
    ti_final = curve["textual_inversion"][final]["mean"]
    reached = [step for step in checkpoints if curve["batex"][step]["mean"] >= ti_final]
    return {
        "textual_inversion_token_vs_initializer": curve["textual_inversion"][final],
        "batex_token_vs_initializer": curve["batex"][final],
        "batex_minus_textual_inversion": bootstrap(
            np.concatenate(curves["batex"][final]) - np.concatenate(curves["textual_inversion"][final])
        ),
        "curve": {m: {str(step): r for step, r in by_step.items()} for m, by_step in curve.items()},
        "batex_steps_to_textual_inversion_final": reached[0] if reached else None,
        "infusion_with_vs_without_residuals": bootstrap(np.concatenate(infusion_gain)),
        "infusion_no_class_word_max_abs_change": untouched,
        "anchor_pull": bootstrap(np.array(anchor_pull)),
        "anchor_relative_pull": float(np.mean([1 - v["anchored"] / v["plain"] for v in anchor_values])),
        "anchor_values": anchor_values,
        "anchored_token_vs_initializer": bootstrap(np.concatenate(anchored_gain)),
        "steps": steps,
        "checkpoints": checkpoints,
        "anchor_seeds": seeds,
        "concepts": [c for c, _ in FINETUNE_CONCEPTS[: args.finetune_concepts]],
    }


# ---- the run --------------------------------------------------------------------------------------------


def run(args) -> dict:
    from training.crop_data import STORED_CROP_KEYS

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_learning_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.world:
        sd, image_encoder, train_spec, eval_spec = build_world_inputs(
            work, args.world_models, args.world_train_images, args.world_eval_images
        )
    else:
        sd, image_encoder, train_spec, eval_spec = build_inputs(work, args.base, args.image_encoder, args.resolution)
    eval_spec = args.eval_shards or eval_spec
    common = [
        f"pretrained_model_name_or_path={sd}",
        f"image_encoder_name_or_path={image_encoder}",
        f"train_shards={train_spec}",
        f"data.resolution={args.resolution}",
        f"train_batch_size={args.batch}",
        "gradient_accumulation_steps=1",
        "scale_lr=false",
        "mixed_precision=no",
        *STORED_CROP_KEYS,
        "report_to=none",
        "validation_steps=0",
        "dataloader_num_workers=0",
        f"seed={args.seed}",
        *([] if args.base else ["mapping_hidden_dim=256"]),  # the paper's 1024 for real models
        *([f"data.clip_size={_image_size(image_encoder)}"] if args.world else []),
    ]
    timings = {}
    ev = Evaluator(
        sd,
        image_encoder,
        eval_spec,
        args.draws,
        args.seed,
        args.resolution,
        _image_size(image_encoder) if args.world else 224,
    )
    results: dict = {"stage1": None, "stage2": {}}
    if "elite" in args.parts:
        elite_results(args, work, common, ev, results, timings)
    if "ip_adapter" in args.parts:
        tick = time.time()
        results["ip_adapter"] = ip_adapter_results(args, work, ev, sd, train_spec)
        timings["ip_adapter_s"] = round(time.time() - tick, 1)
    if "finetunes" in args.parts and args.finetune_concepts:
        tick = time.time()
        results["finetunes"] = finetune_results(args, work, common, ev)
        timings["finetunes_s"] = round(time.time() - tick, 1)
    results["settings"] = {
        "steps_global": args.steps_global,
        "steps_local": args.steps_local,
        "lr_global": args.lr_global,
        "lr_local": args.lr_local,
        "draws_per_crop": args.draws,
        "held_out_crops": ev.count,
        "parts": args.parts,
        "eval_shards": eval_spec,
        "train_shards": train_spec,
        "resolution": args.resolution,
        "batch": args.batch,
        "seed": args.seed,
        "world": bool(args.world),
        "base": sd,
        "image_encoder": image_encoder,
    }
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    results["seconds"] = {**timings, "total": round(time.time() - started, 1)}
    return results


def elite_results(args, work: Path, common: list[str], ev: Evaluator, results: dict, timings: dict) -> None:
    """Both ELITE stages (and each stage-2 option) trained and evaluated; fills `results`."""
    tick = time.time()
    # the initialisation: one step at a learning rate too small to move any weight
    untrained = train(
        "global_mapping", work / "global_0", [*common, "max_steps=1", "learning_rate=1e-12"], work / "global_0.log"
    )
    stage1 = train(
        "global_mapping",
        work / "global",
        [*common, f"max_steps={args.steps_global}", f"learning_rate={args.lr_global}"],
        work / "global.log",
    )
    timings["train_global_s"] = round(time.time() - tick, 1)
    g0, g1 = evaluate_global(ev, untrained), evaluate_global(ev, stage1)
    results.update(
        {
            "stage1": {
                "trained": {
                    "own_vs_shuffled": bootstrap(g1["shuffled"] - g1["own"]),
                    "own_vs_class_word": bootstrap(g1["class_word"] - g1["own"]),
                    "mean_loss_own": float(g1["own"].mean()),
                },
                "untrained": {
                    "own_vs_shuffled": bootstrap(g0["shuffled"] - g0["own"]),
                    "own_vs_class_word": bootstrap(g0["class_word"] - g0["own"]),
                    "mean_loss_own": float(g0["own"].mean()),
                },
                "trained_vs_untrained_own": bootstrap(g0["own"] - g1["own"]),
            },
            "stage2": {},
        }
    )
    local_keys = [
        *common,
        f"global_mapping_path={stage1}",
        f"max_steps={args.steps_local}",
        f"learning_rate={args.lr_local}",
    ]
    tick = time.time()
    reference = train("local_mapping", work / "local", local_keys, work / "local.log")
    timings["train_local_s"] = round(time.time() - tick, 1)
    ref = evaluate_local(ev, reference)
    results["stage2"]["reference"] = {
        "own_vs_off": bootstrap(ref["off"] - ref["own"]),
        "own_vs_shuffled": bootstrap(ref["shuffled"] - ref["own"]),
        "mean_loss_own": float(ref["own"].mean()),
    }
    if "multiphoto" in args.parts:
        results["multiphoto"] = multiphoto_results(args, reference, ev)
    if args.world:
        sd = next(k.split("=", 1)[1] for k in common if k.startswith("pretrained_model_name_or_path="))
        identity = identity_results(reference, sd, Path(sd).parent, objects=args.identity_objects)
        pictures = identity.pop("_pictures")
        results["identity"] = identity
        _identity_sheet(pictures, Path(args.out).with_name(Path(args.out).stem + "_identity.png"))
    if args.options == "all":
        for name, keys in OPTIONS:
            folder = train(
                "local_mapping",
                work / f"local_{len(results['stage2'])}",
                [*local_keys, *keys],
                work / f"local_{len(results['stage2'])}.log",
            )
            opt = evaluate_local(ev, folder)
            results["stage2"][name] = {
                "own_vs_off": bootstrap(opt["off"] - opt["own"]),
                "own_vs_shuffled": bootstrap(opt["shuffled"] - opt["own"]),
                "mean_loss_own": float(opt["own"].mean()),
                "vs_reference": bootstrap(opt["own"] - ref["own"]),  # < 0: the option denoises better
            }


def held_out_objects(objects: int):
    """(shape, colour, pattern, photo, mask, other background) for `objects` held-out world objects: each a
    triple no model saw, rendered on one background, to be generated on another (not its own colour)."""
    from PIL import Image

    from data_prep.world import BACKGROUNDS, HELD_OUT_TRIPLES, render_object

    rng = np.random.default_rng(11)
    for k in range(objects):
        shape, colour, pattern = HELD_OUT_TRIPLES[k % len(HELD_OUT_TRIPLES)]
        source_bg, target_bg = rng.choice([b for b in BACKGROUNDS if b not in (colour,)], 2, replace=False)
        photo = render_object(shape, colour, pattern, str(source_bg), seed=100 + k)
        mask = Image.fromarray(photo.objects[0].mask.astype(np.uint8) * 255, "L")
        yield shape, colour, pattern, photo.image, mask, str(target_bg)


IDENTITY_GROUPS = ("shape", "colour", "pattern", "background")


def identity_chance() -> dict:
    from data_prep.world import BACKGROUNDS, COLOURS, PATTERNS, SHAPES

    sizes = {"shape": len(SHAPES), "colour": len(COLOURS), "pattern": len(PATTERNS), "background": len(BACKGROUNDS)}
    return {g: 1 / sizes[g] for g in IDENTITY_GROUPS}


def identity_rates(classifier, images, truths) -> dict:
    """How often the world classifier reads each attribute of `truths` in `images`, with bootstrap intervals."""
    readings = classifier.read(images)
    hits = {g: np.array([r[g] == t[g] for r, t in zip(readings, truths)], dtype=float) for g in IDENTITY_GROUPS}
    return {
        g: {
            "rate": float(h.mean()),
            "ci95": [
                float(v) for v in np.percentile(np.random.default_rng(0).choice(h, (4000, h.size)).mean(1), [2.5, 97.5])
            ],
        }
        for g, h in hits.items()
    }


def ip_adapter_identity(
    export: Path,
    sd: str,
    models: Path,
    objects: int = 16,
    seeds: int = 2,
    steps: int = 25,
    guidance: float = 4.0,
    scales=(1.0, 0.5),
) -> dict:
    """`identity_results` for an IP-Adapter: a stock pipeline with `load_ip_adapter`, each held-out object's photo
    as the image prompt and "a photo of a star on a green background" as the text, at each image-prompt scale;
    the class word alone (scale 0) as the reference."""
    import sys

    import torch
    from diffusers import StableDiffusionPipeline

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_world import WorldClassifier

    classifier = WorldClassifier(models / "classifier")
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(export), subfolder="ip_adapter", weight_name="ip_adapter.safetensors")
    images = {scale: [] for scale in (*scales, 0.0)}
    truths, photos = [], []
    for shape, colour, pattern, photo, _mask, target_bg in held_out_objects(objects):
        photos.append(photo)
        for seed in range(seeds):
            for scale in images:
                pipe.set_ip_adapter_scale(scale)
                out = pipe(
                    f"a photo of a {shape} on a {target_bg} background",
                    ip_adapter_image=photo,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed),
                )
                images[scale].append(out.images[0])
            truths.append({"shape": shape, "colour": colour, "pattern": pattern, "background": target_bg})
    return {
        **{f"scale_{scale:g}": identity_rates(classifier, imgs, truths) for scale, imgs in images.items() if scale},
        "class_word": identity_rates(classifier, images[0.0], truths),
        "chance": identity_chance(),
        "images": len(truths),
        "steps": steps,
        "guidance": guidance,
        "_pictures": (photos[:8], images[scales[0]][: 8 * seeds : seeds], images[0.0][: 8 * seeds : seeds]),
    }


def identity_results(
    encoders: Path,
    sd: str,
    models: Path,
    objects: int = 16,
    seeds: int = 2,
    steps: int = 25,
    guidance: float = 4.0,
    elite_scale: float = 0.6,
) -> dict:
    """Identity in generation on the world: each held-out object (a shape x colour x pattern triple no model
    saw) is encoded from one photo and generated on another background ("a photo of S* on a green
    background"); the world's classifier reads shape, colour and pattern of the result. The same with
    the class word alone ("a photo of a star on a green background") and chance, for comparison."""
    import sys

    import torch

    from inference.pipeline import ElitePipeline

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_world import WorldClassifier

    classifier = WorldClassifier(models / "classifier")
    elite = ElitePipeline.from_pretrained(
        sd, encoders=str(encoders), device="cpu", dtype=torch.float32, safety_checker=False
    )
    elite.pipe.set_progress_bar_config(disable=True)
    truths, with_concept, with_class, photos = [], [], [], []
    for shape, colour, pattern, photo, mask, target_bg in held_out_objects(objects):
        photos.append(photo)
        concept = elite.encode_concept(photo, mask)
        for seed in range(seeds):
            out = elite(
                f"a photo of S* on a {target_bg} background",
                concepts=concept,
                elite_scale=elite_scale,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
            )
            with_concept.append(out.images[0])
            plain = elite(
                f"a photo of a {shape} on a {target_bg} background",
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
            )
            with_class.append(plain.images[0])
            truths.append({"shape": shape, "colour": colour, "pattern": pattern, "background": target_bg})
    return {
        "elite": identity_rates(classifier, with_concept, truths),
        "class_word": identity_rates(classifier, with_class, truths),
        "chance": identity_chance(),
        "images": len(truths),
        "elite_scale": elite_scale,
        "steps": steps,
        "guidance": guidance,
        "_pictures": (photos[:8], with_concept[: 8 * seeds : seeds], with_class[: 8 * seeds : seeds]),
    }


def _identity_sheet(pictures, path: Path) -> None:
    """One row per entry of `pictures`, in order: (the source photos,) generated with the held-out object,
    generated with its class word alone."""
    from PIL import Image

    columns = len(pictures[0])
    sheet = Image.new("RGB", (columns * 132, len(pictures) * 134 - 6), "white")
    for r, row in enumerate(pictures):
        for c, image in enumerate(row):
            sheet.paste(image.resize((128, 128), Image.NEAREST), (c * 132, r * 134))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


MULTIPHOTO_CONCEPTS = ("backpack", "berry_bowl", "cat", "dog", "pink_sunglasses", "teapot")


def multiphoto_results(args, encoders: Path, ev: Evaluator) -> dict:
    """Several photos of one concept vs one: each DreamBooth photo in turn is the target (its held-out
    denoising loss on "a photo of S*"), the concept's other photos the input; one photo = the mean
    loss over the other photos each encoded alone, several = all of them through `encode_photos`
    (w0 averaged, local tokens side by side), paired by draw. Whole photos, no masks (the folders
    have none); lambda 1 and 0 (the global word alone: what averaging w0 does)."""
    import torch

    from encoders.attention import restore_default_processors, set_elite_processors
    from encoders.conditioning import elite_conditioning
    from inference.encoding import encode_photos
    from inference.loading import load_encoders

    enc = load_encoders(encoders, device="cpu", dtype="float32")
    set_elite_processors(ev.sd.unet, enc.global_mapping, enc.local_mapping)
    tok = ev.sd.tokenizer
    ids = tok("a photo of S*", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    diffs: dict[float, list[np.ndarray]] = {1.0: [], 0.0: []}

    def losses(concept, draws, scale) -> np.ndarray:
        c = elite_conditioning(
            ev.sd.text_encoder,
            ids,
            [ev.placeholder_id],
            [concept.w0.view(1, 1, -1)],
            local=[(concept.local_tokens[None], concept.local_keep[None])],
            scale=scale,
        )
        with torch.no_grad():
            return np.array(
                [
                    float(
                        (
                            (
                                ev.sd.unet(
                                    noisy, t, c.prompt_embeds, cross_attention_kwargs=c.context.as_kwargs()
                                ).sample
                                - target
                            )
                            ** 2
                        ).mean()
                    )
                    for noisy, target, t in draws
                ]
            )

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no mask: the whole photo" for every photo
        for name in MULTIPHOTO_CONCEPTS:
            photos = sorted((DATA / "concepts/dreambooth" / name).glob("*.jpg"))
            singles = {p: encode_photos(enc, p) for p in photos}
            for k, target in enumerate(photos):
                others = [p for p in photos if p != target]
                draws = _photo_latents(ev, target, args.resolution, args.draws, args.seed + 1000 + k)
                several = encode_photos(enc, others)
                for scale in diffs:
                    one = np.mean([losses(singles[p], draws, scale) for p in others], axis=0)
                    diffs[scale].append(one - losses(several, draws, scale))
    restore_default_processors(ev.sd.unet)
    return {
        "several_vs_one": bootstrap(np.concatenate(diffs[1.0])),
        "several_vs_one_global_only": bootstrap(np.concatenate(diffs[0.0])),
        "concepts": list(MULTIPHOTO_CONCEPTS),
        "targets": sum(len(list((DATA / "concepts/dreambooth" / n).glob("*.jpg"))) for n in MULTIPHOTO_CONCEPTS),
    }


def table(results: dict) -> str:
    def row(name, r):
        lo, hi = r["ci95"]
        return f"| {name} | {r['mean']:+.5f} | [{lo:+.5f}, {hi:+.5f}] | {'yes' if r['excludes_zero'] else 'no'} |"

    s1, s2 = results["stage1"], results["stage2"]
    lines = [
        "| comparison (loss of the worse - loss of own; > 0: own helps) | mean | 95 % CI | excludes 0 |",
        "|---|---|---|---|",
    ]
    if s1:
        lines += [
            row("stage 1 trained: shuffled w0 - own w0", s1["trained"]["own_vs_shuffled"]),
            row("stage 1 trained: class word - own w0", s1["trained"]["own_vs_class_word"]),
            row("stage 1 untrained: shuffled w0 - own w0", s1["untrained"]["own_vs_shuffled"]),
            row("stage 1: untrained own - trained own", s1["trained_vs_untrained_own"]),
        ]
    for name, r in s2.items():
        lines.append(row(f"stage 2 {name}: lambda 0 - lambda 1", r["own_vs_off"]))
        lines.append(row(f"stage 2 {name}: shuffled tokens - own tokens", r["own_vs_shuffled"]))
        if "vs_reference" in r:
            lines.append(row(f"stage 2 {name} - reference (own tokens; < 0: option better)", r["vs_reference"]))
    ip = results.get("ip_adapter")
    if ip:
        lines += [
            row("IP-Adapter trained: shuffled image - own image", ip["trained"]["own_vs_shuffled"]),
            row("IP-Adapter trained: no image - own image", ip["trained"]["own_vs_no_image"]),
            row("IP-Adapter untrained: shuffled image - own image", ip["untrained"]["own_vs_shuffled"]),
            row("IP-Adapter: untrained own - trained own", ip["trained_vs_untrained_own"]),
        ]
    m = results.get("multiphoto")
    if m:
        lines.append(row("several photos vs one (one photo's loss - several's), lambda 1", m["several_vs_one"]))
        lines.append(row("several photos vs one, global word only (lambda 0)", m["several_vs_one_global_only"]))
    f = results.get("finetunes")
    if f:
        lines.append(
            row("Textual Inversion: initializer word - learned token", f["textual_inversion_token_vs_initializer"])
        )
        lines.append(row("BaTex: initializer word - learned token", f["batex_token_vs_initializer"]))
        lines.append(row("BaTex gain - Textual Inversion gain (same steps)", f["batex_minus_textual_inversion"]))
        for method, by_step in f.get("curve", {}).items():
            for step, r in by_step.items():
                lines.append(row(f"{method} after {step} steps: initializer word - learned token", r))
        if "curve" in f:
            reached = f["batex_steps_to_textual_inversion_final"]
            lines.append(
                f"| BaTex reaches Textual Inversion's final gain after | "
                f"{reached if reached is not None else 'not within ' + str(f['steps'])} steps | | |"
            )
        if "anchor_pull" in f:
            lines.append(row("anchors: L_anc (x 77 D) of the plain word - of the anchored word", f["anchor_pull"]))
            lines.append(f"| anchors: relative drop of L_anc | {f['anchor_relative_pull']:.1%} | | |")
            lines.append(
                row("anchored Textual Inversion: initializer word - learned token", f["anchored_token_vs_initializer"])
            )
        lines.append(
            row("Infusion: without - with residuals (class-word prompt)", f["infusion_with_vs_without_residuals"])
        )
        lines.append(
            "| Infusion on a prompt without the class word: largest change | "
            f"{f['infusion_no_class_word_max_abs_change']:.2e} | | |"
        )
    ident = results.get("identity")
    if ident:
        lines += [
            "",
            f"Identity in generation ({ident['images']} images of held-out objects on new backgrounds; "
            "the world classifier's reading):",
            "",
            "| attribute kept | S* (encoded photo) | class word alone | chance |",
            "|---|---|---|---|",
        ]
        for g in ("shape", "colour", "pattern", "background"):
            e, c = ident["elite"][g], ident["class_word"][g]
            lines.append(
                f"| {g} | {e['rate']:.0%} [{e['ci95'][0]:.0%}, {e['ci95'][1]:.0%}] | "
                f"{c['rate']:.0%} [{c['ci95'][0]:.0%}, {c['ci95'][1]:.0%}] | {ident['chance'][g]:.0%} |"
            )
    ip_ident = (results.get("ip_adapter") or {}).get("identity")
    if ip_ident:
        scales = [k for k in ip_ident if k.startswith("scale_")]
        lines += [
            "",
            f"IP-Adapter identity in generation ({ip_ident['images']} images, the photo as image prompt):",
            "",
            "| attribute kept | "
            + " | ".join(f"image prompt, {k.replace('_', ' ')}" for k in scales)
            + " | class word alone | chance |",
            "|---|" + "---|" * (len(scales) + 2),
        ]

        def cell(r):
            return f"{r['rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]"

        for g in IDENTITY_GROUPS:
            cells = [cell(ip_ident[k][g]) for k in scales] + [cell(ip_ident["class_word"][g])]
            lines.append(f"| {g} | " + " | ".join(cells) + f" | {ip_ident['chance'][g]:.0%} |")
    return "\n".join(lines)


def _image_size(image_encoder: str) -> int:
    return int(json.loads((Path(image_encoder) / "config.json").read_text())["image_size"])


def world_available() -> bool:
    """Whether the trained world ships with this checkout (then `--world` is the default)."""
    try:
        from encoders.world import check_assets

        check_assets()
    except Exception:  # not shipped, or damaged: the tiny random bundle as before
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--eval-shards", default=None, help="held-out crop shards (default: the split made here)")
    parser.add_argument("--steps-global", type=int, default=300)
    parser.add_argument("--steps-local", type=int, default=300)
    parser.add_argument("--lr-global", type=float, default=1e-3)
    parser.add_argument("--lr-local", type=float, default=1e-3)
    parser.add_argument("--draws", type=int, default=8, help="(noise, timestep) draws per held-out crop")
    parser.add_argument("--options", choices=("all", "none"), default="all", help="also train each stage-2 option")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parts",
        default="elite,finetunes",
        help="what to train and measure: elite, multiphoto (with elite), ip_adapter, finetunes",
    )
    parser.add_argument("--steps-ip", type=int, default=1000, help="IP-Adapter training steps (--parts ip_adapter)")
    parser.add_argument("--lr-ip", type=float, default=1e-4, help="IP-Adapter learning rate (official: 1e-4)")
    parser.add_argument("--steps-finetune", type=int, default=100, help="steps of each per-concept fine-tune")
    parser.add_argument(
        "--anchor-seeds", type=int, default=2, help="seeds of the anchored / plain Textual Inversion pairs"
    )
    parser.add_argument(
        "--finetune-concepts", type=int, default=2, help="DreamBooth concepts for the fine-tunes (0: skip)"
    )
    parser.add_argument("--base", default=None, help="a Stable Diffusion folder / Hub id instead of the tiny one")
    parser.add_argument("--image-encoder", default=None, help="a CLIP vision folder / Hub id (with --base)")
    parser.add_argument("--resolution", type=int, default=64, help="training and evaluation resolution")
    parser.add_argument("--batch", type=int, default=4, help="training batch of both ELITE stages and the fine-tunes")
    world = parser.add_mutually_exclusive_group()
    world.add_argument(
        "--world",
        dest="world",
        action="store_true",
        default=None,
        help="on the trained miniature world (default when it ships): its models, crops of its train "
        "split to train, of its held-out triples to measure",
    )
    world.add_argument(
        "--no-world", dest="world", action="store_false", help="on the random tiny bundle and the bundled photos"
    )
    parser.add_argument("--world-models", default=None, help="a world models folder (default: the shipped ones)")
    parser.add_argument("--world-train-images", type=int, default=3000)
    parser.add_argument("--world-eval-images", type=int, default=100)
    parser.add_argument(
        "--identity-objects", type=int, default=16, help="world: held-out objects generated for identity"
    )
    args = parser.parse_args(argv)
    if args.world is None:
        args.world = args.base is None and world_available()
    if args.world and "finetunes" in args.parts:
        args.parts = ",".join(p for p in args.parts.split(",") if p != "finetunes")
        print("note: --world measures the ELITE stages; the fine-tunes part runs on the DreamBooth photos (--no-world)")
    results = run(args)
    print(table(results))
    path = write_results(results, args.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
