"""Concept photos for the fine-tunes: reading, masks, bad files, and the seeded batch stream."""

from __future__ import annotations

import shutil

import pytest
import torch

from encoders.common.images import list_photos
from training.concept_data import ConceptBatches, load_concept_photos
from training.templates import OBJECT_TEMPLATES


def test_photos_load_square_and_normalised(data_dir):
    photos = load_concept_photos(data_dir / "concepts" / "dreambooth" / "dog", resolution=32)
    assert len(photos) == 5 and photos.pixels.shape == (5, 3, 32, 32)
    assert photos.pixels.min() >= -1.0 and photos.pixels.max() <= 1.0
    assert photos.masks is None and not photos.has_mask.any()


def test_masks_are_found_by_name_and_resized(data_dir, tmp_path):
    concept = tmp_path / "teapot"
    shutil.copytree(data_dir / "concepts" / "dreambooth" / "teapot", concept)
    photos = load_concept_photos(concept, resolution=32, mask_dir=data_dir / "concepts" / "masks")
    index = [p.name for p in photos.files].index("04.jpg")
    assert photos.has_mask.tolist() == [i == index for i in range(len(photos))]
    mask = photos.masks[index]
    assert set(mask.unique().tolist()) == {0.0, 1.0} and 0 < mask.mean() < 1
    assert photos.masks[0].min() == 1.0  # photos without a mask weigh every pixel
    off = load_concept_photos(concept, resolution=32, mask_dir=data_dir / "concepts" / "masks", use_masks=False)
    assert off.masks is None


def test_bad_photos_are_skipped_and_named(data_dir, tmp_path):
    concept = tmp_path / "cat"
    shutil.copytree(data_dir / "concepts" / "dreambooth" / "cat", concept)
    (concept / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        photos = load_concept_photos(concept, resolution=16)
    assert len(photos) == 5 and photos.skipped == [str(concept / "broken.jpg")]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no photos"):
        list_photos(empty)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"xx")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of its 1 images"):
        load_concept_photos(only_bad, resolution=16)


def test_batches_are_seeded_and_cover_every_photo():
    def take(seed, n=6):
        stream = ConceptBatches(5, 4, "S*", OBJECT_TEMPLATES, flip_p=0.5, seed=seed)
        return [next(stream) for _ in range(n)]

    a, b, c = take(1), take(1), take(2)
    assert all(
        torch.equal(x["index"], y["index"]) and torch.equal(x["flip"], y["flip"]) and x["prompt"] == y["prompt"]
        for x, y in zip(a, b)
    )
    assert any(not torch.equal(x["index"], y["index"]) for x, y in zip(a, c))
    seen = torch.cat([x["index"] for x in a])
    assert set(seen[:5].tolist()) == set(range(5))  # an epoch is a permutation
    assert all("S*" in p for x in a for p in x["prompt"])
    flips = torch.cat([x["flip"] for x in a]).float().mean()
    assert 0.1 < flips < 0.9
