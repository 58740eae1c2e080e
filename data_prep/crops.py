"""Pure crop geometry: where to cut a square around an object box, where the box lands, which boxes to keep.

No I/O and no images here, only numbers, so every rule can be checked against hand-computed cases
(tests/test_data_prep_crops.py). Boxes are `(x0, y0, x1, y1)` floats in pixels, x1/y1 exclusive
edges (COCO's `[x, y, w, h]` becomes `(x, y, x + w, y + h)`).

The crop is a square of side `longest box side * (1 + 2 * padding)` centred on the box and shifted
to stay inside the image. When the image is too small for that square the padding shrinks first
(never past the box itself); only when the box's longest side exceeds the image's shorter side is
the square allowed past the image edge, along that axis only, centred on the image, and the part
outside is filled (letterboxed). `valid_in_crop` then records which part holds real pixels, and
the training loader keeps those pixels out of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class CropGeometry:
    """A square source region and where the object and the real pixels sit inside it."""

    crop_xyxy: Box  # the square source region in image pixels (may pass the image edge: letterbox)
    side: float  # its side in image pixels
    box_in_crop: Box  # the object box in the crop, 0..1
    valid_in_crop: Box  # the part of the crop inside the image, 0..1 ((0, 0, 1, 1) without letterbox)

    @property
    def letterboxed(self) -> bool:
        return self.valid_in_crop != (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class BoxFilters:
    """Which objects are worth a training sample (ELITE's filters by default: boxes of 2-80% of the image,
    >= 100 px on the short side, aspect ratio <= 2)."""

    min_area_fraction: float = 0.02  # box area / image area
    max_area_fraction: float = 0.8
    min_side: float = 100.0  # shorter box side, in original image pixels
    max_aspect_ratio: float = 2.0  # longer / shorter box side


def xywh_to_xyxy(box: tuple[float, float, float, float]) -> Box:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def box_size(box: Box) -> tuple[float, float]:
    return (box[2] - box[0], box[3] - box[1])


def box_area(box: Box) -> float:
    w, h = box_size(box)
    return max(w, 0.0) * max(h, 0.0)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def is_degenerate(box: Box) -> bool:
    """True for a box with a non-finite coordinate or no area (x1 <= x0 or y1 <= y0)."""
    return not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]


def clip_box(box: Box, image_wh: tuple[int, int]) -> Box | None:
    """The part of `box` inside the image, or None when nothing (or only a line) is left."""
    w, h = image_wh
    clipped = (min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h))
    return None if is_degenerate(clipped) else clipped


def check_box(box: Box, image_wh: tuple[int, int], filters: BoxFilters) -> str | None:
    """The reason to drop an object box (already clipped to the image), or None to keep it."""
    if is_degenerate(box):
        return "degenerate_box"
    bw, bh = box_size(box)
    area_fraction = bw * bh / float(image_wh[0] * image_wh[1])
    if area_fraction < filters.min_area_fraction:
        return "area_below_min"
    if area_fraction > filters.max_area_fraction:
        return "area_above_max"
    if min(bw, bh) < filters.min_side:
        return "side_below_min"
    if max(bw, bh) / min(bw, bh) > filters.max_aspect_ratio:
        return "aspect_above_max"
    return None


def _place(center: float, side: float, extent: float) -> float:
    """Origin of a segment of length `side` centred at `center`, kept inside [0, extent] when it fits."""
    if side <= extent:
        return min(max(center - side / 2.0, 0.0), extent - side)
    return (extent - side) / 2.0  # wider than the image: centre on the image, letterbox both sides


def square_crop(box: Box, image_wh: tuple[int, int], padding: float) -> CropGeometry:
    """The square region to cut around `box` (clipped to the image) with `padding` x longest side per edge."""
    if is_degenerate(box):
        raise ValueError(f"degenerate box {box}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    w, h = image_wh
    bw, bh = box_size(box)
    longest = max(bw, bh)
    side = longest * (1.0 + 2.0 * padding)
    if longest <= min(w, h):
        side = min(side, float(min(w, h)))  # give up padding before leaving the image
    else:
        side = min(side, float(max(w, h)))  # the box cannot fit a square inside: letterbox one axis
    x0 = _place((box[0] + box[2]) / 2.0, side, w)
    y0 = _place((box[1] + box[3]) / 2.0, side, h)
    crop = (x0, y0, x0 + side, y0 + side)
    return CropGeometry(
        crop_xyxy=crop,
        side=side,
        box_in_crop=to_crop_frame(box, crop),
        valid_in_crop=to_crop_frame((max(x0, 0.0), max(y0, 0.0), min(x0 + side, w), min(y0 + side, h)), crop),
    )


def to_crop_frame(box: Box, crop: Box) -> Box:
    """`box` (image pixels) in the 0..1 frame of `crop`."""
    side_x, side_y = crop[2] - crop[0], crop[3] - crop[1]
    return (
        (box[0] - crop[0]) / side_x,
        (box[1] - crop[1]) / side_y,
        (box[2] - crop[0]) / side_x,
        (box[3] - crop[1]) / side_y,
    )


def valid_pixel_box(valid_in_crop: Box, resolution: int) -> tuple[int, int, int, int]:
    """The real-pixel region of a `resolution`-sized crop, rounded to whole output pixels."""
    x0, y0, x1, y1 = (round(v * resolution) for v in valid_in_crop)
    return (max(x0, 0), max(y0, 0), min(x1, resolution), min(y1, resolution))


def rotate_normalized_box(box: Box, degrees_ccw: int) -> Box:
    """A 0..1 box after rotating its image by 0/90/180/270 degrees counter-clockwise (OpenImages' Rotation)."""
    x0, y0, x1, y1 = box
    turn = degrees_ccw % 360
    if turn == 0:
        return box
    if turn == 90:  # (u, v) -> (v, 1 - u)
        return (y0, 1.0 - x1, y1, 1.0 - x0)
    if turn == 180:  # (u, v) -> (1 - u, 1 - v)
        return (1.0 - x1, 1.0 - y1, 1.0 - x0, 1.0 - y0)
    if turn == 270:  # (u, v) -> (1 - v, u)
        return (1.0 - y1, x0, 1.0 - y0, x1)
    raise ValueError(f"rotation must be a multiple of 90 degrees, got {degrees_ccw}")
