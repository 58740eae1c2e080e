"""One object record -> one square crop, its mask and its metadata (the pixel stage).

`render_object` returns PIL images (the training benchmark's on-the-fly baseline calls it
directly); `make_crop_sample` encodes them into the crop sample of the shard contract (`encoders.common.shards`):
`KEY.jpg` (RGB, square), `KEY.mask.png` (L, 0/255, same size), `KEY.json` (metadata).
The last decoded source image is cached per process, so the objects of one image (sources
sort records by image) decode it once.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from encoders.common.shards import CROP_SCHEMA, crop_flags

from .crops import Box, box_iou, check_box, clip_box, rotate_normalized_box, square_crop, valid_pixel_box
from .images import load_rgb, mask_bbox, mask_from_coco, mask_from_png
from .records import CropSettings, ObjectRecord
from .writer import Skip

# Letterbox fill: CLIP's mean colour, so filled borders are ~0 after CLIP normalisation.
FILL_RGB = (122, 116, 104)
_ROTATE = {90: Image.ROTATE_90, 180: Image.ROTATE_180, 270: Image.ROTATE_270}


@dataclass
class RenderedObject:
    image: Image.Image  # RGB, resolution x resolution
    mask: Image.Image  # L, 0/255, same size
    meta: dict  # the sample's JSON


@dataclass
class _SourceImage:
    image: Image.Image
    notes: list[str]


_cache: tuple[tuple, _SourceImage] | None = None


def _load_source(record: ObjectRecord, settings: CropSettings, use_cache: bool) -> _SourceImage:
    """The record's image, upright and RGB, in the frame its annotations use (cached per process)."""
    global _cache
    cache_key = (
        record.image_path,
        record.declared_size,
        record.rotation,
        settings.exif_transpose,
        settings.convert_modes,
        settings.apply_rotation,
    )
    if use_cache and _cache is not None and _cache[0] == cache_key:
        return _cache[1]
    image, raw, notes = load_rgb(
        record.image_path, exif_transpose=settings.exif_transpose, convert_modes=settings.convert_modes
    )
    if (
        record.declared_size is not None
        and image.size != tuple(record.declared_size)
        and raw is not None
        and raw.size == tuple(record.declared_size)
    ):
        # The annotations describe the stored pixels (e.g. COCO's frame), not the EXIF-turned ones.
        image = raw
        notes = [n for n in notes if n != "exif_transposed"] + ["exif_ignored_for_annotations"]
    if record.rotation % 360 and settings.apply_rotation:
        if record.rotation % 360 not in _ROTATE:
            raise Skip("bad_rotation", f"{record.image_path}: rotation {record.rotation}")
        image = image.transpose(_ROTATE[record.rotation % 360])
        notes = notes + ["rotated"]
    loaded = _SourceImage(image, notes)
    if use_cache:
        _cache = (cache_key, loaded)
    return loaded


def _object_box(
    record: ObjectRecord, size: tuple[int, int], notes: list[str], rotate: bool, rescale: bool = False
) -> Box:
    """The record's box in pixels of the loaded image (COCO boxes rescaled when the file was resized)."""
    w, h = size
    if record.box_normalized:
        box = record.box
        if rotate and record.rotation % 360:
            box = rotate_normalized_box(box, record.rotation)
        return (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    if record.declared_size is None or tuple(record.declared_size) == (w, h):
        return record.box
    dw, dh = record.declared_size
    if not rescale or abs(dw / dh - w / h) > 0.01 * (w / h):
        hint = "" if rescale else " (rescale_annotations=true scales the annotations to resized copies)"
        raise Skip("image_size_mismatch", f"{record.image_path} is {w}x{h}, the annotations say {dw}x{dh}{hint}")
    sx, sy = w / dw, h / dh
    notes.append("annotation_rescaled")
    b = record.box
    return (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)


def _full_mask(record: ObjectRecord, size: tuple[int, int], notes: list[str], rotate: bool) -> np.ndarray:
    """HxW (0/1) mask of the object on the loaded image."""
    w, h = size
    if record.mask_kind == "png":
        turned = rotate and record.rotation % 180 == 90
        pre_size = (h, w) if turned else (w, h)
        mask, mask_notes = mask_from_png(record.mask, pre_size)
        notes.extend(mask_notes)
        if rotate and record.rotation % 360:
            mask = np.asarray(Image.fromarray(mask).transpose(_ROTATE[record.rotation % 360]))
        return mask
    dw, dh = record.declared_size or (w, h)
    mask = mask_from_coco(record.mask, dh, dw)
    if (dw, dh) != (w, h):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return mask


def _crop(image: Image.Image, geometry, size: tuple[int, int], resolution: int, resample: int, fill) -> Image.Image:
    """The square `geometry.crop_xyxy` of `image` resized to `resolution`, letterboxed where it leaves the image."""
    w, h = size
    x0, y0, x1, y1 = geometry.crop_xyxy
    if not geometry.letterboxed:
        region = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
        return image.resize((resolution, resolution), resample, box=region)
    canvas = Image.new(image.mode, (resolution, resolution), fill)
    px0, py0, px1, py1 = valid_pixel_box(geometry.valid_in_crop, resolution)
    region = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
    canvas.paste(image.resize((px1 - px0, py1 - py0), resample, box=region), (px0, py0))
    return canvas


def _rounded(values, digits: int) -> list[float]:
    return [round(float(v), digits) for v in values]


def render_object(record: ObjectRecord, settings: CropSettings, use_cache: bool = True) -> RenderedObject:
    """Cut the record's object out of its image: square crop, mask, metadata; Skip on bad input."""
    source = _load_source(record, settings, use_cache)
    image = source.image
    notes = list(source.notes)
    size = image.size
    rotate = settings.apply_rotation
    raw_box = _object_box(record, size, notes, rotate, settings.rescale_annotations)
    box = clip_box(raw_box, size)
    if box is None:
        raise Skip("box_outside_image", f"box {_rounded(raw_box, 1)} on a {size[0]}x{size[1]} image")
    if max(abs(a - b) for a, b in zip(box, raw_box)) > 1.0:
        notes.append("box_clipped")
    reason = check_box(box, size, settings.filters)
    if reason:
        raise Skip(reason, f"box {_rounded(box, 1)} on a {size[0]}x{size[1]} image")
    geometry = square_crop(box, size, settings.padding)
    if geometry.letterboxed and not settings.letterbox:
        raise Skip("needs_letterbox", f"box {_rounded(box, 1)} on a {size[0]}x{size[1]} image (letterbox is off)")
    resolution = settings.resolution
    crop = _crop(image, geometry, size, resolution, Image.BICUBIC, FILL_RGB)

    bx0, by0, bx1, by1 = (v * resolution for v in geometry.box_in_crop)
    if record.mask_kind == "box":
        mask = np.zeros((resolution, resolution), np.uint8)
        mask[
            int(round(by0)) : max(int(round(by1)), int(round(by0)) + 1),
            int(round(bx0)) : max(int(round(bx1)), int(round(bx0)) + 1),
        ] = 255
    else:
        full = _full_mask(record, size, notes, rotate)
        mask_image = _crop(Image.fromarray(full * np.uint8(255), "L"), geometry, size, resolution, Image.NEAREST, 0)
        mask = np.where(np.asarray(mask_image) > 127, np.uint8(255), np.uint8(0))
    tight = mask_bbox(mask)
    if tight is None:
        raise Skip("empty_mask", "no mask pixel inside the crop")
    iou = box_iou(tuple(float(v) for v in tight), (bx0, by0, bx1, by1))
    if iou < settings.min_mask_box_iou:
        raise Skip(
            "mask_box_mismatch", f"mask box {tight} vs object box {_rounded((bx0, by0, bx1, by1), 1)} (IoU {iou:.2f})"
        )

    meta = {
        "schema": CROP_SCHEMA,
        "key": record.key,
        "source": record.source,
        "image_id": str(record.image_id),
        "annotation_id": str(record.annotation_id),
        "image_file": record.image_file,
        "category": record.category,
        "category_id": str(record.category_id),
        "image_size": [size[0], size[1]],
        "bbox_xyxy": _rounded(box, 2),
        "crop_xyxy": _rounded(geometry.crop_xyxy, 2),
        "box_in_crop": _rounded(geometry.box_in_crop, 5),
        "valid_in_crop": _rounded(geometry.valid_in_crop, 5),
        "resolution": resolution,
        "mask_source": record.mask_kind,
        "mask_box_iou": round(iou, 4),
        "area_fraction": round((box[2] - box[0]) * (box[3] - box[1]) / (size[0] * size[1]), 5),
        "flags": crop_flags(record.flags),
        "notes": ",".join(sorted(set(notes))),  # a string: an empty list has no type for Arrow readers
    }
    return RenderedObject(crop, Image.fromarray(mask, "L"), meta)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return buffer.getvalue()


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def make_crop_sample(record: ObjectRecord, settings: CropSettings) -> dict:
    """The shard sample of one record (the writer's `process` function for crop shards)."""
    rendered = render_object(record, settings)
    return {
        "__key__": record.key,
        "jpg": encode_jpeg(rendered.image, settings.jpeg_quality),
        "mask.png": encode_png(rendered.mask),
        "json": json.dumps(rendered.meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
        "__notes__": [n for n in rendered.meta["notes"].split(",") if n],
    }
