"""What every generation call of the inference package returns: one type, whatever was switched on.

`ElitePipeline(...)` and `generate_with_spatial_guidance(...)` both return an `EliteOutput`: the images
always; with spatial guidance also the boxes steered to (and, when the location MLP chose them, the
nouns whose layouts they are), the location loss L_loc of each reverse step
(measured on the conditional attention maps of the denoising pass), L_loc at each guidance iteration,
and each concept's cross-attention map averaged over the steps (for pictures). Without guidance
those fields are None, so callers test `out.location_losses is not None`, never `hasattr`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
    per_prompt: list[EliteOutput] | None = None  # several prompts in one call: each prompt's own output

    @classmethod
    def join(cls, outputs: Sequence[EliteOutput]) -> EliteOutput:
        """One output for several prompts: the images in prompt order; each prompt's output (boxes,
        losses, maps) in `per_prompt`."""
        images = [o.images for o in outputs]
        if all(isinstance(i, torch.Tensor) for i in images):
            joined = torch.cat(images)
        elif all(isinstance(i, np.ndarray) for i in images):
            joined = np.concatenate(images)
        else:
            joined = [image for group in images for image in group]
        return cls(images=joined, per_prompt=list(outputs))
