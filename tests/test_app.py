"""The web demo's input handling without a browser: the painted mask, boxes, and a generation through
`DemoApp` (the page itself is driven in Chromium by test_app_browser.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.app import DemoApp, _box, painted_mask
from inference.inputs import ConceptInputError


def test_the_painted_layer_is_the_mask():
    photo = Image.new("RGB", (40, 30), (10, 20, 30))
    layer = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (5, 5, 15, 20))  # a brush stroke
    got_photo, mask = painted_mask({"background": photo, "layers": [layer], "composite": photo})
    assert got_photo.size == (40, 30) and mask.mode == "L"
    values = np.asarray(mask) > 0
    assert values[5:20, 5:15].all() and values.sum() == 10 * 15
    assert painted_mask({"background": photo, "layers": [Image.new("RGBA", (40, 30))]})[1] is None  # nothing painted
    assert painted_mask(None) == (None, None)


def test_boxes_are_checked():
    assert _box("0, 0.2, 0.5, 1") == [0.0, 0.2, 0.5, 1.0] and _box("") is None
    for bad in ("0,0,1", "0.5,0,0.2,1", "a,b,c,d", "0,0,1.5,1"):
        with pytest.raises(ConceptInputError, match="x0,y0,x1,y1"):
            _box(bad)


def test_demo_app_generates_with_a_painted_mask_and_the_paper_preset(tiny_sd_path, tiny_encoders_path, data_dir):
    from inference.pipeline import ElitePipeline

    elite = ElitePipeline.from_pretrained(
        str(tiny_sd_path), encoders=str(tiny_encoders_path), device="cpu", dtype="float32", safety_checker=False
    )
    app = DemoApp(elite, mask_model=None, max_steps=2)
    photo = Image.open(data_dir / "concepts" / "dreambooth" / "dog" / "00.jpg").convert("RGB")
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (100, 100, 500, 500))
    inputs = app.concept_inputs(photo, mask, None, auto_mask=True, mask_word="dog")
    images, previews, status = app.generate("a photo of S*", [inputs], 0.3, 1, 50, "paper", 7.5, 1)
    assert len(images) == 1 and len(previews) == 1
    assert "lambda 0.8" in status and "2 steps" in status and "painted mask" in status  # the paper's lambda rule
    _, _, notes = app.concept_inputs(photo, None, None, auto_mask=True, mask_word="dog")
    assert notes == ["photo 1: whole photo (no mask model)"]
    with pytest.raises(ConceptInputError, match="prompt"):
        app.generate(" ", [inputs], 0.6, 0, 2, "none (the settings below)", 7.5, 1)
