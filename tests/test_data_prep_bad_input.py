"""Bad input never kills a job and never passes silently: every case below gives its skip reason
(or, for convertible images, a counted repair), and a file that is not what it claims stops the
job with an error naming it before any shard exists. Inputs are built in tmp_path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main as cli_main
from data_prep.crop_commands import build_coco_shards, build_openimages_shards
from data_prep.records import CropSettings
from data_prep.sources import SourceError

SETTINGS = CropSettings(resolution=32, min_area_fraction=0.01, max_area_fraction=0.95, min_side=10, jpeg_quality=90)
W, H = 120, 100
SQUARE = (30, 20, 90, 80)  # the red object on every test image
RED, BLUE = (240, 40, 40), (10, 20, 120)  # also apart in grey: L = 100 vs 28


def scene() -> Image.Image:
    image = Image.new("RGB", (W, H), BLUE)
    image.paste(RED, SQUARE)
    return image


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kw)
    return buffer.getvalue()


def samples(folder: Path) -> dict[str, dict]:
    """key -> {ext: bytes} for every sample in a folder's shards."""
    out: dict[str, dict] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def centre_colour(sample: dict) -> tuple:
    meta = json.loads(sample["json"])
    image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
    x0, y0, x1, y1 = (v * image.shape[0] for v in meta["box_in_crop"])
    return tuple(int(v) for v in image[int((y0 + y1) / 2), int((x0 + x1) / 2)])


def is_red(rgb) -> bool:
    """The object's colour (or, for images converted from grey, its grey level)."""
    if max(rgb) - min(rgb) < 12:
        return 75 < rgb[0] < 125
    return rgb[0] > 150 and rgb[1] < 110 and rgb[2] < 110  # (RGBA: alpha 200 over white lightens it)


# ---------------------------------------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_bad")
    images = root / "images"
    images.mkdir()
    good = scene()
    good.save(images / "good.jpg", quality=95)
    good.convert("CMYK").save(images / "cmyk.jpg", quality=95)
    good.convert("P", palette=Image.ADAPTIVE).save(images / "palette.png")
    Image.fromarray(np.asarray(good.convert("L"), np.uint16) * 257).save(images / "gray16.png")
    good.convert("L").save(images / "gray.png")
    rgba = good.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(images / "rgba.png")
    # EXIF orientation 6: the stored pixels are the scene turned 90 degrees counter-clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    (images / "exif.jpg").write_bytes(jpeg_bytes(good.transpose(Image.ROTATE_90), exif=exif.tobytes()))
    (images / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    data = jpeg_bytes(good)
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])

    names = [
        "good.jpg",
        "cmyk.jpg",
        "palette.png",
        "gray16.png",
        "gray.png",
        "rgba.png",
        "exif.jpg",
        "exif.jpg",
        "corrupt.jpg",
        "truncated.jpg",
        "missing.jpg",
    ]
    image_entries = [{"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)]
    image_entries[7].update(width=H, height=W)  # the same EXIF file, annotated in its stored frame
    x0, y0, x1, y1 = SQUARE
    square = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    bbox = [x0, y0, x1 - x0, y1 - y0]
    annotations = [
        {"id": 100 + i, "image_id": i + 1, "category_id": 1, "bbox": bbox, "segmentation": square, "iscrowd": 0}
        for i in range(len(names))
    ]
    # stored frame of image 8: the square turned 90 degrees counter-clockwise: (x, y) -> (y, W - x)
    annotations[7]["bbox"] = [y0, W - x1, y1 - y0, x1 - x0]
    annotations[7]["segmentation"] = [[y0, W - x1, y1, W - x1, y1, W - x0, y0, W - x0]]
    annotations += [
        {"id": 200, "image_id": 1, "category_id": 1, "bbox": [500, 500, 20, 20], "segmentation": square},  # outside
        {"id": 201, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 30], "segmentation": square},  # degenerate
        {"id": 100, "image_id": 1, "category_id": 1, "bbox": [31, 21, 50, 50], "segmentation": square},  # repeated id
        {"id": 202, "image_id": 1, "category_id": 1, "bbox": bbox, "segmentation": square},  # same object again
        {"id": 203, "image_id": 1, "category_id": 1, "bbox": "abc", "segmentation": square},  # malformed
        {"id": 204, "image_id": 99, "category_id": 1, "bbox": bbox, "segmentation": square},  # unknown image
        {
            "id": 205,
            "image_id": 1,
            "category_id": 7,
            "bbox": [20, 15, 60, 60],
            "segmentation": square,
        },  # unknown category
        {"id": 206, "image_id": 1, "category_id": 1, "bbox": [25, 10, 70, 80], "segmentation": [[1, 2]]},  # bad polygon
        {
            "id": 207,
            "image_id": 1,
            "category_id": 1,
            "bbox": [28, 18, 64, 64],
            "iscrowd": 1,
            "segmentation": {
                "size": [H, W],
                "counts": [H * x0 + y0]
                + sum([[y1 - y0, H - (y1 - y0)] for _ in range(x1 - x0)], [])[:-1]
                + [H * (W - x1) + H - y1],
            },
        },
    ]
    annotation_file = root / "annotations.json"
    annotation_file.write_text(
        json.dumps({"images": image_entries, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    return root, annotation_file, images


def test_coco_bad_inputs_are_counted_by_reason(coco_case, tmp_path, caplog):
    root, annotations, images = coco_case
    manifest = build_coco_shards(annotations, images, tmp_path, SETTINGS, progress=False)
    assert manifest["skipped_in_source"] == {
        "box_outside_image": 1,
        "degenerate_box": 1,
        "duplicate_annotation": 2,
        "malformed_annotation": 1,
        "unknown_image": 1,
        "unknown_category": 1,
        "crowd": 1,
    }
    assert manifest["skipped_in_shards"] == {
        "corrupt_image": 1,
        "truncated_image": 1,
        "missing_image": 1,
        "malformed_segmentation": 1,
    }
    assert manifest["notes"] == {
        "converted_cmyk": 1,
        "converted_palette": 1,
        "converted_16bit": 1,
        "converted_grayscale": 1,
        "converted_rgba": 1,
        "exif_transposed": 1,
        "exif_ignored_for_annotations": 1,
    }
    got = samples(tmp_path)
    assert sorted(got) == [f"coco_{i}_{100 + i - 1}" for i in range(1, 9)]
    for key, sample in got.items():
        assert is_red(centre_colour(sample)), key  # the crop holds the object, whatever the file's mode or EXIF
    assert json.loads(got["coco_7_106"]["json"])["image_size"] == [W, H]  # EXIF turned upright
    assert json.loads(got["coco_8_107"]["json"])["image_size"] == [H, W]  # annotations in the stored frame
    assert "corrupt.jpg" in caplog.text  # logged with the file name


def test_coco_crowd_rle_and_strict_modes(coco_case, tmp_path):
    root, annotations, images = coco_case
    strict = CropSettings(**{**SETTINGS.to_dict(), "include_crowd": True, "convert_modes": False})
    manifest = build_coco_shards(annotations, images, tmp_path, strict, progress=False)
    skipped = manifest["skipped_in_shards"]
    for mode in ("cmyk", "palette", "16bit", "grayscale", "rgba"):
        assert skipped[f"image_mode_{mode}"] == 1
    crowd = json.loads(samples(tmp_path)["coco_1_207"]["json"])
    assert crowd["mask_source"] == "rle" and crowd["flags"]["is_crowd"] == 1 and crowd["flags"]["is_occluded"] == -1
    assert crowd["mask_box_iou"] > 0.8


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "hold a list"),
        ('{"images": [], "annotations": []}', "no categories"),
    ],
)
def test_coco_file_that_is_not_coco_stops_before_any_shard(tmp_path, content, message, capsys):
    bad = tmp_path / "instances.json"
    bad.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError, match=message) as err:
        build_coco_shards(bad, tmp_path / "images", tmp_path / "out", SETTINGS, progress=False)
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))
    code = cli_main(
        ["coco", "--annotations", str(bad), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    )
    assert code == 2 and str(bad) in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


# ---------------------------------------------------------------------------------------- OpenImages

BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
)
SEG_HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"
NORM = f"{SQUARE[0] / W},{SQUARE[2] / W},{SQUARE[1] / H},{SQUARE[3] / H}"


def _mask_png(size, box=SQUARE, mode="1") -> Image.Image:
    """The square's mask drawn at `size` (scaled from the W x H frame)."""
    sx, sy = size[0] / W, size[1] / H
    mask = Image.new("L", size, 0)
    mask.paste(255, tuple(int(round(v * s)) for v, s in zip(box, (sx, sy, sx, sy))))
    return mask.convert(mode)


@pytest.fixture(scope="module")
def oi_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("oi_bad")
    (root / "images" / "train").mkdir(parents=True)
    (root / "masks" / "train-masks-a").mkdir(parents=True)
    scene().save(root / "images" / "train" / "img1.jpg", quality=95)
    scene().save(root / "images" / "train" / "img2.png")
    (root / "images" / "train" / "imgc.jpg").write_bytes(b"\xff\xd8 garbage")
    masks = root / "masks" / "train-masks-a"
    _mask_png((W // 2, H // 2)).save(masks / "img1_m01_0001.png")  # half resolution, 1-bit
    (masks / "img1_m01_0003.png").write_bytes(b"not a png")
    _mask_png((50, 50)).save(masks / "img1_m01_0004.png")  # another shape entirely
    _mask_png((W, H)).save(masks / "img2_m01_0006.png")
    _mask_png((W, H)).save(masks / "imgx_m01_0007.png")
    _mask_png((W, H)).save(masks / "imgc_m01_0008.png")
    boxes = [
        BOX_HEADER,
        f"img1,xclick,/m/01,1,{NORM},0,0,0,0,0",
        f"img1,xclick,/m/01,1,{NORM},0,0,0,0,0",  # the same box twice
        f"img2,xclick,/m/01,1,{NORM},1,0,0,0,0",
        "img1,xclick,/m/01,1,0.1,0.2,0.3",  # a row short of columns
        "img1,xclick,/m/01,1,a,b,c,d,0,0,0,0,0",  # not numbers
        "img1,xclick,/m/02,1,0.1,0.5,0.1,0.5,0,0,1,0,0",  # a group
    ]
    segs = [
        SEG_HEADER,
        f"img1_m01_0001.png,img1,/m/01,0001,{NORM},0.9,",
        f"img1_m01_0001.png,img1,/m/01,0001,{NORM},0.9,",  # listed twice
        f"img1_m01_0002.png,img1,/m/01,0002,{NORM},0.9,",  # no such file
        f"img1_m01_0003.png,img1,/m/01,0003,{NORM},0.9,",  # corrupt
        f"img1_m01_0004.png,img1,/m/01,0004,{NORM},0.9,",  # wrong shape
        f"img2_m01_0006.png,img2,/m/01,0006,{NORM},0.9,",  # rotated image (see image info)
        f"imgx_m01_0007.png,imgx,/m/01,0007,{NORM},0.9,",  # image missing
        f"imgc_m01_0008.png,imgc,/m/01,0008,{NORM},0.9,",  # image corrupt
        "img1_m01_0009.png,img1,/m/01,0009,0.5,0.5,0.2,0.4,0.9,",  # degenerate
        "img1_m01_0010.png,img1,/m/01,0010,1.2,1.5,0.2,0.4,0.9,",  # outside the image
    ]
    (root / "boxes.csv").write_text("\n".join(boxes) + "\n")
    (root / "segs.csv").write_text("\n".join(segs) + "\n")
    (root / "classes.csv").write_text("/m/01,Thing\n/m/02,\n")
    (root / "info.csv").write_text("ImageID,Subset,Rotation\nimg2,train,90\nimg1,train\n")  # second row one short
    return root


def _build_oi(root, out, settings=SETTINGS, **kw):
    return build_openimages_shards(
        root / "boxes.csv",
        root / "segs.csv",
        root / "masks",
        root / "images",
        root / "classes.csv",
        out,
        settings,
        image_info=root / "info.csv",
        progress=False,
        **kw,
    )


def test_openimages_bad_inputs_are_counted_by_reason(oi_case, tmp_path):
    manifest = _build_oi(oi_case, tmp_path)
    assert manifest["skipped_in_source"] == {
        "malformed_row": 3,
        "duplicate_annotation": 2,
        "degenerate_box": 1,
        "box_outside_image": 1,
        "no_mask": 1,
    }
    assert manifest["skipped_in_shards"] == {
        "missing_mask": 1,
        "corrupt_mask": 1,
        "mask_size_mismatch": 1,
        "missing_image": 1,
        "corrupt_image": 1,
    }
    assert manifest["notes"] == {"mask_resized": 1, "rotated": 1}
    got = samples(tmp_path)
    assert sorted(got) == ["oi_img1_m01_0001", "oi_img2_m01_0006"]
    for sample in got.values():
        assert is_red(centre_colour(sample))
    rotated = json.loads(got["oi_img2_m01_0006"]["json"])
    assert rotated["image_size"] == [H, W] and rotated["flags"]["is_occluded"] == 1
    first = json.loads(got["oi_img1_m01_0001"]["json"])
    assert first["category"] == "Thing" and first["mask_source"] == "png" and first["image_file"] == "train/img1.jpg"


def test_openimages_boxes_without_masks_on_request(oi_case, tmp_path):
    settings = CropSettings(**{**SETTINGS.to_dict(), "mask_from_box": True, "include_group_of": True})
    manifest = _build_oi(oi_case, tmp_path, settings)
    boxes = {
        k: json.loads(s["json"]) for k, s in samples(tmp_path).items() if json.loads(s["json"])["mask_source"] == "box"
    }
    assert len(boxes) == 1
    (meta,) = boxes.values()
    assert meta["category"] == "/m/02" and meta["flags"]["is_group_of"] == 1  # no display name: the label id
    assert "no_mask" not in manifest["skipped"]
    no_groups = CropSettings(**{**settings.to_dict(), "include_group_of": False})
    assert _build_oi(oi_case, tmp_path / "no_groups", no_groups)["skipped_in_source"]["group_of"] == 1


@pytest.mark.parametrize("which", ["boxes", "segs", "classes"])
def test_openimages_csv_that_is_not_what_it_claims(oi_case, tmp_path, which):
    bad = tmp_path / f"{which}.csv"
    bad.write_text("Foo,Bar,Baz\n1,2,3\n")
    paths = {
        "boxes": oi_case / "boxes.csv",
        "segs": oi_case / "segs.csv",
        "classes": oi_case / "classes.csv",
        which: bad,
    }
    with pytest.raises(SourceError) as err:
        build_openimages_shards(
            paths["boxes"],
            paths["segs"],
            oi_case / "masks",
            oi_case / "images",
            paths["classes"],
            tmp_path / "out",
            SETTINGS,
            progress=False,
        )
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unseen_datumaro_tree(data_dir, tmp_path):
    """Tiny synthetic images, a 1-bit mask, -1 flags and an image-info row one column short."""
    tree = data_dir / "openimages/datumaro_v6"
    ann = tree / "annotations"
    permissive = CropSettings(
        resolution=16,
        min_area_fraction=0.0,
        max_area_fraction=1.0,
        min_side=0.0,
        max_aspect_ratio=1000.0,
        min_mask_box_iou=0.0,
        mask_from_box=True,
        include_group_of=True,
    )
    manifest = build_openimages_shards(
        [ann / "oidv6-train-annotations-bbox.csv", ann / "test-annotations-bbox.csv"],
        ann / "train-annotations-object-segmentation.csv",
        tree / "masks",
        tree / "images",
        ann / "oidv6-class-descriptions.csv",
        tmp_path,
        permissive,
        image_info=ann / "image_ids_and_rotation.csv",
        progress=False,
    )
    assert manifest["skipped_in_source"] == {"malformed_row": 1}  # image d's row
    assert manifest["samples"] == 2
    got = {json.loads(s["json"])["category"]: json.loads(s["json"]) for s in samples(tmp_path).values()}
    assert got["Generic label #0"]["mask_source"] == "png" and got["Generic label #0"]["flags"]["is_occluded"] == -1
    assert got["Generic label #3"]["mask_source"] == "box" and got["Generic label #3"]["image_size"] == [5, 10]


def test_unseen_mmdetection_csvs_without_images(data_dir, tmp_path):
    tree = data_dir / "openimages/mmdetection_sample/annotations"
    (tmp_path / "images").mkdir()
    settings = CropSettings(mask_from_box=True)
    manifest = build_openimages_shards(
        tree / "oidv6-train-annotations-bbox.csv",
        None,
        None,
        tmp_path / "images",
        tree / "class-descriptions-boxable.csv",
        tmp_path / "out",
        settings,
        progress=False,
    )
    assert manifest["samples"] == 0 and manifest["skipped"] == {"missing_image": 1}
