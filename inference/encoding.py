"""Encode a concept photo with loaded ELITE encoders: one forward pass, no optimisation.

`encode_with(encoders, photo, mask)` reads the photo and mask (`inference.inputs`), crops a square
around the object, runs the CLIP vision tower once per view it needs and the mappings once, and
returns a `Concept`: w0 (from the view the last training stage read it from), the local tokens and
their keep-mask, metadata about its origin, and a small preview of what was encoded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders.clip_features import mask_background

from .concept import Concept
from .inputs import ConceptImage, ImageLike, load_concept_image, prepare_concept_image
from .loading import EliteEncoders, check_encoders_fit, load_base_pipeline, load_encoders
from .pictures import mask_preview

PREVIEW_SIZE = 96  # side of the picture a concept file keeps of what was encoded (for grids)


def _image_tensor(image, size: int, device, resample) -> torch.Tensor:
    """PIL image -> `[1, C, size, size]` float in [0, 1] (antialiased PIL resize, as the reference)."""
    array = np.asarray(image.resize((size, size), resample), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)


def _file_name(source: str) -> str:
    """A photo's file name for metadata (no local directories); descriptions stay as they are."""
    return source if source.startswith("<") or source in ("alpha channel", "whole image") else Path(source).name


def _w0_source(encoders: EliteEncoders, w0_from: str | None) -> str:
    """Which view of the photo w0 is read from: as the last training stage did, unless told otherwise.

    The local stage computes w0 from the object on black (the view its local tokens come from), the
    global stage from the whole crop; so "object" with a local mapping, "crop" without one.
    """
    if w0_from is None:
        return "object" if encoders.local_mapping is not None else "crop"
    if w0_from not in ("object", "crop"):
        raise ValueError(f"w0_from must be 'object' or 'crop', got {w0_from!r}")
    return w0_from


def encode_with(
    encoders: EliteEncoders,
    image: ImageLike | ConceptImage,
    mask: ImageLike | None = None,
    crop: bool = True,
    return_input: bool = False,
    w0_from: str | None = None,
):
    """Encode a concept photo with loaded encoders (see `ElitePipeline.encode_concept`)."""
    loaded = image if isinstance(image, ConceptImage) else load_concept_image(image, mask)
    prepared = prepare_concept_image(loaded, crop=crop)
    source = _w0_source(encoders, w0_from)
    extractor = encoders.feature_extractor
    device = extractor.image_mean.device
    size = extractor.image_size
    w0_layer = int(encoders.global_mapping.config.feature_layers[0])
    with torch.inference_mode():
        pixels = _image_tensor(prepared.image, size, device, Image.BICUBIC)
        mask_t = (_image_tensor(prepared.mask, size, device, Image.NEAREST) > 0.5).float()
        views = {}
        if source == "crop":
            views["crop"] = dict(zip(extractor.layers, extractor.encode(pixels)))
        if source == "object" or encoders.local_mapping is not None:
            views["object"] = dict(zip(extractor.layers, extractor.encode(mask_background(pixels, mask_t))))
        w0 = encoders.global_mapping([views[source][w0_layer]], num_words=1)[0, 0].float().cpu()
        tokens = keep = None
        if encoders.local_mapping is not None:
            feats = [views["object"][int(layer)] for layer in encoders.local_mapping.config.feature_layers]
            out = encoders.local_mapping(feats, mask_t)
            tokens, keep = out.tokens[0].float().cpu(), out.keep[0].cpu()
    metadata = {
        "encoders": encoders.source,
        "base_model": encoders.base_model_name or "",
        "image_encoder": encoders.image_encoder_name,
        "source_image": _file_name(prepared.source),
        "mask_source": _file_name(prepared.mask_source),
        "crop_xyxy": ",".join(str(v) for v in prepared.crop_xyxy),
        "mask_fraction": f"{prepared.mask_fraction:.4f}",
        "w0_from": source,
    }
    thumb = mask_preview(prepared.image, prepared.mask).resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.BICUBIC)
    preview = torch.from_numpy(np.asarray(thumb, dtype=np.uint8).copy())
    concept = Concept(w0=w0, local_tokens=tokens, local_keep=keep, metadata=metadata, preview=preview)
    return (concept, prepared) if return_input else concept


def encode_concept_standalone(
    encoders: str | Path,
    image: ImageLike,
    mask: ImageLike | None = None,
    base: str | Path | None = None,
    image_encoder: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    crop: bool = True,
) -> Concept:
    """Encode without a UNet in memory (only the image encoder and mappings); with `base`, check the
    encoders fit it first (loads the base pipeline's configs and weights)."""
    loaded = load_encoders(encoders, image_encoder=image_encoder, device=device, dtype=dtype)
    if base is not None:
        check_encoders_fit(loaded, load_base_pipeline(base, device="cpu", dtype="float32", safety_checker=False))
    return encode_with(loaded, image, mask, crop=crop)

