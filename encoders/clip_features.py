"""Multi-layer features of a frozen CLIP vision tower: the input of both ELITE mapping networks.

ELITE reads five hidden states of CLIP ViT-L/14 at 224 px, in this order: the deepest layer
(24, `last_hidden_state`), then layers 4, 8, 12 and 16. Each is `[B, 1 + P, D]` (CLS + 16x16
patches, D = 1024 for ViT-L). Word i of the global mapping comes from tapped layer i, so the
order matters: the first tap gives w0, the word used at inference.

    from encoders.clip_features import CLIPFeatureExtractor
    clip = CLIPFeatureExtractor.from_pretrained("openai/clip-vit-large-patch14")
    with torch.no_grad():
        feats = clip.encode(images)          # images [B, 3, H, W] in [0, 1]; list of 5 x [B, 257, 1024]
        obj = clip.encode(mask_background(images, masks))   # local stage input: the object on black

`encode` resizes to the tower's `image_size` (bilinear) and applies the pixel normalisation read
from the encoder's `preprocessor_config.json` (CLIP's mean/std when the file is missing). The
tower is frozen (`requires_grad=False`, eval mode); run it under `torch.no_grad()` in training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LAYERS: tuple[int, ...] = (24, 4, 8, 12, 16)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def load_clip_normalization(
    name_or_path: str | os.PathLike, subfolder: str | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`(image_mean, image_std)` from the encoder's `preprocessor_config.json`, else CLIP's values.

    Works for a local folder and for a Hub id (through the local Hugging Face cache, so it never
    needs the network when the model was downloaded with its preprocessor).
    """
    path = Path(name_or_path) / (subfolder or "") / "preprocessor_config.json"
    data = None
    if path.is_file():
        data = json.loads(path.read_text())
    elif not Path(name_or_path).exists():
        try:
            from huggingface_hub import hf_hub_download

            cached = hf_hub_download(str(name_or_path), "preprocessor_config.json", subfolder=subfolder)
            data = json.loads(Path(cached).read_text())
        except Exception:  # no preprocessor on the Hub / offline: CLIP's own statistics are the right default
            data = None
    if not data:
        return CLIP_MEAN, CLIP_STD
    mean = tuple(float(v) for v in data.get("image_mean", CLIP_MEAN))
    std = tuple(float(v) for v in data.get("image_std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{path}: image_mean/image_std must have 3 values, got {mean} / {std}")
    return mean, std


def mask_background(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The object on black (`x * m`): the local stage's CLIP input. `images` in [0, 1], `masks` [B, 1, h, w].

    The mask is resized (nearest) to the image when their sizes differ.
    """
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[-2:] != images.shape[-2:]:
        masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="nearest")
    return images * masks.to(images.dtype)


class CLIPFeatureExtractor(nn.Module):
    """A frozen `CLIPVisionModel` returning the hidden states of `layers`, in that order.

    Layer `k` (1..num_hidden_layers) is the output of transformer block k; `num_hidden_layers`
    equals `last_hidden_state` (before the post layer norm, as the reference uses it); 0 is the
    embedding output.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        layers: Sequence[int] = DEFAULT_LAYERS,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__()
        depth = int(vision_model.config.num_hidden_layers)
        layers = tuple(int(layer) for layer in layers)
        if not layers:
            raise ValueError("CLIPFeatureExtractor needs at least one layer to tap")
        bad = [layer for layer in layers if not 0 <= layer <= depth]
        if bad:
            raise ValueError(f"layers {bad} outside 0..{depth} (the image encoder has {depth} transformer layers)")
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.layers = layers
        self.register_buffer(
            "image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        layers: Sequence[int] = DEFAULT_LAYERS,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> CLIPFeatureExtractor:
        """Load a transformers CLIP vision folder or Hub id (`openai/clip-vit-large-patch14`)."""
        from transformers import CLIPVisionModel

        load_kwargs = dict(kwargs)
        if subfolder:
            load_kwargs["subfolder"] = subfolder
        if torch_dtype is not None:
            load_kwargs["dtype"] = torch_dtype
        model = CLIPVisionModel.from_pretrained(name_or_path, **load_kwargs)
        mean, std = load_clip_normalization(name_or_path, subfolder)
        return cls(model, layers=layers, image_mean=mean, image_std=std)

    # the tower never trains: keep it in eval mode whatever the caller does with .train()
    def train(self, mode: bool = True) -> CLIPFeatureExtractor:
        super().train(False)
        return self

    @property
    def image_size(self) -> int:
        return int(self.vision_model.config.image_size)

    @property
    def hidden_size(self) -> int:
        return int(self.vision_model.config.hidden_size)

    @property
    def num_patches(self) -> int:
        return (self.image_size // int(self.vision_model.config.patch_size)) ** 2

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in [0, 1] -> normalised `pixel_values` at `image_size` (bilinear resize)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        size = self.image_size
        x = images.float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - self.image_mean.to(x.device)) / self.image_std.to(x.device)
        return x.to(self.dtype)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Normalised `pixel_values` -> list of `[B, 1 + P, D]` hidden states, one per tapped layer."""
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states
        return [hidden[layer] for layer in self.layers]

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """`preprocess` then `forward`: images in [0, 1] -> the tapped features."""
        return self(self.preprocess(images))
