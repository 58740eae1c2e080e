"""The crop-shard loader (training/data.py): shapes and value ranges both ELITE stages expect, seeded
determinism, one clean pass without resampling, scale augmentation's valid region, bad shards
skipped, and the shards' compatibility with `datasets.load_dataset("webdataset")`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from encoders.clip_features import CLIP_MEAN, CLIP_STD
from encoders.tokenizer import build_clip_tokenizer
from training.data import CropDataConfig, CropSampleTransform, build_crop_dataloader
from training.templates import IMAGENET_TEMPLATES


def _all_keys(folder) -> set[str]:
    keys = set()
    for manifest in folder.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        keys |= {k for s in data["shards"] for k in [s["file"]]}
    import tarfile

    out = set()
    for tar_path in folder.rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            out |= {n.split(".", 1)[0] for n in tar.getnames()}
    return out


@pytest.mark.parametrize("factor", [2, 4])
def test_batch_shapes_and_ranges(crop_shards, factor):
    tokenizer = build_clip_tokenizer()
    cfg = CropDataConfig(resolution=64, shuffle_buffer=8, shuffle_initial=2)
    loader = build_crop_dataloader(crop_shards, cfg, batch_size=3, vae_scale_factor=factor, tokenizer=tokenizer, seed=0)
    batch = next(iter(loader))
    latent = 64 // factor
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["valid_mask"].shape == batch["object_mask_latent"].shape == (3, 1, latent, latent)
    assert batch["clip_pixel_values"].shape == batch["clip_object_pixel_values"].shape == (3, 3, 224, 224)
    assert batch["object_mask_clip"].shape == (3, 1, 224, 224)
    assert batch["input_ids"].shape == (3, tokenizer.model_max_length) and batch["input_ids"].dtype == torch.long
    assert batch["box_in_crop"].shape == (3, 4)
    assert len(batch["caption"]) == len(batch["category"]) == len(batch["key"]) == 3
    px = batch["pixel_values"]
    assert px.dtype == torch.float32 and px.min() >= -1 and px.max() <= 1 and px.std() > 0.1
    for name in ("valid_mask", "object_mask_latent", "object_mask_clip"):
        assert set(batch[name].unique().tolist()) <= {0.0, 1.0}
    assert (batch["object_mask_latent"].flatten(1).sum(1) > 0).all()  # every object is visible at latent size
    assert batch["valid_mask"].min() == 1.0  # no letterbox, no scale augmentation here
    lo = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    clip = batch["clip_pixel_values"]
    assert (clip >= lo - 1e-5).all() and (clip <= hi + 1e-5).all()
    # the local stage's input is the object on black: outside the mask it is normalised black
    obj, m = batch["clip_object_pixel_values"], batch["object_mask_clip"]
    assert torch.allclose(obj * (1 - m), lo.expand_as(obj) * (1 - m), atol=1e-5)
    assert torch.allclose(obj * m, clip * m, atol=1e-5)
    for caption in batch["caption"]:
        assert "S*" in caption
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).replace(" ", "") == batch["caption"][0].replace(" ", "").lower()
    b = batch["box_in_crop"]
    assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all() and b.min() >= 0 and b.max() <= 1


def test_resolution_must_divide_by_the_vae_factor(crop_shards):
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        build_crop_dataloader(crop_shards, CropDataConfig(resolution=60), batch_size=2, vae_scale_factor=8)


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_seeded_batches_are_reproducible(crop_shards):
    cfg = CropDataConfig(resolution=32, clip_size=32, shuffle_buffer=8, shuffle_initial=4, scale_prob=0.5)
    make = lambda seed: build_crop_dataloader(crop_shards, cfg, batch_size=2, vae_scale_factor=2, seed=seed)  # noqa: E731
    a, b, c = _batches(make(0), 4), _batches(make(0), 4), _batches(make(1), 4)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        for name in ("pixel_values", "clip_pixel_values", "valid_mask", "box_in_crop"):
            assert torch.equal(x[name], y[name])
    assert [x["key"] for x in a] != [x["key"] for x in c] or any(
        not torch.equal(x["clip_pixel_values"], z["clip_pixel_values"]) for x, z in zip(a, c)
    )


def test_one_pass_without_resampling_sees_every_sample_once(crop_shards):
    cfg = CropDataConfig(resolution=32, clip_size=32, resampled=False, shuffle_buffer=4, shuffle_initial=2)
    loader = build_crop_dataloader(crop_shards, cfg, batch_size=1, vae_scale_factor=2, seed=3)
    first = [b["key"][0] for b in loader]
    assert sorted(first) == sorted(_all_keys(crop_shards)) and len(first) == loader.num_samples
    second = [b["key"][0] for b in loader]  # the next epoch reshuffles
    assert sorted(second) == sorted(first) and second != first


def test_two_workers_split_the_shards(crop_shards):
    cfg = CropDataConfig(resolution=32, clip_size=32, resampled=False, shuffle_buffer=0)
    loader = build_crop_dataloader(crop_shards, cfg, batch_size=1, vae_scale_factor=2, num_workers=2, seed=0)
    keys = [b["key"][0] for b in loader]
    assert sorted(keys) == sorted(_all_keys(crop_shards))


def test_scale_augmentation_marks_the_canvas_invalid(crop_shards):
    cfg = CropDataConfig(resolution=64, clip_size=32, scale_prob=1.0, scale_range=(0.5, 0.5), shuffle_buffer=0)
    batch = next(iter(build_crop_dataloader(crop_shards, cfg, batch_size=4, vae_scale_factor=4, seed=0)))
    valid = batch["valid_mask"]
    assert (valid.flatten(1).sum(1) == 8 * 8).all()  # a 32 px object on a 64 px canvas = 8x8 latent cells of 16x16
    up = torch.nn.functional.interpolate(valid, scale_factor=4, mode="nearest")
    assert (batch["pixel_values"] * (1 - up)).abs().max() == 0  # grey (0) outside the placed crop
    assert ((batch["object_mask_latent"] * (1 - valid)) == 0).all()  # the object sits inside the valid region
    b = batch["box_in_crop"]
    assert ((b[:, 2] - b[:, 0]) <= 0.5 + 1e-6).all()


def test_letterboxed_crop_keeps_fill_out_of_the_loss():
    cfg = CropDataConfig(resolution=32, clip_size=32)
    transform = CropSampleTransform(cfg, vae_scale_factor=4)
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (4, 10, 28, 22))
    meta = {"box_in_crop": [0.125, 0.3125, 0.875, 0.6875], "valid_in_crop": [0.0, 0.25, 1.0, 0.75], "key": "k"}
    out = transform(image, mask, meta, random.Random(0))
    rows = out["valid_mask"][0].amin(dim=1)
    assert rows.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # rows 8..24 of 32 are real pixels


def test_bad_shard_is_skipped_not_fatal(crop_shards, tmp_path, caplog):
    (tmp_path / "broken.tar").write_bytes(b"\x00" * 100 + b"definitely not a tar" * 50)
    shards = sorted(str(p) for p in crop_shards.rglob("*.tar")) + [str(tmp_path / "broken.tar")]
    cfg = CropDataConfig(resolution=32, clip_size=32, resampled=False, shuffle_buffer=0)
    keys = [b["key"][0] for b in build_crop_dataloader(shards, cfg, batch_size=1, vae_scale_factor=2)]
    assert sorted(keys) == sorted(_all_keys(crop_shards))
    assert "broken.tar" in caplog.text


def test_templates_are_the_clip_imagenet_ones(data_dir):
    bundled = json.loads((data_dir / "prompts/en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
    assert list(IMAGENET_TEMPLATES) == bundled and len(bundled) == 80


def test_shards_open_with_hf_datasets(crop_shards, tmp_path):
    import datasets

    files = sorted(str(p) for p in (crop_shards / "coco").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    manifest = json.loads((crop_shards / "coco" / "manifest.json").read_text())
    assert len(ds) == manifest["samples"]
    row = ds[0]
    assert row["jpg"].size == (64, 64) and row["mask.png"].size == (64, 64)
    assert row["json"]["source"] == "coco" and len(row["json"]["box_in_crop"]) == 4
