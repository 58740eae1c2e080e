"""Concept inputs (photo, mask, alpha, prompt) and the concept file: every bad input behaves as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.common.files import atomic_write_json
from inference.concept import Concept, ConceptFileError
from inference.inputs import (
    LETTERBOX_RGB,
    ConceptInputError,
    ConceptInputWarning,
    find_placeholders,
    load_concept_image,
    prepare_concept_image,
    square_box_around,
)
from inference.pictures import make_grid, mask_preview, save_image_atomic


def _photo(size=(80, 60), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size=(80, 60), box=(20, 10, 50, 40)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with pytest.raises(ConceptInputError, match="broken.jpg.*cannot be read"):
        load_concept_image(broken)
    with pytest.raises(ConceptInputError, match="nope.png: no such file"):
        load_concept_image(tmp_path / "nope.png")
    good = tmp_path / "good.png"
    _photo().save(good)
    bad_mask = tmp_path / "mask.png"
    bad_mask.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ConceptInputError, match="mask .*mask.png"):
        load_concept_image(good, bad_mask)


def test_truncated_image_is_an_error_not_a_partial_image(tmp_path):
    path = tmp_path / "cut.png"
    _photo((200, 200)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptInputError, match="cut.png"):
        load_concept_image(path)


def test_alpha_channel_is_the_mask(tmp_path):
    rgba = _photo().convert("RGBA")
    alpha = np.zeros((60, 80), np.uint8)
    alpha[5:25, 30:70] = 255
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "cutout.png"
    rgba.save(path)
    concept = load_concept_image(path)
    assert concept.mask_source == "alpha channel"
    assert concept.image.mode == "RGB" and concept.mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(concept.mask), alpha)


def test_explicit_mask_wins_over_alpha_with_a_warning(tmp_path):
    rgba = _photo().convert("RGBA")
    rgba.putalpha(_mask(box=(0, 0, 10, 10)))
    with pytest.warns(ConceptInputWarning, match="alpha channel"):
        concept = load_concept_image(rgba, _mask())
    np.testing.assert_array_equal(np.asarray(concept.mask), np.asarray(_mask()))


def test_mask_of_another_size_is_resized_with_a_note(tmp_path):
    small = _mask(size=(40, 30), box=(10, 5, 25, 20))
    path = tmp_path / "small_mask.png"
    small.save(path)
    with pytest.warns(ConceptInputWarning, match=r"small_mask.png is 40x30 .* 80x60"):
        concept = load_concept_image(_photo(), path)
    assert concept.mask.size == (80, 60)
    assert set(np.unique(np.asarray(concept.mask))) == {0, 255}
    assert 0.1 < concept.mask_fraction < 0.3  # 15x15 of 40x30 -> the same fraction after resizing


def test_empty_mask_is_an_error(tmp_path):
    path = tmp_path / "empty.png"
    Image.new("L", (80, 60), 0).save(path)
    with pytest.raises(ConceptInputError, match="empty.png: the mask is empty"):
        load_concept_image(_photo(), path)
    transparent = _photo().convert("RGBA")
    transparent.putalpha(0)
    with pytest.raises(ConceptInputError, match="alpha channel .* empty"):
        load_concept_image(transparent)


def test_no_mask_means_whole_image_with_a_warning():
    with pytest.warns(ConceptInputWarning, match="whole image"):
        concept = load_concept_image(_photo())
    assert concept.mask_source == "whole image" and concept.mask_fraction == 1.0
    assert prepare_concept_image(concept) is concept  # nothing to crop around


def test_masks_of_any_mode_are_binarised():
    gray = Image.fromarray(np.tile(np.arange(80, dtype=np.uint8) * 3, (60, 1)))  # 0..237 left to right
    concept = load_concept_image(_photo(), gray)
    values = np.asarray(concept.mask)
    assert set(np.unique(values)) == {0, 255}
    assert values[0, 42] == 0 and values[0, 43] == 255  # 3 * 43 = 129 >= 128
    rgb_mask = _mask().convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_concept_image(_photo(), rgb_mask).mask), np.asarray(_mask()))


def test_crop_is_a_square_around_the_object_inside_the_photo():
    concept = prepare_concept_image(load_concept_image(_photo(), _mask()), margin=0.1)
    x0, y0, x1, y1 = concept.crop_xyxy
    assert x1 - x0 == y1 - y0 == 36  # 30 px box + 10% on each side
    assert x0 <= 20 and y0 <= 10 and x1 >= 50 and y1 >= 40
    assert concept.image.size == concept.mask.size == (36, 36)
    assert np.asarray(concept.mask).sum() == np.asarray(_mask()).sum()  # the whole object is kept
    # an object at the border: the square is shifted inside the image
    assert square_box_around((70, 50, 80, 60), (80, 60), 0.5) == (60, 40, 80, 60)
    # an object wider than the photo is tall: the square passes the top and bottom edges (letterbox)
    assert square_box_around((0, 0, 80, 60), (80, 60), 0.1) == (0, -10, 80, 70)
    wide_object = _mask((80, 60), box=(2, 10, 78, 50))
    letterboxed = prepare_concept_image(load_concept_image(_photo(), wide_object))
    assert letterboxed.image.size == letterboxed.mask.size == (80, 80)
    assert letterboxed.crop_xyxy == (0, -10, 80, 70)
    pixels, mask = np.asarray(letterboxed.image), np.asarray(letterboxed.mask)
    assert (pixels[:10] == LETTERBOX_RGB).all() and (pixels[70:] == LETTERBOX_RGB).all()  # CLIP's mean colour
    np.testing.assert_array_equal(pixels[10:70], np.asarray(_photo()))
    assert mask[:10].max() == 0 and mask.sum() == np.asarray(wide_object).sum()  # the whole object kept


def test_prompt_without_placeholder_is_an_error():
    find_placeholders("a photo of S* on the beach", ["S*"])
    with pytest.raises(ConceptInputError, match=r"'a photo of a dog' does not contain the placeholder 'S\*'"):
        find_placeholders("a photo of a dog", ["S*"])
    with pytest.raises(ConceptInputError, match="'S2'"):
        find_placeholders("S1 playing with a ball", ["S1", "S2"])


def test_bundled_demo_mask_fits_its_photo(data_dir):
    photo = data_dir / "concepts" / "dreambooth" / "teapot" / "04.jpg"
    mask = data_dir / "concepts" / "masks" / "teapot_04.png"
    concept = load_concept_image(photo, mask)  # no warning: same size, non-empty
    assert concept.mask.size == concept.image.size
    assert 0.03 < concept.mask_fraction < 0.15
    crop = prepare_concept_image(concept)
    assert 0.15 < crop.mask_fraction < 0.6  # the teapot fills a good part of the encoder's view


# ---------------------------------------------------------------- the concept file


def _concept(local=True, seed=0) -> Concept:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(16, generator=g) > 0.3
    return Concept(
        w0=torch.randn(32, generator=g),
        local_tokens=torch.randn(16, 32, generator=g) if local else None,
        local_keep=keep if local else None,
        metadata={"encoders": "org/elite", "source_image": "teapot.jpg", "crop_xyxy": "1,2,3,4"},
        preview=torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8) if local else None,
    )


@pytest.mark.parametrize("local", [True, False])
def test_concept_round_trip(tmp_path, local):
    concept = _concept(local)
    path = concept.save(tmp_path / "sub" / "teapot.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["teapot.safetensors"]  # no temp file left over
    back = Concept.load(path)
    assert torch.equal(back.w0, concept.w0)
    assert back.metadata == concept.metadata
    if local:
        assert torch.equal(back.local_tokens, concept.local_tokens)
        assert back.local_keep.dtype == torch.bool and torch.equal(back.local_keep, concept.local_keep)
        assert torch.equal(back.preview, concept.preview) and back.preview_image().size == (8, 8)
    else:
        assert back.local_tokens is None and back.local_keep is None and back.preview is None


def test_concept_file_errors(tmp_path):
    with pytest.raises(ConceptFileError, match="missing.safetensors: no such file"):
        Concept.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ConceptFileError, match="junk.safetensors: not a readable"):
        Concept.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w0": torch.zeros(4)}, str(other))
    with pytest.raises(ConceptFileError, match="not a concept file"):
        Concept.load(other)


def test_concept_rejects_bad_shapes():
    with pytest.raises(ValueError, match="w0 must be one word"):
        Concept(w0=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="local_tokens must be"):
        Concept(w0=torch.zeros(32), local_tokens=torch.zeros(16, 8))
    with pytest.raises(ValueError, match="preview must be"):
        Concept(w0=torch.zeros(32), preview=torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="local_keep must be"):
        Concept(w0=torch.zeros(32), local_tokens=torch.zeros(16, 32), local_keep=torch.ones(8, dtype=torch.bool))


# ---------------------------------------------------------------- outputs


def test_grid_layout_and_atomic_writes(tmp_path):
    outputs = [_photo((64, 64), seed=i) for i in range(3)]
    inputs = [mask_preview(_photo(), _mask())]
    grid = make_grid([("prompt one", inputs, outputs), ("prompt two", inputs, outputs[:2])], cell=64, gap=4)
    assert grid.size == (4 + 68 + 8 + 3 * 68, 4 + 2 * (14 + 64 + 4))
    # the first output sits right after the input and the separator, unchanged (64 px, no resampling)
    top = 4 + 14
    np.testing.assert_array_equal(np.asarray(grid)[top : top + 64, 80 : 80 + 64], np.asarray(outputs[0]))
    preview = np.asarray(inputs[0]).astype(int)
    original = np.asarray(_photo()).astype(int)
    assert (preview[20, 30] == original[20, 30]).all()  # inside the mask: unchanged
    np.testing.assert_array_equal(preview[0, 0], (original[0, 0] * np.float32(0.35)).astype(int))  # outside: dimmed

    path = save_image_atomic(grid, tmp_path / "grid.png")
    atomic_write_json(tmp_path / "settings.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "settings.json"]
    assert Image.open(path).size == grid.size
    assert (path.stat().st_mode & 0o644) == 0o644  # readable like any other file, not mkstemp's 0600
