"""The keys every trainer accepts, as one dataclass that each trainer extends.

`accelerate launch -m training.<trainer> --config FILE [key=value ...]`: the trainer's dataclass
subclasses `TrainConfig`, adds its own keys, and `encoders.common.config.parse_config_cli` fills it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from accelerate.utils import LoggerType

from encoders.anchors import AnchorRegularizer
from encoders.common.config import ConfigError, keyed_field


@dataclass
class TrainConfig:
    """Settings shared by all trainers: models, data, optimisation, checkpoints, logging, export."""

    # `base` is the name every other command uses for the base pipeline (`--base X` works too)
    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"base": "pretrained_model_name_or_path"}

    pretrained_model_name_or_path: str = keyed_field(
        "base Stable Diffusion pipeline: a diffusers folder or Hub id", "CompVis/stable-diffusion-v1-4"
    )
    image_encoder_name_or_path: str = keyed_field(
        "CLIP vision tower: a transformers folder or Hub id", "openai/clip-vit-large-patch14"
    )
    train_shards: str = keyed_field(
        "training shards: a path, glob or brace pattern (e.g. data/train-{000000..000099}.tar)", ""
    )
    output_dir: str = keyed_field("run folder: config.yaml, checkpoint-N/, logs/, validation/", "outputs/train")
    export_dir: str | None = keyed_field(
        "encoders folder the final models are exported into (default: <output_dir>/encoders)", None
    )
    max_steps: int = keyed_field("optimizer steps to train for", 1000)
    train_batch_size: int = keyed_field("samples per device per micro-step", 4)
    gradient_accumulation_steps: int = keyed_field("micro-steps accumulated per optimizer step", 1)
    learning_rate: float = keyed_field("peak learning rate (before scale_lr)", 1e-5)
    scale_lr: bool = keyed_field(
        "multiply learning_rate by batch size x accumulation x processes (the reference does)", False
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = keyed_field("learning-rate schedule (diffusers.optimization.get_scheduler)", "constant")
    lr_warmup_steps: int = keyed_field("warm-up optimizer steps", 0)
    adam_beta1: float = keyed_field("AdamW beta1", 0.9)
    adam_beta2: float = keyed_field("AdamW beta2", 0.999)
    adam_weight_decay: float = keyed_field("AdamW weight decay", 1e-2)
    adam_epsilon: float = keyed_field("AdamW epsilon", 1e-8)
    max_grad_norm: float = keyed_field("gradient clipping norm (0 disables)", 1.0)
    use_ema: bool = keyed_field(
        "keep an exponential moving average of the trainable weights (diffusers' EMAModel), checkpointed with "
        "the run and exported instead of the last weights",
        False,
    )
    ema_decay: float = keyed_field("use_ema: the average's decay (reached after its warm-up)", 0.9999)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = keyed_field(
        "autocast precision; frozen models are stored in it too (unset: `accelerate launch --mixed_precision` or "
        "the accelerate config decides). bf16 works on CPU and recent GPUs; fp16 needs a GPU",
        None,
    )
    gradient_checkpointing: bool = keyed_field(
        "recompute the frozen UNet's activations in backward to save memory", False
    )
    checkpointing_steps: int = keyed_field("save checkpoint-N/ every N optimizer steps (0: only at the end)", 500)
    checkpoints_total_limit: int | None = keyed_field("keep at most this many checkpoints (oldest removed)", None)
    resume_from_checkpoint: str | None = keyed_field("'latest' or a checkpoint-N folder to continue from", None)
    resume_overrides: list[str] = keyed_field(
        "settings that may differ from the checkpoint's when resuming (e.g. learning_rate); others must match",
        factory=list,
    )
    seed: int = keyed_field("seed for model init, noise, timesteps and data order", 0)
    report_to: str = keyed_field(
        "experiment trackers through accelerate, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, "
        "clearml, dvclive, trackio, swanlab, all (every installed one) or none; validation images go to each "
        "tracker that takes images",
        "tensorboard",
    )
    tracker_project_name: str | None = keyed_field("tracker run name (default: the trainer's name)", None)
    logging_steps: int = keyed_field("log averaged metrics every N optimizer steps", 10)
    validation_steps: int = keyed_field("render validation images every N optimizer steps (0 disables)", 0)
    dataloader_num_workers: int = keyed_field("data loading worker processes per training process", 0)
    push_to_hub: bool = keyed_field("upload the exported folder to the Hub at the end", False)
    hub_model_id: str | None = keyed_field("Hub repo id for push_to_hub (user/name)", None)
    license: str = keyed_field(
        "the model card's license (Stable Diffusion v1 derivatives: creativeml-openrail-m)", "creativeml-openrail-m"
    )
    hub_private: bool = keyed_field("create the Hub repo as private", False)

    def __post_init__(self) -> None:
        positive = ("max_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        for item in fields(self):  # nan/inf pass every "> 0" check and end as an optimizer's traceback
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{item.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(
                f"seed must be between 0 and 2**63 - 1 (torch's generators take 64-bit seeds), got {self.seed}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub=true needs hub_model_id=<user/name>")
        self.report_to = ",".join(name.strip() for name in self.report_to.split(",") if name.strip()) or "none"
        known = {"none", *(kind.value for kind in LoggerType)}
        unknown = [name for name in self.report_to.split(",") if name not in known]
        if unknown or ("none" in self.report_to.split(",") and self.report_to != "none"):
            raise ConfigError(
                f"report_to: unknown tracker {', '.join(unknown) or 'none with others'}; "
                f"use none or a comma-separated list of {', '.join(sorted(known - {'none'}))}"
            )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")

    @property
    def resolved_export_dir(self) -> str:
        return self.export_dir or os.path.join(self.output_dir, "encoders")


@dataclass
class AnchorsConfig:
    """Semantic inversion (`encoders.anchors`): pull a learned word towards a few sparse-coded real words.

    The code is a non-negative Lasso path with at most `max_active` anchors (L_anc needs weights >= 0).
    Each trainer adds its own `weight` (how L_anc enters its loss).
    """

    enabled: bool = keyed_field("add the anchor-attractor loss L_anc", False)
    vocabulary: str = keyed_field("anchor words: coco (80 names) or a word-list file", "coco")
    max_active: int = keyed_field("at most this many active anchors (c)", 3)
    refresh_every: int = keyed_field("recompute the sparse code every N steps", 1)
    normalisation: str = keyed_field(
        "official: sum_i delta_i ||e - e_i||^2 / (77 x D), the official code's MSE over the prompt's input embeddings, "
        "for which its lambda 0.95 was tuned; paper: / K, Eq. 6 as printed (~740x stronger for 80 anchors)",
        "official",
    )

    def __post_init__(self) -> None:
        if self.normalisation not in ("official", "paper"):
            raise ConfigError(f"anchors.normalisation must be official or paper, got {self.normalisation!r}")

    def build_regularizer(self, tokenizer, text_encoder, device, initializer: str | None = None):
        """The `AnchorRegularizer` over this vocabulary's input embeddings, or None when disabled (lists of
        tokenizers and text encoders: SDXL's two, the anchors as wide as both tables). `initializer`: the one
        anchor of weight 1 instead of a sparse code over the vocabulary (the official compositional code's)."""
        if not self.enabled:
            return None

        return AnchorRegularizer.from_text_encoder(
            tokenizer,
            text_encoder,
            words=[initializer] if initializer else self.vocabulary,
            max_active=self.max_active,
            refresh_every=self.refresh_every,
            normalisation=self.normalisation,
            sparse=not initializer,
        ).to(device)
