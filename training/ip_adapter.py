"""IP-Adapter on this repository's crop shards and training loop, exported for diffusers and ComfyUI.

    accelerate launch -m training.ip_adapter --config configs/train/ip_adapter.yaml [key=value ...]

IP-Adapter ("IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
Ye et al., 2023): a frozen CLIP image encoder's output, projected into a few tokens
(`encoders.ip_adapter`), is read by new K/V projections beside every frozen cross-attention layer
(decoupled cross-attention). Per step, as the official training script: the target's latents (frozen
VAE), the caption's text states (frozen text encoder) and the image's CLIP output (frozen, no
gradients); with probability 0.05 each the image is dropped (zero `image_embeds`; zero pixels for
"plus"), the caption is dropped (""), or both, so classifier-free guidance works on either; the UNet,
running diffusers' own IP-Adapter processors with the trainable projections, predicts the noise;
loss = MSE to the scheduler's target. Official recipe: lr 1e-4, weight decay 0.01, no gradient
clipping, batch 8 per GPU on 8 GPUs, 512 px, fp16.

What this repository adds: the crop shards as data (the crop is both the target and the image
prompt; its caption is a template naming the crop's category, "a photo of a teapot"), the mask as an
option the original lacks (`condition=object`: the image prompt is the object on black), exact resume,
DeepSpeed and the memory plans of the shared loop.

Export: `<export_dir>/ip_adapter/ip_adapter.safetensors` in the official single-file layout, with the
image encoder beside it as `image_encoder/`, so a stock pipeline loads it with

    pipe.load_ip_adapter(export_dir, subfolder="ip_adapter", weight_name="ip_adapter.safetensors")
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from encoders.clip_features import load_clip_normalization
from encoders.common.config import ConfigError, keyed_field, parse_config_cli
from encoders.common.files import atomic_directory
from encoders.ip_adapter import BASE_TOKENS, EXPORT_FILE, VARIANTS, IPAdapter

from .common_config import TrainConfig
from .crop_data import CropDataConfig, build_crop_dataloader, first_crop_samples
from .diffusion import FrozenStableDiffusion, denoising_loss
from .export import card_header, copy_samples, describe_source, fp32_module
from .loop import TrainingTask, run_from_command_line
from .shard_reader import ShardSet

logger = logging.getLogger(__name__)

CONDITIONS = ("image", "object")
# The official script feeds CLIP the image as its processor makes it (resize + centre crop), no augmentation.
IP_ADAPTER_DATA = dict(
    clip_flip_prob=0.0,
    clip_rotation_prob=0.0,
    clip_blur_prob=0.0,
    clip_affine_prob=0.0,
    object_resize_crop_prob=0.0,
    object_rotation_prob=0.0,
    object_translate_prob=0.0,
)


@dataclass
class IPAdapterConfig(TrainConfig):
    """Keys of `training.ip_adapter` (shared keys: training/common_config.py; `data.*`: training/crop_data.py)."""

    pretrained_model_name_or_path: str = keyed_field(
        "base Stable Diffusion pipeline: a diffusers folder or Hub id (official: SD v1.5)",
        "runwayml/stable-diffusion-v1-5",
    )
    image_encoder_name_or_path: str = keyed_field(
        "CLIP vision tower with its projection (CLIPVisionModelWithProjection): a folder or Hub id", "h94/IP-Adapter"
    )
    image_encoder_subfolder: str | None = keyed_field(
        "subfolder of image_encoder_name_or_path holding it (h94/IP-Adapter: models/image_encoder, OpenCLIP "
        "ViT-H/14); not used when the folder given holds the model itself",
        "models/image_encoder",
    )
    data: CropDataConfig = keyed_field(
        "crop-shard loader settings; this trainer's defaults: no augmentation of the CLIP view",
        factory=lambda: CropDataConfig(**IP_ADAPTER_DATA),
    )
    variant: str = keyed_field(
        "base (pooled image_embeds -> 4 tokens) or plus (penultimate patch states -> resampler, 16 tokens)", "base"
    )
    num_tokens: int | None = keyed_field("image tokens (default: 4 for base, which is fixed; 16 for plus)", None)
    plus_heads: int = keyed_field("plus: resampler heads of width 64 (official: 12 on SD 1.5, 20 on SDXL)", 12)
    condition: str = keyed_field(
        "the image prompt: image (the crop, official) or object (the crop times its mask, black outside)", "image"
    )
    image_drop_rate: float = keyed_field("probability of dropping the image prompt alone (official: 0.05)", 0.05)
    text_drop_rate: float = keyed_field("probability of dropping the caption alone (official: 0.05)", 0.05)
    both_drop_rate: float = keyed_field("probability of dropping both (official: 0.05)", 0.05)
    learning_rate: float = keyed_field("peak learning rate (official: 1e-4)", 1e-4)
    max_grad_norm: float = keyed_field("gradient clipping norm (official: none, 0)", 0.0)
    export_image_encoder: bool = keyed_field(
        "write the image encoder beside the weights (ip_adapter/image_encoder/), as load_ip_adapter looks for it",
        True,
    )
    validation_prompts: list[str] = keyed_field(
        "prompts for validation images, each with the crop as image prompt", factory=lambda: ["", "on the beach"]
    )
    num_validation_samples: int = keyed_field("crops from the shards to render validation images for", 2)
    validation_inference_steps: int = keyed_field("sampler steps for validation images", 25)
    validation_guidance_scale: float = keyed_field("classifier-free guidance for validation images", 7.5)
    validation_ip_scale: float = keyed_field("the image prompt's weight for validation images", 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.condition not in CONDITIONS:
            raise ConfigError(f"condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")
        if self.variant == "base" and self.num_tokens not in (None, BASE_TOKENS):
            raise ConfigError(f"variant=base has {BASE_TOKENS} image tokens (diffusers' loader reads it so)")
        rates = (self.image_drop_rate, self.text_drop_rate, self.both_drop_rate)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ConfigError(f"the drop rates must be >= 0 and sum to at most 1, got {rates}")
        if self.plus_heads < 1:
            raise ConfigError(f"plus_heads must be >= 1, got {self.plus_heads}")

    @property
    def image_encoder_kwargs(self) -> dict:
        """`from_pretrained` keywords for the image encoder: `image_encoder_subfolder` unless the given folder
        holds the model itself (a local `CLIPVisionModelWithProjection` or `CLIPModel` folder)."""
        sub = self.image_encoder_subfolder
        if not sub or (Path(self.image_encoder_name_or_path) / "config.json").is_file():
            return {}
        return {"subfolder": sub}

    @property
    def resolved_num_tokens(self) -> int:
        return self.num_tokens or (BASE_TOKENS if self.variant == "base" else 16)


class IPAdapterTask(TrainingTask):
    name = "ip_adapter"
    config: IPAdapterConfig

    def setup(self, accelerator, weight_dtype: torch.dtype) -> None:
        from transformers import CLIPVisionModelWithProjection

        cfg = self.config
        self.accelerator, self.device, self.weight_dtype = accelerator, accelerator.device, weight_dtype
        self.shards = ShardSet.open(cfg.train_shards)  # a mistyped pattern stops here, before any model loads
        self.sd = FrozenStableDiffusion.load(
            cfg.pretrained_model_name_or_path,
            accelerator.device,
            weight_dtype,
            cfg.gradient_checkpointing,
            allow_sdxl=True,
        )
        sub = cfg.image_encoder_kwargs
        encoder = CLIPVisionModelWithProjection.from_pretrained(cfg.image_encoder_name_or_path, **sub)
        self.image_encoder = encoder.eval().requires_grad_(False).to(accelerator.device, weight_dtype)
        size = int(encoder.config.image_size)
        if cfg.data.clip_size != size:
            raise ConfigError(
                f"data.clip_size={cfg.data.clip_size} but {cfg.image_encoder_name_or_path} takes {size} px images; "
                f"set data.clip_size={size}"
            )
        plus = cfg.variant == "plus"
        self.ip_adapter = IPAdapter.from_unet(
            self.sd.unet,
            image_embed_dim=int(encoder.config.hidden_size if plus else encoder.config.projection_dim),
            variant=cfg.variant,
            num_tokens=cfg.resolved_num_tokens,
            plus_heads=cfg.plus_heads,
            image_encoder_name_or_path=cfg.image_encoder_name_or_path,
            pretrained_model_name_or_path=cfg.pretrained_model_name_or_path,
        ).to(self.device)
        self.ip_adapter.train()
        self.ip_adapter.install(self.sd.unet)  # after the UNet's cast: the projections stay fp32 and trainable
        mean, std = load_clip_normalization(cfg.image_encoder_name_or_path, sub.get("subfolder"))
        self.loader = build_crop_dataloader(
            self.shards,
            cfg.data,
            batch_size=cfg.train_batch_size,
            vae_scale_factor=self.sd.vae_scale_factor,
            clip_mean=mean,
            clip_std=std,
            num_workers=cfg.dataloader_num_workers,
            seed=cfg.seed,
        )
        self._validation_crops = None

    def trainable_models(self):
        return {"ip_adapter": self.ip_adapter}

    def train_dataloader(self):
        return self.loader

    # ---- per step -----------------------------------------------------------------------------
    def captions(self, batch: Mapping) -> list[str]:
        """The loader's template captions with the crop's category in the placeholder's place."""
        token = self.config.data.placeholder_token
        return [c.replace(token, cat or "object") for c, cat in zip(batch["caption"], batch["category"])]

    def drops(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop image, drop text) per sample, as the official dataset draws them: one uniform number,
        image alone below image_drop_rate, text alone in the next text_drop_rate, both in the next."""
        cfg = self.config
        r = torch.rand(batch_size, generator=generator, device=generator.device).cpu()
        image_only = r < cfg.image_drop_rate
        text_only = (r >= cfg.image_drop_rate) & (r < cfg.image_drop_rate + cfg.text_drop_rate)
        both = (r >= cfg.image_drop_rate + cfg.text_drop_rate) & (
            r < cfg.image_drop_rate + cfg.text_drop_rate + cfg.both_drop_rate
        )
        return image_only | both, text_only | both

    @torch.no_grad()
    def image_embeds(self, pixels: torch.Tensor, drop_image: torch.Tensor) -> torch.Tensor:
        """What `unet.encoder_hid_proj` reads: base `[B, 1, D]` image_embeds (zeroed where dropped), plus
        `[B, 1, 1 + P, D]` penultimate states of the image (zero pixels where dropped), as the official scripts."""
        keep = (~drop_image).to(self.device)
        pixels = pixels.to(self.device, self.image_encoder.dtype)
        if self.config.variant == "plus":
            pixels = pixels * keep[:, None, None, None].to(pixels.dtype)
            states = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
            return states[:, None]
        embeds = self.image_encoder(pixels).image_embeds
        return (embeds * keep[:, None].to(embeds.dtype))[:, None]

    def training_step(self, models, batch, generator):
        cfg = self.config
        drop_image, drop_text = self.drops(len(batch["caption"]), generator)
        with torch.no_grad():
            if "latent_moments" in batch:
                latents = self.sd.sample_latents(batch["latent_moments"], generator=generator)
            else:
                latents = self.sd.encode_images(batch["pixel_values"], generator=generator)
            captions = ["" if drop else c for c, drop in zip(self.captions(batch), drop_text.tolist())]
            text, added = self.sd.encode_text(captions, cfg.data.resolution)
            key = "clip_object_pixel_values" if cfg.condition == "object" else "clip_pixel_values"
            embeds = self.image_embeds(batch[key], drop_image)
        noisy, target, timesteps = self.sd.add_noise(latents, generator)
        added = dict(added or {}, image_embeds=[embeds])
        pred = self.sd.unet(noisy, timesteps, text.to(self.sd.unet.dtype), added_cond_kwargs=added).sample
        loss = denoising_loss(pred, target)
        return loss, {"mse": loss.detach(), "dropped_images": drop_image.float().mean()}

    # ---- validation ---------------------------------------------------------------------------
    def validation_pipeline(self):
        """A stock diffusers pipeline over the frozen parts, the UNet with the adapter being trained and the
        image encoder registered: validation pictures come from `pipe(prompt, ip_adapter_image=crop)`."""
        pipe = self.sd.sampling_pipeline()
        pipe.register_modules(image_encoder=self.image_encoder, feature_extractor=self.image_processor())
        pipe.set_ip_adapter_scale(self.config.validation_ip_scale)
        return pipe

    def image_processor(self):
        """The image encoder's own `CLIPImageProcessor`, or, when none is saved, the one `load_ip_adapter` makes
        (CLIP's statistics at the encoder's size)."""
        from transformers import CLIPImageProcessor

        cfg = self.config
        try:
            return CLIPImageProcessor.from_pretrained(cfg.image_encoder_name_or_path, **cfg.image_encoder_kwargs)
        except OSError:
            size = int(self.image_encoder.config.image_size)
            return CLIPImageProcessor(size=size, crop_size=size)

    def validation_images(self, models, step: int) -> list | None:
        cfg = self.config
        if not cfg.validation_prompts or cfg.num_validation_samples <= 0:
            return None
        if self._validation_crops is None:  # read apart from the training stream: its order is untouched
            self._validation_crops = first_crop_samples(self.loader.shards, cfg.num_validation_samples)
        pipe = self.validation_pipeline()  # sets validation_ip_scale on the processors training uses ...
        try:
            return self._render(pipe)
        finally:
            pipe.set_ip_adapter_scale(1.0)  # ... so training goes on at the scale it trains with

    def _render(self, pipe) -> list:
        cfg = self.config
        res = cfg.data.resolution
        images = []
        with self.accelerator.autocast():
            for image, mask, _ in self._validation_crops:
                prompt_image = image
                if cfg.condition == "object":
                    from PIL import Image

                    prompt_image = Image.composite(image, Image.new("RGB", image.size), mask.resize(image.size))
                images.append(image.resize((res, res)))
                for prompt in cfg.validation_prompts:
                    out = pipe(
                        prompt,
                        ip_adapter_image=prompt_image,
                        num_inference_steps=cfg.validation_inference_steps,
                        guidance_scale=cfg.validation_guidance_scale,
                        generator=torch.Generator("cpu").manual_seed(cfg.seed),
                        height=res,
                        width=res,
                    )
                    images.append(out.images[0])
        return images

    # ---- export -------------------------------------------------------------------------------
    def export(self, models, export_dir: Path) -> list[str]:
        """`ip_adapter/ip_adapter.safetensors` (official layout, fp32) and `ip_adapter/image_encoder/`."""
        from transformers import CLIPVisionModelWithProjection

        cfg = self.config
        adapter = fp32_module(models["ip_adapter"], "ip_adapter", cfg.output_dir)
        with atomic_directory(Path(export_dir) / "ip_adapter") as tmp:
            save_file(adapter.official_state_dict(), Path(tmp) / EXPORT_FILE, metadata={"format": "pt"})
            if cfg.export_image_encoder:
                sub = cfg.image_encoder_kwargs
                encoder = CLIPVisionModelWithProjection.from_pretrained(cfg.image_encoder_name_or_path, **sub)
                encoder.save_pretrained(Path(tmp) / "image_encoder", safe_serialization=True)
                self.image_processor().save_pretrained(Path(tmp) / "image_encoder")
        return [f"ip_adapter/{EXPORT_FILE}"] + (["ip_adapter/image_encoder/"] if cfg.export_image_encoder else [])

    def model_card(self) -> str:
        cfg = self.config
        samples = copy_samples(cfg.output_dir, cfg.resolved_export_dir)
        header = card_header(cfg, ["ip-adapter", "stable-diffusion", "zero-step-personalization"])
        header = header.replace("---\n", "---\nlibrary_name: diffusers\n", 1)
        prompt_view = "the object on black (its mask)" if cfg.condition == "object" else "the crop"
        encoder_line = (
            "`ip_adapter/image_encoder/` holds the image encoder it was trained with."
            if cfg.export_image_encoder
            else f"Load the image encoder it was trained with ({describe_source(cfg.image_encoder_name_or_path)}"
            + (f", subfolder {sub}" if (sub := cfg.image_encoder_kwargs.get("subfolder")) else "")
            + ") with "
            "`image_encoder_folder=`."
        )
        return (
            header
            + f"""
# IP-Adapter{" Plus" if cfg.variant == "plus" else ""}

An image prompt adapter (decoupled cross-attention, {cfg.resolved_num_tokens} image tokens) for
{describe_source(cfg.pretrained_model_name_or_path)}, in the official single-file layout that diffusers'
`load_ip_adapter` and ComfyUI's IP-Adapter nodes read. {encoder_line}

```python
pipe.load_ip_adapter("PATH_OR_REPO", subfolder="ip_adapter", weight_name="{EXPORT_FILE}")
pipe.set_ip_adapter_scale(0.6)
image = pipe("on the beach", ip_adapter_image=photo).images[0]
```
{chr(10) + "![validation samples](" + samples + ")" + chr(10) if samples else ""}
## Training

- crop shards, {cfg.data.resolution} px targets; image prompt: {prompt_view}; captions: templates naming the
  crop's category
- drop rates: image {cfg.image_drop_rate:g}, text {cfg.text_drop_rate:g}, both {cfg.both_drop_rate:g}
- {cfg.max_steps} steps, batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps} per process,
  lr {cfg.learning_rate:g}{" (scaled)" if cfg.scale_lr else ""}, weight decay {cfg.adam_weight_decay:g}, seed {cfg.seed}
- image encoder {describe_source(cfg.image_encoder_name_or_path)}; every setting in `training_config_ip_adapter.yaml`
"""
        )


def main(argv: list[str] | None = None) -> None:
    config = parse_config_cli(
        IPAdapterConfig,
        argv,
        prog="accelerate launch -m training.ip_adapter",
        description="Train an IP-Adapter on crop shards; export ip_adapter.safetensors for diffusers and ComfyUI.",
    )
    run_from_command_line(IPAdapterTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
