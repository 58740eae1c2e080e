"""Frozen Stable Diffusion parts and the denoising loss, shared by every diffusion trainer.

ELITE's two stages, Textual Inversion and Infusion all do the same thing around their own
trainable piece: encode the target image with the frozen VAE (once, without gradients), draw noise
and timesteps from the run's generator, and compare the frozen UNet's prediction with the
scheduler's target. That lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTokenizer

from encoders.common.config import ConfigError
from encoders.common.hub import UnsupportedBaseError, check_supported_base


@dataclass
class FrozenStableDiffusion:
    """Tokenizer, text encoder, VAE, UNet and training noise scheduler of a base pipeline, frozen."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object

    @classmethod
    def load(
        cls,
        name_or_path: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
    ) -> "FrozenStableDiffusion":
        """Load each component with `from_pretrained(name_or_path, subfolder=...)` (a folder or a Hub id);
        an SDXL-style base is a ConfigError naming it (`check_supported_base`)."""
        try:
            check_supported_base(name_or_path)
        except UnsupportedBaseError as err:
            raise ConfigError(f"pretrained_model_name_or_path: {err}") from None
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
        for module in (text_encoder, vae, unet):
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers only checkpoints in training mode; the UNet has no dropout/batch-norm
        return cls(tokenizer, text_encoder, vae, unet, noise_scheduler)

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
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, sum_channels: bool = False
) -> torch.Tensor:
    """Mean squared error per sample, averaged over the batch.

    With `weight` (e.g. the valid-region mask at latent resolution, [B, 1, h, w]) each sample's error
    is averaged over the weighted cells only, so padding added by scale augmentation does not count.
    `sum_channels=True` sums the error over the latent channels before that average (official ELITE
    stage 2: `(mse * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])` with a one-channel mask, i.e. C x
    the per-element mean).
    """
    err = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if sum_channels:
        err = err.sum(dim=1, keepdim=True)
    if weight is None:
        return err.mean(dim=tuple(range(1, err.ndim))).mean()
    weight = weight.to(err.dtype).expand_as(err)
    per_sample = (err * weight).sum(dim=tuple(range(1, err.ndim))) / weight.sum(dim=tuple(range(1, err.ndim))).clamp_min(1e-8)
    return per_sample.mean()
