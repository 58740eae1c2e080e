"""Concept photo folders: which files are photos, and where each photo's mask is.

One rule for every command that reads a folder of concept photos (the fine-tunes, evaluation,
`inference encode/generate` with a folder): photos are the image files directly in the folder,
sorted by name, except mask files; the mask of `NAME.jpg` is the first that exists of

    <mask_dir>/NAME.png, <mask_dir>/NAME.mask.png, <mask_dir>/<folder>_NAME.png   (when a mask_dir is given)
    <folder>/masks/NAME.png, <folder>/masks/NAME.mask.png, <folder>/masks/<folder>_NAME.png
    <folder>/NAME.mask.png, <folder>/NAME_bg.png                                   (beside the photo)

`NAME_bg.png` beside the photo is the official ELITE test-set convention, so those folders work as
they are.

Pixels follow one rule wherever they are read (`data_prep` and `inference`): `to_rgb` turns any mode
into 8-bit RGB (16-bit grey scaled from its full range, transparency shown on white), EXIF orientation
is applied with `apply_orientation`, and `mask_to_binary` says which mask pixels are the object.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_STEM_SUFFIXES = (".mask", "_bg")
MASKS_SUBFOLDER = "masks"


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_photos(folder: str | os.PathLike) -> list[Path]:
    """Photo files directly in `folder`, sorted by name, mask files excluded.

    Raises FileNotFoundError naming the folder when it is not one or holds no photo.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"concept folder {folder} is not a folder")
    photos = sorted(
        p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.stem.endswith(MASK_STEM_SUFFIXES)
    )
    if not photos:
        raise FileNotFoundError(f"concept folder {folder} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
    return photos


def mask_candidates(photo: str | os.PathLike, mask_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the mask of `photo` may be, in the order they are tried (see the module docstring)."""
    photo = Path(photo)
    folders = ([Path(mask_dir)] if mask_dir else []) + [photo.parent / MASKS_SUBFOLDER]
    names = (f"{photo.stem}.png", f"{photo.stem}.mask.png", f"{photo.parent.name}_{photo.stem}.png")
    seen, out = set(), []
    for candidate in [f / n for f in folders for n in names] + [
        photo.with_name(f"{photo.stem}.mask.png"),
        photo.with_name(f"{photo.stem}_bg.png"),
    ]:
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out


def find_mask(photo: str | os.PathLike, mask_dir: str | os.PathLike | None = None) -> Path | None:
    """The mask file of `photo`, or None when it has none."""
    return next((c for c in mask_candidates(photo, mask_dir) if c.is_file() and c != Path(photo)), None)


# ---- pixels: one rule for data_prep and inference -------------------------------------------------

# Modes PIL converts to 8-bit RGB faithfully, and the short name a conversion is noted by.
MODE_NAMES = {
    "L": "grayscale",
    "1": "grayscale",
    "LA": "grayscale_alpha",
    "P": "palette",
    "PA": "palette",
    "RGBA": "rgba",
    "RGBa": "rgba",
    "RGBX": "rgbx",
    "CMYK": "cmyk",
    "YCbCr": "ycbcr",
    "LAB": "lab",
    "HSV": "hsv",
    "I;16": "16bit",
    "I;16L": "16bit",
    "I;16B": "16bit",
    "I;16N": "16bit",
    "I": "32bit_int",
    "F": "float",
}
EXIF_ORIENTATION = 0x0112
MASK_THRESHOLD = 128  # a mask pixel is object where its brightest channel is >= this (0..255)


# The largest photo (in pixels) that `encode`, `generate` and the web demo accept: a 6000 x 6000 photo,
# more than any camera's default output. Decoding costs ~60 bytes a pixel on the way to the encoder, so a
# 1 MB JPEG of 8000 x 8000 would take ~4 GB; larger photos are refused with their size, before decoding.
MAX_IMAGE_PIXELS = 36_000_000


class ImageModeError(ValueError):
    """A PIL image mode this project cannot turn into RGB pixels."""


def _eight_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit or float pixel values scaled to 0..255 (16-bit by its full range, others as stored)."""
    values = values.astype(np.float64)
    top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB pixels of any PIL image and the name of the conversion made (None for RGB already).

    16-bit and 32-bit grey images are scaled from their full range (PIL's own `convert("RGB")` clips
    them to white); images with transparency are shown on white, as a viewer shows them.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    name = MODE_NAMES.get(mode)
    if name is None:
        raise ImageModeError(f"image mode {mode} is not supported")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_eight_bit(np.asarray(image), mode), "L").convert("RGB"), name
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), name
    return image.convert("RGB"), name


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); a broken EXIF block counts as upright."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is no reason to lose the pixels
        return 1


_TRANSPOSE = {
    2: [Image.FLIP_LEFT_RIGHT],
    3: [Image.ROTATE_180],
    4: [Image.FLIP_TOP_BOTTOM],
    5: [Image.TRANSPOSE],
    6: [Image.ROTATE_270],
    7: [Image.TRANSVERSE],
    8: [Image.ROTATE_90],
}


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned the way EXIF orientation `orientation` says (the same turn for a photo and its mask)."""
    for op in _TRANSPOSE.get(orientation, []):
        image = image.transpose(op)
    return image


def mask_to_binary(mask: Image.Image, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """`[H, W]` bool of a mask image of any mode: white (or any bright colour) is the object.

    The rule: a pixel is object where its brightest colour channel is >= `threshold` (so a pure red or
    blue mask counts, as do grey levels from 128 up); a mask with transparency (RGBA / LA / palette with
    a transparent colour) whose colour is one flat value is read by its alpha instead (opaque = object).
    16-bit masks are scaled to 0..255 first.
    """
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        colour = np.asarray(rgba.convert("RGB"))
        if alpha.min() < 255 and colour.reshape(-1, 3).min(0).tolist() == colour.reshape(-1, 3).max(0).tolist():
            return alpha >= threshold
        return colour.max(axis=-1) >= threshold
    if mask.mode == "1":
        return np.asarray(mask, dtype=bool)
    if mask.mode.startswith("I;16") or mask.mode in ("I", "F"):
        return _eight_bit(np.asarray(mask), mask.mode) >= threshold
    return np.asarray(mask.convert("RGB")).max(axis=-1) >= threshold
