"""Infusion's overfitting measures for every method against the base model: latent W2 and latent Fisher divergence.

The reference is a folder of real images when `reference_images` is given (Infusion's paper: 50,000 LAION images
with their captions for the Fisher divergence, 1,000 for W2); without it, the base model's own generations of the
same prompts stand in, a quick fallback that results.md labels as such.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler

from encoders.common.images import list_photos
from encoders.conditioning import sdxl_added_conditioning

from ..loading import (
    is_sdxl_pipeline,
)
from .config import EvalConfig
from .generation import RowGenerator
from .metrics import (
    gaussian_w2,
    latent_fisher_divergence,
)
from .plan import Row
from .prompts import GENERIC_PROMPTS


class OverfittingMeasures:
    """Infusion's measures for every row against the base model: latent W2 between images of the same prompts
    and sampling, and the latent Fisher divergence of the noise predictions (on generic and class-word prompts).
    The base row of a concept must come first (`plan_rows` puts it there): its images are the reference."""

    def __init__(self, config: EvalConfig, generator: RowGenerator, seeds: Sequence[int]):
        self.config, self.generator, self.seeds = config, generator, list(seeds)
        self.base_latents: dict[tuple, dict] = {}  # (concept, sampling) -> {kind: latents}
        self.fisher_data: dict[str, dict] = {}  # concept -> {kind: (z0, prompts)}
        self._reference: dict | None = None  # the real images' latents and captions, read once

    def reference(self) -> dict | None:
        """The real reference set (`reference_images`): {"w2": latents, "fisher": (latents, captions), "note"}, or
        None. Captions come from `<stem>.txt` beside each image; without one, the generic prompts in turn."""
        folder = self.config.reference_images
        if folder is None:
            return None
        if self._reference is None:
            from PIL import Image

            paths = list_photos(folder)
            count = max(self.config.fisher_samples, self.config.w2_samples)
            paths = paths[:count]
            captions, uncaptioned = [], 0
            for k, path in enumerate(paths):
                text = path.with_suffix(".txt")
                if text.is_file():
                    captions.append(text.read_text(encoding="utf-8").strip())
                else:
                    captions.append(GENERIC_PROMPTS[k % len(GENERIC_PROMPTS)])
                    uncaptioned += 1
            latents = []
            for i in range(0, len(paths), 8):
                images = []
                for path in paths[i : i + 8]:
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                latents.append(self.image_latents(images))
            latents = torch.cat(latents)
            n_fisher, n_w2 = min(self.config.fisher_samples, len(paths)), min(self.config.w2_samples, len(paths))
            note = f"reference: {n_fisher} real images of {folder} for the Fisher divergence, {n_w2} for W2" + (
                f" ({uncaptioned} without a caption file, given the generic prompts in turn)" if uncaptioned else ""
            )
            self._reference = {
                "w2": latents[:n_w2],
                "fisher": (latents[:n_fisher], captions[:n_fisher]),
                "note": note,
            }
        return self._reference

    def describe_reference(self) -> str:
        """What results.md says the overfitting measures were compared with."""
        ref = self.reference()
        if ref is not None:
            return ref["note"] + " (Infusion's paper: 50,000 LAION images, 1,000 for W2)."
        return (
            "reference: the base model's own generations of the same prompts, a quick fallback (Infusion's paper "
            "compares with 50,000 LAION images, 1,000 for W2: give reference_images=DIR)."
        )

    @torch.no_grad()
    def image_latents(self, images) -> torch.Tensor:
        """VAE posterior means of generated images (the latents the Gaussians are fitted to)."""
        vae = self.generator.pipe.vae
        out = []
        for i in range(0, len(images), 8):
            arrays = [
                np.asarray(im.convert("RGB").resize((self.generator.width, self.generator.height)), dtype=np.float32)
                for im in images[i : i + 8]
            ]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            out.append(dist.mean.float().cpu() * vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def fisher_divergence(self, row: Row, z0: torch.Tensor, prompts: Sequence[str]) -> float:
        """The latent Fisher divergence between the base and the customised model (Infusion's measure):
        mean squared difference of their noise predictions on the same noisy latents, prompts and timesteps.

        z0 are the base model's own images of `prompts` (VAE latents, one per prompt, standing in for
        data), noised with DDPM's forward process at `fisher_timesteps` from the first seed's noise.
        The customised model is each method's (`GenerationMethod.noise_predictions`): Textual Inversion /
        BaTex the base UNet with the token loaded (the prompts have none of it: the text is the same); ELITE
        the UNet with its cross-attention K/V (which every prompt goes through); Infusion the residual stream
        of its dual call (row 1; row 0 is the base stream); IP-Adapter the UNet with the concept photo as
        image prompt (its base: scale 0). 0 for the base row.
        """
        if row.method == "base":
            return 0.0
        pipe = self.generator.pipe
        noising = DDPMScheduler.from_config(self.generator._scheduler_config)
        generator = torch.Generator("cpu").manual_seed(int(self.seeds[0]))

        def text_embeds(prompt: str, rows: int) -> dict:
            """The UNet's text keywords for `rows` copies of `prompt` (SDXL: with pooled embedding and size numbers)."""
            if is_sdxl_pipeline(pipe):
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=prompt, device=pipe.device, num_images_per_prompt=rows, do_classifier_free_guidance=False
                )
                added = sdxl_added_conditioning(pooled.to(embeds.dtype), self.generator.height, self.generator.width)
                return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}
            ids = pipe.tokenizer(
                [prompt] * rows,
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(pipe.device)
            return {"encoder_hidden_states": pipe.text_encoder(ids)[0]}

        inputs = []  # (noisy latent, timestep, prompt), the same for every method
        for z, prompt in zip(z0.split(1), prompts):
            for t in self.config.fisher_timesteps:
                timestep = torch.tensor([int(t)])
                noisy = noising.add_noise(z, torch.randn(z.shape, generator=generator), timestep)
                inputs.append((noisy.to(pipe.device, pipe.unet.dtype), timestep.to(pipe.device), prompt))
        method = self.generator.method_for(
            row
        )  # its `noise_predictions`: the base and the customised model on the same inputs
        try:
            eps_base, eps_custom = method.noise_predictions(inputs, text_embeds)
        finally:
            self.generator.release_elite()
            self.generator.release_ip_adapter()
        if noising.config.prediction_type == "v_prediction":  # the measure is on scores, i.e. noise predictions
            eps_base = [as_epsilon(noising, v, noisy, t) for v, (noisy, t, _) in zip(eps_base, inputs)]
            eps_custom = [as_epsilon(noising, v, noisy, t) for v, (noisy, t, _) in zip(eps_custom, inputs)]
        return latent_fisher_divergence(torch.cat(eps_base), torch.cat(eps_custom))

    def measure(self, row: Row, items) -> dict:
        """Latent W2 to the base model with the same sampling, on class-word and generic prompts; latent
        Fisher divergence on the same two kinds of prompts."""
        concept = row.concept
        by_kind = {kind: [image for spec, _, image, _ in items if spec.kind == kind] for kind in ("concept", "generic")}
        latents = {kind: self.image_latents(images) for kind, images in by_kind.items() if images}
        if row.method == "base":
            self.base_latents[(concept.name, row.sampling)] = latents
            if concept.name not in self.fisher_data:  # the first seed's images of each prompt stand in for data
                first = [(spec, image) for spec, seed, image, _ in items if seed == self.seeds[0]]
                self.fisher_data[concept.name] = {
                    kind: (
                        self.image_latents([im for spec, im in first if spec.kind == kind]),
                        [spec.template.format(concept.class_word) for spec, _ in first if spec.kind == kind],
                    )
                    for kind in ("concept", "generic")
                    if any(spec.kind == kind for spec, _ in first)
                }
        reference = dict(self.base_latents.get((concept.name, row.sampling), {}))
        fisher_data = dict(self.fisher_data.get(concept.name, {}))
        real = self.reference()
        if real is not None:  # real images for the prompts that do not name the concept
            reference["generic"] = real["w2"]
            fisher_data["generic"] = real["fisher"]
        out = {}
        for kind, key in (("generic", "w2_generic"), ("concept", "w2_concept")):
            if kind in latents and kind in reference and len(latents[kind]) >= 2:
                same = row.method == "base" and (real is None or kind == "concept")
                out[key] = 0.0 if same else gaussian_w2(reference[kind], latents[kind])
        for kind, key in (("generic", "fisher_generic"), ("concept", "fisher_class")):
            if kind in fisher_data:
                z0, prompts = fisher_data[kind]
                out[key] = self.fisher_divergence(row, z0, prompts)
        return out


def as_epsilon(scheduler, v_prediction: torch.Tensor, noisy: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A v-prediction UNet's output as the noise prediction it implies: eps = sqrt(a) v + sqrt(1 - a) x_t."""
    alpha = scheduler.alphas_cumprod[timestep.cpu()].view(-1, 1, 1, 1).float()
    return alpha.sqrt() * v_prediction.float() + (1 - alpha).sqrt() * noisy.float().cpu()
