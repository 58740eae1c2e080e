"""What ELITE's two training stages share: config keys, frozen models, data, validation pictures.

`training.global_mapping` and `training.local_mapping` subclass `EliteStageTask` and add only their
trainable model and loss. Set-up loads, frozen and without gradients: the Stable Diffusion parts
(`training.diffusion.FrozenStableDiffusion`, in the run's precision) and the CLIP vision tower
(`encoders.clip_features`), and adds the placeholder token to the tokenizer. Batches come from the
crop-shard loader (`training.crop_data`); per step the frozen encoders run once, under `torch.no_grad()`.

Validation (every `validation_steps`): for the first `num_validation_samples` crops of the shards,
the crop followed by one image per `validation_prompts` entry, made by `inference.ElitePipeline`
with the mappings as they are (w0 at the placeholder, plus the local branch in the local stage at
`validation_elite_scale`): the same encoding and generation code users run.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from encoders.clip_features import DEFAULT_LAYERS, CLIPFeatureExtractor, load_clip_normalization
from encoders.common.config import ConfigError, keyed_field
from encoders.conditioning import EliteConditioning, elite_conditioning
from inference.loading import EliteEncoders
from inference.pipeline import ElitePipeline

from .common_config import TrainConfig
from .crop_data import CropDataConfig, build_crop_dataloader, cached_latents_models, first_crop_samples
from .diffusion import FrozenStableDiffusion, denoising_loss
from .loop import TrainingTask
from .shard_reader import ShardSet

logger = logging.getLogger(__name__)


@dataclass
class EliteStageConfig(TrainConfig):
    """Keys both ELITE stages add to the shared ones (`data.*` are the loader's, see training/crop_data.py)."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"validation_lam": "validation_elite_scale"}  # old key spellings

    data: CropDataConfig = keyed_field(
        "crop-shard loader settings (data.resolution, data.scale_augment, ...)", factory=CropDataConfig
    )
    feature_layers: list[int] = keyed_field(
        "CLIP vision layers tapped, in word order (the first gives w0)", factory=lambda: list(DEFAULT_LAYERS)
    )
    mapping_hidden_dim: int = keyed_field("hidden width of the mapping MLPs (paper: 1024)", 1024)
    weight_loss_by_valid_region: bool = keyed_field(
        "average the denoising error over the target's real pixels only (the loader's valid_mask)", False
    )
    validation_prompts: list[str] = keyed_field(
        "prompts for validation images; the placeholder stands for the crop's concept",
        factory=lambda: ["a photo of S*", "a S* on the beach"],
    )
    num_validation_samples: int = keyed_field("crops from the shards to render validation images for", 2)
    validation_inference_steps: int = keyed_field("sampler steps for validation images", 25)
    validation_guidance_scale: float = keyed_field("classifier-free guidance for validation images (paper: 5)", 5.0)
    validation_elite_scale: float = keyed_field(
        "lambda, the local branch's weight, for validation images (paper: 0.8)", 0.8
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.feature_layers:
            raise ConfigError("feature_layers must name at least one CLIP layer")
        if self.mapping_hidden_dim <= 0:
            raise ConfigError(f"mapping_hidden_dim must be positive, got {self.mapping_hidden_dim}")
        for prompt in self.validation_prompts:
            if self.data.placeholder_token not in prompt:
                raise ConfigError(
                    f"validation prompt {prompt!r} lacks the placeholder {self.data.placeholder_token!r} "
                    "(data.placeholder_token)"
                )


class EliteStageTask(TrainingTask):
    """Frozen SD + CLIP + data for an ELITE stage; subclasses build their mapping and loss."""

    config: EliteStageConfig

    # ---- set-up ---------------------------------------------------------------------------------
    def clip_layers(self) -> tuple[int, ...]:
        """Layers the CLIP pass taps (a stage may need more than `feature_layers`)."""
        return tuple(self.config.feature_layers)

    def setup(self, accelerator, weight_dtype: torch.dtype) -> None:
        cfg = self.config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype
        # the shards first: a mistyped train_shards stops here in a second, before any model loads
        self.shards = ShardSet.open(cfg.train_shards)
        self.sd = FrozenStableDiffusion.load(
            cfg.pretrained_model_name_or_path,
            accelerator.device,
            weight_dtype,
            cfg.gradient_checkpointing,
            allow_sdxl=True,
        )
        self.clip = CLIPFeatureExtractor.from_pretrained(cfg.image_encoder_name_or_path, layers=self.clip_layers())
        self.clip.to(device=accelerator.device, dtype=weight_dtype)
        if cfg.data.clip_size != self.clip.image_size:
            raise ConfigError(
                f"data.clip_size={cfg.data.clip_size} but {cfg.image_encoder_name_or_path} takes "
                f"{self.clip.image_size} px images; set data.clip_size={self.clip.image_size}"
            )
        self.placeholder_ids = self.sd.add_placeholders([cfg.data.placeholder_token])  # [encoder][concept]
        self.text_dim = self.sd.word_width  # SDXL: both text encoders' widths (one slice of each word per encoder)
        self.build_models(accelerator)
        self._validation_crops = None
        self.loader = self._make_loader(cfg.train_batch_size)
        if cfg.data.cached_latents:
            self._check_latents_model()

    def _check_latents_model(self) -> None:
        """Warn when the shards' cached latents were made with another base model's VAE."""
        base = self.config.pretrained_model_name_or_path
        same = {os.path.abspath(base) if os.path.exists(base) else base}
        recorded = {os.path.abspath(m) if os.path.exists(m) else m for m in cached_latents_models(self.loader.urls)}
        if recorded and not recorded & same:
            logger.warning(
                "data.cached_latents: the shards' latents were made with %s, this run trains on %s",
                sorted(recorded),
                base,
            )

    @abstractmethod
    def build_models(self, accelerator) -> None:
        """Create the trainable mapping (fp32) and install the attention processors on the frozen UNet."""

    def mapping_kwargs(self) -> dict:
        """Config values every mapping records: widths, taps, and the models it is trained for."""
        cfg = self.config
        return dict(
            input_dim=self.clip.hidden_size,
            output_dim=self.text_dim,
            hidden_dim=cfg.mapping_hidden_dim,
            feature_layers=tuple(cfg.feature_layers),
            pretrained_model_name_or_path=cfg.pretrained_model_name_or_path,
            image_encoder_name_or_path=cfg.image_encoder_name_or_path,
        )

    def _make_loader(self, batch_size: int, **overrides):
        cfg = self.config
        mean, std = load_clip_normalization(cfg.image_encoder_name_or_path)
        data_cfg = cfg.data if not overrides else CropDataConfig(**{**vars(cfg.data), **overrides})
        return build_crop_dataloader(
            self.shards,
            data_cfg,
            batch_size=batch_size,
            vae_scale_factor=self.sd.vae_scale_factor,
            tokenizer=self.sd.tokenizer,
            clip_mean=mean,
            clip_std=std,
            num_workers=cfg.dataloader_num_workers,
            seed=cfg.seed,
        )

    def train_dataloader(self):
        return self.loader

    # ---- per-step pieces ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frozen(
        self, batch: Mapping, clip_key: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Latents of the target and the tapped CLIP features {layer: [B, 1+P, D]} (no gradients)."""
        if "latent_moments" in batch:  # data.cached_latents: the VAE ran once, in data_prep
            latents = self.sd.sample_latents(batch["latent_moments"], generator=generator)
        else:
            latents = self.sd.encode_images(batch["pixel_values"], generator=generator)
        return latents, self.clip_features(batch, clip_key)

    @torch.no_grad()
    def clip_features(self, batch: Mapping, clip_key: str) -> dict[int, torch.Tensor]:
        """The tapped CLIP features {layer: [B, 1+P, D]} of one of the batch's views (no gradients)."""
        feats = self.clip(batch[clip_key].to(self.device, self.clip.dtype))
        return dict(zip(self.clip.layers, feats))

    def conditioning(self, batch: Mapping, words: torch.Tensor, **kwargs) -> EliteConditioning:
        """`encoders.conditioning.elite_conditioning` of the batch's captions with `words` at the
        placeholder; on SDXL the captions are also tokenised for the second text encoder."""
        ids = [batch["input_ids"]] + (self.sd.token_ids(batch["caption"])[1:] if self.sd.is_sdxl else [])
        return elite_conditioning(self.sd.text_encoders, ids, self.placeholder_ids, [words], **kwargs)

    def diffusion_loss(
        self, latents, cond: EliteConditioning, generator, valid_mask=None, sum_channels: bool = False
    ) -> torch.Tensor:
        """Noise the latents, run the frozen UNet with the ELITE processors, compare with the target.
        SDXL's size numbers say a full, uncropped image of the training resolution (what its pipeline
        passes by default at that size): the crops are object-centred squares resized to it."""
        noisy, target, timesteps = self.sd.add_noise(latents, generator)
        added = self.sd.added_conditioning(cond.pooled_prompt_embeds, self.config.data.resolution)
        pred = self.sd.unet(
            noisy,
            timesteps,
            cond.prompt_embeds.to(self.sd.unet.dtype),
            cross_attention_kwargs=cond.context.as_kwargs(),
            added_cond_kwargs=added,
        ).sample
        weight = valid_mask if self.config.weight_loss_by_valid_region else None
        return denoising_loss(pred, target, weight, sum_channels=sum_channels)

    # ---- validation -----------------------------------------------------------------------------
    @abstractmethod
    def validation_mappings(self, models: Mapping[str, nn.Module]) -> tuple[nn.Module, nn.Module | None]:
        """(global mapping, local mapping or None) as they are now, for the validation pictures."""

    def _validation_pipeline(self, models: Mapping[str, nn.Module]):
        """`inference.ElitePipeline` over the frozen parts and the mappings being trained: the pictures are
        made by the code users run (encode the crop, inject w0, the local branch at `validation_elite_scale`)."""
        cfg = self.config
        pipe = self.sd.sampling_pipeline()
        global_mapping, local_mapping = self.validation_mappings(models)
        encoders = EliteEncoders(
            global_mapping=global_mapping,
            local_mapping=local_mapping,
            location_mlp=None,
            feature_extractor=self.clip,
            source=f"{cfg.output_dir} (training)",
            image_encoder_name=cfg.image_encoder_name_or_path,
            base_model_name=cfg.pretrained_model_name_or_path,
        )
        return ElitePipeline(pipe, encoders, elite_scale=cfg.validation_elite_scale)

    def validation_images(self, models: Mapping[str, nn.Module], step: int) -> list | None:
        cfg = self.config
        if not cfg.validation_prompts or cfg.num_validation_samples <= 0:
            return None
        if self._validation_crops is None:  # read apart from the training stream: its order is untouched
            self._validation_crops = first_crop_samples(self.loader.shards, cfg.num_validation_samples)
        elite = self._validation_pipeline(models)
        res = cfg.data.resolution
        images = []
        with self.accelerator.autocast():
            for image, mask, _ in self._validation_crops:
                concept = elite.encode_concept(image, mask=mask)
                images.append(image.resize((res, res)))
                for prompt in cfg.validation_prompts:
                    out = elite(
                        prompt,
                        concept,
                        placeholders=[cfg.data.placeholder_token],
                        num_inference_steps=cfg.validation_inference_steps,
                        guidance_scale=cfg.validation_guidance_scale,
                        seed=cfg.seed,
                        height=res,
                        width=res,
                    )
                    images.append(out.images[0])
        return images


def resolve_mapping_folder(path_or_repo: str, subfolder: str) -> tuple[str, str | None]:
    """`(path_or_repo, subfolder)` for from_pretrained: an encoders folder, the subfolder itself, or a Hub repo."""
    p = Path(path_or_repo)
    if (p / subfolder / "config.json").is_file():
        return str(p), subfolder
    if (p / "config.json").is_file():
        return str(p), None
    if p.exists():
        raise FileNotFoundError(f"{p} holds neither {subfolder}/config.json nor config.json")
    return path_or_repo, subfolder
