"""Use the output folders of the per-concept fine-tunes (Textual Inversion, BaTex, Infusion) for generation.

A fine-tune's `output_dir` holds `concept.json` (the contract is `encoders.common.finetune_folder`:
method, placeholder token, class word, concept photos, which file holds the result). This module
applies the result to a diffusers `StableDiffusionPipeline`, the one way both `python -m inference generate
--finetune DIR` and `python -m inference.evaluate runs=...` do:

    run = read_finetune("out/dog_ti")
    token = load_embedding(pipe, run)                 # diffusers' own pipe.load_textual_inversion
    residuals = load_infusion(pipe, read_finetune("out/dog_infusion"))  # value residuals for the class word

Generating with them is `inference.methods` (`load_run(pipe, run).generate(prompts, seeded_latents(pipe, [0]))`).

Needs only torch, diffusers, safetensors and `encoders` (no training stack).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from encoders.common.finetune_folder import (  # noqa: F401  (the contract's names, re-exported for callers)
    CONCEPT_FILE,
    EMBEDDING_METHODS,
    FinetuneFolderError,
    FinetuneRun,
)
from encoders.common.finetune_folder import read_finetune as read_finetune_folder

from .loading import default_image_size
from .methods import METHODS, load_embedding, load_infusion  # noqa: F401  (re-exported: the loaders' old home)


def read_finetune(folder) -> FinetuneRun:
    """A fine-tune folder (or Hub repo) whose concept.json names a method registered in `inference.methods`."""
    return read_finetune_folder(folder, methods=[name for name, cls in METHODS.items() if cls.from_runs])


def seeded_latents(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The initial noise of one image per seed, each drawn on the CPU from its own seed.

    The same noise every method starts from (and what the pipeline draws from
    `torch.Generator("cpu").manual_seed(seed)`), so images of different methods compare.
    """
    return seeded_noise(pipe, seeds, height, width)[0]


def _one_latent(pipe, height: int | None, width: int | None) -> tuple[int, int, int, int]:
    """The shape of one image's initial latent (the base model's own size where none is given)."""
    default_h, default_w = default_image_size(pipe)
    height, width = height or default_h, width or default_w
    return (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def stream_noise(pipe, positions: Sequence[int], seed: int, height: int | None = None, width: int | None = None):
    """`(latents, generators)` as one CPU generator seeded `seed` draws them image after image: image k starts
    from the k-th draw (Compositional Inversion's notebook seeds one generator with 8888 per prompt and calls the
    pipeline once per image, so image k of every prompt starts from the same noise); each generator is the
    stream's state after that draw."""
    shape = _one_latent(pipe, height, width)
    stream = torch.Generator("cpu").manual_seed(int(seed))
    draws, states = [], []
    for _ in range(max(positions) + 1):
        draws.append(torch.randn(shape, generator=stream))
        states.append(stream.get_state())
    generators = []
    for k in positions:
        generator = torch.Generator("cpu")
        generator.set_state(states[k])
        generators.append(generator)
    return torch.cat([draws[k] for k in positions]), generators


def seeded_noise(pipe, seeds: Sequence[int], height: int | None = None, width: int | None = None):
    """`(latents, generators)`: the initial noise of one image per seed and each seed's CPU generator
    after drawing it, as diffusers leaves them when given `generator=[...]` and no latents. A
    stochastic sampler (DDPM) given these generators draws each image's step noise as the pipeline
    would, so every method and a re-run see the same noise."""
    shape = _one_latent(pipe, height, width)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return torch.cat([torch.randn(shape, generator=g) for g in generators]), generators
