"""The keys every trainer accepts (DESIGN.md §4), as one dataclass that each trainer extends.

`accelerate launch -m training.<trainer> --config FILE [key=value ...]`: the trainer's dataclass
subclasses `TrainConfig`, adds its own keys, and `encoders.run_config.parse_config_cli` fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from encoders.run_config import ConfigError


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Settings shared by all trainers: models, data, optimisation, checkpoints, logging, export."""

    pretrained_model_name_or_path: str = _help(
        "base Stable Diffusion pipeline: a diffusers folder or Hub id", "CompVis/stable-diffusion-v1-4"
    )
    image_encoder_name_or_path: str = _help(
        "CLIP vision tower: a transformers folder or Hub id", "openai/clip-vit-large-patch14"
    )
    train_shards: str = _help("training shards: a path, glob or brace pattern (e.g. data/train-{000000..000099}.tar)", "")
    output_dir: str = _help("run folder: config.yaml, checkpoint-N/, logs/, validation/", "outputs/train")
    export_dir: Optional[str] = _help(
        "encoders folder the final models are exported into (default: <output_dir>/encoders)", None
    )
    max_steps: int = _help("optimizer steps to train for", 1000)
    train_batch_size: int = _help("samples per device per micro-step", 4)
    gradient_accumulation_steps: int = _help("micro-steps accumulated per optimizer step", 1)
    learning_rate: float = _help("peak learning rate (before scale_lr)", 1e-5)
    scale_lr: bool = _help("multiply learning_rate by batch size x accumulation x processes (the reference does)", False)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = _help("learning-rate schedule (diffusers.optimization.get_scheduler)", "constant")
    lr_warmup_steps: int = _help("warm-up optimizer steps", 0)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    adam_weight_decay: float = _help("AdamW weight decay", 1e-2)
    adam_epsilon: float = _help("AdamW epsilon", 1e-8)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 1.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = _help(
        "autocast precision; frozen models are stored in it too. bf16 works on CPU and recent GPUs; fp16 needs a GPU",
        "no",
    )
    gradient_checkpointing: bool = _help("recompute the frozen UNet's activations in backward to save memory", False)
    checkpointing_steps: int = _help("save checkpoint-N/ every N optimizer steps (0: only at the end)", 500)
    checkpoints_total_limit: Optional[int] = _help("keep at most this many checkpoints (oldest removed)", None)
    resume_from_checkpoint: Optional[str] = _help("'latest' or a checkpoint-N folder to continue from", None)
    seed: int = _help("seed for model init, noise, timesteps and data order", 0)
    report_to: Literal["tensorboard", "none"] = _help("experiment tracker (through accelerate)", "tensorboard")
    tracker_project_name: Optional[str] = _help("tracker run name (default: the trainer's name)", None)
    logging_steps: int = _help("log averaged metrics every N optimizer steps", 10)
    validation_steps: int = _help("render validation images every N optimizer steps (0 disables)", 0)
    dataloader_num_workers: int = _help("data loading worker processes per training process", 0)
    push_to_hub: bool = _help("upload the exported folder to the Hub at the end", False)
    hub_model_id: Optional[str] = _help("Hub repo id for push_to_hub (user/name)", None)
    hub_private: bool = _help("create the Hub repo as private", False)

    def __post_init__(self) -> None:
        positive = ("max_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub=true needs hub_model_id=<user/name>")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")

    @property
    def resolved_export_dir(self) -> str:
        import os

        return self.export_dir or os.path.join(self.output_dir, "encoders")
