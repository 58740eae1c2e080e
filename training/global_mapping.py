"""ELITE stage 1: train the global mapping (CLIP features -> 5 words) with new global K/V projections.

    accelerate launch -m training.global_mapping --config configs/train/global_mapping.yaml [key=value ...]

Per step: the crop's latents and its multi-layer CLIP features come from the frozen VAE and CLIP
tower (once, without gradients); the global mapping turns the features into N words that take the
placeholder's place in a random ImageNet template caption (the tail shifts right by N - 1); the
frozen text encoder runs WITH gradients (they flow into the words, not its weights); the frozen
UNet, whose cross-attention layers use the mapping's trainable K/V projections for the text,
predicts the noise. Loss = epsilon-MSE + `word_l1_weight` (paper: 0.01) x mean |words|, plus, with
`anchors.enabled=true`, `anchors.weight` x L_anc of w0 (compositional inversion's semantic anchors:
w0 is pulled towards a few sparse-coded real words, so it composes with the rest of a prompt).

Trainable: `GlobalMapping` (MLPs + K/V), saved as `checkpoint-N/global_mapping/` and exported to
`<export_dir>/global_mapping/`. Paper: batch 16 over 4 GPUs, lr 1e-6 (the reference scales it by
GPUs x batch x accumulation: `scale_lr=true`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from encoders.attention import set_elite_processors
from encoders.common.config import keyed_field, parse_config_cli
from encoders.global_mapping import GlobalMapping

from .common_config import AnchorsConfig
from .crop_data import CropDataConfig
from .elite_common import EliteStageConfig, EliteStageTask
from .export import export_fp32
from .loop import run_from_command_line


@dataclass
class MappingAnchorsConfig(AnchorsConfig):
    """Semantic anchors on the mapping's w0: loss += weight x L_anc (the sparse code is per sample)."""

    weight: float = keyed_field("weight of L_anc(w0) added to the loss", 1.0)


# Official stage 1's data: objects whose box covers 2-80 % of the image, cropped to the box + 10 px.
STAGE1_DATA = dict(min_box_area=0.02, max_box_area=0.8, crop_geometry="box", box_margin=(10, 10))


@dataclass
class GlobalMappingConfig(EliteStageConfig):
    """Keys of `training.global_mapping` (shared keys: training/common_config.py, ELITE keys: elite_common.py)."""

    data: CropDataConfig = keyed_field(
        "crop-shard loader settings; this stage's defaults: boxes covering 2-80 % of the image, cropped to the box + "
        "10 px",
        factory=lambda: CropDataConfig(**STAGE1_DATA),
    )
    learning_rate: float = keyed_field("peak learning rate (paper: 1e-6; before scale_lr)", 1e-6)
    word_l1_weight: float = keyed_field("weight of mean |words| in the loss (paper: 0.01)", 0.01)
    anchors: MappingAnchorsConfig = keyed_field(
        "semantic anchors on w0 (anchors.enabled, anchors.weight, ...)", factory=lambda: MappingAnchorsConfig()
    )


class GlobalMappingTask(EliteStageTask):
    name = "global_mapping"
    config: GlobalMappingConfig

    def build_models(self, accelerator) -> None:
        self.global_mapping = GlobalMapping.from_unet(self.sd.unet, **self.mapping_kwargs()).to(self.device)
        self.global_mapping.train()
        set_elite_processors(self.sd.unet, self.global_mapping)
        self.anchors = self.config.anchors.build_regularizer(self.sd.tokenizers, self.sd.text_encoders, self.device)

    def trainable_models(self):
        return {"global_mapping": self.global_mapping}

    def training_step(self, models, batch, generator):
        mapping = models["global_mapping"]
        latents, feats = self.encode_frozen(batch, "clip_pixel_values", generator)
        words = mapping([feats[layer] for layer in self.config.feature_layers])
        cond = self.conditioning(batch, words)
        mse = self.diffusion_loss(latents, cond, generator, batch.get("valid_mask"))
        word_l1 = words.float().abs().mean()
        loss = mse + self.config.word_l1_weight * word_l1
        logs = {"mse": mse.detach(), "word_l1": word_l1.detach()}
        if self.anchors is not None:
            anchor_loss = self.anchors(words[:, 0].float())
            loss = loss + self.config.anchors.weight * anchor_loss
            logs["anchor_loss"] = anchor_loss.detach()
        return loss, logs

    def validation_mappings(self, models):
        return models["global_mapping"], None

    def export(self, models, export_dir):
        return [export_fp32(models["global_mapping"], "global_mapping", export_dir, self.config.output_dir)]

    def model_card_notes(self) -> str:
        cfg = self.config
        return (
            "## global_mapping\n\n"
            f"ELITE global mapping: CLIP layers {list(cfg.feature_layers)} -> {len(cfg.feature_layers)} words "
            "(w0 is the one to use), plus global K/V projections for every UNet cross-attention layer. "
            f"Trained {cfg.max_steps} steps, batch {cfg.train_batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} per process, lr {cfg.learning_rate:g} (scale_lr={cfg.scale_lr}), "
            f"word L1 {cfg.word_l1_weight:g}, {cfg.data.resolution} px."
            + (
                f" Semantic anchors on w0 ({cfg.anchors.vocabulary}, at most {cfg.anchors.max_active} active, "
                f"weight {cfg.anchors.weight:g})."
                if cfg.anchors.enabled
                else ""
            )
            + "\n"
        )


def main(argv: list[str] | None = None) -> None:
    config = parse_config_cli(
        GlobalMappingConfig,
        argv,
        prog="accelerate launch -m training.global_mapping",
        description="ELITE stage 1: train the global mapping network and global K/V projections on crop shards.",
    )
    run_from_command_line(GlobalMappingTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
