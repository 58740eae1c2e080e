"""Every model the inference package uses is loaded here: base pipelines, ELITE encoders, the location MLP.

Base pipelines come from a diffusers folder or Hub id (`load_base_pipeline`), or are assembled from
parts already in memory (`pipeline_from_parts`: the training stack's frozen models, so validation
pictures are made by the same code users run). Device and dtype are chosen once
(`encoders.common.device`: "auto" = CUDA, else MPS, else CPU; fp16 on CUDA, fp32 elsewhere) and
everything else follows the pipeline's. Samplers can be picked by short name (`lms` is ELITE's) or
swapped in afterwards (`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`).

An encoders folder / Hub repo (`load_encoders`) holds `global_mapping/` (required), `local_mapping/`
and `location_mlp/` (optional); the image encoder is the one its config records. `check_encoders_fit`
refuses encoders made for another base model's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline

from encoders.clip_features import CLIPFeatureExtractor
from encoders.common.device import dtype_kwargs, resolve_device, resolve_dtype
from encoders.common.hub import UnsupportedBaseError, check_supported_base
from encoders.global_mapping import GlobalMapping, MappingFitError
from encoders.local_mapping import LocalMapping
from encoders.location_mlp import LocationMLP
from encoders.text_injection import word_widths

from .presets import elite_lms_scheduler

# short name -> diffusers scheduler class name; built with `from_config(pipe.scheduler.config)`
SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",  # ELITE's sampler, with SD v1's published betas (100 steps, guidance 5 in the paper)
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",  # SD v1-4's default
    "ddpm": "DDPMScheduler",  # ancestral; Compositional Inversion's evaluation sampler (50 steps)
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


class ModelLoadError(RuntimeError):
    """A base model or encoders folder/Hub repo that cannot be loaded or does not fit; says which and why."""


def make_scheduler(name: str, base_config):
    """Build a diffusers scheduler by short name (see SCHEDULERS) from the pipeline's scheduler config;
    `lms` is ELITE's own (`inference.presets.elite_lms_scheduler`: SD v1's published betas)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if name == "lms":
        return elite_lms_scheduler(base_config)
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config)


def _eval(pipe):
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.eval()
    return pipe


def load_base_pipeline(
    name_or_path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    scheduler: str | None = None,
    safety_checker: bool = True,
    allow_sdxl: bool = False,
):
    """A `StableDiffusionPipeline` from a diffusers folder or Hub id, on `device` in `dtype`.

    `scheduler` replaces the folder's sampler by short name (None keeps it). `safety_checker=False`
    skips loading the model's safety checker (when it has one), as diffusers allows. `allow_sdxl`: an
    SDXL base loads as a `StableDiffusionXLPipeline` (for the methods that support it) instead of
    being refused.
    """

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kwargs = dtype_kwargs(dtype)
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    local = Path(name_or_path)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(f"base model {local}: not a diffusers pipeline folder (no model_index.json)")
    try:
        sdxl = check_supported_base(name_or_path, allow_sdxl=allow_sdxl)
    except UnsupportedBaseError as err:
        raise ModelLoadError(str(err)) from None
    pipeline_class = StableDiffusionPipeline
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipeline_class = StableDiffusionXLPipeline  # it has no safety checker to skip
        kwargs = {k: v for k, v in kwargs.items() if k not in ("safety_checker", "requires_safety_checker")}
    try:
        pipe = pipeline_class.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the base pipeline {name_or_path!s}: {err}") from err
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    return _eval(pipe)


def pipeline_from_parts(vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None):
    """A `StableDiffusionPipeline` over models already in memory (no safety checker, no progress bar);
    with `text_encoder_2` / `tokenizer_2` a `StableDiffusionXLPipeline`.

    The models are used as they are (device, dtype, processors): the training stack builds its
    validation pictures with this, through the same `ElitePipeline` users run.
    """

    if text_encoder_2 is not None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl_pipeline(pipe) -> bool:
    """An SDXL pipeline (two text encoders, pooled and size conditioning) rather than SD 1.x / 2.x."""
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoders_of(pipe) -> list:
    """The pipeline's text encoders: one (SD 1.x / 2.x) or two (SDXL)."""
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl_pipeline(pipe) else [])


def tokenizers_of(pipe) -> list:
    """The pipeline's tokenizers, one per text encoder (`text_encoders_of`)."""
    return [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl_pipeline(pipe) else [])


def word_width_of(pipe) -> int:
    """Width of a word for this pipeline: its text encoder's, or both SDXL encoders' together."""
    return sum(word_widths(text_encoders_of(pipe)))


def default_image_size(pipe) -> tuple[int, int]:
    """(height, width) the pipeline generates by default: UNet sample size x the VAE's scale factor."""
    sample = pipe.unet.config.sample_size
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor


# ---- ELITE encoders --------------------------------------------------------------------------------


@dataclass
class EliteEncoders:
    """What an encoders folder / Hub repo holds, loaded and ready: mappings, image encoder, origin."""

    global_mapping: torch.nn.Module
    local_mapping: torch.nn.Module | None
    location_mlp: torch.nn.Module | None
    feature_extractor: torch.nn.Module  # encoders.clip_features.CLIPFeatureExtractor
    source: str
    image_encoder_name: str
    base_model_name: str | None

    @property
    def text_dim(self) -> int:
        return int(self.global_mapping.config.output_dim)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EliteEncoders:
        """Move the mappings and the image encoder (the location MLP keeps fp32); returns self."""
        for model in (self.global_mapping, self.local_mapping, self.feature_extractor):
            if model is not None:
                model.to(device=device, dtype=dtype)
        if self.location_mlp is not None:
            self.location_mlp.to(device=device)
        return self


def _load_subfolder(cls, name_or_path: str, subfolder: str, required: bool, dtype: torch.dtype):
    """`cls.from_pretrained(name_or_path, subfolder=...)`; None when optional and absent."""
    local = Path(name_or_path)
    if local.exists() and not (local / subfolder / "config.json").is_file():
        if required:
            raise ModelLoadError(f"encoders folder {local}: no {subfolder}/config.json (is this an encoders folder?)")
        return None
    try:
        return cls.from_pretrained(str(name_or_path), subfolder=subfolder, **dtype_kwargs(dtype))
    except (OSError, ValueError) as err:
        if not required and not local.exists():
            return None  # a Hub repo without the optional subfolder
        raise ModelLoadError(f"cannot load {subfolder}/ from the encoders {name_or_path}: {err}") from err
    except (TypeError, KeyError, AttributeError, RuntimeError) as err:  # a config.json value of the wrong kind
        raise ModelLoadError(
            f"encoders {name_or_path}: {subfolder}/config.json does not describe a {cls.__name__} this "
            f"package can build ({type(err).__name__}: {err})"
        ) from err


def load_encoders(
    name_or_path: str | Path,
    image_encoder: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> EliteEncoders:
    """Load global_mapping/ (required), local_mapping/ and location_mlp/ (optional) and the image encoder.

    The image encoder is the one recorded in the global mapping's config unless `image_encoder`
    overrides it (e.g. a local copy of `openai/clip-vit-large-patch14`).
    """

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    global_mapping = _load_subfolder(GlobalMapping, name, "global_mapping", True, dtype)
    local_mapping = _load_subfolder(LocalMapping, name, "local_mapping", False, dtype)
    location_mlp = _load_subfolder(LocationMLP, name, "location_mlp", False, torch.float32)

    image_encoder_name = str(image_encoder or global_mapping.config.image_encoder_name_or_path or "")
    if not image_encoder_name:
        raise ModelLoadError(
            f"encoders {name}: global_mapping/config.json records no image_encoder_name_or_path; pass the CLIP "
            "vision model it was trained with (--image-encoder / image_encoder=)"
        )
    # one CLIP pass taps every layer either mapping reads
    layers = [int(v) for v in global_mapping.config.feature_layers]
    if local_mapping is not None:
        layers += [int(v) for v in local_mapping.config.feature_layers if int(v) not in layers]
    try:
        extractor = CLIPFeatureExtractor.from_pretrained(image_encoder_name, layers=tuple(layers), torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load the image encoder {image_encoder_name} for the encoders {name}: {err}"
        ) from err
    for label, model in (("global_mapping", global_mapping), ("local_mapping", local_mapping)):
        if model is not None and int(model.config.input_dim) != extractor.hidden_size:
            raise ModelLoadError(
                f"encoders {name}: {label} reads image features of width {model.config.input_dim}, but the image "
                f"encoder {image_encoder_name} gives {extractor.hidden_size}: pass the image encoder they were "
                "trained with"
            )
    for model in (global_mapping, local_mapping, location_mlp, extractor):
        if model is not None:
            model.to(device).eval().requires_grad_(False)
    return EliteEncoders(
        global_mapping=global_mapping,
        local_mapping=local_mapping,
        location_mlp=location_mlp,
        feature_extractor=extractor,
        source=name,
        image_encoder_name=image_encoder_name,
        base_model_name=global_mapping.config.pretrained_model_name_or_path,
    )


def check_encoders_fit(encoders: EliteEncoders, pipe) -> None:
    """Raise `ModelLoadError` unless the encoders were made for this base model's shapes
    (`MappingModel.check_fits` for each mapping; the location MLP's embedding width)."""

    text_dim = word_width_of(pipe)
    for label, model in (("global_mapping", encoders.global_mapping), ("local_mapping", encoders.local_mapping)):
        if model is None:
            continue
        try:
            model.check_fits(pipe.unet, text_dim=text_dim)
        except MappingFitError as err:
            raise ModelLoadError(f"encoders {encoders.source}: {label}: {err}") from err
    if encoders.location_mlp is not None and int(encoders.location_mlp.config.embedding_dim) != text_dim:
        raise ModelLoadError(
            f"encoders {encoders.source}: location_mlp reads embeddings of size "
            f"{encoders.location_mlp.config.embedding_dim}, this base model's are {text_dim}"
        )


def load_location_mlp(path_or_repo: str, subfolder: str | None = "location_mlp", device=None):
    """`LocationMLP` from an encoders folder / Hub repo (its `location_mlp/` subfolder) or a folder itself."""

    local = Path(path_or_repo)
    if local.is_dir() and (local / "config.json").is_file() and not (local / (subfolder or "")).is_dir():
        subfolder = None  # the location_mlp folder itself
    try:
        model = LocationMLP.from_pretrained(path_or_repo, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a location MLP from {path_or_repo}: {err}") from err
    return model.to(device) if device is not None else model
