"""Automatic concept masks (`inference.masking`): CLIPSeg prompted with a word, the mask saved beside
the outputs and used by the encoders like a hand-made one; a mask model that cannot load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from inference.cli import main as inference_main
from inference.concept import Concept
from inference.loading import ModelLoadError
from inference.masking import AutoMasker, fill_masks


def test_masker_gives_a_binary_mask_of_the_photo_size_that_depends_on_the_prompt(tiny_clipseg_path, data_dir, tmp_path):
    masker = AutoMasker.from_pretrained(tiny_clipseg_path)
    photo = Image.open(data_dir / "concepts" / "dreambooth" / "dog" / "00.jpg")
    mask = masker(photo, "dog")
    values = np.asarray(mask)
    assert mask.mode == "L" and mask.size == photo.size and set(np.unique(values)) <= {0, 255} and values.any()
    dog, teapot = masker.probabilities(photo, "dog"), masker.probabilities(photo, "teapot")
    assert dog.shape == (photo.height, photo.width) and 0 <= dog.min() and dog.max() <= 1
    assert np.abs(dog - teapot).max() > 1e-4  # the word steers the map

    pairs = fill_masks([(photo, None), (photo, tmp_path / "given.png")], masker, "dog", tmp_path, "m")
    assert pairs[0][1] == tmp_path / "m-0.png" and Image.open(pairs[0][1]).size == photo.size
    assert pairs[1][1] == tmp_path / "given.png"  # a given mask is kept
    with pytest.raises(ValueError, match="threshold"):
        AutoMasker(masker.model, masker.processor, threshold=1.5)


def test_encode_with_auto_mask_saves_and_uses_the_mask(tiny_clipseg_path, tiny_encoders_path, data_dir, tmp_path):
    photo = data_dir / "concepts" / "dreambooth" / "dog" / "00.jpg"
    out = tmp_path / "dog.safetensors"
    code = inference_main(
        [
            "encode",
            "--encoders",
            str(tiny_encoders_path),
            "--image",
            str(photo),
            "--out",
            str(out),
            "--auto-mask",
            "dog",
            "--mask-model",
            str(tiny_clipseg_path),
        ]
    )
    assert code == 0
    saved = tmp_path / "dog.mask-0.png"
    concept = Concept.load(out)
    assert saved.is_file() and concept.metadata["mask_source"] == saved.name
    fraction = float(concept.metadata["mask_fraction"])
    assert fraction == pytest.approx((np.asarray(Image.open(saved)) > 0).mean(), abs=0.02) and fraction < 1.0


def test_generate_masks_a_folder_by_default_and_records_it(
    tiny_clipseg_path, tiny_sd_path, tiny_encoders_path, data_dir, tmp_path
):
    folder = tmp_path / "concept"
    folder.mkdir()
    for name in ("00.jpg", "01.jpg"):
        (folder / name).write_bytes((data_dir / "concepts" / "dreambooth" / "dog" / name).read_bytes())
    out = tmp_path / "out"
    code = inference_main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--encoders",
            str(tiny_encoders_path),
            "--image",
            str(folder),
            "--prompt",
            "a photo of S*",
            "--steps",
            "1",
            "--height",
            "16",
            "--quiet",
            "--no-safety-checker",
            "--mask-model",
            str(tiny_clipseg_path),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads((out / "settings.json").read_text())["concepts"][0]
    assert record["auto_masks"] == ["mask-0-0.png", "mask-0-1.png"]
    assert record["mask_source"] == "mask-0-0.png,mask-0-1.png" and (out / "mask-0-1.png").is_file()


def test_a_mask_model_that_does_not_load(tiny_encoders_path, data_dir, tmp_path, capsys):
    photo = data_dir / "concepts" / "dreambooth" / "dog" / "00.jpg"
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model"):
        AutoMasker.from_pretrained(missing)
    # asked for: an error naming the model
    code = inference_main(
        [
            "encode",
            "--encoders",
            str(tiny_encoders_path),
            "--image",
            str(photo),
            "--out",
            str(tmp_path / "a.safetensors"),
            "--auto-mask",
            "dog",
            "--mask-model",
            str(missing),
        ]
    )
    assert code == 2 and "no_such_model" in capsys.readouterr().err
    # the default: a warning, and the whole photo, as without automatic masks
    code = inference_main(
        [
            "encode",
            "--encoders",
            str(tiny_encoders_path),
            "--image",
            str(photo),
            "--out",
            str(tmp_path / "b.safetensors"),
            "--mask-model",
            str(missing),
        ]
    )
    assert code == 0 and "cannot load the mask model" in capsys.readouterr().err
    assert Concept.load(tmp_path / "b.safetensors").metadata["mask_source"] == "whole image"
    assert not list(tmp_path.glob("b.mask*"))


def test_encode_concept_auto_mask_in_python(tiny_clipseg_path, tiny_sd_path, tiny_encoders_path, data_dir):
    from inference.pipeline import ElitePipeline

    elite = ElitePipeline.from_pretrained(
        str(tiny_sd_path), encoders=str(tiny_encoders_path), device="cpu", dtype="float32", safety_checker=False
    )
    elite.mask_model = str(tiny_clipseg_path)
    folder = data_dir / "concepts" / "dreambooth" / "dog"  # no masks/: every photo is auto-masked
    whole = elite.encode_concept(folder)
    masked = elite.encode_concept(folder, auto_mask="dog")
    assert masked.metadata["photos"] == whole.metadata["photos"] == "5"
    assert "whole image" in whole.metadata["mask_source"] and "whole image" not in masked.metadata["mask_source"]
    assert not torch.equal(masked.local_keep, whole.local_keep)  # the object's patches only
