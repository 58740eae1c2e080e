"""`EvalConfig`: what to evaluate, with which prompts, seeds and scoring models; `protocol_config` for a paper's."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from diffusers import DDPMScheduler

from encoders.common.config import ConfigError, keyed_field

from ..loading import (
    make_scheduler,
)
from ..methods import METHODS
from .metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_DETECTOR_MODEL,
    DEFAULT_DINO_MODEL,
)
from .protocols import PROTOCOLS, Protocol, protocols_for


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts and seeds, with which scoring models."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {  # other spellings of the same keys
        "elite_lambda": "elite_scale",
        "pretrained_model_name_or_path": "base",
    }

    base: str = keyed_field("base Stable Diffusion pipeline (folder or Hub id)", "CompVis/stable-diffusion-v1-4")
    out: str = keyed_field("output folder", "outputs/eval")
    protocol: str = keyed_field(
        f"custom (the keys as given), {', '.join(PROTOCOLS)} (each paper's evaluation) or all (elite, compositional, "
        "infusion)",
        "custom",
    )
    runs: list[str] = keyed_field(
        "fine-tune output folders (with concept.json): Textual Inversion, BaTex, Infusion", factory=list
    )
    encoders: str | None = keyed_field("ELITE encoders folder or Hub repo (enables the elite method)", None)
    image_encoder: str | None = keyed_field("image encoder for the ELITE encoders (default: the one they record)", None)
    location_mlp: str | None = keyed_field(
        "location MLP for the '+ spatial' rows (folder or Hub repo; default: the encoders' location_mlp/)", None
    )
    concepts: list[str] = keyed_field("extra concept photo folders for base/elite: DIR or DIR=class word", factory=list)
    methods: list[str] = keyed_field(f"methods to run, among {', '.join(METHODS)}", factory=lambda: list(METHODS))
    prompts: str = keyed_field(
        "custom protocol: dreambooth, or a text file with one prompt per line ({} = the concept)", "dreambooth"
    )
    num_prompts: int | None = keyed_field("use only the first N prompts of each kind (quick runs)", None)
    seeds: list[int] | None = keyed_field(
        "one image per prompt and seed (default: 0-4, or the protocol's count: ELITE 5, Compositional 10, Infusion 5, "
        "Textual Inversion 64, BaTex 64 (16 for its edit prompts), DreamBench 4)",
        None,
    )
    coi: bool = keyed_field(
        "custom protocol: add 'a photo of {} and a <object>' prompts and score the CoI likelihood", False
    )
    coi_objects: list[str] | None = keyed_field(
        "objects for the CoI prompts (detector label names; default: 10 common ones, COCO's 80 in the compositional "
        "protocol, the concept's own class included)",
        None,
    )
    noise_seed: int | None = keyed_field(
        "initial noise: unset = the protocol's (compositional: image k of every prompt from the k-th draw of one "
        "generator seeded 8888, as its notebook; else each image from its own seed); -1 = each from its own seed; "
        "N = the k-th draw of seed N",
        None,
    )
    append_class_word: bool = keyed_field(
        "prompt learned tokens as 'S* dog' instead of 'S*' (compositional: always)", False
    )
    num_inference_steps: int | None = keyed_field(
        "sampling steps for every method (default: 50, or each method's paper's)", None
    )
    guidance_scale: float | None = keyed_field(
        "classifier-free guidance for every method (default: 7.5, or each paper's)", None
    )
    scheduler: str | None = keyed_field(
        "sampler for every method: ddim, lms, pndm, ddpm, euler, euler_a, dpm (default: ddim, or each paper's)", None
    )
    resolution: int | None = keyed_field("image size (default: the base model's)", None)
    elite_scale: float | None = keyed_field(
        "ELITE's lambda, the local branch's weight (default: its paper's rule, 0.8 for 'a photo of S*', else 0.6)", None
    )
    elite_image: int = keyed_field("which concept photo (sorted by name) ELITE encodes (and IP-Adapter reads)", 0)
    ip_adapter: str | None = keyed_field(
        "IP-Adapter export folder or Hub repo (training.ip_adapter's; enables the ip_adapter method)", None
    )
    ip_adapter_scale: float = keyed_field("the image prompt's weight for the ip_adapter rows", 1.0)
    mask_dir: str | None = keyed_field(
        "folder of concept masks for ELITE (<stem>.png or <concept>_<stem>.png); default <concept>/masks/", None
    )
    infusion_measures: bool = keyed_field(
        "also the latent Fisher divergence and W2 against the base model, on non-customised and class-word prompts "
        "(infusion protocol: always)",
        False,
    )
    fisher_timesteps: list[int] = keyed_field(
        "timesteps for the latent Fisher divergence", factory=lambda: [100, 300, 500, 700, 900]
    )
    reference_images: str | None = keyed_field(
        "folder of real images (captions in <stem>.txt beside them) the overfitting measures compare with, as "
        "Infusion's paper (LAION images); unset: the base model's own generations, a quick fallback",
        None,
    )
    fisher_samples: int = keyed_field("reference images the latent Fisher divergence uses (paper: 50,000)", 50000)
    w2_samples: int = keyed_field("reference images the generic-prompt W2 uses (paper: 1,000)", 1000)
    clip_model: str = keyed_field("CLIP for CLIP-T / CLIP-I", DEFAULT_CLIP_MODEL)
    dino_model: str = keyed_field("DINO ViT for DINO-I", DEFAULT_DINO_MODEL)
    detector_model: str = keyed_field("object detector for the CoI likelihood", DEFAULT_DETECTOR_MODEL)
    detection_threshold: float = keyed_field("detector score threshold", DEFAULT_DETECTION_THRESHOLD)
    detector_revision: str | None = keyed_field(
        "Hub revision of the detector (DETR's main branch needs timm; some repos have a no_timm branch)", None
    )
    batch_size: int = keyed_field("images generated per pipeline call", 4)
    grid_prompts: int = keyed_field("prompts shown per row of the grids", 8)
    regenerate: bool = keyed_field("regenerate images that already exist under out/images", False)
    device: str = keyed_field("auto, cpu, cuda, cuda:1, mps", "auto")
    dtype: str = keyed_field("auto (fp16 on CUDA, fp32 elsewhere), float32, float16, bfloat16", "auto")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose among {', '.join(METHODS)} (inference.methods)")
        if self.protocol != "custom":
            try:
                protocols_for(self.protocol)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.seeds is not None and not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be positive, got {self.num_prompts}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:  # 0 must not mean "the default"
            raise ConfigError(
                f"num_inference_steps must be at least 1, got {self.num_inference_steps} "
                "(leave it unset for each protocol's own number)"
            )
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise ConfigError(f"guidance_scale must be a finite number, got {self.guidance_scale}")
        if self.fisher_samples < 1 or self.w2_samples < 2:
            raise ConfigError(
                f"fisher_samples must be >= 1 and w2_samples >= 2, got {self.fisher_samples} and {self.w2_samples}"
            )
        if self.reference_images is not None and not Path(self.reference_images).is_dir():
            raise ConfigError(f"reference_images {self.reference_images} is not a folder")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.scheduler is not None:
            try:
                make_scheduler(self.scheduler, DDPMScheduler().config)
            except ValueError as err:
                raise ConfigError(str(err)) from None


def protocol_config(config: EvalConfig, protocol: Protocol) -> EvalConfig:
    """The settings one paper's protocol runs with: its prompts, image count and measures, in out/<name>/;
    what the user set for quick runs (num_prompts, seeds, steps, ...) still applies."""
    return replace(
        config,
        out=str(Path(config.out) / protocol.name),
        protocol=protocol.name,
        prompts=protocol.prompts,
        seeds=config.seeds if config.seeds is not None else list(range(protocol.seeds)),
        coi=False,
        append_class_word=config.append_class_word or protocol.append_class_word,
        infusion_measures=config.infusion_measures or protocol.overfitting,
    )
