"""Crop geometry against hand-computed cases (data_prep.crops is pure: numbers in, numbers out)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_prep.crops import (
    BoxFilters,
    box_iou,
    check_box,
    clip_box,
    rotate_normalized_box,
    square_crop,
    valid_pixel_box,
    xywh_to_xyxy,
)


def approx(values, expected):
    return list(values) == pytest.approx(list(expected), abs=1e-9)


def test_square_crop_inside_image():
    # box 100x50 at (100, 100); padding 0.1 of the longest side (100) -> side 120, centred on (150, 125)
    g = square_crop((100, 100, 200, 150), (640, 480), padding=0.1)
    assert g.side == pytest.approx(120)
    assert approx(g.crop_xyxy, (90, 65, 210, 185))
    assert approx(g.box_in_crop, (10 / 120, 35 / 120, 110 / 120, 85 / 120))
    assert g.valid_in_crop == (0.0, 0.0, 1.0, 1.0) and not g.letterboxed


def test_square_crop_shifted_at_the_edge():
    # box at the left edge: the 60 px square would start at x = -5, so it shifts right to 0
    g = square_crop((0, 10, 50, 60), (640, 480), padding=0.1)
    assert approx(g.crop_xyxy, (0, 5, 60, 65))
    assert approx(g.box_in_crop, (0, 5 / 60, 50 / 60, 55 / 60))
    # ... and at the bottom-right corner it shifts up/left to stay inside
    g = square_crop((600, 440, 640, 480), (640, 480), padding=0.5)
    assert approx(g.crop_xyxy, (560, 400, 640, 480))


def test_padding_gives_way_before_the_image_edge():
    # box 380 x 290 in a 400 x 400 image: 380 * 1.2 = 456 > 400, so the square is the whole image
    g = square_crop((10, 10, 390, 300), (400, 400), padding=0.1)
    assert g.side == pytest.approx(400)
    assert approx(g.crop_xyxy, (0, 0, 400, 400))
    assert not g.letterboxed


def test_letterbox_when_the_box_is_wider_than_the_image_is_tall():
    # box 600 x 300 in 640 x 427: no square inside the image holds it; side = min(720, 640) = 640,
    # x spans the image, y is centred on the image: (427 - 640) / 2 = -106.5
    g = square_crop((20, 100, 620, 400), (640, 427), padding=0.1)
    assert g.side == pytest.approx(640)
    assert approx(g.crop_xyxy, (0, -106.5, 640, 533.5))
    assert approx(g.box_in_crop, (20 / 640, 206.5 / 640, 620 / 640, 506.5 / 640))
    assert approx(g.valid_in_crop, (0, 106.5 / 640, 1, 533.5 / 640))
    assert g.letterboxed
    assert valid_pixel_box(g.valid_in_crop, 128) == (0, 21, 128, 107)  # 106.5/640*128 = 21.3, 533.5/640*128 = 106.7


def test_box_always_inside_its_crop():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(20, 800, 2))
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        g = square_crop((x0, y0, x1, y1), (w, h), padding=float(rng.uniform(0, 0.5)))
        b = g.box_in_crop
        assert -1e-9 <= b[0] < b[2] <= 1 + 1e-9 and -1e-9 <= b[1] < b[3] <= 1 + 1e-9
        v = g.valid_in_crop
        assert v[0] <= b[0] + 1e-9 and v[1] <= b[1] + 1e-9 and b[2] <= v[2] + 1e-9 and b[3] <= v[3] + 1e-9
        assert g.crop_xyxy[2] - g.crop_xyxy[0] == pytest.approx(g.crop_xyxy[3] - g.crop_xyxy[1])


def test_square_crop_rejects_bad_input():
    with pytest.raises(ValueError, match="degenerate"):
        square_crop((10, 10, 10, 20), (100, 100), 0.1)
    with pytest.raises(ValueError, match="padding"):
        square_crop((10, 10, 20, 20), (100, 100), -0.1)


def test_clip_box():
    assert clip_box((-10, -5, 50, 60), (40, 40)) == (0, 0, 40, 40)
    assert clip_box((50, 50, 60, 60), (40, 40)) is None  # entirely outside
    assert clip_box((40, 0, 60, 10), (40, 40)) is None  # touches the edge only
    assert xywh_to_xyxy((10, 20, 30, 40)) == (10, 20, 40, 60)


@pytest.mark.parametrize(
    "box, reason",
    [
        ((0, 0, 0, 50), "degenerate_box"),
        ((0, 0, float("nan"), 50), "degenerate_box"),
        ((0, 0, 20, 20), "area_below_min"),  # 400 / 40000 = 1%
        ((0, 0, 190, 190), "area_above_max"),  # 90%
        ((0, 0, 150, 10), "side_below_min"),  # 3.75% area, 10 px short side
        ((0, 0, 60, 30), "side_below_min"),  # 4.5% area but 30 px short side
        ((0, 0, 150, 60), "aspect_above_max"),  # 2.5 : 1
        ((0, 0, 100, 50), None),
    ],
)
def test_check_box(box, reason):
    filters = BoxFilters(min_area_fraction=0.02, max_area_fraction=0.8, min_side=40, max_aspect_ratio=2.0)
    assert check_box(box, (200, 200), filters) == reason


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


@pytest.mark.parametrize(
    "degrees, transpose", [(90, Image.ROTATE_90), (180, Image.ROTATE_180), (270, Image.ROTATE_270)]
)
def test_rotated_box_follows_the_rotated_image(degrees, transpose):
    w, h = 50, 30
    mask = np.zeros((h, w), np.uint8)
    mask[6:21, 5:16] = 255  # box (5, 6, 16, 21)
    rotated = np.asarray(Image.fromarray(mask).transpose(transpose)) > 0
    rh, rw = rotated.shape
    ys, xs = np.nonzero(rotated)
    expected = (xs.min() / rw, ys.min() / rh, (xs.max() + 1) / rw, (ys.max() + 1) / rh)
    got = rotate_normalized_box((5 / w, 6 / h, 16 / w, 21 / h), degrees)
    assert got == pytest.approx(expected)
    assert rotate_normalized_box((0.1, 0.2, 0.3, 0.4), 0) == (0.1, 0.2, 0.3, 0.4)
    with pytest.raises(ValueError):
        rotate_normalized_box((0.1, 0.2, 0.3, 0.4), 45)
