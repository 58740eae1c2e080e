"""Concept photos for the per-concept fine-tunes, and the task skeleton they share.

Textual Inversion / BaTex and Infusion learn from the same thing: 3-5 photos of one object, each
shown with a neutral caption from CLIP's ImageNet templates ("a photo of a {}"), horizontally flipped
at random, optionally with a mask that restricts the loss to the object. This module holds:

- `FinetuneConfig`: the keys every fine-tune takes on top of `TrainConfig` (`concept_dir`,
  `placeholder_token`, `initializer_token`, `class_word`; resolution, flips, masks...).
- `load_concept_photos`: the photos (and masks) of a folder as square tensors; unreadable files are
  skipped with a warning that names them, an empty folder is an error that names it.
- `ConceptBatches`: an endless, seeded stream of dict batches (photo index, flip, caption) that
  replays identically after a resume.
- `ConceptFinetuneTask`: a `training.loop.TrainingTask` that loads the frozen Stable Diffusion, caches
  the VAE posterior of every photo (and its mirror image) once, draws latents/noise/timesteps and
  computes the masked epsilon loss. A method supplies only its trainable model, how the noise is
  predicted with it, and how it exports and samples (`training.textual_inversion`, `training.infusion`).
"""

from __future__ import annotations

import logging
import os
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image, ImageOps
from torch import nn

from encoders.common.config import ConfigError, keyed_field
from encoders.common.finetune_folder import write_concept_info
from encoders.common.images import find_mask, list_photos
from inference.inputs import ConceptInputError, load_concept_image

from .common_config import TrainConfig
from .diffusion import FrozenStableDiffusion, denoising_loss
from .export import card_header, copy_samples, describe_source
from .loop import TrainingTask
from .shard_reader import mix_seed
from .templates import TEMPLATES

logger = logging.getLogger(__name__)
# A mask pixel is object where any channel is above this: the same rule as `inference encode` (official ELITE: not
# black),
# so 0/1-valued masks work in both.
MASK_THRESHOLD = 0


@dataclass
class ConceptDataConfig:
    """How the concept photos become training samples; fine-tunes nest it as `data` (`data.resolution=64`)."""

    resolution: int | None = keyed_field(
        "training image size in pixels (square); default: the base model's own size (UNet sample size x VAE factor)",
        None,
    )
    center_crop: bool = keyed_field(
        "crop non-square photos to their centre square before resizing; false (diffusers' and the official "
        "scripts' default): squash the whole photo to the square",
        False,
    )
    num_photos: int | None = keyed_field(
        "train on the first N photos only, sorted by name (ELITE's baselines: 1, the photo its encoder sees)", None
    )
    flip_p: float = keyed_field("probability of a horizontal flip per sample", 0.5)
    templates: str = keyed_field("caption templates: object, style or imagenet (training.templates)", "object")
    mask_dir: str | None = keyed_field(
        "folder of concept masks named like the photos (<stem>.png); default <concept_dir>/masks when present", None
    )
    use_masks: bool = keyed_field("weight the loss by the mask of each photo that has one", True)
    soft_masks: str | None = keyed_field(
        "CLIPSeg folder or Hub id: a soft object mask (CLIPSeg's probabilities, prompted with the class word) for "
        "every photo without a mask file, as Infusion's soft_segment.py; none: off",
        None,
    )
    mask_average: Literal["mask", "image"] = keyed_field(
        "the masked error per sample: mask = averaged over the mask's weight (object pixels only); image = averaged "
        "over all pixels (Infusion's code)",
        "mask",
    )

    def __post_init__(self) -> None:
        if self.templates not in TEMPLATES:
            raise ConfigError(f"data.templates must be one of {', '.join(TEMPLATES)}, got {self.templates!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ConfigError(f"data.flip_p must be within [0, 1], got {self.flip_p}")
        if isinstance(self.soft_masks, str) and self.soft_masks.strip().lower() in ("", "none", "null", "false"):
            self.soft_masks = None
        if self.mask_average not in ("mask", "image"):
            raise ConfigError(f"data.mask_average must be mask or image, got {self.mask_average!r}")
        if self.num_photos is not None and self.num_photos < 1:
            raise ConfigError(f"data.num_photos must be at least 1 (or unset for all), got {self.num_photos}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"data.resolution must be a positive multiple of 8, got {self.resolution}")


@dataclass
class FinetuneConfig(TrainConfig):
    """Keys shared by the per-concept fine-tunes (Textual Inversion / BaTex, Infusion)."""

    # the photo settings used to be top-level keys; they are `data.*` as in the ELITE trainers
    CONFIG_ALIASES: ClassVar[dict[str, str]] = {
        name: f"data.{name}"
        for name in (
            "resolution",
            "center_crop",
            "flip_p",
            "templates",
            "mask_dir",
            "use_masks",
            "num_photos",
            "soft_masks",
            "mask_average",
        )
    }

    concept_dir: str = keyed_field("folder with the 3-5 photos of the concept (jpg/png/webp)", "")
    placeholder_token: str = keyed_field("the new word that will stand for the concept (Textual Inversion)", "S*")
    initializer_token: str = keyed_field("a coarse one-token word the embedding starts from (e.g. dog)", "")
    class_word: str = keyed_field(
        "the concept's class noun (e.g. cat): Infusion's token; evaluation replaces S* by it for CLIP-T", ""
    )
    data: ConceptDataConfig = keyed_field(
        "how the photos become samples (data.resolution, data.flip_p, ...)", factory=ConceptDataConfig
    )
    validation_prompt: str = keyed_field(
        "validation caption; {} is replaced by the concept's phrase", "a photo of a {} on the beach"
    )
    num_validation_images: int = keyed_field("images rendered per validation", 2)
    validation_inference_steps: int = keyed_field("sampling steps for validation images", 25)
    validation_guidance_scale: float = keyed_field("classifier-free guidance for validation images", 7.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.concept_dir:
            raise ConfigError("concept_dir is required: the folder with the photos of the concept")

    @property
    def resolved_export_dir(self) -> str:
        """Fine-tunes export into `output_dir` itself (learned_embeds.safetensors next to the run)."""
        return self.export_dir or self.output_dir


# --------------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------------


@dataclass
class ConceptPhotos:
    """The usable photos of a concept: `pixels` [N, 3, R, R] in [-1, 1], `masks` [N, 1, R, R] in {0, 1}."""

    files: list[Path]
    pixels: torch.Tensor
    masks: torch.Tensor | None  # None when no photo has a mask
    has_mask: torch.Tensor  # [N] bool
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.files)


def _square(image, resolution: int, center_crop: bool, resample):

    if center_crop and image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), resample)


def load_concept_photos(
    concept_dir: str | os.PathLike,
    resolution: int,
    center_crop: bool = True,
    mask_dir: str | os.PathLike | None = None,
    use_masks: bool = True,
    num_photos: int | None = None,
) -> ConceptPhotos:
    """Read every photo (EXIF-rotated, RGB) and its optional mask, as square tensors at `resolution`.

    Photos and masks are found by the project's one rule (`encoders.common.images`: mask files are not
    photos; `<mask_dir>/NAME.png`, `<concept_dir>/masks/NAME.png`, `NAME.mask.png`, `NAME_bg.png`...).
    """
    folder = Path(concept_dir)
    files = list_photos(folder)[:num_photos]
    mask_root = Path(mask_dir) if mask_dir is not None else None
    if mask_root is not None and not mask_root.is_dir():
        raise FileNotFoundError(f"mask_dir {mask_root} is not a folder")

    kept, pixels, masks, has_mask, skipped = [], [], [], [], []
    for path in files:
        mask_file = find_mask(path, mask_root) if use_masks else None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # the one reader of `encode`: EXIF turn, alpha cut-outs, masks of any mode (0/1 too), size checks
                concept = load_concept_image(path, mask_file, mask_threshold=MASK_THRESHOLD)
        except ConceptInputError as err:
            if mask_file is not None and str(mask_file) in str(err):
                raise ValueError(f"mask {mask_file} for {path}: {err}") from err
            warnings.warn(f"skipping concept photo {path}: {err}", stacklevel=2)
            skipped.append(str(path))
            continue
        for note in caught:  # a resized mask, a mask beside an alpha channel: said once, as encode says it
            if concept.mask_source != "whole image":
                warnings.warn(str(note.message), note.category, stacklevel=2)
        array = np.asarray(_square(concept.image, resolution, center_crop, Image.BICUBIC), dtype=np.float32)
        pixels.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
        masked = use_masks and concept.mask_source != "whole image"
        mask = torch.ones(1, resolution, resolution)
        if masked:
            mask_array = np.asarray(_square(concept.mask, resolution, center_crop, Image.NEAREST), dtype=np.float32)
            mask = torch.from_numpy(mask_array > 127).float()[None]
            if mask.sum() == 0:
                raise ValueError(
                    f"mask {concept.mask_source} for {path} holds no object pixel inside the "
                    f"{'centre crop' if center_crop else 'photo'}"
                )
        masks.append(mask)
        has_mask.append(masked)
        kept.append(path)
    if not kept:
        raise ValueError(f"concept_dir {folder}: none of its {len(files)} images could be read")
    if len(kept) < 3:
        logger.warning("concept_dir %s has %d usable photo(s); the methods are made for 3-5", folder, len(kept))
    any_mask = any(has_mask)
    return ConceptPhotos(
        files=kept,
        pixels=torch.stack(pixels),
        masks=torch.stack(masks) if any_mask else None,
        has_mask=torch.tensor(has_mask, dtype=torch.bool),
        skipped=skipped,
    )


class ConceptBatches:
    """Endless batches over a concept's photos: shuffled epochs, random flips, random captions.

    Sample position p is photo `perm_e[p % N]` of epoch e = p // N (each epoch's permutation seeded by
    (seed, e)); the flips and captions of batch b are seeded by (seed, b). So the stream is a function of
    the seed and the batch number: `load_state_dict` restarts it at any batch without replaying. Each
    batch: `index` [B] long, `flip` [B] bool, `prompt` list of B captions.
    """

    def __init__(
        self, num_photos: int, batch_size: int, phrase: str, templates: Sequence[str], flip_p: float, seed: int
    ):
        self.num_photos = num_photos
        self.batch_size = batch_size
        self.phrase = phrase
        self.templates = list(templates)
        self.flip_p = flip_p
        self.seed = seed
        self.batches = 0  # batches handed out so far: the stream's position
        self._perm: tuple[int, list[int]] | None = None

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def _photo(self, position: int) -> int:
        epoch = position // self.num_photos
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5045))
            self._perm = (epoch, torch.randperm(self.num_photos, generator=g).tolist())
        return self._perm[1][position % self.num_photos]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        b = self.batches
        index = torch.tensor([self._photo(b * self.batch_size + j) for j in range(self.batch_size)])
        g = torch.Generator().manual_seed(mix_seed(self.seed, b, 0x4241))
        flip = torch.rand(self.batch_size, generator=g) < self.flip_p
        picks = torch.randint(len(self.templates), (self.batch_size,), generator=g).tolist()
        prompts = [self.templates[i].format(self.phrase) for i in picks]
        self.batches = b + 1
        return {"index": index, "flip": flip, "prompt": prompts}


# --------------------------------------------------------------------------------------------------
# The shared task
# --------------------------------------------------------------------------------------------------


class ConceptFinetuneTask(TrainingTask):
    """A per-concept fine-tune on the shared loop: frozen SD + concept photos + masked epsilon loss.

    Subclasses implement `build_trainable`, `trainable_models`, `concept_phrase`, `predict_noise`,
    `sample` (validation pictures) and `export`; `regularize` may add a term to the loss.
    """

    config: FinetuneConfig

    def setup(self, accelerator, weight_dtype: torch.dtype) -> None:
        config = self.config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype
        try:
            list_photos(config.concept_dir)  # a mistyped concept_dir stops here, before any model loads
        except (FileNotFoundError, NotADirectoryError) as err:
            raise ConfigError(f"concept_dir: {err}") from None
        self.sd = FrozenStableDiffusion.load(
            config.pretrained_model_name_or_path,
            self.device,
            weight_dtype,
            config.gradient_checkpointing,
            allow_sdxl=self.supports_sdxl,
        )
        if config.data.resolution is None:  # as diffusers' pipelines do: the size the base model was made for
            sample = self.sd.unet.config.sample_size
            config.data.resolution = int(sample if isinstance(sample, int) else max(sample)) * self.sd.vae_scale_factor
            accelerator.print(
                f"[{self.name}] data.resolution not given: {config.data.resolution} px, the base model's size"
            )
        self.photos = load_concept_photos(
            config.concept_dir,
            config.data.resolution,
            config.data.center_crop,
            config.data.mask_dir,
            config.data.use_masks,
            config.data.num_photos,
        )
        if config.data.soft_masks and config.data.use_masks:
            self._add_soft_masks(config.data.soft_masks, config.class_word or config.initializer_token)
        accelerator.print(
            f"[{self.name}] {len(self.photos)} photos from {config.concept_dir}"
            f"{f', {int(self.photos.has_mask.sum())} with masks' if self.photos.masks is not None else ''}"
            f"{f', skipped {len(self.photos.skipped)}' if self.photos.skipped else ''}"
        )
        self._cache_latents()
        self.build_trainable()

    def _add_soft_masks(self, model: str, prompt: str) -> None:
        """CLIPSeg's soft mask (object probability per pixel) for every photo without a mask file, squared as the
        photos are (Infusion's soft masks); photos with a mask file keep theirs."""
        from inference.masking import AutoMasker

        if not prompt:
            raise ConfigError("data.soft_masks prompts CLIPSeg with the class word: give class_word=")
        missing = [k for k, has in enumerate(self.photos.has_mask.tolist()) if not has]
        if not missing:
            return
        masker = AutoMasker.from_pretrained(model, device=self.device)
        resolution, crop = self.config.data.resolution, self.config.data.center_crop
        masks = self.photos.masks
        if masks is None:
            masks = torch.ones(len(self.photos), 1, resolution, resolution)
        for k in missing:
            with Image.open(self.photos.files[k]) as photo:
                photo = ImageOps.exif_transpose(photo).convert("RGB")
            soft = Image.fromarray(masker.probabilities(photo, prompt).astype(np.float32), mode="F")
            masks[k] = torch.from_numpy(np.asarray(_square(soft, resolution, crop, Image.BILINEAR), dtype=np.float32))
        self.photos.masks = masks.clamp(0, 1)
        self.photos.has_mask = torch.ones(len(self.photos), dtype=torch.bool)
        self.accelerator.print(f"[{self.name}] soft masks from {model} ('{prompt}') for {len(missing)} photo(s)")

    @torch.no_grad()
    def _cache_latents(self) -> None:
        """VAE posterior mean/std of every photo and its mirror image, computed once: [N, 2, C, h, w]."""
        vae = self.sd.vae
        means, stds = [], []
        for flip in (False, True):
            pixels = self.photos.pixels.flip(-1) if flip else self.photos.pixels
            mean_rows, std_rows = [], []
            for chunk in pixels.split(4):
                dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
                mean_rows.append(dist.mean.float())
                std_rows.append(dist.std.float())
            means.append(torch.cat(mean_rows))
            stds.append(torch.cat(std_rows))
        self.latent_mean = torch.stack(means, dim=1)
        self.latent_std = torch.stack(stds, dim=1)
        self.latent_weight = None
        if self.photos.masks is not None:
            size = self.latent_mean.shape[-2:]
            small = F.interpolate(self.photos.masks, size=size, mode="area").to(self.device)
            self.latent_weight = torch.stack([small, small.flip(-1)], dim=1)  # [N, 2, 1, h, w]

    def train_dataloader(self):
        rank = getattr(self.accelerator, "process_index", 0)
        return ConceptBatches(
            len(self.photos),
            self.config.train_batch_size,
            self.concept_phrase(),
            TEMPLATES[self.config.data.templates],
            self.config.data.flip_p,
            seed=self.config.seed * 1000 + 7919 * rank + 1,
        )

    def batch_latents(self, batch: Mapping[str, Any], generator: torch.Generator):
        """Scaled latents sampled from the cached posteriors, and the loss weights (masks) or None."""
        index = batch["index"].to(self.device)
        flip = batch["flip"].to(self.device).long()
        mean, std = self.latent_mean[index, flip], self.latent_std[index, flip]
        noise = torch.randn(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        latents = (mean + std * noise) * self.sd.vae.config.scaling_factor
        weight = None if self.latent_weight is None else self.latent_weight[index, flip]
        return latents.to(self.weight_dtype), weight

    def training_step(self, models, batch, generator):
        latents, weight = self.batch_latents(batch, generator)
        noisy, target, timesteps = self.sd.add_noise(latents, generator)
        prediction = self.predict_noise(models, noisy, timesteps, list(batch["prompt"]))
        rec = denoising_loss(prediction, target, weight, average=self.config.data.mask_average)
        loss, logs = self.regularize(models, rec)
        return loss, {"rec_loss": rec.detach(), **logs}

    def regularize(self, models, rec_loss: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return rec_loss, {}

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.sd.tokenizer
        return tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def pipeline(self):
        """A `StableDiffusionPipeline` (`StableDiffusionXLPipeline` for an SDXL base) over the frozen
        parts (DDIM sampler), for validation images."""
        return self.sd.sampling_pipeline(DDIMScheduler)

    def validation_images(self, models, step: int):
        prompt = self.config.validation_prompt.format(self.concept_phrase())
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        return self.sample(models, [prompt] * self.config.num_validation_images, generator)

    def write_concept_file(self, export_dir: Path, method: str, files: Mapping[str, str], **extra) -> str:
        """`concept.json`: what was learned, from which photos, for which base model (for evaluation);
        `extra` keys are recorded too (e.g. `semantic_inversion`)."""
        config = self.config
        info = {
            "method": method,
            "concept_dir": str(Path(config.concept_dir).resolve()),
            "placeholder_token": config.placeholder_token,
            "initializer_token": config.initializer_token,
            "class_word": config.class_word or config.initializer_token,
            "base_model": config.pretrained_model_name_or_path,
            "max_steps": config.max_steps,
            "files": dict(files),
            **extra,
        }
        return write_concept_info(export_dir, info)

    card_tags: tuple[str, ...] = ()
    supports_sdxl: ClassVar[bool] = False  # methods whose conditioning handles SDXL's two encoders and size numbers

    def model_card(self) -> str:
        """The run folder's README: what was learned, how to use it (`model_card_notes`), how it was trained."""
        c = self.config
        masks = int(self.photos.has_mask.sum()) if hasattr(self, "photos") else 0
        photos = len(self.photos) if hasattr(self, "photos") else "?"
        samples = copy_samples(c.output_dir, c.resolved_export_dir)
        header = card_header(c, [*self.card_tags, "stable-diffusion", "zero-step-personalization"])
        header = header.replace("---\n", "---\nlibrary_name: diffusers\n", 1)  # loads with diffusers' own loaders
        return (
            header
            + f"""
{self.model_card_notes()}
{chr(10) + "![validation samples](" + samples + ")" + chr(10) if samples else ""}
## Training

- {photos} photos from `{Path(c.concept_dir).name}`{f" ({masks} with masks)" if masks else ""}, {c.data.resolution}
  px, horizontal flips p={c.data.flip_p}, {c.data.templates} caption templates
- {c.max_steps} steps, batch {c.train_batch_size} x accumulation {c.gradient_accumulation_steps}, learning rate
  {c.learning_rate:g}{" (scaled by the batch)" if c.scale_lr else ""}, {c.mixed_precision} precision, seed {c.seed}
- base model {describe_source(c.pretrained_model_name_or_path)}; every setting in `training_config_{self.name}.yaml`
- `concept.json` describes the concept for `python -m inference.evaluate runs=<this folder>`
"""
        )

    # ---- what a method supplies ------------------------------------------------------------------
    @abstractmethod
    def build_trainable(self) -> None:
        """Create the trainable model(s) (fp32) now that `self.sd` is loaded."""

    @abstractmethod
    def concept_phrase(self) -> str:
        """What fills the caption templates ("S*" or "cat")."""

    @abstractmethod
    def predict_noise(
        self, models: Mapping[str, nn.Module], noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]
    ) -> torch.Tensor:
        """The UNet's prediction for the noisy latents under `prompts`, with the method's model applied."""

    @abstractmethod
    def sample(self, models: Mapping[str, nn.Module], prompts: list[str], generator: torch.Generator) -> list:
        """PIL images for `prompts` with the current model (validation)."""
