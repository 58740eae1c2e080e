"""Train the miniature world's base models from scratch on the shared loop: CLIP, then the VAE, then the UNet.

    python -m training.world --config configs/world/clip.yaml    # CLIP text + vision towers, contrastive
    python -m training.world --config configs/world/vae.yaml     # KL autoencoder (factor 4: 64 px -> 16x16x4)
    python -m training.world --config configs/world/unet.yaml    # text-conditioned UNet, v-prediction, SD v1 schedule

Each stage renders its scenes with `data_prep.world` (a pool drawn once from `world_seed`, kept in
`output_dir/pool-*.npz` so a resume does not redraw it) and exports into `export_dir`:

- clip: `clip/` (a `CLIPModel` with its processor and the real CLIP tokenizer).
- vae: `vae/` (an `AutoencoderKL`; its `scaling_factor` is 1 / std of the pool's latents, as SD's 0.18215 is).
- unet: `sd/`, a complete `StableDiffusionPipeline` folder (this UNet, the vae stage's VAE, the clip
  stage's text tower as text encoder, SD v1-4's PNDM schedule) and `image_encoder/`, the clip stage's
  vision tower as a `CLIPVisionModel` (ELITE's image encoder; SD v1 and ELITE share CLIP ViT-L/14 the
  same way).

The architecture kinds are SD v1's and CLIP ViT's, so every command of the repository runs on the
result unchanged; only the sizes differ (`WORLD_*` below), chosen so that the whole recipe trains on
two CPU cores: 64 px images, a VAE of factor 4 (16x16 latents), attention only at the UNet's 8x8 and
4x4 levels, a 48-wide text tower of 3 layers, a 24-layer 48-wide vision tower on 8 px patches (ELITE
taps layers 24, 4, 8, 12 and 16). Frozen inputs of a later stage are read from earlier exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from encoders.clip_features import CLIP_MEAN, CLIP_STD
from encoders.common.config import ConfigError, keyed_field, parse_config_cli
from encoders.common.files import atomic_directory, atomic_write

from .common_config import TrainConfig
from .loop import TrainingTask, run_from_command_line

WORLD_TEXT_KWARGS = dict(
    hidden_size=48,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=48,
)
WORLD_VISION_KWARGS = dict(
    hidden_size=48,
    intermediate_size=192,
    num_hidden_layers=24,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    projection_dim=48,
)
WORLD_VAE_KWARGS = dict(
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
WORLD_UNET_KWARGS = dict(
    sample_size=16,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=32,
)


@dataclass
class WorldConfig(TrainConfig):
    """One stage of the world's base-model recipe (see the module docstring)."""

    stage: Literal["clip", "vae", "unet", "classifier"] = keyed_field(
        "which model to train: clip, vae, unet, or classifier (the world's attribute classifier for evaluation)", "unet"
    )
    world_seed: int = keyed_field("seed of the rendered world (data_prep.world)", 0)
    pool_size: int = keyed_field("scenes rendered once and drawn from at random", 20000)
    empty_caption_prob: float = keyed_field("unet: fraction of empty captions (for classifier-free guidance)", 0.1)
    train_text_encoder: bool = keyed_field(
        "unet: train the clip stage's text tower together with the UNet (exported as the pipeline's text encoder; "
        "clip/ and ELITE's image encoder stay the clip stage's)",
        False,
    )
    noise_offset: float = keyed_field(
        "unet: std of a per-image, per-channel constant added to the training noise (offset noise, as diffusers' "
        "--noise_offset); 0: off. Tried on an epsilon UNet whose backgrounds followed the seed, it did not help "
        "(v-prediction did: docs/world.md)",
        0.0,
    )
    snr_gamma: float = keyed_field(
        "unet: Min-SNR loss weighting (Hang et al., Efficient Diffusion Training via Min-SNR Weighting Strategy; "
        "diffusers' --snr_gamma): each timestep's loss weighed by min(SNR, gamma) / SNR for epsilon, / (SNR + 1) "
        "for v, so the nearly clean timesteps stop dominating; 0: off (the plain MSE of SD's recipe)",
        0.0,
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = keyed_field(
        "unet: what the UNet predicts: epsilon (SD v1) or v_prediction (SD 2.x), written into the pipeline's "
        "scheduler config, which every sampler and trainer of the repository reads; default: the init_from "
        "pipeline's, else epsilon",
        None,
    )
    kl_weight: float = keyed_field("vae: weight of the KL term (SD's VAE: 1e-6)", 1e-6)
    vae_parts: Literal["all", "decoder"] = keyed_field(
        "vae: what trains: all (the whole autoencoder), or decoder (of the VAE in vae_path, <init_from>/sd/vae or "
        "<export_dir>/vae: its encoder, latent scale and so every latent stay as they are, as in Stability AI's "
        "fine-tuned SD VAE decoders; a UNet and encoders trained on those latents stay valid while the decoded "
        "pictures improve)",
        "all",
    )
    shape_groups: int = keyed_field(
        "clip: each batch holds groups of this many scenes that differ only in shape (same colour, pattern, "
        "background, "
        "drawn fresh), so the contrastive loss must tell shapes apart; 0: random pool batches only",
        0,
    )
    clip_path: str | None = keyed_field(
        "unet/vae: the clip stage's export (default <init_from>/clip, else <export_dir>/clip)", None
    )
    vae_path: str | None = keyed_field(
        "unet: the VAE to encode with; vae with vae_parts=decoder: the VAE to fine-tune (default <init_from>/sd/vae, "
        "else <export_dir>/vae)",
        None,
    )
    init_from: str | None = keyed_field(
        "start from these weights instead of from scratch: a world models folder (`python -m encoders.world --out "
        "DIR` writes the shipped ones), so a later run, on this CPU or a GPU, continues the committed models; the "
        "unet stage then also reads that folder's text encoder and VAE",
        None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < self.train_batch_size:
            raise ConfigError(
                f"pool_size ({self.pool_size}) must be at least train_batch_size ({self.train_batch_size})"
            )
        if not 0 <= self.empty_caption_prob < 1:
            raise ConfigError(f"empty_caption_prob must be in [0, 1), got {self.empty_caption_prob}")
        if not 0 <= self.noise_offset < 1:
            raise ConfigError(f"noise_offset must be in [0, 1), got {self.noise_offset}")
        if self.snr_gamma < 0:
            raise ConfigError(f"snr_gamma must be >= 0 (0: off), got {self.snr_gamma}")

    @property
    def decoder_only(self) -> bool:
        """A vae stage that fine-tunes a trained VAE's decoder alone (`vae_parts=decoder`)."""
        return self.stage == "vae" and self.vae_parts == "decoder"

    def export_path(self, name: str, given: str | None) -> Path:
        return Path(given) if given else Path(self.resolved_export_dir) / name

    def clip_dir(self) -> Path:
        """The clip stage's model: `clip_path`, `<init_from>/clip`, or this recipe's export."""
        if self.clip_path is None and self.init_from:
            return Path(self.init_from) / "clip"
        return self.export_path("clip", self.clip_path)

    def vae_dir(self) -> Path:
        """The VAE the unet stage encodes with (and a decoder fine-tune starts from): `vae_path`,
        `<init_from>/sd/vae`, or this recipe's export."""
        if self.vae_path is None and self.init_from:
            return Path(self.init_from) / "sd" / "vae"
        return self.export_path("vae", self.vae_path)

    def resolved_prediction_type(self) -> str:
        """`prediction_type`, else the continued pipeline's (a UNet keeps what it learned to predict), else epsilon;
        a continued pipeline trained for the other one is refused."""
        continued = None
        scheduler_config = Path(self.init_from or "") / "sd/scheduler/scheduler_config.json"
        if self.init_from and scheduler_config.is_file():
            continued = json.loads(scheduler_config.read_text()).get("prediction_type", "epsilon")
        if self.prediction_type and continued and self.prediction_type != continued:
            raise ConfigError(
                f"prediction_type={self.prediction_type}, but the UNet in init_from={self.init_from} was trained for "
                f"{continued} (its sd/scheduler/scheduler_config.json)"
            )
        return self.prediction_type or continued or "epsilon"

    def initial(self, part: str) -> Path | None:
        """Where `init_from` keeps this stage's model (None: from scratch); a clear error when it is missing."""
        if not self.init_from:
            return None
        folder = Path(self.init_from) / {"unet": "sd/unet", "vae": "sd/vae"}.get(part, part)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"init_from={self.init_from}: no {folder.relative_to(self.init_from)}/config.json (write the shipped "
                "models with python -m encoders.world --out DIR)"
            )
        return folder


# ------------------------------------------------------------------------------------------ data
def render_pool(seed: int, count: int, cache_dir: Path | None = None, split: str = "train") -> dict:
    """`count` scenes of `split` as uint8 images [N, 64, 64, 3], captions and multi-hot attribute labels
    (`data_prep.world.ATTRIBUTE_LABELS`), cached as .npz in `cache_dir`."""
    from tqdm.auto import tqdm

    from data_prep.world import ATTRIBUTE_LABELS, render_scene, scene_labels

    cache = None if cache_dir is None else Path(cache_dir) / f"pool-{split}-seed{seed}-n{count}.npz"
    if cache is not None and cache.is_file():
        data = np.load(cache, allow_pickle=False)
        return {"images": data["images"], "captions": [str(c) for c in data["captions"]], "labels": data["labels"]}
    images = np.empty((count, 64, 64, 3), dtype=np.uint8)
    labels = np.empty((count, len(ATTRIBUTE_LABELS)), dtype=np.float32)
    captions = []
    for i in tqdm(range(count), desc="rendering the world", mininterval=5):
        scene = render_scene(seed, i, split)
        images[i] = np.asarray(scene.image)
        labels[i] = scene_labels(scene)
        captions.append(scene.caption)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(
            cache, lambda tmp: np.savez(open(tmp, "wb"), images=images, captions=np.array(captions), labels=labels)
        )
    return {"images": images, "captions": captions, "labels": labels}


class PoolBatches:
    """Endless random batches of pool indices for this process; its position is one number (exact resume)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, make_batch):
        self.size, self.batch_size, self.seed, self.rank = size, batch_size, seed, rank
        self.make_batch = make_batch
        self.batches = 0

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def __iter__(self):
        while True:
            rng = np.random.default_rng([self.seed, self.rank, self.batches])
            indices = rng.choice(self.size, self.batch_size, replace=False)
            self.batches += 1
            yield self.make_batch(np.sort(indices), rng)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ task
class WorldTask(TrainingTask):
    """The three stages as one task: the model and loss vary with `config.stage`."""

    def __init__(self, config: WorldConfig):
        super().__init__(config)
        # a decoder fine-tune gets its own config file and log label
        self.name = "world_vae_decoder" if config.decoder_only else f"world_{config.stage}"

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, accelerator, weight_dtype) -> None:
        from encoders.tokenizer import build_clip_tokenizer

        cfg: WorldConfig = self.config
        if cfg.decoder_only and not (cfg.vae_dir() / "config.json").is_file():
            raise ConfigError(f"vae_parts=decoder fine-tunes a trained VAE: no config.json in {cfg.vae_dir()}")
        self.device, self.rank = accelerator.device, accelerator.process_index
        self.tokenizer = build_clip_tokenizer()
        self.pool = render_pool(cfg.world_seed, cfg.pool_size, Path(cfg.output_dir))
        if cfg.stage == "clip":
            from transformers import CLIPConfig, CLIPModel

            initial = cfg.initial("clip")
            self.model = (
                CLIPModel.from_pretrained(initial)
                if initial
                else CLIPModel(
                    CLIPConfig(
                        text_config=WORLD_TEXT_KWARGS,
                        vision_config=WORLD_VISION_KWARGS,
                        projection_dim=WORLD_TEXT_KWARGS["projection_dim"],
                    )
                )
            )
        elif cfg.stage == "vae":
            from diffusers import AutoencoderKL

            initial = cfg.vae_dir() if cfg.decoder_only else cfg.initial("vae")
            self.model = AutoencoderKL.from_pretrained(initial) if initial else AutoencoderKL(**WORLD_VAE_KWARGS)
            if cfg.decoder_only:
                self.model.encoder.requires_grad_(False)
                self.model.quant_conv.requires_grad_(False)
        elif cfg.stage == "classifier":
            from transformers import ResNetForImageClassification

            initial = cfg.initial("classifier")
            self.model = ResNetForImageClassification.from_pretrained(initial) if initial else build_world_classifier()
        else:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel

            clip_dir, vae_dir = cfg.clip_dir(), cfg.vae_dir()
            # continuing a pipeline: the text encoder it was trained with (train_text_encoder may have moved it)
            text_dir = Path(cfg.init_from) / "sd" / "text_encoder" if cfg.init_from and not cfg.clip_path else clip_dir
            for what, folder in (("clip", text_dir), ("vae", vae_dir)):
                if not (folder / "config.json").is_file():
                    raise ConfigError(
                        f"the unet stage needs the {what} stage's export in {folder} (run stage={what} first)"
                    )
            self.text_encoder = CLIPTextModel.from_pretrained(text_dir).to(self.device).eval()
            self.text_encoder.requires_grad_(cfg.train_text_encoder)
            self.vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
            self.latents = self._encode_pool()
            initial = cfg.initial("unet")
            self.model = (
                UNet2DConditionModel.from_pretrained(initial) if initial else UNet2DConditionModel(**WORLD_UNET_KWARGS)
            )
            from diffusers import DDPMScheduler

            from encoders.tiny import SCHEDULER_KWARGS

            self.noise_scheduler = DDPMScheduler(
                **{
                    k: v
                    for k, v in SCHEDULER_KWARGS.items()
                    if k not in ("skip_prk_steps", "set_alpha_to_one", "steps_offset")
                },
                prediction_type=cfg.resolved_prediction_type(),
            )
            self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)

    def _encode_pool(self) -> dict:
        """The pool's latent means and std-devs, encoded once (cached beside the pool)."""
        cfg = self.config
        cache = Path(cfg.output_dir) / f"latents-seed{cfg.world_seed}-n{cfg.pool_size}.pt"
        if cache.is_file():
            return torch.load(cache, weights_only=True)
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(self.pool["images"]), 256):
                dist = self.vae.encode(images_to_tensor(self.pool["images"][start : start + 256])).latent_dist
                means.append(dist.mean.half())
                stds.append(dist.std.half())
        out = {"mean": torch.cat(means), "std": torch.cat(stds)}
        atomic_write(cache, lambda tmp: torch.save(out, tmp))
        return out

    def trainable_models(self):
        if self.config.stage == "unet" and self.config.train_text_encoder:
            return {"unet": self.model, "text_encoder": self.text_encoder}
        return {self.config.stage: self.model}

    def train_dataloader(self):
        cfg = self.config
        return PoolBatches(cfg.pool_size, cfg.train_batch_size, cfg.seed + 1, self.rank, self._batch)

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    def _batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        cfg = self.config
        captions = [self.pool["captions"][i] for i in indices]
        if cfg.stage == "unet":
            captions = ["" if rng.random() < cfg.empty_caption_prob else c for c in captions]
            index = torch.from_numpy(indices)
            return {
                "mean": self.latents["mean"][index].float(),
                "std": self.latents["std"][index].float(),
                "input_ids": self._tokens(captions),
            }
        images = self.pool["images"][indices]
        if cfg.stage == "clip" and cfg.shape_groups > 1:
            images, captions = self._shape_groups(len(indices), rng)
        batch = {"pixels": images_to_tensor(images)}
        if cfg.stage == "classifier":
            batch["labels"] = torch.from_numpy(self.pool["labels"][indices])
        if cfg.stage == "clip":
            batch["input_ids"] = self._tokens(captions)
        return batch

    def _shape_groups(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """`size` scenes in groups of `shape_groups` sharing colour, pattern and background, each group's shapes
        distinct; only train-split triples (the held-out ones stay unseen)."""
        from data_prep.world import COLOURS, HELD_OUT_TRIPLES, PATTERNS, SHAPES, backgrounds_for, render_object

        group = self.config.shape_groups
        images, captions = [], []
        while len(images) < size:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
            backgrounds = backgrounds_for(colour)
            background = backgrounds[int(rng.integers(len(backgrounds)))]
            shapes = [s for s in SHAPES if (s, colour, pattern) not in HELD_OUT_TRIPLES]
            for shape in rng.permutation(shapes)[:group]:
                scene = render_object(str(shape), colour, pattern, background, seed=int(rng.integers(2**31)))
                images.append(np.asarray(scene.image))
                captions.append(scene.caption)
        return np.stack(images[:size]), captions[:size]

    # ---- losses ---------------------------------------------------------------------------------
    def training_step(self, models, batch, generator):
        model = models[self.config.stage]
        if self.config.stage == "clip":
            return self._clip_loss(model, batch)
        if self.config.stage == "vae":
            return self._vae_loss(model, batch, generator)
        if self.config.stage == "classifier":
            out = model(pixel_values=batch["pixels"], labels=batch["labels"])
            exact = ((out.logits > 0) == (batch["labels"] > 0.5)).all(-1).float().mean()
            return out.loss, {"exact_match": exact}
        return self._unet_loss(
            model, batch, generator, (models["text_encoder"] if "text_encoder" in models else self.text_encoder)
        )

    @staticmethod
    def _clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
        return ((pixels + 1) / 2 - mean) / std

    def _clip_loss(self, model, batch):
        out = model(input_ids=batch["input_ids"], pixel_values=self._clip_pixels(batch["pixels"]), return_loss=True)
        labels = torch.arange(out.logits_per_image.shape[0], device=out.logits_per_image.device)
        accuracy = (out.logits_per_image.argmax(-1) == labels).float().mean()
        return out.loss, {"batch_accuracy": accuracy}

    def _vae_loss(self, vae, batch, generator):
        pixels = batch["pixels"]
        decoder_only = self.config.decoder_only
        with torch.set_grad_enabled(not decoder_only):
            dist = vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device=pixels.device)
        recon = vae.decode(z).sample
        l1 = (recon - pixels).abs().mean()
        mse = F.mse_loss(recon.float(), pixels.float())
        loss = l1 + mse if decoder_only else l1 + mse + self.config.kl_weight * dist.kl().mean()
        psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))
        return loss, {"psnr": psnr}

    def _unet_loss(self, unet, batch, generator, text_encoder):
        mean, std = batch["mean"], batch["std"]
        latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.config.noise_offset:
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device)
            noise = noise + self.config.noise_offset * offset
        steps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=latents.device,
        )
        alpha = self.alphas_cumprod[steps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        with torch.set_grad_enabled(self.config.train_text_encoder):
            context = text_encoder(batch["input_ids"]).last_hidden_state
        pred = unet(noisy, steps, context).sample
        v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        target = self.noise_scheduler.get_velocity(latents, noise, steps) if v_prediction else noise
        if not self.config.snr_gamma:
            return F.mse_loss(pred.float(), target.float()), {}
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, steps)
        weight = snr.clamp(max=self.config.snr_gamma) / (snr + 1 if v_prediction else snr)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean(), {}

    # ---- export ---------------------------------------------------------------------------------
    def export(self, models, export_dir: Path) -> list[str]:
        stage = self.config.stage
        model = models[stage]
        if stage == "clip":
            from transformers import CLIPProcessor

            with atomic_directory(export_dir / "clip") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                CLIPProcessor(image_processor=world_image_processor(), tokenizer=self.tokenizer).save_pretrained(tmp)
            return ["clip"]
        if stage == "classifier":
            with atomic_directory(export_dir / "classifier") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                classifier_image_processor().save_pretrained(tmp)
            return ["classifier"]
        if stage == "vae":
            if not self.config.decoder_only:  # a frozen encoder keeps the latent scale its UNet was trained with
                model.register_to_config(scaling_factor=self._latent_scale(model))
            with atomic_directory(export_dir / "vae") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
            return ["vae"]
        return self._export_pipeline(
            model, export_dir, (models["text_encoder"] if "text_encoder" in models else self.text_encoder)
        )

    def _latent_scale(self, vae) -> float:
        """1 / std of the latents of 512 pool images, rounded (SD's VAE: 0.18215 the same way)."""
        with torch.no_grad():
            z = vae.encode(images_to_tensor(self.pool["images"][:512]).to(self.device)).latent_dist.mean
        return round(1.0 / float(z.float().std()), 5)

    def _export_pipeline(self, unet, export_dir: Path, text_encoder) -> list[str]:
        from diffusers import PNDMScheduler, StableDiffusionPipeline
        from transformers import CLIPVisionModel

        from encoders.tiny import SCHEDULER_KWARGS
        from encoders.tokenizer import save_clip_tokenizer

        cfg = self.config
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=self.vae,
            text_encoder=text_encoder.cpu(),
            tokenizer=self.tokenizer,
            scheduler=PNDMScheduler(**SCHEDULER_KWARGS, prediction_type=self.noise_scheduler.config.prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        with atomic_directory(export_dir / "sd") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            save_clip_tokenizer(Path(tmp) / "tokenizer")
        vision = CLIPVisionModel.from_pretrained(cfg.clip_dir())
        with atomic_directory(export_dir / "image_encoder") as tmp:
            vision.save_pretrained(tmp, safe_serialization=True)
            world_image_processor().save_pretrained(tmp)
        return ["sd", "image_encoder"]

    def model_card_notes(self) -> str:
        cfg = self.config
        start = f"from the weights in `{Path(cfg.init_from).name}`" if cfg.init_from else "from scratch"
        return (
            f"The miniature world's {cfg.stage} stage (`python -m training.world stage={cfg.stage}`), trained "
            f"{start} for {cfg.max_steps} steps at batch {cfg.train_batch_size} on {cfg.pool_size} rendered "
            f"scenes (world seed {cfg.world_seed})."
        )


def build_world_classifier():
    """A small `ResNetForImageClassification` over the world's attribute labels (multi-label, 64 px)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from data_prep.world import ATTRIBUTE_LABELS

    config = ResNetConfig(
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        num_labels=len(ATTRIBUTE_LABELS),
        problem_type="multi_label_classification",
        id2label=dict(enumerate(ATTRIBUTE_LABELS)),
        label2id={name: i for i, name in enumerate(ATTRIBUTE_LABELS)},
    )
    return ResNetForImageClassification(config)


def classifier_image_processor():
    """The classifier's inputs: 64 px, scaled to [-1, 1] (mean 0.5, std 0.5)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def world_image_processor():
    """The CLIP image processor at the world's 64 px (CLIP's mean and std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config_cli(
        WorldConfig,
        argv,
        prog="python -m training.world",
        description="Train one stage of the miniature world's base models from scratch.",
    )
    run_from_command_line(WorldTask(config))


if __name__ == "__main__":
    main()
