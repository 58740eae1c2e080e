"""The official ELITE datasets' crop rules, computed by the loader from what the shards store: which objects each
stage keeps, and the tight-box crop with its margin."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training.crop_data import CropDataConfig, box_view, crop_filter_reason


def meta(box, size=(640, 480), crop=(0, 0, 640, 480)):
    return {"bbox_xyxy": list(box), "image_size": list(size), "crop_xyxy": list(crop)}


def test_stage_filters_keep_what_the_official_datasets_keep():
    from training.global_mapping import STAGE1_DATA
    from training.local_mapping import STAGE2_DATA

    stage1, stage2 = CropDataConfig(**STAGE1_DATA), CropDataConfig(**STAGE2_DATA)
    assert crop_filter_reason(meta((0, 0, 320, 240)), stage1) is None  # 25 % of the image
    assert "area" in crop_filter_reason(meta((0, 0, 60, 60)), stage1)  # 1.2 %
    assert "area" in crop_filter_reason(meta((0, 0, 620, 470)), stage1)  # 95 %
    assert crop_filter_reason(meta((10, 10, 150, 200)), stage2) is None  # 140 x 190
    assert "px" in crop_filter_reason(meta((10, 10, 90, 200)), stage2)  # 80 px wide
    assert "aspect" in crop_filter_reason(meta((10, 10, 120, 400)), stage2)  # 110 x 390: aspect 3.5
    assert crop_filter_reason(meta((0, 0, 5, 5)), CropDataConfig()) is None  # no filters by default
    with pytest.raises(ValueError, match="crop_geometry=stored"):
        CropDataConfig(cached_latents=True, crop_geometry="box")


def test_box_view_is_the_tight_box_plus_margin_cut_from_the_stored_crop():
    original = Image.new("RGB", (200, 160), (30, 30, 30))
    draw = ImageDraw.Draw(original)
    draw.rectangle((60, 50, 119, 109), fill=(250, 40, 40))
    draw.rectangle((0, 0, 199, 20), fill=(40, 40, 250))
    crop = (40, 30, 140, 130)  # the stored square crop: the box with 20 px of context
    stored = original.crop(crop).resize((64, 64), Image.BICUBIC)
    mask = Image.new("L", (200, 160), 0)
    ImageDraw.Draw(mask).rectangle((60, 50, 119, 109), fill=255)
    stored_mask = mask.crop(crop).resize((64, 64), Image.NEAREST)
    m = {**meta((60, 50, 120, 110), (200, 160), crop), "valid_in_crop": [0, 0, 1, 1]}

    image, cut_mask, new = box_view(stored, stored_mask, m, (10, 10), random.Random(0))
    assert image.size == cut_mask.size == (64, 64)
    expected = np.asarray(original.crop((50, 40, 130, 120)).resize((64, 64), Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - expected).mean() < 12  # resampled twice, same region
    np.testing.assert_allclose(new["box_in_crop"], [0.125, 0.125, 0.875, 0.875], atol=0.02)
    ys, xs = np.nonzero(np.asarray(cut_mask) > 127)
    assert abs(xs.min() / 64 - 0.125) < 0.04 and abs(xs.max() / 64 - 0.875) < 0.04

    # a margin beyond the stored crop stops at its edge: the region is clipped, never padded
    _, _, wide = box_view(stored, stored_mask, m, (40, 40), random.Random(0))
    assert wide["crop_xyxy"] == pytest.approx([40, 30, 140, 130], abs=1.0)


def test_the_demo_makefile_keeps_the_stored_crops_the_loader_names():
    """`make demo` spells the stored-crop keys out (it runs before any Python is installed): they must stay
    `training.crop_data.STORED_CROP_KEYS`."""
    import re
    from pathlib import Path

    from training.crop_data import STORED_CROP_KEYS

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    spelled = re.search(r"^STORED_CROPS := (.*?)(?<!\\)\n", makefile, flags=re.M | re.S).group(1)
    assert spelled.replace("\\\n", " ").split() == list(STORED_CROP_KEYS)
