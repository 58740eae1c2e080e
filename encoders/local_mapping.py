"""ELITE's local mapping network: CLIP patch features of the masked object -> local text-space tokens.

For each tapped layer i, every patch token becomes `MLP_i(CLS_i) + MLP'_i(patch)` (the CLS term is
broadcast over patches); the per-layer maps are averaged over layers, giving one `output_dim`
token per patch (16x16 = 256 for ViT-L/14 at 224 px). Tokens outside the object mask (nearest-
resized to the patch grid) are zeroed and flagged False in `keep`.

The model also owns the *local* key/value projections (one bias-free `to_k`/`to_v` per UNet
cross-attention layer, initialised from the frozen ones); `encoders.attention.EliteAttnProcessor`
applies them to the local tokens and fuses the result into the global branch with weight lambda.

    lm = LocalMapping.from_unet(unet, input_dim=clip.hidden_size, ...)
    out = lm(clip.encode(object_view), mask)
    out.tokens   # [B, 256, 768], zero outside the mask
    out.keep     # [B, 256] bool, True inside the mask

How the local branch and a concept photo are computed is part of the model, stored in its
`config.json` so a folder always runs the way it was trained. The defaults (`REFERENCE_SETTINGS`)
are those of ELITE (Wei et al., "ELITE: Encoding Visual Concepts into Textual Embeddings for
Customized Text-to-Image Generation", ICCV 2023) and its official code; the other values are this
repository's options:

- `w0_map_norm`: w0's cross-attention map, which re-weights the local branch, is divided by its
  max over heads and query positions of each sample ("sample"; the official code takes one max
  over its whole batch, which is the same at batch 1, the official inference); "sample_head":
  one max per sample and head.
- `local_mask_mode`: masked-out tokens are zero keys/values that stay in the local softmax
  ("zero_tokens", the paper's K_l = W_K(e * m)); "exclude": they take no attention at all.
- `w0_source`: w0 comes from the whole (unmasked) image ("image", paper Eq. 3 and the official
  stage 2 and inference) or from the object on black ("object").
- `object_view`: the object view is the photo times its mask at full resolution, then resized to
  the image encoder's size ("mask_then_resize", official: edges blend with black), or resized
  first and masked after ("resize_then_mask").
- `mask_grid_via`: at inference the mask reaches the patch grid through a nearest resize to this
  side first (official: 128; 0 goes from the encoder's input size, as in training).
- `mask_threshold`: a mask pixel is object where its brightest channel (or alpha) is above this
  value (official: 0, any non-black pixel).
- `concept_crop`: what `encode_concept` feeds the encoder: the whole photo ("none", official) or
  a square around the mask with a margin ("square", as `data_prep` crops).

Config keys are those of `GlobalMapping` (`input_dim`, `output_dim`, `hidden_dim`,
`feature_layers`, `kv_layers`, `pretrained_model_name_or_path`, `image_encoder_name_or_path`)
plus the settings above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .clip_features import DEFAULT_LAYERS
from .global_mapping import MappingModel, _check_features

# The choices of each setting; the first is the official one.
SETTING_CHOICES: dict[str, tuple] = {
    "w0_map_norm": ("sample", "sample_head"),
    "local_mask_mode": ("zero_tokens", "exclude"),
    "w0_source": ("image", "object"),
    "object_view": ("mask_then_resize", "resize_then_mask"),
    "concept_crop": ("none", "square"),
}
# The official ELITE computation: what `convert_reference` writes and every default.
REFERENCE_SETTINGS: dict[str, object] = {
    **{name: choices[0] for name, choices in SETTING_CHOICES.items()},
    "mask_grid_via": 128,
    "mask_threshold": 0,
}


def check_local_settings(settings: dict) -> None:
    """Raise ValueError naming the key for a setting value that is not one of its choices."""
    for name, choices in SETTING_CHOICES.items():
        if name in settings and settings[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {settings[name]!r}")
    if "mask_grid_via" in settings and int(settings["mask_grid_via"]) < 0:
        raise ValueError(f"mask_grid_via must be 0 or a side in pixels, got {settings['mask_grid_via']}")
    if "mask_threshold" in settings and not 0 <= int(settings["mask_threshold"]) <= 254:
        raise ValueError(f"mask_threshold must be in 0..254, got {settings['mask_threshold']}")


@dataclass
class LocalMappingOutput(BaseOutput):
    """`tokens` `[B, P, D]` (zero outside the mask) and `keep` `[B, P]` (True where a token may be attended)."""

    tokens: torch.Tensor
    keep: torch.Tensor


def mask_to_patch_grid(mask: torch.Tensor, num_patches: int, via: int = 0) -> torch.Tensor:
    """Object mask `[B, 1, H, W]` / `[B, H, W]` (any size, values in [0, 1]) -> `[B, P]` in {0, 1}.

    Nearest resize (torch's, as the official code) to the square patch grid, through a `via` x `via`
    nearest resize first when `via` > 0 (the official inference goes full size -> 128 -> 16), then
    threshold at 0.5.
    """
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W] or [B, H, W], got {tuple(mask.shape)}")
    mask = mask.float()
    if via:
        mask = F.interpolate(mask, size=(int(via), int(via)), mode="nearest")
    grid = F.interpolate(mask, size=(side, side), mode="nearest")
    return (grid.flatten(1) > 0.5).float()


class LocalMapping(MappingModel):
    """CLIP features of the masked object (+ mask) -> local tokens `[B, P, output_dim]`, plus local K/V."""

    @register_to_config
    def __init__(
        self,
        input_dim: int = 1024,
        output_dim: int = 768,
        hidden_dim: int = 1024,
        feature_layers: Sequence[int] = DEFAULT_LAYERS,
        kv_layers: dict[str, list[int]] | None = None,
        pretrained_model_name_or_path: str | None = None,
        image_encoder_name_or_path: str | None = None,
        w0_map_norm: str = "sample",
        local_mask_mode: str = "zero_tokens",
        w0_source: str = "image",
        object_view: str = "mask_then_resize",
        mask_grid_via: int = 128,
        mask_threshold: int = 0,
        concept_crop: str = "none",
    ) -> None:
        check_local_settings(
            dict(
                w0_map_norm=w0_map_norm,
                local_mask_mode=local_mask_mode,
                w0_source=w0_source,
                object_view=object_view,
                mask_grid_via=mask_grid_via,
                mask_threshold=mask_threshold,
                concept_crop=concept_crop,
            )
        )
        super().__init__(
            input_dim,
            output_dim,
            hidden_dim,
            feature_layers,
            kv_layers,
            pretrained_model_name_or_path,
            image_encoder_name_or_path,
        )

    @property
    def settings(self) -> dict:
        """The computation settings this model runs with (`REFERENCE_SETTINGS` keys)."""
        return {name: self.config[name] for name in REFERENCE_SETTINGS}

    def forward(
        self, features: Sequence[torch.Tensor], mask: torch.Tensor | None = None, grid_via: int = 0
    ) -> LocalMappingOutput:
        """`features`: one `[B, 1 + P, input_dim]` per tapped layer; `mask`: object mask or None (keep
        all), reaching the patch grid through `grid_via` (see `mask_to_patch_grid`; the trainer passes
        the augmented view's mask directly, inference its photo's mask via `config.mask_grid_via`)."""
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
            return LocalMappingOutput(
                tokens=tokens, keep=torch.ones(batch, patches, dtype=torch.bool, device=tokens.device)
            )
        if mask.shape[0] != batch:
            raise ValueError(f"mask batch {mask.shape[0]} != feature batch {batch}")
        grid = mask_to_patch_grid(mask.to(tokens.device), patches, via=grid_via)
        return LocalMappingOutput(tokens=tokens * grid.unsqueeze(-1).to(tokens.dtype), keep=grid > 0.5)
