"""ELITE's local mapping network: CLIP patch features of the masked object -> local text-space tokens.

For each tapped layer i, every patch token becomes `MLP_i(CLS_i) + MLP'_i(patch)` (the CLS term is
broadcast over patches); the per-layer maps are averaged over layers, giving one `output_dim`
token per patch (16x16 = 256 for ViT-L/14 at 224 px). Tokens outside the object mask (nearest-
resized to the patch grid) are zeroed and flagged in `keep`, so the attention processors give them
no attention at all (the reference let them take softmax weight).

The model also owns the *local* key/value projections (one bias-free `to_k`/`to_v` per UNet
cross-attention layer, initialised from the frozen ones); `encoders.attention.EliteAttnProcessor`
applies them to the local tokens and fuses the result into the global branch with weight lambda.

    lm = LocalMapping.from_unet(unet, input_dim=clip.hidden_size, ...)
    out = lm(clip.encode(mask_background(images, masks)), masks)
    out.tokens   # [B, 256, 768], zero outside the mask
    out.keep     # [B, 256] bool, True inside the mask

Config keys are those of `GlobalMapping` (`input_dim`, `output_dim`, `hidden_dim`,
`feature_layers`, `kv_layers`, `pretrained_model_name_or_path`, `image_encoder_name_or_path`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from .global_mapping import MappingModel, _check_features


@dataclass
class LocalMappingOutput(BaseOutput):
    """`tokens` `[B, P, D]` (zero outside the mask) and `keep` `[B, P]` (True where a token may be attended)."""

    tokens: torch.Tensor
    keep: torch.Tensor


def mask_to_patch_grid(mask: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Object mask `[B, 1, H, W]` / `[B, H, W]` (any size, values in [0, 1]) -> `[B, P]` in {0, 1}.

    Nearest resize to the square patch grid (as the reference), then threshold at 0.5.
    """
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W] or [B, H, W], got {tuple(mask.shape)}")
    grid = F.interpolate(mask.float(), size=(side, side), mode="nearest")
    return (grid.flatten(1) > 0.5).float()


class LocalMapping(MappingModel):
    """CLIP features of the masked object (+ mask) -> local tokens `[B, P, output_dim]`, plus local K/V."""

    def forward(self, features: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> LocalMappingOutput:
        """`features`: one `[B, 1 + P, input_dim]` per tapped layer; `mask`: object mask or None (keep all)."""
        _check_features(features, len(self.cls_mappings), self.config.input_dim, "LocalMapping")
        dtype = self.cls_mappings[0][0].weight.dtype
        total = None
        for cls_mlp, patch_mlp, f in zip(self.cls_mappings, self.patch_mappings, features):
            f = f.to(dtype)
            layer = cls_mlp(f[:, :1]) + patch_mlp(f[:, 1:])
            total = layer if total is None else total + layer
        tokens = total / len(self.cls_mappings)
        batch, patches = tokens.shape[:2]
        if mask is None:
            return LocalMappingOutput(tokens=tokens, keep=torch.ones(batch, patches, dtype=torch.bool, device=tokens.device))
        if mask.shape[0] != batch:
            raise ValueError(f"mask batch {mask.shape[0]} != feature batch {batch}")
        grid = mask_to_patch_grid(mask.to(tokens.device), patches)
        return LocalMappingOutput(tokens=tokens * grid.unsqueeze(-1).to(tokens.dtype), keep=grid > 0.5)
