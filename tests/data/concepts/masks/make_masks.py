"""Rebuild the bundled concept masks from their photos (run from the repository root).

    .venv/bin/python tests/data/concepts/masks/make_masks.py

How `teapot_04.png` was made: the object region was outlined by hand as a polygon (coordinates read
off the photo on a 20-px grid; it follows the teapot's outline loosely and cuts straight above the
stone block the teapot stands on, keeping only its foot ring). Inside that polygon a pixel is object
when it is darker or more saturated than the light grey backdrop; a 5-px median filter removes JPEG
speckle, and enclosed background specks smaller than 2,500 px (specular highlights on the glaze) are
filled, while the large hole inside the handle stays background. Output: mode L, 0/255, same size as
the photo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

HERE = Path(__file__).parent
PHOTOS = HERE.parent / "dreambooth"

# (photo, output, hand-drawn polygon in photo pixels)
MASKS = [
    (
        "teapot/04.jpg",
        "teapot_04.png",
        [(205, 372), (662, 372), (662, 668), (556, 668), (556, 688), (356, 688), (356, 668), (205, 668)],
    ),
]


def object_mask(photo: Image.Image, polygon: list[tuple[int, int]], max_hole_px: int = 2500) -> Image.Image:
    rgb = np.asarray(photo.convert("RGB")).astype(np.float32)
    region = Image.new("L", photo.size, 0)
    ImageDraw.Draw(region).polygon(polygon, fill=255)
    luminance = rgb.mean(-1)
    saturation = rgb.max(-1) - rgb.min(-1)
    obj = ((luminance < 185) | (saturation > 40)) & (np.asarray(region) > 0)
    obj = np.asarray(Image.fromarray(obj.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(5))) > 0
    holes, count = ndimage.label(~obj)
    sizes = ndimage.sum(np.ones_like(holes), holes, index=range(1, count + 1))
    for label, size in enumerate(sizes, start=1):
        if size < max_hole_px:
            obj[holes == label] = True
    return Image.fromarray(obj.astype(np.uint8) * 255, mode="L")


def main() -> None:
    for photo_name, out_name, polygon in MASKS:
        photo = Image.open(PHOTOS / photo_name)
        mask = object_mask(photo, polygon)
        mask.save(HERE / out_name, optimize=True)
        print(f"{out_name}: {photo.size[0]}x{photo.size[1]}, {np.asarray(mask).mean() / 255:.1%} object")


if __name__ == "__main__":
    main()
