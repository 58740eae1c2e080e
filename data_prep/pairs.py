"""Location-pair shards from real COCO layouts: `python -m data_prep pairs coco --annotations FILE --out DIR`.

The location MLP (`encoders/location_mlp.py`) learns where two nouns go when they share an image.
Real pairs come straight from COCO instance annotations: for every image with at least two
categories, one sample per unordered category pair, each category represented by its largest
instance (largest annotated `area`, the COCO instance size; ties go to the lower annotation id).
Crowd regions are groups, not instances, and are left out unless `--include-crowd`. Boxes are
clipped to the image and normalised to 0..1.

A pair sample (the contract of `encoders.common.shards`) is `KEY.json` with `words` [a, b]
(category order), `boxes` [[x0, y0, x1, y1], ...] in 0..1 and `source` "coco" (here) or
"generated" (`data_prep.pairs_generate`, which also writes `KEY.jpg`). Shards go through the
generic writer (`data_prep.writer`): same determinism, resume, worker and node options as the crop
shards. The command line is `data_prep.pairs_cli`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from encoders.common.shards import PAIR_SCHEMA, check_pair_sample

from .crops import clip_box, is_degenerate
from .records import safe_key_part
from .sources import SourceError, SourceReport
from .sources.coco import read_coco_tables, sortable_id
from .writer import ShardJob, write_shards


def normalized_box(box_xyxy: Sequence[float], image_wh: tuple[int, int]) -> list[float]:
    """A pixel box (already inside the image) as [x0, y0, x1, y1] fractions of the image size."""
    w, h = image_wh
    return [box_xyxy[0] / w, box_xyxy[1] / h, box_xyxy[2] / w, box_xyxy[3] / h]


@dataclass(frozen=True)
class PairRecord:
    """One COCO image's pair of categories, each with its chosen (largest) instance."""

    key: str
    image_id: Any
    image_file: str
    image_size: tuple[int, int]
    words: tuple[str, str]
    category_ids: tuple[Any, Any]
    annotation_ids: tuple[Any, Any]
    boxes_xyxy: tuple[tuple[float, ...], tuple[float, ...]]  # pixels, clipped to the image

    def describe(self) -> str:
        return f"{self.key} (image {self.image_file}, {self.words[0]} + {self.words[1]})"


def read_coco_pairs(
    annotations: str | Path, include_crowd: bool = False, min_area_fraction: float = 0.0, log_first: int = 5
) -> tuple[list[PairRecord], SourceReport]:
    """Pair records of a COCO instances file, sorted by image then category ids, and what was dropped."""
    annotations = Path(annotations)
    report = SourceReport("coco-pairs", files={"annotations": str(annotations)}, log_first=log_first)
    tables = read_coco_tables(annotations, report)
    images, categories = tables.images, tables.categories
    where = annotations.name

    # best[image_id][category_id] = (area, annotation id order, annotation id, clipped box)
    best: dict = {}
    for ann in tables.annotations:
        ann_id, image_id, category_id, box = ann.ann_id, ann.image_id, ann.category_id, ann.box
        if ann.crowd and not include_crowd:
            report.skip("crowd", f"{where}: annotation {ann_id}")
            continue
        _, width, height = images[image_id]
        clipped = None if is_degenerate(box) else clip_box(box, (width, height))
        if clipped is None:
            report.skip("degenerate_box", f"{where}: annotation {ann_id} bbox {ann.bbox}")
            continue
        box_area = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
        if box_area < min_area_fraction * width * height:
            report.skip("area_below_min", f"{where}: annotation {ann_id}")
            continue
        area = box_area if ann.area is None else ann.area
        candidate = (area, sortable_id(ann_id), ann_id, clipped)
        per_image = best.setdefault(image_id, {})
        current = per_image.get(category_id)
        # larger area wins; on a tie the lower annotation id
        if current is None or area > current[0] or (area == current[0] and candidate[1] < current[1]):
            per_image[category_id] = candidate

    records: list[PairRecord] = []
    single = 0
    for image_id in sorted(best, key=sortable_id):
        per_image = best[image_id]
        if len(per_image) < 2:
            single += 1
            continue
        file_name, width, height = images[image_id]
        for cat_a, cat_b in combinations(sorted(per_image, key=sortable_id), 2):
            a, b = per_image[cat_a], per_image[cat_b]
            records.append(
                PairRecord(
                    key=f"coco_{safe_key_part(image_id)}_{safe_key_part(cat_a)}_{safe_key_part(cat_b)}",
                    image_id=image_id,
                    image_file=file_name,
                    image_size=(width, height),
                    words=(categories[cat_a], categories[cat_b]),
                    category_ids=(cat_a, cat_b),
                    annotation_ids=(a[2], b[2]),
                    boxes_xyxy=(tuple(a[3]), tuple(b[3])),
                )
            )
    report.counts = {
        "images": len(images),
        "annotations": tables.total_annotations,
        "images_with_objects": len(best),
        "images_with_one_category": single,
        "pairs": len(records),
    }
    return records, report


def coco_pair_sample(record: PairRecord) -> dict:
    """The shard sample of one pair record: `KEY.json` only (COCO pairs carry no image)."""
    meta = {
        "schema": PAIR_SCHEMA,
        "source": "coco",
        "words": list(record.words),
        "boxes": [normalized_box(b, record.image_size) for b in record.boxes_xyxy],
        "image_id": record.image_id,
        "image_file": record.image_file,
        "image_size": list(record.image_size),
        "category_ids": list(record.category_ids),
        "annotation_ids": list(record.annotation_ids),
        "bbox_xyxy": [list(b) for b in record.boxes_xyxy],
    }
    check_pair_sample(meta, record.key)
    return {"__key__": record.key, "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def write_coco_pairs(
    annotations: str | Path, job: ShardJob, include_crowd: bool = False, min_area_fraction: float = 0.0
) -> dict:
    """Read the annotations and write the pair shards of this node; returns the manifest."""
    records, report = read_coco_pairs(annotations, include_crowd, min_area_fraction, log_first=job.log_first)
    if not records:
        raise SourceError(
            f"{annotations}: no image has two categories ({report.counts.get('images_with_objects', 0)} images with "
            "objects), "
            "so there are no pairs to write"
        )
    settings = {"kind": "pairs-coco", "include_crowd": include_crowd, "min_area_fraction": min_area_fraction}
    return write_shards(
        records,
        coco_pair_sample,
        job,
        settings=settings,
        source=report.to_dict(),
        source_skipped=report.skipped,
    )
