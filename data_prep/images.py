"""Reading source pixels without trusting them: images in any mode, masks in any encoding.

Every failure becomes a `Skip` with a reason the manifest counts (`missing_image`,
`truncated_image`, `corrupt_image`, `missing_mask`, ...), and every silent repair (a CMYK or
16-bit image converted, an EXIF rotation applied, a mask resized to its image) is returned as a
note, so the manifest says what was done to the data.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from encoders.common.images import MODE_NAMES, apply_orientation, exif_orientation
from encoders.common.images import to_rgb as common_to_rgb

from .writer import Skip


def open_image(path: str | os.PathLike, missing: str = "missing_image", corrupt: str = "corrupt_image") -> Image.Image:
    """Open and fully decode an image file, or raise Skip naming the file and what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except FileNotFoundError:
        raise Skip(missing, str(path)) from None
    except IsADirectoryError:
        raise Skip(missing, f"{path} is a directory") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Skip("image_too_large", f"{path}: {err}") from None
    except UnidentifiedImageError:
        raise Skip(corrupt, f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated_image" if "truncat" in str(err).lower() and missing == "missing_image" else corrupt
        raise Skip(reason, f"{path}: {err}") from None
    return image


def to_rgb(image: Image.Image, convert: bool = True) -> tuple[Image.Image, list[str]]:
    """8-bit RGB pixels of any PIL image (`encoders.common.images.to_rgb`), the conversion noted;
    `convert=False` skips non-RGB images instead."""
    if image.mode == "RGB":
        return image, []
    name = MODE_NAMES.get(image.mode)
    if name is None:
        raise Skip("unsupported_image_mode", f"mode {image.mode}")
    if not convert:
        raise Skip(f"image_mode_{name}", f"mode {image.mode} (convert_modes is off)")
    rgb, _ = common_to_rgb(image)
    return rgb, [f"converted_{name}"]


def mask_from_png(path: str | os.PathLike, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """A binary HxW uint8 mask (0/1) from a PNG of any mode, resized (nearest) to `size` = (w, h).

    OpenImages masks are 1-bit PNGs whose resolution may differ from their image's; a mask whose
    aspect ratio does not match the image's is a different picture and is skipped.
    """
    mask = open_image(path, missing="missing_mask", corrupt="corrupt_mask")
    notes: list[str] = []
    if mask.mode not in ("1", "L"):
        mask = (
            mask.convert("L") if mask.mode != "I;16" else Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
        )
    if mask.size != tuple(size):
        (mw, mh), (w, h) = mask.size, size
        expected_h = mw * h / w
        if abs(mh - expected_h) > max(2.0, 0.03 * mh):
            raise Skip("mask_size_mismatch", f"{path}: mask {mw}x{mh} does not have the shape of its image {w}x{h}")
        mask = mask.convert("L").resize(size, Image.NEAREST)
        notes.append("mask_resized")
    return (np.asarray(mask.convert("L")) > 0).astype(np.uint8), notes


def mask_from_coco(segmentation, height: int, width: int) -> np.ndarray:
    """HxW uint8 (0/1) mask of a COCO segmentation: polygons, uncompressed or compressed RLE (pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            raise Skip("malformed_segmentation", "no polygon with at least 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        rle_h, rle_w = (int(v) for v in segmentation["size"])
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, rle_h, rle_w)
        else:
            counts = segmentation["counts"]
            rle = {"size": [rle_h, rle_w], "counts": counts.encode() if isinstance(counts, str) else counts}
        if (rle_h, rle_w) != (height, width):
            decoded = mask_utils.decode(rle)
            return np.asarray(Image.fromarray(decoded * 255).resize((width, height), Image.NEAREST)) // 255
    else:
        raise Skip("malformed_segmentation", f"segmentation of type {type(segmentation).__name__}")
    return np.ascontiguousarray(mask_utils.decode(rle))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1) of the set pixels, x1/y1 exclusive; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def load_rgb(
    path: str | os.PathLike, *, exif_transpose: bool, convert_modes: bool
) -> tuple[Image.Image, Image.Image | None, list[str]]:
    """(upright RGB image, the stored-frame RGB image when EXIF turned it, notes)."""
    image = open_image(path)
    orientation = exif_orientation(image)
    image, notes = to_rgb(image, convert_modes)
    raw = None
    if orientation != 1:
        if exif_transpose:
            raw = image
            image = apply_orientation(image, orientation)
            notes.append("exif_transposed")
        else:
            notes.append("exif_ignored")
    return image, raw, notes
