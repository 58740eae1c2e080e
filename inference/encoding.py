"""Encode a concept photo with loaded ELITE encoders: one forward pass, no optimisation.

`encode_with(encoders, photo, mask)` reads the photo and mask (`inference.inputs`), runs the CLIP
vision tower once per view it needs and the mappings once, and returns a `Concept`: w0, the local
tokens and their keep-mask, metadata about its origin, and a small preview of what was encoded.

How is the local mapping's (`encoders.local_mapping`, stored in its `config.json`); the defaults
are the official ELITE inference: the whole photo and the photo times its mask, each resized to
the encoder's 224 px with PIL's bicubic filter; w0 from the whole photo; the mask (object: any pixel
above 0) to the 16 x 16 patch grid by torch's nearest resize through 128 x 128.

Several photos of one concept (`encode_photos`, or a concept folder: its photos and the masks in its
`masks/`): each photo is encoded as above, then w0 is their mean (the word the photos share) and the
local tokens are all photos' tokens side by side (the local branch attends over every photo's detail
and takes from each what the query needs; a position-wise mean would blur objects that are not
aligned). The official ELITE encodes one photo; with one photo the result is exactly that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders.clip_features import mask_background
from encoders.common.images import find_mask, list_photos
from encoders.local_mapping import REFERENCE_SETTINGS

from .concept import Concept
from .inputs import ConceptImage, ImageLike, load_concept_image, prepare_concept_image
from .loading import EliteEncoders, check_encoders_fit, load_base_pipeline, load_encoders
from .pictures import mask_preview

PREVIEW_SIZE = 96  # side of the picture a concept file keeps of what was encoded (for grids)
_W0_ALIASES = {"crop": "image"}  # the earlier name of the unmasked view


def _image_tensor(image, size: int, device, resample) -> torch.Tensor:
    """PIL image -> `[1, C, size, size]` float in [0, 1] (antialiased PIL resize, as the reference)."""
    array = np.asarray(image.resize((size, size), resample), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)


def _mask_tensor(mask: Image.Image, device) -> torch.Tensor:
    """A 0/255 L mask at its own size -> `[1, 1, H, W]` float 0/1."""
    return torch.from_numpy(np.asarray(mask) > 0).float()[None, None].to(device)


def _file_name(source: str) -> str:
    """A photo's file name for metadata (no local directories); descriptions stay as they are."""
    return source if source.startswith("<") or source in ("alpha channel", "whole image") else Path(source).name


def encoding_settings(encoders: EliteEncoders, crop: bool | None = None, w0_from: str | None = None) -> dict:
    """The settings an encoding uses: the local mapping's (the official ones without a local mapping),
    with `crop` (True: "square", False: "none") and `w0_from` ("image" / "object") overriding them."""
    lm = encoders.local_mapping
    settings = dict(REFERENCE_SETTINGS)
    if lm is not None:
        settings.update({k: lm.config[k] for k in REFERENCE_SETTINGS if k in lm.config})
    if crop is not None:
        settings["concept_crop"] = "square" if crop else "none"
    if w0_from is not None:
        w0_from = _W0_ALIASES.get(w0_from, w0_from)
        if w0_from not in ("image", "object"):
            raise ValueError(f"w0_from must be 'image' or 'object', got {w0_from!r}")
        settings["w0_source"] = w0_from
    return settings


def encode_with(
    encoders: EliteEncoders,
    image: ImageLike | ConceptImage,
    mask: ImageLike | None = None,
    crop: bool | None = None,
    return_input: bool = False,
    w0_from: str | None = None,
):
    """Encode a concept photo with loaded encoders (see `ElitePipeline.encode_concept`)."""
    settings = encoding_settings(encoders, crop, w0_from)
    loaded = image if isinstance(image, ConceptImage) else load_concept_image(image, mask, settings["mask_threshold"])
    prepared = prepare_concept_image(loaded, crop=settings["concept_crop"] == "square")
    extractor = encoders.feature_extractor
    device = extractor.image_mean.device
    size = extractor.image_size
    w0_layer = int(encoders.global_mapping.config.feature_layers[0])
    local_mapping = encoders.local_mapping
    with torch.inference_mode():
        pixels = _image_tensor(prepared.image, size, device, Image.BICUBIC)
        views = {}
        if settings["w0_source"] == "image":
            views["image"] = dict(zip(extractor.layers, extractor.encode(pixels)))
        if settings["w0_source"] == "object" or local_mapping is not None:
            if settings["object_view"] == "mask_then_resize":  # x * m at full size, then resized
                object_pixels = _image_tensor(prepared.masked_image(), size, device, Image.BICUBIC)
            else:
                small_mask = _mask_tensor(prepared.mask.resize((size, size), Image.NEAREST), device)
                object_pixels = mask_background(pixels, small_mask)
            views["object"] = dict(zip(extractor.layers, extractor.encode(object_pixels)))
        w0 = encoders.global_mapping([views[settings["w0_source"]][w0_layer]], num_words=1)[0, 0].float().cpu()
        tokens = keep = None
        if local_mapping is not None:
            via = int(settings["mask_grid_via"])
            mask_t = (
                _mask_tensor(prepared.mask, device)
                if via
                else _mask_tensor(prepared.mask.resize((size, size), Image.NEAREST), device)
            )
            feats = [views["object"][int(layer)] for layer in local_mapping.config.feature_layers]
            out = local_mapping(feats, mask_t, grid_via=via)
            tokens, keep = out.tokens[0].float().cpu(), out.keep[0].cpu()
    metadata = {
        "encoders": encoders.source,
        "base_model": encoders.base_model_name or "",
        "image_encoder": encoders.image_encoder_name,
        "source_image": _file_name(prepared.source),
        "mask_source": _file_name(prepared.mask_source),
        "crop_xyxy": ",".join(str(v) for v in prepared.crop_xyxy),
        "mask_fraction": f"{prepared.mask_fraction:.4f}",
        "w0_from": settings["w0_source"],
        "concept_crop": settings["concept_crop"],
        "object_view": settings["object_view"],
    }
    thumb = mask_preview(prepared.image, prepared.mask).resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.BICUBIC)
    preview = torch.from_numpy(np.asarray(thumb, dtype=np.uint8).copy())
    concept = Concept(w0=w0, local_tokens=tokens, local_keep=keep, metadata=metadata, preview=preview)
    return (concept, prepared) if return_input else concept


def concept_photos(image, mask=None) -> list[tuple]:
    """(photo, mask) pairs of what a user handed over: one photo (+ mask), a list of photos (+ a list of
    masks or None), or a concept folder (its photos, each with the mask `find_mask` finds or none)."""
    if isinstance(image, (list, tuple)):
        masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(image) if mask is None else None
        if masks is None or len(masks) != len(image):
            raise ValueError(f"{len(image)} photos but masks {mask!r}: give one mask per photo (None for none)")
        return [pair for img, m in zip(image, masks) for pair in concept_photos(img, m)]
    if isinstance(image, (str, Path)) and Path(image).is_dir():
        if mask is not None:
            raise ValueError(
                f"{image} is a concept folder: its masks come from {Path(image) / 'masks'}, not from mask="
            )
        return [(photo, find_mask(photo)) for photo in list_photos(image)]
    return [(image, mask)]


def combine_concepts(concepts: list[Concept]) -> Concept:
    """One concept from several photos' encodings: w0 averaged, local tokens and keep-masks concatenated."""
    if len(concepts) == 1:
        return concepts[0]
    w0 = torch.stack([c.w0 for c in concepts]).mean(dim=0)
    tokens = keep = None
    if all(c.local_tokens is not None for c in concepts):
        tokens = torch.cat([c.local_tokens for c in concepts])
        keep = torch.cat([c.local_keep for c in concepts])
    first = concepts[0].metadata
    metadata = {
        **first,
        "source_image": ",".join(c.metadata.get("source_image", "?") for c in concepts),
        "mask_source": ",".join(c.metadata.get("mask_source", "?") for c in concepts),
        "crop_xyxy": ";".join(c.metadata.get("crop_xyxy", "") for c in concepts),
        "photos": str(len(concepts)),
        "combined": "w0 mean, local tokens concatenated",
    }
    return Concept(w0=w0, local_tokens=tokens, local_keep=keep, metadata=metadata, preview=concepts[0].preview)


def encode_photos(
    encoders: EliteEncoders,
    image,
    mask=None,
    crop: bool | None = None,
    return_input: bool = False,
    w0_from: str | None = None,
):
    """Encode one photo, several photos of one concept, or a concept folder into one `Concept`."""
    pairs = concept_photos(image, mask)
    encoded = [encode_with(encoders, img, m, crop=crop, return_input=True, w0_from=w0_from) for img, m in pairs]
    concept = combine_concepts([c for c, _ in encoded])
    return (concept, encoded[0][1]) if return_input else concept


def encode_concept_standalone(
    encoders: str | Path,
    image: ImageLike,
    mask: ImageLike | None = None,
    base: str | Path | None = None,
    image_encoder: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    crop: bool | None = None,
) -> Concept:
    """Encode without a UNet in memory (only the image encoder and mappings); with `base`, check the
    encoders fit it first (loads the base pipeline's configs and weights)."""
    loaded = load_encoders(encoders, image_encoder=image_encoder, device=device, dtype=dtype)
    if base is not None:
        check_encoders_fit(
            loaded, load_base_pipeline(base, device="cpu", dtype="float32", safety_checker=False, allow_sdxl=True)
        )
    return encode_photos(loaded, image, mask, crop=crop)
