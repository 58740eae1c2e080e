"""Frozen Stable Diffusion parts and the denoising loss, shared by every diffusion trainer.

ELITE's two stages, Textual Inversion and Infusion all do the same thing around their own
trainable piece: encode the target image with the frozen VAE (once, without gradients), draw noise
and timesteps from the run's generator, and compare the frozen UNet's prediction with the
scheduler's target. That lives here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from encoders.common.config import ConfigError
from encoders.common.hub import UnsupportedBaseError, check_supported_base
from encoders.conditioning import sdxl_added_conditioning
from encoders.text_injection import add_placeholder_tokens, word_widths


@dataclass
class FrozenStableDiffusion:
    """Tokenizer, text encoder, VAE, UNet and training noise scheduler of a base pipeline, frozen; for an
    SDXL base also its second tokenizer and text encoder (`is_sdxl`)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None

    @classmethod
    def load(
        cls,
        name_or_path: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        allow_sdxl: bool = False,
    ) -> FrozenStableDiffusion:
        """Load each component with `from_pretrained(name_or_path, subfolder=...)` (a folder or a Hub id);
        a base the method does not support (SDXL unless `allow_sdxl`) is a ConfigError naming it."""
        try:
            sdxl = check_supported_base(name_or_path, allow_sdxl=allow_sdxl)
        except UnsupportedBaseError as err:
            raise ConfigError(f"pretrained_model_name_or_path: {err}") from None
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder")
        tokenizer_2 = text_encoder_2 = None
        if sdxl:
            tokenizer_2 = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2")
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
        for module in (text_encoder, text_encoder_2, vae, unet):
            if module is None:
                continue
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers only checkpoints in training mode; the UNet has no dropout/batch-norm
        return cls(tokenizer, text_encoder, vae, unet, noise_scheduler, tokenizer_2, text_encoder_2)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def tokenizers(self) -> list:
        """The base's tokenizers, one per text encoder (SDXL: two)."""
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def word_width(self) -> int:
        """Width of a word for this base: the text encoder's, or both encoders' together on SDXL
        (a word's first slice goes into the first encoder's embedding space, the rest into the second's)."""
        return sum(word_widths(self.text_encoders))

    def add_placeholders(self, tokens: Sequence[str]) -> list[list[int]]:
        """Add the placeholder tokens to every tokenizer; their ids per tokenizer (`[encoder][concept]`).
        A token that is already a word of one of them is a ConfigError (it would not be new)."""
        ids = []
        for name, tokenizer in zip(("tokenizer", "tokenizer_2"), self.tokenizers):
            taken = [t for t in tokens if t in tokenizer.get_vocab() and t not in tokenizer.get_added_vocab()]
            if taken:
                raise ConfigError(
                    f"placeholder {taken[0]!r} is already a word of the base's {name}; pick a new one (e.g. S*)"
                )
            ids.append(add_placeholder_tokens(tokenizer, list(tokens)))
        return ids

    def token_ids(self, prompts: Sequence[str], device=None) -> list[torch.Tensor]:
        """`[B, L]` ids of `prompts` from each tokenizer (padded to its max length), one tensor per encoder."""
        return [
            tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device or self.unet.device)
            for tokenizer in self.tokenizers
        ]

    def added_conditioning(self, pooled: torch.Tensor | None, size: int) -> dict | None:
        """The UNet's `added_cond_kwargs`: None on SD, the pooled embedding + size numbers on SDXL."""
        return None if pooled is None else sdxl_added_conditioning(pooled, size)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], size: int) -> tuple[torch.Tensor, dict | None]:
        """`(encoder_hidden_states, added_cond_kwargs)` for plain prompts, as the base's pipeline computes
        them. SD: the text encoder's last states, None. SDXL (as `StableDiffusionXLPipeline.encode_prompt`):
        both encoders' penultimate states side by side, the second one's projected pooled embedding,
        and the six size numbers (original size, crop corner 0, 0, target size) for a `size` px square."""
        device = self.unet.device

        def ids(tokenizer):
            return tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)

        if not self.is_sdxl:
            return self.text_encoder(ids(self.tokenizer))[0], None
        first = self.text_encoder(ids(self.tokenizer), output_hidden_states=True)
        second = self.text_encoder_2(ids(self.tokenizer_2), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return states, sdxl_added_conditioning(second.text_embeds, size)

    def sampling_pipeline(self, scheduler_class=None):
        """A diffusers pipeline (`StableDiffusionXLPipeline` for SDXL) over these frozen parts, as they are (device,
        dtype, attention processors), with `scheduler_class` (default DPM-Solver++) on the base's schedule:
        validation pictures are made by the code users run."""
        from diffusers import DPMSolverMultistepScheduler

        from inference.loading import pipeline_from_parts

        return pipeline_from_parts(
            self.vae,
            self.text_encoder,
            self.tokenizer,
            self.unet,
            (scheduler_class or DPMSolverMultistepScheduler).from_config(self.noise_scheduler.config),
            self.text_encoder_2,
            self.tokenizer_2,
        )

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell, read from the VAE config (8 for SD, 2 for the tiny test VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (a sample of the VAE posterior, as SD training does)."""
        pixel_values = pixel_values.to(device=self.vae.device, dtype=self.vae.dtype)
        dist = self.vae.encode(pixel_values).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cached posterior moments `[B, 2C, h, w]` (mean, log-variance) -> scaled latents.

        The same draw `encode_images` makes from the VAE's output, without running the encoder
        (shards from `python -m data_prep latents`, `data.cached_latents=true`).
        """

        moments = moments.to(device=self.vae.device, dtype=self.vae.dtype)
        return DiagonalGaussianDistribution(moments).sample(generator=generator) * self.vae.config.scaling_factor

    def add_noise(
        self, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy latents, the UNet's regression target and the timesteps, all drawn from `generator`."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=latents.device,
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} in the base model's scheduler config")
        return noisy, target, timesteps


def denoising_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    sum_channels: bool = False,
    average: str = "mask",
) -> torch.Tensor:
    """Mean squared error per sample, averaged over the batch.

    With `weight` (e.g. the valid-region mask at latent resolution, [B, 1, h, w]) each sample's error
    is averaged over the weighted cells only, so padding added by scale augmentation does not count.
    `sum_channels=True` sums the error over the latent channels before that average (official ELITE
    stage 2: `(mse * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])` with a one-channel mask, i.e. C x
    the per-element mean). `average="image"` divides the weighted error by all cells instead (Infusion's
    code: `(mse * mask).mean()`, soft masks weighing each cell).
    """
    err = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if sum_channels:
        err = err.sum(dim=1, keepdim=True)
    if weight is None:
        return err.mean(dim=tuple(range(1, err.ndim))).mean()
    weight = weight.to(err.dtype).expand_as(err)
    if average == "image":
        return (err * weight).mean(dim=tuple(range(1, err.ndim))).mean()
    per_sample = (err * weight).sum(dim=tuple(range(1, err.ndim))) / weight.sum(
        dim=tuple(range(1, err.ndim))
    ).clamp_min(1e-8)
    return per_sample.mean()
