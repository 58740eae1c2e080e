"""COCO instance annotations (`instances_*.json`) -> one `ObjectRecord` per usable annotation.

Masks stay in the record as COCO gives them (polygons, uncompressed RLE for crowd regions,
compressed RLE strings) and are decoded with pycocotools in the pixel stage. The crowd flag is
recorded and filtered by `include_crowd`. The JSON is read directly rather than through
`pycocotools.coco.COCO`, which silently keeps only the last of two annotations with the same id;
here duplicates are counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crops import check_box, clip_box, is_degenerate, xywh_to_xyxy
from ..records import CropSettings, ObjectRecord, safe_key_part
from . import SourceError, SourceReport, drop_duplicate_keys, path_inside


def sortable_id(value) -> tuple:
    """A sort key that orders ids of mixed types: numbers by value, then everything else as text."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def load_coco_json(path: Path) -> dict:
    """The parsed annotation file, or SourceError naming the file when it is not COCO instances JSON."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SourceError(f"COCO annotations {path} do not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"COCO annotations {path} are not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SourceError(
            f"COCO annotations {path} hold a {type(data).__name__}, not an object with images/annotations/categories"
        )
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise SourceError(
            f"COCO annotations {path} have no {', '.join(missing)} list(s) (found keys: "
            f"{', '.join(sorted(data)) or 'none'}); "
            "expected a COCO instances file such as instances_val2017.json"
        )
    return data


@dataclass(frozen=True)
class CocoAnnotation:
    """One well-formed annotation whose image and category exist; `box` is [x0, y0, x1, y1] in pixels."""

    ann_id: Any
    image_id: Any
    category_id: Any
    box: tuple[float, float, float, float]
    crowd: bool
    area: float | None
    segmentation: Any
    bbox: Any  # as the file gives it, for messages


@dataclass
class CocoTables:
    """A COCO instances file read once: images {id: (file_name, width, height)}, categories {id: name}, and
    its annotations in file order, with every malformed, duplicate or dangling entry counted in `report`."""

    images: dict
    categories: dict
    annotations: list[CocoAnnotation]
    total_annotations: int


def read_coco_tables(path: Path, report: SourceReport) -> CocoTables:
    """The one COCO reader of `data_prep`: crops (`read_coco`) and location pairs (`read_coco_pairs`) both
    start from it, so they agree on which entries are malformed (a bbox with NaN or inf is), which are
    duplicates (the same annotation id, or the same image, category and box to 0.01 px), and which dangle."""
    data = load_coco_json(path)
    where = path.name
    images: dict = {}
    for entry in data["images"]:
        try:
            image_id, file_name = entry["id"], str(entry["file_name"])
            width, height = int(entry["width"]), int(entry["height"])
            if width <= 0 or height <= 0:
                raise ValueError("non-positive size")
        except (KeyError, TypeError, ValueError):
            report.skip("malformed_image_entry", f"{where}: image entry {str(entry)[:120]}")
            continue
        if image_id in images:
            report.skip("duplicate_image_entry", f"{where}: image id {image_id}")
            continue
        images[image_id] = (file_name, width, height)
    categories = {
        c["id"]: str(c["name"]) for c in data["categories"] if isinstance(c, dict) and "id" in c and "name" in c
    }
    annotations: list[CocoAnnotation] = []
    seen_ids: set = set()
    seen_content: set = set()
    for ann in data["annotations"]:
        try:
            ann_id, image_id, category_id = ann["id"], ann["image_id"], ann["category_id"]
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            report.skip("malformed_annotation", f"{where}: annotation {str(ann)[:120]}")
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            report.skip("malformed_annotation", f"{where}: annotation {ann_id} bbox {ann['bbox']}")
            continue
        content = (image_id, category_id, round(x, 2), round(y, 2), round(w, 2), round(h, 2))
        if ann_id in seen_ids or content in seen_content:
            report.skip("duplicate_annotation", f"{where}: annotation {ann_id} (image {image_id})")
            continue
        seen_ids.add(ann_id)
        seen_content.add(content)
        if image_id not in images:
            report.skip("unknown_image", f"{where}: annotation {ann_id} refers to image {image_id}")
            continue
        if category_id not in categories:
            report.skip("unknown_category", f"{where}: annotation {ann_id} has category {category_id}")
            continue
        try:
            area = float(ann["area"]) if "area" in ann else None
        except (TypeError, ValueError):
            area = None
        if area is not None and not math.isfinite(area):
            area = None
        annotations.append(
            CocoAnnotation(
                ann_id=ann_id,
                image_id=image_id,
                category_id=category_id,
                box=xywh_to_xyxy((x, y, w, h)),
                crowd=bool(ann.get("iscrowd", 0)),
                area=area,
                segmentation=ann.get("segmentation"),
                bbox=ann["bbox"],
            )
        )
    return CocoTables(images, categories, annotations, total_annotations=len(data["annotations"]))


def _mask_kind(segmentation) -> str | None:
    if isinstance(segmentation, list):
        return "polygon" if segmentation else None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return "rle" if isinstance(segmentation["counts"], list) else "rle_compressed"
    return None


def read_coco(
    annotations: str | Path, images_dir: str | Path, settings: CropSettings, log_first: int = 5
) -> tuple[list[ObjectRecord], SourceReport]:
    """Records of the usable objects, sorted by image then annotation id, and what was dropped."""
    annotations, images_dir = Path(annotations), Path(images_dir)
    if not images_dir.is_dir():
        raise SourceError(f"COCO image folder {images_dir} does not exist")
    report = SourceReport(
        "coco", files={"annotations": str(annotations), "images": str(images_dir)}, log_first=log_first
    )
    tables = read_coco_tables(annotations, report)
    images, categories = tables.images, tables.categories
    where = annotations.name
    images_root = images_dir.resolve()
    wanted = {c.lower() for c in settings.categories}

    records: list[ObjectRecord] = []
    for ann in tables.annotations:
        ann_id, image_id, category_id = ann.ann_id, ann.image_id, ann.category_id
        name = categories[category_id]
        if wanted and name.lower() not in wanted and str(category_id) not in wanted:
            report.skip("category_not_selected", f"{where}: annotation {ann_id} ({name})")
            continue
        crowd = ann.crowd
        if crowd and not settings.include_crowd:
            report.skip("crowd", f"{where}: annotation {ann_id}")
            continue
        file_name, width, height = images[image_id]
        image_path = images_dir / file_name
        if not settings.allow_outside_images and not path_inside(image_path, images_root):
            report.skip(
                "path_outside_images", f"{where}: image {image_id} file_name {file_name!r} leads out of {images_dir}"
            )
            continue
        box = ann.box
        if is_degenerate(box):
            report.skip("degenerate_box", f"{where}: annotation {ann_id} bbox {ann.bbox}")
            continue
        clipped = clip_box(box, (width, height))
        if clipped is None:
            report.skip("box_outside_image", f"{where}: annotation {ann_id} bbox {ann.bbox} on {width}x{height}")
            continue
        reason = check_box(clipped, (width, height), settings.filters)
        if reason:
            report.skip(reason, f"{where}: annotation {ann_id} ({file_name})")
            continue
        segmentation = ann.segmentation
        kind = _mask_kind(segmentation)
        if kind is None:
            if segmentation not in (None, [], {}):
                report.skip("malformed_segmentation", f"{where}: annotation {ann_id}")
                continue
            if not settings.mask_from_box:
                report.skip("no_mask", f"{where}: annotation {ann_id}")
                continue
            kind, segmentation = "box", None
        records.append(
            ObjectRecord(
                key=f"coco_{safe_key_part(image_id)}_{safe_key_part(ann_id)}",
                source="coco",
                image_path=str(image_path),
                image_file=file_name,
                image_id=image_id,
                annotation_id=ann_id,
                category=name,
                category_id=category_id,
                box=box,
                box_normalized=False,
                mask_kind=kind,
                mask=segmentation,
                declared_size=(width, height),
                flags={"is_crowd": int(bool(crowd)), "box_matched": 1},
            )
        )
    records.sort(key=lambda r: (sortable_id(r.image_id), sortable_id(r.annotation_id)))
    records = drop_duplicate_keys(records, report, where)  # ids that differ only in unsafe characters
    report.counts = {
        "images": len(images),
        "annotations": tables.total_annotations,
        "categories": len(categories),
        "records": len(records),
    }
    return records, report
