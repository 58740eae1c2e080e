"""The crop-shard loader (training/crop_data.py): shapes and value ranges both ELITE stages expect, seeded
determinism, one clean pass without resampling, scale augmentation's valid region, bad shards
skipped, the shards' compatibility with `datasets.load_dataset("webdataset")`, and the batched
CLIP-view augmentation (grids, flip/rotation against PIL's affine warp, per-sample blur, cached tokens)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from encoders.clip_features import CLIP_MEAN, CLIP_STD
from encoders.common.shards import CROP_FLAGS, index_file_name
from encoders.tokenizer import build_clip_tokenizer
from training.crop_data import (
    CropDataConfig,
    CropSampleTransform,
    build_crop_dataloader,
    clip_view_grids,
    gaussian_blur,
)
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
    cfg = CropDataConfig(resolution=64)
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
    obj = batch["clip_object_pixel_values"]
    assert (obj >= lo - 1e-5).all() and (obj <= hi + 1e-5).all()
    for caption in batch["caption"]:
        assert "S*" in caption
    assert (
        tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).replace(" ", "")
        == batch["caption"][0].replace(" ", "").lower()
    )
    b = batch["box_in_crop"]
    assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all() and b.min() >= 0 and b.max() <= 1


def _unaugmented(**extra) -> CropDataConfig:
    off = dict(
        clip_flip_prob=0,
        clip_rotation_prob=0,
        clip_blur_prob=0,
        clip_affine_prob=0,
        object_resize_crop_prob=0,
        object_rotation_prob=0,
        object_translate_prob=0,
    )
    return CropDataConfig(**{"resolution": 64, **off, **extra})


def test_the_object_view_is_the_object_on_black_in_both_orders(crop_shards):
    """mask_then_resize (official): x * m at crop size, then resized, so only the mask's edge blends with
    black; resize_then_mask: the image view with black exactly outside the view's mask."""
    lo = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    batches = {}
    for order in ("mask_then_resize", "resize_then_mask"):
        loader = build_crop_dataloader(
            crop_shards, _unaugmented(object_view=order), batch_size=3, vae_scale_factor=4, seed=0
        )
        batches[order] = next(iter(loader))
    late = batches["resize_then_mask"]
    obj, m, clip = late["clip_object_pixel_values"], late["object_mask_clip"], late["clip_pixel_values"]
    assert torch.allclose(obj * (1 - m), lo.expand_as(obj) * (1 - m), atol=1e-5)
    assert torch.allclose(obj * m, clip * m, atol=1e-5)
    early = batches["mask_then_resize"]
    assert torch.equal(early["object_mask_clip"], m) and torch.equal(early["clip_pixel_values"], clip)
    near = F.max_pool2d(m, 5, stride=1, padding=2)  # the mask grown by 2 px
    inner = -F.max_pool2d(-m, 5, stride=1, padding=2)  # and shrunk by 2 px
    e = early["clip_object_pixel_values"]
    assert torch.allclose(e * (1 - near), lo.expand_as(e) * (1 - near), atol=1e-5)  # black away from the object
    assert torch.allclose(e * inner, clip * inner, atol=1e-4)  # the photo inside it
    edge = (near - inner).bool().expand_as(e)
    assert (e - obj).abs()[edge].mean() > 0.05  # the two orders differ along the mask's edge


def test_the_object_view_warp_moves_image_and_mask_together(crop_shards):
    cfg = _unaugmented(object_resize_crop_prob=1.0, object_rotation_prob=1.0, object_translate_prob=1.0)
    batch = next(iter(build_crop_dataloader(crop_shards, cfg, batch_size=3, vae_scale_factor=4, seed=0)))
    plain = next(iter(build_crop_dataloader(crop_shards, _unaugmented(), batch_size=3, vae_scale_factor=4, seed=0)))
    assert not torch.equal(batch["object_mask_clip"], plain["object_mask_clip"])  # warped
    assert torch.equal(batch["clip_pixel_values"], plain["clip_pixel_values"])  # the image view is not
    # the masked photo and the mask are separate sources: the object lands inside the warped mask
    m = batch["object_mask_clip"]
    near = F.max_pool2d(m, 7, stride=1, padding=3)  # 3 px: the nearest-sampled mask vs the bilinear-sampled photo
    lo = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    obj = batch["clip_object_pixel_values"]
    assert (
        torch.allclose(obj * (1 - near), lo.expand_as(obj) * (1 - near), atol=1e-5) and (m.flatten(1).sum(1) > 0).all()
    )
    assert ((obj - lo).abs().sum(1, keepdim=True) * m).flatten(1).sum(1).gt(0).all()  # and is not black inside it


def test_object_view_warp_follows_cv2_conventions():
    """The forward pixel maps: resize-then-crop keeps the crop's top-left where cv2.resize puts it; the
    rotation turns about the image centre; the shift adds whole pixels."""
    import random as random_module

    from training.crop_data import object_view_warp

    only = dict(object_resize_crop_prob=0, object_rotation_prob=0, object_translate_prob=0)
    for key in ("object_resize_crop_prob", "object_rotation_prob", "object_translate_prob"):
        cfg = _unaugmented(**{**only, key: 1.0})
        warp = object_view_warp(random_module.Random(3), cfg, 224)
        if key == "object_rotation_prob":
            centre = warp @ np.array([112.0, 112.0, 1.0])
            assert np.allclose(centre[:2], [112.0, 112.0]) and abs(np.linalg.det(warp[:2, :2]) - 1) < 1e-9
        elif key == "object_translate_prob":
            assert np.allclose(warp[:2, :2], np.eye(2)) and np.allclose(warp[:2, 2], np.round(warp[:2, 2]))
        else:
            scale = warp[0, 0]
            assert 1.0 <= scale <= 256 / 224 + 1e-9 and warp[0, 0] == warp[1, 1]


def test_resolution_must_divide_by_the_vae_factor(crop_shards):
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        build_crop_dataloader(crop_shards, CropDataConfig(resolution=60), batch_size=2, vae_scale_factor=8)


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_seeded_batches_are_reproducible(crop_shards):
    cfg = CropDataConfig(resolution=32, clip_size=32, shuffle_shards=2, scale_augment="shrink", scale_prob=0.5)
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
    cfg = CropDataConfig(resolution=32, clip_size=32, resampled=False, shuffle_shards=2)
    loader = build_crop_dataloader(crop_shards, cfg, batch_size=1, vae_scale_factor=2, seed=3)
    first = [b["key"][0] for b in loader]
    assert sorted(first) == sorted(_all_keys(crop_shards)) and len(first) == loader.num_samples
    second = [b["key"][0] for b in loader]  # the next epoch reshuffles
    assert sorted(second) == sorted(first) and second != first


def test_two_workers_split_the_shards(crop_shards):
    cfg = CropDataConfig(resolution=32, clip_size=32, resampled=False, shuffle_shards=0)
    loader = build_crop_dataloader(crop_shards, cfg, batch_size=1, vae_scale_factor=2, num_workers=2, seed=0)
    keys = [b["key"][0] for b in loader]
    assert sorted(keys) == sorted(_all_keys(crop_shards))


def test_scale_augmentation_marks_the_canvas_invalid(crop_shards):
    cfg = CropDataConfig(
        resolution=64, clip_size=32, scale_augment="shrink", scale_prob=1.0, scale_range=(0.5, 0.5), shuffle_shards=0
    )
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
    cfg = CropDataConfig(resolution=32, clip_size=32, resampled=False, shuffle_shards=0)
    keys = [b["key"][0] for b in build_crop_dataloader(shards, cfg, batch_size=1, vae_scale_factor=2)]
    assert sorted(keys) == sorted(_all_keys(crop_shards))
    assert "broken.tar" in caplog.text


def test_templates_are_the_clip_imagenet_ones(data_dir):
    bundled = json.loads((data_dir / "prompts/en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
    assert list(IMAGENET_TEMPLATES) == [t.replace("{c}", "{}") for t in bundled] and len(bundled) == 80


def test_shards_open_with_hf_datasets(crop_shards, tmp_path):
    import datasets

    # COCO and OpenImages shards together: one schema (ids as strings, a fixed set of flags, notes as text)
    files = sorted(str(p) for p in crop_shards.rglob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "hf"))
    manifests = [json.loads(m.read_text()) for m in crop_shards.glob("*/manifest.json")]
    assert len(ds) == sum(m["samples"] for m in manifests)
    row = ds[0]
    assert row["jpg"].size == (64, 64) and row["mask.png"].size == (64, 64)
    assert {r["json"]["source"] for r in ds} == {"coco", "openimages"}
    assert all(len(r["json"]["box_in_crop"]) == 4 and isinstance(r["json"]["image_id"], str) for r in ds)
    assert set(ds.features["json"]["flags"]) == set(CROP_FLAGS)
    # the index beside each shard lets a reader filter without opening the tar
    index = [json.loads(line) for f in files for line in index_file_name(f).read_text().splitlines()]
    assert len(index) == len(ds) and {r["source"] for r in index} == {"coco", "openimages"}
    assert all(set(r["members"]) == {"jpg", "mask.png", "json"} and r["category"] for r in index)


def _photo(data_dir, size: int) -> Image.Image:
    image = Image.open(sorted((data_dir / "coco_sample/images").glob("*.jpg"))[0]).convert("RGB")
    side = min(image.size)
    return image.crop((0, 0, side, side)).resize((size, size), Image.BICUBIC)


def test_clip_view_grids_are_affine_grids():
    flip = torch.tensor([False, True, True, False])
    angle = torch.tensor([0.0, 0.0, 7.5, -10.0])
    grids = clip_view_grids(flip, angle, 24)
    a = torch.deg2rad(angle)
    mirror = 1 - 2 * flip.float()
    zero = torch.zeros(4)
    theta = torch.stack(
        [torch.stack([a.cos() * mirror, a.sin(), zero], -1), torch.stack([-a.sin() * mirror, a.cos(), zero], -1)], 1
    )
    assert torch.allclose(grids, F.affine_grid(theta, [4, 1, 24, 24], align_corners=False), atol=1e-6)
    image = torch.arange(2 * 24 * 24, dtype=torch.float32).view(2, 1, 24, 24)
    same = F.grid_sample(image, grids[:2], mode="nearest", align_corners=False)
    assert torch.equal(same[0], image[0]) and torch.equal(same[1], image[1].flip(-1))  # identity; mirror


def test_clip_views_match_pils_affine_warp(data_dir):
    """Flip + rotation + resize by grid_sample lands where PIL's affine warp of the same crop does."""
    cfg = CropDataConfig(
        resolution=128,
        clip_size=56,
        clip_flip_prob=1.0,
        clip_rotation_prob=1.0,
        clip_rotation_degrees=10.0,
        clip_blur_prob=0.0,
        clip_affine_prob=0.0,
        clip_border="mean",
        object_resize_crop_prob=0,
        object_rotation_prob=0,
        object_translate_prob=0,
    )
    transform = CropSampleTransform(cfg, vae_scale_factor=8)
    image = _photo(data_dir, 128)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (20, 40, 70, 100))
    meta = {"box_in_crop": [20 / 128, 40 / 128, 70 / 128, 100 / 128], "key": "k"}
    sample = transform(image, mask, meta, random.Random(2))
    flip, angle, blur, affine = sample["clip_aug"].tolist()
    assert flip == 1.0 and 5.0 < abs(angle) <= 10.0 and blur == 0.0 and affine == 0.0
    batch = transform.collate([sample])

    def pil_view(source: Image.Image, resample) -> np.ndarray:  # the reference's affine warp, about the centre
        scale, a = source.width / 56, math.radians(angle)
        m00, m01, m10, m11 = -math.cos(a) * scale, math.sin(a) * scale, math.sin(a) * scale, math.cos(a) * scale
        h_in, h_out = source.width / 2, 28
        coeffs = (m00, m01, h_in - (m00 + m01) * h_out, m10, m11, h_in - (m10 + m11) * h_out)
        return np.asarray(source.transform((56, 56), Image.AFFINE, coeffs, resample), dtype=np.float32)

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    ours = (batch["clip_pixel_values"][0] * std + mean) * 255
    reference = torch.from_numpy(pil_view(image.reduce(2), Image.BILINEAR)).permute(2, 0, 1)
    inside = torch.from_numpy(pil_view(Image.new("L", (64, 64), 255), Image.NEAREST) > 0)[
        2:-2, 2:-2
    ]  # away from the fill edge
    assert (ours - reference).abs()[:, 2:-2, 2:-2][
        :, inside
    ].mean() < 6.0  # grey levels: ~0.6; unrotated ~26, turned the wrong way ~39


def test_gaussian_blur_per_sample_sigma_like_pil(data_dir):
    image = _photo(data_dir, 64)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    out = gaussian_blur(torch.stack([x, x, x]), [0.1, 0.8, 1.5])
    assert out.shape == (3, 3, 64, 64)
    assert (out[0] - x).abs().mean() < 0.5  # sigma 0.1 is (almost) no blur
    for i, sigma in ((1, 0.8), (2, 1.5)):
        reference = torch.from_numpy(
            np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
        ).permute(2, 0, 1)
        assert (out[i] - reference).abs().mean() < 2.0  # PIL approximates the Gaussian with box passes
    assert (out[2] - x).abs().mean() > (out[1] - x).abs().mean() > 1.0
    flat = torch.full((2, 3, 16, 16), 0.25)
    assert torch.allclose(gaussian_blur(flat, [0.5, 1.5]), flat)  # normalised kernels, replicated edges


def test_token_ids_are_the_tokenizers_and_follow_added_tokens():
    tokenizer = build_clip_tokenizer()
    transform = CropSampleTransform(
        CropDataConfig(resolution=32, clip_size=32), vae_scale_factor=4, tokenizer=tokenizer
    )
    captions = ["a photo of a S*.", "a rendering of a S*.", "a photo of a S*."]
    direct = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert transform.token_ids(captions).tolist() == direct
    tokenizer.add_tokens(["S*"])  # what the trainers do before training: the cached ids must not be reused
    ids = transform.token_ids(captions[:1])[0].tolist()
    assert tokenizer.convert_tokens_to_ids("S*") in ids
    assert ids == tokenizer(captions[:1], padding="max_length", max_length=tokenizer.model_max_length).input_ids[0]


def test_elite_scale_augmentation_is_the_official_draw():
    """custom_aug: 2/3 of draws a side in R/3..R (under 0.6 R: shrunk, 'a far away' / 'very small', the loss
    mask one latent cell inside the crop), 1/3 zoomed 1.2-1.4 R ('zoomed in' / 'close up', all valid)."""
    from training.crop_data import caption_with_prefix

    cfg = _unaugmented(resolution=64, scale_augment="elite")
    transform = CropSampleTransform(cfg, vae_scale_factor=8)
    image, mask = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("L", (64, 64), 255)
    meta = {"box_in_crop": [0.0, 0.0, 1.0, 1.0], "key": "k"}
    kinds = {"shrunk": 0, "zoomed": 0, "kept": 0}
    for seed in range(300):
        out = transform(image, mask, meta, random.Random(seed))
        caption, valid = out["caption"], out["valid_mask"][0]
        x0, y0, x1, y1 = out["canvas"].tolist()
        if caption.startswith(("a far away", "very small")):
            kinds["shrunk"] += 1
            side = x1 - x0
            assert side < 0.6 * 64 and side % 2 == 0 and (y1 - y0) == side
            rows = valid.amax(dim=1).nonzero().flatten().tolist()
            cols = list(range(x0 // 8 + 1, x1 // 8 - 1))  # one cell in from each edge, as the official mask
            assert rows == (list(range(y0 // 8 + 1, y1 // 8 - 1)) if cols else [])  # (at 64 px it can vanish)
        elif caption.startswith(("zoomed in", "close up")):
            kinds["zoomed"] += 1
            assert valid.min() == 1 and (x0, y0, x1, y1) == (0, 0, 64, 64)
        else:
            kinds["kept"] += 1
            assert caption.startswith(("a ", "ahe ")) and valid.min() == 1  # "the photo of a S*" -> "ahe photo of a S*"
    assert abs(kinds["zoomed"] / 300 - 1 / 3) < 0.08 and abs(kinds["shrunk"] / 300 - 0.267) < 0.08
    assert caption_with_prefix("the photo of a S*", "a") == "ahe photo of a S*"  # the official rule, as it is
    assert caption_with_prefix("the photo of a S*", "very small", "first_word") == "very small photo of a S*"
    assert caption_with_prefix("a photo of a S*", "a far away") == "a far away photo of a S*"


def test_box_blur_is_a_per_sample_box_filter():
    from training.crop_data import box_blur

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 12, generator=g)
    out = box_blur(x, [3, 5])
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for b, size in ((0, 3), (1, 5)):
        o = 2 - size // 2
        expected = torch.stack(
            [
                torch.stack(
                    [padded[b, :, o + i : o + i + size, o + j : o + j + size].mean(dim=(1, 2)) for j in range(12)], -1
                )
                for i in range(12)
            ],
            -2,
        )
        assert torch.allclose(out[b], expected, atol=1e-6)


def test_the_elastic_affine_moves_its_control_points():
    from training.crop_data import elastic_affine

    warp = elastic_affine(random.Random(1), 224, 50.0)
    assert warp.shape == (3, 3) and np.allclose(warp[2], [0, 0, 1])
    c, s = 112, 74
    moved = warp @ np.array([[c + s, c + s, 1.0], [c + s, c - s, 1.0], [c - s, c - s, 1.0]]).T
    shift = moved[:2].T - np.array([[c + s, c + s], [c + s, c - s], [c - s, c - s]])
    assert np.abs(shift).max() <= 50.0 and np.abs(shift).max() > 5.0
