"""ELITE stage 1: train the global mapping (CLIP features -> 5 words) with new global K/V projections.

    accelerate launch -m training.global_mapping --config configs/train/global_mapping.yaml [key=value ...]

Per step: the crop's latents and its multi-layer CLIP features come from the frozen VAE and CLIP
tower (once, without gradients); the global mapping turns the features into N words that take the
placeholder's place in a random ImageNet template caption (the tail shifts right by N - 1); the
frozen text encoder runs WITH gradients (they flow into the words, not its weights); the frozen
UNet, whose cross-attention layers use the mapping's trainable K/V projections for the text,
predicts the noise. Loss = epsilon-MSE + `word_l1_weight` (paper: 0.01) x mean |words|.

Trainable: `GlobalMapping` (MLPs + K/V), saved as `checkpoint-N/global_mapping/` and exported to
`<export_dir>/global_mapping/`. Paper: batch 16 over 4 GPUs, lr 1e-6 (the reference scales it by
GPUs x batch x accumulation: `scale_lr=true`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from encoders.attention import AttentionContext, set_elite_processors
from encoders.global_mapping import GlobalMapping
from encoders.run_config import parse_config_cli
from encoders.text_injection import encode_text_with_words

from .elite_common import EliteStageConfig, EliteStageTask, _help, export_fp32
from .loop import run_training


@dataclass
class GlobalMappingConfig(EliteStageConfig):
    """Keys of `training.global_mapping` (shared keys: training/common_config.py, ELITE keys: elite_common.py)."""

    learning_rate: float = _help("peak learning rate (paper: 1e-6; before scale_lr)", 1e-6)
    word_l1_weight: float = _help("weight of mean |words| in the loss (paper: 0.01)", 0.01)


class GlobalMappingTask(EliteStageTask):
    name = "global_mapping"
    config: GlobalMappingConfig

    def build_models(self, accelerator) -> None:
        self.global_mapping = GlobalMapping.from_unet(self.sd.unet, **self.mapping_kwargs()).to(self.device)
        self.global_mapping.train()
        set_elite_processors(self.sd.unet, self.global_mapping)

    def trainable_models(self):
        return {"global_mapping": self.global_mapping}

    def training_step(self, models, batch, generator):
        mapping = models["global_mapping"]
        latents, feats = self.encode_frozen(batch, "clip_pixel_values", generator)
        words = mapping([feats[layer] for layer in self.config.feature_layers])
        text = encode_text_with_words(self.sd.text_encoder, batch["input_ids"], self.placeholder_id, words)
        mse = self.diffusion_loss(latents, text.hidden_states, generator, AttentionContext().as_kwargs(),
                                  batch.get("valid_mask"))
        word_l1 = words.float().abs().mean()
        loss = mse + self.config.word_l1_weight * word_l1
        return loss, {"mse": mse.detach(), "word_l1": word_l1.detach()}

    @torch.no_grad()
    def concept_inputs(self, models, batch):
        feats = self.clip(batch["clip_pixel_values"].to(self.device, self.clip.dtype))
        return models["global_mapping"](feats[:1], num_words=1), None

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
            f"word L1 {cfg.word_l1_weight:g}, {cfg.data.resolution} px.\n"
        )


def main(argv: list[str] | None = None) -> None:
    config = parse_config_cli(
        GlobalMappingConfig,
        argv,
        prog="accelerate launch -m training.global_mapping",
        description="ELITE stage 1: train the global mapping network and global K/V projections on crop shards.",
    )
    run_training(GlobalMappingTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
