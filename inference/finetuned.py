"""Use the output folders of the per-concept fine-tunes (Textual Inversion, BaTex, Infusion) for generation.

A fine-tune's `output_dir` holds `concept.json` (the contract is `encoders.common.finetune_folder`:
method, placeholder token, class word, concept photos, which file holds the result). This module
applies the result to a diffusers `StableDiffusionPipeline` and generates with it, the one way both
`python -m inference generate --finetune DIR` and `python -m inference.evaluate runs=...` do:

    run = read_finetune("out/dog_ti")
    token = load_embedding(pipe, run)                 # diffusers' own pipe.load_textual_inversion
    images = generate_finetuned(pipe, [f"a photo of {token} on the beach"], seeded_latents(pipe, [0]))

    run = read_finetune("out/dog_infusion")
    residuals = load_infusion(pipe, run)              # value residuals for the class word's tokens
    images = generate_finetuned(pipe, ["a dog on the beach"], seeded_latents(pipe, [0]), infusions=[residuals])

Needs only torch, diffusers, safetensors and `encoders` (no training stack).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from encoders.common.finetune_folder import (  # noqa: F401  (the contract's names, re-exported for callers)
    CONCEPT_FILE,
    EMBEDDING_METHODS,
    FINETUNE_METHODS,
    FinetuneFolderError,
    FinetuneRun,
    read_finetune,
)
from encoders.infusion import InfusionResiduals, generate_with_infusion

from .loading import default_image_size, is_sdxl_pipeline


def load_embedding(pipe, run: FinetuneRun, token: str | None = None) -> str:
    """Load a Textual Inversion / BaTex embedding with diffusers' `load_textual_inversion`; returns its token.

    `token` defaults to the run's placeholder token; give another one to load several runs that
    were all trained as S*.
    """
    if run.method not in EMBEDDING_METHODS:
        raise FinetuneFolderError(f"{run.folder} is a {run.method} run, not an embedding")
    token = token or run.placeholder_token
    if token in pipe.tokenizer.get_vocab():
        raise FinetuneFolderError(
            f"token {token!r} of {run.folder} is already in the tokenizer: give each run its own token (DIR=TOKEN)"
        )
    path = run.result_path()
    keys: set[str] = set()
    if path.suffix == ".safetensors":  # (a legacy learned_embeds.bin is one-encoder)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    if keys == {"clip_l", "clip_g"}:  # an SDXL embedding: one vector per text encoder (diffusers' SDXL layout)
        if not is_sdxl_pipeline(pipe):
            raise FinetuneFolderError(
                f"{run.folder}: an SDXL embedding (clip_l / clip_g), but the base is not SDXL "
                f"(trained for {run.info.get('base_model', 'an unrecorded base model')})"
            )
        from safetensors.torch import load_file

        state = load_file(str(path))
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        return token
    if is_sdxl_pipeline(pipe):
        raise FinetuneFolderError(f"{run.folder}: a one-encoder embedding, but the base is SDXL (two text encoders)")
    if path.suffix == ".safetensors" and len(keys) == 1:  # say both widths (diffusers' own message leaves them out)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            width = int(handle.get_slice(next(iter(keys))).get_shape()[-1])
        expected = int(pipe.text_encoder.get_input_embeddings().weight.shape[-1])
        if width != expected:
            raise FinetuneFolderError(
                f"{run.folder}: its embedding is {width} wide, but this base's text encoder takes {expected}-wide "
                "words "
                f"(trained for {run.info.get('base_model', 'an unrecorded base model')}; load it with that base)"
            )
    try:
        pipe.load_textual_inversion(str(path.parent), token=token, weight_name=path.name)
    except ValueError as err:  # e.g. an embedding of another width: trained for another base model
        raise FinetuneFolderError(
            f"{run.folder}: {err} (trained for {run.info.get('base_model', 'an unrecorded base model')})"
        ) from err
    return token


def load_infusion(pipe, run: FinetuneRun) -> InfusionResiduals:
    """Infusion residuals of a run, on the pipeline's device, checked against its UNet."""
    if run.method != "infusion":
        raise FinetuneFolderError(f"{run.folder} is a {run.method} run, not Infusion")
    path = run.result_path()
    residuals = InfusionResiduals.from_pretrained(str(path.parent), subfolder=path.name).to(pipe.device)
    try:
        residuals.check_fits(pipe.unet)
    except ValueError as err:
        raise FinetuneFolderError(f"{run.folder}: {err}") from err
    return residuals


def seeded_latents(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The initial noise of one image per seed, each drawn on the CPU from its own seed.

    The same noise every method starts from (and what the pipeline draws from
    `torch.Generator("cpu").manual_seed(seed)`), so images of different methods compare.
    """
    return seeded_noise(pipe, seeds, height, width)[0]


def seeded_noise(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None):
    """`(latents, generators)`: the initial noise of one image per seed and each seed's CPU generator
    after drawing it, as diffusers leaves them when given `generator=[...]` and no latents. A
    stochastic sampler (DDPM) given these generators draws each image's step noise as the pipeline
    would, so every method and a re-run see the same noise."""
    default_h, default_w = default_image_size(pipe)
    height, width = height or default_h, width or default_w
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.cat([torch.randn(shape, generator=g) for g in generators]), generators


@torch.no_grad()
def generate_finetuned(
    pipe,
    prompts: Sequence[str],
    latents: torch.Tensor,
    infusions: Sequence[InfusionResiduals] = (),
    **pipe_kwargs,
) -> list:
    """Images of `prompts` (one per row of `latents`) with the fine-tunes applied to `pipe`.

    Embeddings (Textual Inversion / BaTex) are already in the pipeline's tokenizer (`load_embedding`):
    their token in a prompt is enough. Infusion residuals run through the dual stream
    (`encoders.infusion.generate_with_infusion`). Other keyword arguments (steps, guidance, size,
    negative prompt) go to the pipeline.
    """
    prompts = list(prompts)
    if latents.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {latents.shape[0]} initial latents")
    latents = latents.to(pipe.device, pipe.unet.dtype)
    if infusions:
        return generate_with_infusion(pipe, prompts, list(infusions), latents=latents, **pipe_kwargs).images
    negative = pipe_kwargs.pop("negative_prompt", None)
    if negative is not None:
        pipe_kwargs["negative_prompt"] = [negative] * len(prompts)
    return pipe(prompt=prompts, latents=latents, **pipe_kwargs).images
