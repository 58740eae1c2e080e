"""Concept photo folders: which files are photos, and where each photo's mask is.

One rule for every command that reads a folder of concept photos (the fine-tunes, evaluation,
`inference encode/generate` with a folder): photos are the image files directly in the folder,
sorted by name, except mask files; the mask of `NAME.jpg` is the first that exists of

    <mask_dir>/NAME.png, <mask_dir>/NAME.mask.png, <mask_dir>/<folder>_NAME.png   (when a mask_dir is given)
    <folder>/masks/NAME.png, <folder>/masks/NAME.mask.png, <folder>/masks/<folder>_NAME.png
    <folder>/NAME.mask.png, <folder>/NAME_bg.png                                   (beside the photo)

`NAME_bg.png` beside the photo is the official ELITE test-set convention, so those folders work as
they are.
"""

from __future__ import annotations

import os
from pathlib import Path

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
        p for p in folder.iterdir()
        if p.is_file() and is_image_file(p) and not p.stem.endswith(MASK_STEM_SUFFIXES)
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
