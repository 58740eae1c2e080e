"""The pictures the project makes for people to look at: result grids, mask previews, guidance sheets.

- `make_grid`: one row per prompt: caption, the concept input(s) (the crop the encoder saw, background
  dimmed outside the mask), a gap, then the generated images.
- `mask_preview`: a concept crop with everything outside its mask darkened.
- `render_comparison`: spatial guidance off / on side by side: each image with its boxes, then each
  concept's cross-attention map (mean over steps and guided layers) with its box, and the mean L_loc.
- `save_image_atomic`: write a picture under a temporary name and rename it (never half a PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from encoders.common.files import atomic_write

Box = Sequence[float]


def save_image_atomic(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image (format from the suffix) via a temporary file + rename."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format=fmt))


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
            grid.paste(
                picture.convert("RGB").resize((cell, cell), Image.NEAREST if picture.width < cell else Image.BICUBIC),
                (x, y),
            )
            x += cell + gap
        y += cell + gap
    return grid


_BOX_COLOURS = [(255, 64, 64), (64, 160, 255), (80, 220, 80), (255, 200, 40)]
_RAMP = [(0, 0, 4), (80, 18, 123), (182, 54, 121), (251, 136, 97), (252, 253, 191)]  # magma-like


def _heatmap(values, size: int):
    """A `[h, w]` map as a colour image, normalised to its own min..max (tiny models attend nearly uniformly)."""
    arr = values.detach().float().cpu().numpy()
    span = float(arr.max() - arr.min())
    norm = (arr - arr.min()) / span if span > 0 else np.zeros_like(arr)
    stops = np.linspace(0, 1, len(_RAMP))
    rgb = np.stack([np.interp(norm, stops, [c[k] for c in _RAMP]) for k in range(3)], axis=-1).astype("uint8")
    return Image.fromarray(rgb).resize((size, size), Image.BILINEAR)


def _as_pil(image):
    """A PIL image from a pipeline output item (PIL, or an `[H, W, 3]` array in 0..1)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return Image.fromarray((arr.clip(0, 1) * 255).round().astype("uint8"))


def _draw_box(draw, box: Box, size: int, colour, width: int = 2) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle([x0 * size, y0 * size, x1 * size - 1, y1 * size - 1], outline=colour, width=width)


def render_comparison(runs: Sequence[tuple[str, object]], concepts: Sequence, prompt: str = "", tile: int = 192):
    """One row per run (e.g. guidance off / on): the image with the boxes drawn, then each concept's
    cross-attention map (mean over steps and guided layers) with its box, and the mean L_loc.
    `runs`: (label, output) with the output's `images`, `location_losses`, `attention_maps`; `concepts`:
    objects with a `name` and a `box`."""
    font = ImageFont.load_default()
    header, label_w = 30, 150
    cols = 1 + len(concepts)
    sheet = Image.new("RGB", (label_w + cols * tile, header + len(runs) * (tile + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), prompt[:120], fill="black", font=font)
    for c, concept in enumerate(concepts):
        draw.text((label_w + (c + 1) * tile + 4, header - 14), f"attention: {concept.name}", fill="black", font=font)
    draw.text((label_w + 4, header - 14), "image + boxes", fill="black", font=font)
    for r, (label, out) in enumerate(runs):
        top = header + r * (tile + 18)
        mean_loss = sum(out.location_losses) / max(len(out.location_losses), 1)
        draw.text((6, top + tile // 2 - 12), label, fill="black", font=font)
        draw.text((6, top + tile // 2 + 4), f"L_loc {mean_loss:.4f}", fill="black", font=font)
        image = _as_pil(out.images[0]).resize((tile, tile), Image.NEAREST)
        tile_draw = ImageDraw.Draw(image)
        for k, concept in enumerate(concepts):
            _draw_box(tile_draw, concept.box, tile, _BOX_COLOURS[k % len(_BOX_COLOURS)])
        sheet.paste(image, (label_w, top))
        for k, concept in enumerate(concepts):
            heat = _heatmap(out.attention_maps[k][0], tile)
            _draw_box(ImageDraw.Draw(heat), concept.box, tile, _BOX_COLOURS[k % len(_BOX_COLOURS)])
            sheet.paste(heat, (label_w + (k + 1) * tile, top))
        draw.text((label_w + 4, top + tile + 2), "maps: own min..max", fill="grey", font=font)
    return sheet
