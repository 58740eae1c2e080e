"""ELITE stage 2: train the local mapping (masked patch features -> local tokens) with local K/V projections.

    accelerate launch -m training.local_mapping --config configs/train/local_mapping.yaml \\
        global_mapping_path=outputs/train_global/encoders [key=value ...]

The stage-1 global mapping is loaded frozen (`global_mapping_path`: an encoders folder, its
`global_mapping/` subfolder, or a Hub repo). By default every step computes what the official
ELITE `train_local.py` does (Wei et al., ICCV 2023). Without gradients and once each: the target's
latents (VAE), w0 from the CLIP features of the unmasked crop (`w0_source=image`; the loader's
image view, unaugmented in this stage), the object view's CLIP features (the crop times its mask,
then resized and warped with its mask: `data.object_view`), and the text encoder with w0 at the
placeholder of a caption whose first word follows the target's scale augmentation
(`data.scale_augment=elite`: "a far away", "very small", "zoomed in", "close up"). With gradients:
the local mapping turns the object features into one token per patch, zero outside the warped mask
(nearest 224 -> 16); the UNet's cross-attention adds `elite_scale` (lambda, 1) x the local branch,
re-weighted by w0's attention map. Loss = the error summed over the latent channels and averaged
over the target's valid cells (`mse_reduction=sum_channels`, the official normalisation) +
`local_l1_weight` (1e-4) x mean over layers of mean |V_local|.

Options that depart from the official computation (each stored in `local_mapping/config.json`, so
inference runs the same way): `w0_map_norm=sample_head`, `local_mask_mode=exclude`,
`w0_source=object`, `data.object_view=resize_then_mask`, `mse_reduction=mean`.

Trainable: `LocalMapping` (MLPs + local K/V), saved as `checkpoint-N/local_mapping/`; the export
writes `local_mapping/` and a copy of the global mapping it was trained with, so the encoders
folder is complete. Paper: batch 8, lr 1e-5.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from encoders.attention import set_elite_processors
from encoders.common.config import ConfigError, keyed_field, parse_config_cli
from encoders.global_mapping import GlobalMapping, MappingFitError
from encoders.local_mapping import REFERENCE_SETTINGS, LocalMapping, check_local_settings

from .crop_data import CropDataConfig
from .elite_common import EliteStageConfig, EliteStageTask, resolve_mapping_folder
from .export import export_fp32, export_model
from .loop import run_from_command_line

logger = logging.getLogger(__name__)

# Official stage 2's data: objects at least 100 px with an aspect up to 2, cropped to the box + 10-19 px; its scale
# augmentation with caption prefixes, and w0 from the crop as it is (the image view unaugmented; the object view
# keeps the loader's official warps).
STAGE2_DATA = dict(
    scale_augment="elite",
    clip_flip_prob=0.0,
    clip_rotation_prob=0.0,
    clip_blur_prob=0.0,
    clip_affine_prob=0.0,
    min_box_side=100,
    max_box_aspect=2.0,
    crop_geometry="box",
    box_margin=(10, 19),
)


@dataclass
class LocalMappingConfig(EliteStageConfig):
    """Keys of `training.local_mapping` (shared keys: training/common_config.py, ELITE keys: elite_common.py)."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"lam": "elite_scale"}  # old key spellings

    global_mapping_path: str = keyed_field(
        "trained stage-1 global mapping: encoders folder, global_mapping/ folder or Hub repo", ""
    )
    data: CropDataConfig = keyed_field(
        "crop-shard loader settings; this stage's defaults: boxes >= 100 px with aspect <= 2, cropped to the box + "
        "10-19 px, scale_augment=elite, the image view unaugmented",
        factory=lambda: CropDataConfig(**STAGE2_DATA),
    )
    learning_rate: float = keyed_field("peak learning rate (paper: 1e-5; before scale_lr)", 1e-5)
    local_l1_weight: float = keyed_field("weight of mean |V_local| in the loss (paper: 1e-4)", 1e-4)
    elite_scale: float = keyed_field("lambda, the local branch's weight, during training (paper: 1)", 1.0)
    weight_loss_by_valid_region: bool = keyed_field(
        "average the denoising error over the target's real pixels only (the loader's valid_mask)", True
    )
    mse_reduction: str = keyed_field(
        "sum_channels (official: the error summed over the latent channels per valid cell) or mean (per element: "
        "1/C of it, so local_l1_weight weighs C x more)",
        "sum_channels",
    )
    w0_map_norm: str = keyed_field("sample (official) or sample_head: how w0's attention map is normalised", "sample")
    local_mask_mode: str = keyed_field(
        "zero_tokens (official: masked tokens stay in the softmax as zeros) or exclude", "zero_tokens"
    )
    w0_source: str = keyed_field(
        "image (official: w0 from the unmasked crop) or object (from the object on black)", "image"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mse_reduction not in ("sum_channels", "mean"):
            raise ConfigError(f"mse_reduction must be sum_channels or mean, got {self.mse_reduction!r}")
        try:
            check_local_settings(
                dict(w0_map_norm=self.w0_map_norm, local_mask_mode=self.local_mask_mode, w0_source=self.w0_source)
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if not self.global_mapping_path:
            raise ConfigError("global_mapping_path is required: the stage-1 encoders folder (or its global_mapping/)")


class LocalMappingTask(EliteStageTask):
    name = "local_mapping"
    config: LocalMappingConfig

    def _load_global(self) -> GlobalMapping:
        if getattr(self, "_global", None) is None:
            path, sub = resolve_mapping_folder(self.config.global_mapping_path, "global_mapping")
            self._global = GlobalMapping.from_pretrained(path, subfolder=sub)
        return self._global

    def clip_layers(self) -> tuple[int, ...]:
        # the CLIP passes tap the local layers plus the global mapping's w0 layer
        layers = list(self.config.feature_layers)
        w0_layer = int(self._load_global().config.feature_layers[0])
        return tuple(layers + ([w0_layer] if w0_layer not in layers else []))

    def build_models(self, accelerator) -> None:
        cfg = self.config
        gm = self._load_global().to(self.device).eval().requires_grad_(False)  # frozen, kept in fp32
        try:
            gm.check_fits(self.sd.unet, text_dim=self.text_dim, image_dim=self.clip.hidden_size)
        except MappingFitError as err:
            raise ConfigError(
                f"global_mapping_path={cfg.global_mapping_path} does not fit {cfg.pretrained_model_name_or_path} + "
                f"{cfg.image_encoder_name_or_path}: {err}"
            ) from err
        for key, ours in (
            ("pretrained_model_name_or_path", cfg.pretrained_model_name_or_path),
            ("image_encoder_name_or_path", cfg.image_encoder_name_or_path),
        ):
            theirs = gm.config.get(key) if hasattr(gm.config, "get") else getattr(gm.config, key, None)
            if theirs and theirs != ours:
                logger.warning("the global mapping was trained with %s=%s, this run uses %s", key, theirs, ours)
        self.global_mapping = gm
        settings = dict(
            w0_map_norm=cfg.w0_map_norm,
            local_mask_mode=cfg.local_mask_mode,
            w0_source=cfg.w0_source,
            object_view=cfg.data.object_view,
        )
        self.local_mapping = LocalMapping.from_unet(self.sd.unet, **self.mapping_kwargs(), **settings).to(self.device)
        self.local_mapping.train()
        set_elite_processors(self.sd.unet, gm, self.local_mapping)

    def trainable_models(self):
        return {"local_mapping": self.local_mapping}

    @torch.no_grad()
    def _w0(self, feats) -> torch.Tensor:
        w0_layer = int(self.global_mapping.config.feature_layers[0])
        return self.global_mapping([feats[w0_layer]], num_words=1)

    def training_step(self, models, batch, generator):
        cfg = self.config
        mapping = models["local_mapping"]
        latents, feats = self.encode_frozen(batch, "clip_object_pixel_values", generator)
        w0_feats = self.clip_features(batch, "clip_pixel_values") if cfg.w0_source == "image" else feats
        local = mapping([feats[layer] for layer in cfg.feature_layers], batch["object_mask_clip"])
        cond = self.conditioning(
            batch, self._w0(w0_feats), local=[(local.tokens, local.keep)], scale=cfg.elite_scale, local_value_l1=[]
        )
        mse = self.diffusion_loss(
            latents, cond, generator, batch.get("valid_mask"), sum_channels=cfg.mse_reduction == "sum_channels"
        )
        value_l1 = torch.stack(cond.context.local_value_l1).mean()
        loss = mse + self.config.local_l1_weight * value_l1
        return loss, {
            "mse": mse.detach(),
            "local_value_l1": value_l1.detach(),
            "kept_tokens": local.keep.float().mean().detach(),
        }

    def validation_mappings(self, models):
        return self.global_mapping, models["local_mapping"]

    def export(self, models, export_dir):
        """`local_mapping/`, and the global mapping it was trained with unless that is the folder's own
        `global_mapping/` already (then it stays as it is: nothing to copy, and its files keep their dates)."""
        written = [export_fp32(models["local_mapping"], "local_mapping", export_dir, self.config.output_dir)]
        path, sub = resolve_mapping_folder(self.config.global_mapping_path, "global_mapping")
        source = Path(path) / sub if sub else Path(path)
        target = Path(export_dir) / "global_mapping"
        if source.exists() and target.exists() and source.resolve() == target.resolve():
            return written
        return written + [export_model(self.global_mapping, export_dir, "global_mapping")]

    def model_card_notes(self) -> str:
        cfg = self.config
        return (
            "## local_mapping\n\n"
            f"ELITE local mapping: masked CLIP patch features of layers {list(cfg.feature_layers)} -> one token per "
            "patch, plus local K/V projections for every UNet cross-attention layer; fused with weight lambda "
            "(paper: 0.8 for generation, 0.6 for editing prompts). "
            f"Trained on top of `{cfg.global_mapping_path}` for {cfg.max_steps} steps, batch {cfg.train_batch_size} x "
            f"accumulation {cfg.gradient_accumulation_steps} per process, lr {cfg.learning_rate:g} "
            f"(scale_lr={cfg.scale_lr}), V_local L1 {cfg.local_l1_weight:g}, {cfg.data.resolution} px, loss "
            f"{cfg.mse_reduction}, scale augmentation {cfg.data.scale_augment}.\n\n"
            "Computation settings (stored in `local_mapping/config.json`; the official ELITE ones unless noted): "
            + ", ".join(
                f"`{k}={v}`" + ("" if REFERENCE_SETTINGS[k] == v else " (option)")
                for k, v in self.local_mapping.settings.items()
            )
            + ".\n\n"
            "## global_mapping\n\n"
            f"The frozen ELITE global mapping this stage was trained with (CLIP layers "
            f"{list(self.global_mapping.config.feature_layers)}; use w0), with its global K/V projections.\n"
        )


def main(argv: list[str] | None = None) -> None:
    config = parse_config_cli(
        LocalMappingConfig,
        argv,
        prog="accelerate launch -m training.local_mapping",
        description="ELITE stage 2: train the local mapping network and local K/V projections (global mapping frozen).",
    )
    run_from_command_line(LocalMappingTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
