"""Write generation results so an interrupted run never leaves a file that looks complete.

Images and JSON go to a temporary sibling name first and are renamed into place. The grid puts, on
each row, a caption with the prompt, then the concept input(s) (the crop the encoder saw, background
dimmed outside the mask), a gap, then the generated images: the picture to look at first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_image_atomic(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image (format from the suffix) via a temporary file + rename."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format=fmt))


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """Write JSON (indented, keys in insertion order) via a temporary file + rename."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def mask_preview(image: Image.Image, mask: Image.Image, dim: float = 0.35) -> Image.Image:
    """The concept crop with everything outside the mask darkened, so the grid shows what was encoded."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    keep = (np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) > 0)[..., None]
    shown = np.where(keep, rgb, rgb * dim)
    return Image.fromarray(shown.clip(0, 255).astype(np.uint8))


def make_grid(
    rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[Image.Image]]],
    cell: int | None = None,
    gap: int = 4,
) -> Image.Image:
    """One row per (caption, inputs, outputs): inputs | outputs, with the caption above the row.

    `cell` is the square size every picture is drawn at (default: the first output's width, at least
    96 px so 64-px demo images stay visible).
    """
    if not rows:
        raise ValueError("make_grid needs at least one row")
    first = next((outs[0] for _, _, outs in rows if outs), None)
    cell = cell or max(96, first.width if first is not None else 96)
    font = ImageFont.load_default()
    caption_h = 14
    widths = []
    for _, inputs, outputs in rows:
        n_in, n_out = len(inputs), len(outputs)
        widths.append(gap + n_in * (cell + gap) + (gap * 2 if n_in else 0) + n_out * (cell + gap))
    width = max(widths)
    height = gap + len(rows) * (caption_h + cell + gap)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    y = gap
    for caption, inputs, outputs in rows:
        draw.text((gap, y), caption, fill="black", font=font)
        y += caption_h
        x = gap
        for picture in inputs:
            grid.paste(picture.convert("RGB").resize((cell, cell), Image.BICUBIC), (x, y))
            x += cell + gap
        if inputs:
            draw.line([(x + gap // 2, y), (x + gap // 2, y + cell)], fill=(160, 160, 160), width=2)
            x += gap * 2
        for picture in outputs:
            grid.paste(picture.convert("RGB").resize((cell, cell), Image.NEAREST if picture.width < cell else Image.BICUBIC), (x, y))
            x += cell + gap
        y += cell + gap
    return grid
