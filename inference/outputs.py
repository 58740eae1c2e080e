"""What every generation call of the inference package returns: one type, whatever was switched on.

`ElitePipeline(...)` and `generate_with_spatial_guidance(...)` both return an `EliteOutput`: the images
always; with spatial guidance also the boxes steered to (and, when the location MLP chose them, the
nouns whose layouts they are), the location loss L_loc of each reverse step
(measured on the conditional attention maps of the denoising pass), L_loc at each guidance iteration,
and each concept's cross-attention map averaged over the steps (for pictures). Without guidance
those fields are None, so callers test `out.location_losses is not None`, never `hasattr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput


@dataclass
class EliteOutput(BaseOutput):
    images: Any
    boxes: list[list[float]] | None = None
    box_nouns: list[str | None] | None = None  # the nouns whose layout the location MLP gave each concept
    location_losses: list[float] | None = None
    guidance_losses: list[list[float]] | None = None
    attention_maps: list[torch.Tensor] | None = None
