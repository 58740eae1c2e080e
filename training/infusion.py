"""Infusion: learn a residual value vector per cross-attention layer for a concept's class word.

    accelerate launch -m training.infusion --config configs/finetune/infusion.yaml \\
        concept_dir=photos/ class_word=cat output_dir=out/cat_infusion

The captions say the class word itself ("a photo of a cat"); the UNet's cross-attention layers get
`encoders.infusion.InfusionAttnProcessor`, which adds the concept's Delta_i to the value of the
class word's tokens only. With `replace_maps` (the paper's dual stream, default) each training sample
runs twice in one UNet call on the same noisy latent: a foundational row and a customised row whose
cross-attention maps are the foundational row's; only the customised row's prediction is trained.
Paper settings: lr 0.01, batch 4; DDIM 50 steps, guidance 8 at inference.

Output in `output_dir`: `infusion/` (an `InfusionResiduals` folder: config + a few KB of safetensors),
`concept.json`, checkpoints and logs. Use it with `inference.methods.generate_with_infusion(pipe,
prompts, [InfusionResiduals.from_pretrained(output_dir, subfolder="infusion")])`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from encoders.attention import CONTEXT_KWARG, AttentionContext
from encoders.common.config import ConfigError, keyed_field, parse_config_cli
from encoders.common.finetune_folder import RESIDUALS_FOLDER
from encoders.infusion import (
    EXTRAS_KEY,
    VARIANTS,
    InfusionResiduals,
    dual_stream_call,
    infusion_call,
    set_infusion_processors,
)
from inference.masking import DEFAULT_MASK_MODEL
from inference.methods import generate_with_infusion

from .concept_data import ConceptDataConfig, ConceptFinetuneTask, FinetuneConfig
from .export import export_model
from .loop import run_from_command_line


@dataclass
class InfusionConfig(FinetuneConfig):
    """Infusion keys (defaults: the paper's settings)."""

    output_dir: str = keyed_field("run folder: infusion/, concept.json, checkpoints, logs", "outputs/infusion")
    max_steps: int = keyed_field("optimizer steps", 500)
    train_batch_size: int = keyed_field("photos per device per step (paper: 4)", 4)
    learning_rate: float = keyed_field("learning rate (paper: 0.01)", 1e-2)
    gradient_accumulation_steps: int = keyed_field("micro-steps accumulated per optimizer step (official: 4)", 4)
    adam_weight_decay: float = keyed_field("AdamW weight decay on the residuals (official: 0.01)", 1e-2)
    data: ConceptDataConfig = keyed_field(
        "how the photos become samples; Infusion's: CLIPSeg soft masks, the masked error averaged over all pixels",
        factory=lambda: ConceptDataConfig(soft_masks=DEFAULT_MASK_MODEL, mask_average="image"),
    )
    checkpointing_steps: int = keyed_field("save checkpoint-N/ every N steps (0: only at the end)", 250)
    variant: Literal["paper", "released"] = keyed_field(
        "paper: value residuals, the base model's cross-attention maps (Eq. 7, the dual stream); released: the "
        "official code's xformers path, a key residual too and the customised model's own maps",
        "paper",
    )
    replace_maps: bool | None = keyed_field(
        "dual stream: the customised rows use the base model's cross-attention maps; unset: by variant (paper: true, "
        "released: false)",
        None,
    )
    validation_inference_steps: int = keyed_field("DDIM steps for validation images (paper: 50)", 50)
    validation_guidance_scale: float = keyed_field("classifier-free guidance for validation images (paper: 8)", 8.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.replace_maps is None:
            self.replace_maps = self.variant == "paper"
        if not self.class_word:
            raise ConfigError(
                "class_word is required: the concept's class noun (e.g. cat) whose value gets the residual"
            )


class InfusionTask(ConceptFinetuneTask):
    name = "infusion"
    config: InfusionConfig
    card_tags = ("infusion",)
    supports_sdxl = True  # residuals on every cross-attention layer's values, whatever the text width

    def build_trainable(self) -> None:
        self.residuals = InfusionResiduals.for_unet(
            self.sd.unet,
            self.config.class_word,
            base_model=self.config.pretrained_model_name_or_path,
            variant=self.config.variant,
        ).to(self.device)
        # references from the frozen UNet's processors to the trainable (fp32) residuals, installed after
        # the UNet was frozen and cast (training.loop's rule for such references)
        set_infusion_processors(self.sd.unet, [self.residuals])
        self.accelerator.print(
            f"[{self.name}] {len(self.residuals.residuals)} cross-attention layers, "
            f"{sum(p.numel() for p in self.residuals.parameters()):,} residual values for {self.config.class_word!r}"
        )

    def trainable_models(self):
        return {"infusion": self.residuals}

    def concept_phrase(self) -> str:
        return self.config.class_word

    def predict_noise(self, models, noisy, timesteps, prompts):
        # SD: the text states; SDXL: both encoders' states and the pooled / size conditioning. The class
        # word sits at the same positions in both SDXL tokenizers (the same BPE), so one mask serves.
        text, added = self.sd.encode_text(prompts, self.config.data.resolution)
        n = len(prompts)
        if self.config.replace_maps:
            call = dual_stream_call(self.sd.tokenizer, prompts, [models["infusion"]], require_all=True)
            noisy, timesteps, text = (
                torch.cat([noisy, noisy]),
                torch.cat([timesteps, timesteps]),
                torch.cat([text, text]),
            )
            added = None if added is None else {k: torch.cat([v, v]) for k, v in added.items()}
        else:
            call = infusion_call(self.sd.tokenizer, prompts, [models["infusion"]], require_all=True)
        ctx = AttentionContext(extras={EXTRAS_KEY: call})
        prediction = self.sd.unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            added_cond_kwargs=added,
            cross_attention_kwargs={CONTEXT_KWARG: ctx},
        ).sample
        return prediction[n:] if self.config.replace_maps else prediction

    def regularize(self, models, rec_loss):
        return rec_loss, {"residual_norm": models["infusion"]().detach().norm()}

    @torch.no_grad()
    def sample(self, models, prompts, generator):
        pipe = self.pipeline()
        out = generate_with_infusion(
            pipe,
            prompts,
            [models["infusion"]],
            replace_maps=self.config.replace_maps,
            generator=generator,
            num_inference_steps=self.config.validation_inference_steps,
            guidance_scale=self.config.validation_guidance_scale,
            height=self.config.data.resolution,
            width=self.config.data.resolution,
        )
        return out.base_images + out.images  # top row: base model, bottom row: with the concept

    def export(self, models, export_dir: Path) -> list[str]:
        written = [export_model(models["infusion"], Path(export_dir), RESIDUALS_FOLDER)]
        written.append(self.write_concept_file(export_dir, "infusion", {"residuals": RESIDUALS_FOLDER}))
        return written

    def model_card_notes(self) -> str:
        c = self.config
        pipeline = (
            "StableDiffusionXLPipeline"
            if getattr(getattr(self, "sd", None), "is_sdxl", False)
            else "StableDiffusionPipeline"
        )
        return (
            f"# Infusion residuals for `{c.class_word}`\n\n"
            f"One value residual{' and one key residual' if c.variant == 'released' else ''} per cross-attention "
            f"layer ({RESIDUALS_FOLDER}/, variant `{c.variant}`) for the concept in `{c.concept_dir}`. "
            f'Prompts that say "{c.class_word}" get the concept; '
            f"{'the base model' if c.replace_maps else 'its own'}'s attention maps are used"
            f"{' (dual stream)' if c.replace_maps else ''}, and prompts without the word are untouched.\n\n"
            "```python\n"
            f"from diffusers import DDIMScheduler, {pipeline}\n"
            "from encoders.infusion import InfusionResiduals\nfrom inference.methods import generate_with_infusion\n\n"
            f'pipe = {pipeline}.from_pretrained("{c.pretrained_model_name_or_path}")\n'
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)\n"
            f'concept = InfusionResiduals.from_pretrained("PATH_OR_REPO", subfolder="{RESIDUALS_FOLDER}")\n'
            f'out = generate_with_infusion(pipe, "a {c.class_word} on the beach", [concept], '
            "num_inference_steps=50, guidance_scale=8)\n"
            "out.images[0]  # out.base_images[0]: the base model from the same noise\n"
            "```\n"
        )


def main(argv: list[str] | None = None) -> Path:
    config = parse_config_cli(
        InfusionConfig,
        argv,
        prog="accelerate launch -m training.infusion",
        description="Learn Infusion's per-layer value residuals for a concept's class word from 3-5 photos.",
    )
    return run_from_command_line(InfusionTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
