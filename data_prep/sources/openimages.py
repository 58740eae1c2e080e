"""OpenImages V6/V7 CSVs -> one `ObjectRecord` per object with a mask (and, when asked, per box without one).

Reads the box CSV(s) (`*-annotations-bbox.csv`: normalised XMin/XMax/YMin/YMax, IsOccluded,
IsTruncated, IsGroupOf, IsDepiction, IsInside), the object-segmentation CSV(s) (MaskPath, BoxID and
the box the mask belongs to), the class descriptions (`/m/..` -> readable name; with or without a
header row), and optionally `image_ids_and_rotation.csv` for the Rotation column. A mask row is
joined to its box row by image, label and coordinates to get the flags; boxes without a mask
become samples only with `mask_from_box` (their mask is the box, recorded as `mask_source: box`).

Images are looked up by ImageID anywhere under `--images` (`train/`, `validation/` subfolders, any
of .jpg/.jpeg/.png), masks by MaskPath anywhere under `--masks` (the official zips unpack into
`train-masks-0/` ... folders). An ImageID or MaskPath that would lead out of its folder
(`../x`, an absolute path, a link pointing elsewhere) is skipped as `path_outside_images` /
`path_outside_masks` (`allow_outside_images=true` allows images out of the folder). Malformed rows (wrong column
count, unparsable numbers) and
duplicate annotations are counted and skipped; a CSV that lacks the columns its kind needs stops
the job with an error naming the file.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

from ..crops import is_degenerate
from ..records import CropSettings, ObjectRecord, safe_key_part
from . import SourceError, SourceReport, drop_duplicate_keys, path_inside

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
SEGMENTATION_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")
FLAG_COLUMNS = {
    "IsOccluded": "is_occluded",
    "IsTruncated": "is_truncated",
    "IsGroupOf": "is_group_of",
    "IsDepiction": "is_depiction",
    "IsInside": "is_inside",
}
logger = logging.getLogger("data_prep")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _rows(path: Path, required: tuple[str, ...], kind: str, report: SourceReport) -> Iterator[tuple[str, dict]]:
    """(where, row) for each well-formed row of a headed CSV; malformed rows are counted and skipped."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise SourceError(f"OpenImages {kind} CSV {path} does not exist") from None
    with f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"OpenImages {kind} CSV {path} is empty")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise SourceError(
                    f"OpenImages {kind} CSV {path} lacks column(s) {', '.join(missing)} "
                    f"(its header: {','.join(header)[:200]}); is it the right file?"
                )
            for row in reader:
                where = f"{path.name}:{reader.line_num}"
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    report.skip("malformed_row", f"{where}: {len(row)} fields, the header has {len(header)}")
                    continue
                yield where, dict(zip(header, row))
        except UnicodeDecodeError as err:
            raise SourceError(f"OpenImages {kind} CSV {path} is not UTF-8 text: {err}") from None
        except csv.Error as err:
            raise SourceError(f"OpenImages {kind} CSV {path} cannot be parsed as CSV: {err}") from None


def _floats(row: dict, names: tuple[str, ...]) -> tuple[float, ...] | None:
    try:
        values = tuple(float(row[n]) for n in names)
    except (TypeError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _flag(value: str | None) -> int:
    try:
        flag = int(float(value))  # "1", "0", "-1" (unknown), sometimes "1.0"
    except (TypeError, ValueError):
        return -1
    return flag if flag in (0, 1) else -1


def read_class_names(path: str | Path, report: SourceReport) -> dict[str, str]:
    """LabelName -> DisplayName from a class-descriptions CSV (two columns, header optional)."""
    path = Path(path)
    names: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if not row:
                    continue
                if reader.line_num == 1 and [c.strip().lower() for c in row] == ["labelname", "displayname"]:
                    continue
                if reader.line_num == 1 and len(row) != 2:
                    raise SourceError(
                        f"OpenImages classes CSV {path} has {len(row)} columns in its first row; "
                        "expected 2 (LabelName,DisplayName) as in class-descriptions-boxable.csv"
                    )
                if len(row) != 2 or not row[0].strip():
                    report.skip("malformed_class_row", f"{path.name}:{reader.line_num}")
                    continue
                names[row[0].strip()] = row[1].strip() or row[0].strip()
    except FileNotFoundError:
        raise SourceError(f"OpenImages classes CSV {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise SourceError(f"OpenImages classes CSV {path} is not UTF-8 text: {err}") from None
    if not names:
        raise SourceError(f"OpenImages classes CSV {path} holds no LabelName,DisplayName rows")
    return names


def read_rotations(path: str | Path, report: SourceReport) -> dict[str, int]:
    """ImageID -> Rotation (degrees counter-clockwise) from image_ids_and_rotation.csv; unknown -> 0."""
    rotations: dict[str, int] = {}
    for where, row in _rows(Path(path), ("ImageID", "Rotation"), "image info", report):
        value = (row.get("Rotation") or "").strip()
        if value.lower() in ("", "nan"):
            continue
        try:
            degrees = int(float(value)) % 360
        except ValueError:
            report.skip("malformed_row", f"{where}: Rotation {value!r}")
            continue
        if degrees % 90:
            report.skip("malformed_row", f"{where}: Rotation {value!r} is not a multiple of 90")
            continue
        rotations[row["ImageID"].strip()] = degrees
    return rotations


def index_files(
    root: Path, extensions: tuple[str, ...] | None, by_stem: bool, report: SourceReport, what: str
) -> dict[str, str]:
    """Name (or stem) -> path of every file under `root`, first in sorted order on a clash."""
    index: dict[str, str] = {}
    clashes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if extensions is not None and ext.lower() not in extensions:
                continue
            key = stem if by_stem else name
            if key in index:
                clashes += 1
                continue
            index[key] = os.path.join(dirpath, name)
    if clashes:
        report.counts[f"{what}_name_clashes"] = clashes
    return index


def _match_key(image_id: str, label: str, box: tuple[float, ...]) -> tuple:
    return (image_id, label, *(round(v, 4) for v in box))


def read_openimages(
    boxes: list[str | Path],
    segmentations: list[str | Path],
    masks_dir: str | Path | None,
    images_dir: str | Path,
    classes: str | Path,
    settings: CropSettings,
    image_info: list[str | Path] | None = None,
    log_first: int = 5,
) -> tuple[list[ObjectRecord], SourceReport]:
    """Records of the usable objects, sorted by image then key, and what was dropped."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise SourceError(f"OpenImages image folder {images_dir} does not exist")
    if segmentations and (masks_dir is None or not Path(masks_dir).is_dir()):
        raise SourceError(f"OpenImages mask folder {masks_dir} does not exist (needed with --segmentations)")
    report = SourceReport(
        "openimages",
        files={
            "boxes": ",".join(map(str, boxes)),
            "segmentations": ",".join(map(str, segmentations)),
            "masks": str(masks_dir or ""),
            "images": str(images_dir),
            "classes": str(classes),
            "image_info": ",".join(map(str, image_info or [])),
        },
        log_first=log_first,
    )
    # Validate every file's header before reading any of them in full.
    for paths, required, kind in (
        (boxes, BOX_COLUMNS, "box"),
        (segmentations, SEGMENTATION_COLUMNS, "segmentation"),
        (image_info or [], ("ImageID", "Rotation"), "image info"),
    ):
        for p in paths:
            next(_rows(Path(p), required, kind, SourceReport("check", log_first=0)), None)
    names = read_class_names(classes, report)
    rotations: dict[str, int] = {}
    for p in image_info or []:
        rotations.update(read_rotations(p, report))

    wanted = {c.lower() for c in settings.categories}
    records: list[ObjectRecord] = []
    image_index = index_files(images_dir, IMAGE_EXTENSIONS, True, report, "image")
    mask_index = index_files(Path(masks_dir), (".png",), False, report, "mask") if segmentations else {}

    def keep(where: str, image_id: str, label: str, box: tuple[float, ...], flags: dict) -> bool:
        """Source-level checks shared by mask rows and box rows; counts the reason when dropping."""
        if is_degenerate(box):
            report.skip("degenerate_box", f"{where}: box {box}")
            return False
        if box[2] <= 0 or box[3] <= 0 or box[0] >= 1 or box[1] >= 1:
            report.skip("box_outside_image", f"{where}: normalised box {box}")
            return False
        name = names.get(label, label)
        if wanted and name.lower() not in wanted and label.lower() not in wanted:
            report.skip("category_not_selected", f"{where}: {name}")
            return False
        for flag, include, reason in (
            ("is_group_of", settings.include_group_of, "group_of"),
            ("is_depiction", settings.include_depiction, "depiction"),
            ("is_occluded", settings.include_occluded, "occluded"),
            ("is_truncated", settings.include_truncated, "truncated"),
        ):
            if flags.get(flag) == 1 and not include:
                report.skip(reason, f"{where}: {name}")
                return False
        return True

    def image_path(where: str, image_id: str) -> str | None:
        """The image file of `image_id`, or None (counted) when it would be read from outside --images."""
        path = image_index.get(image_id) or str(images_dir / f"{image_id}.jpg")
        if not settings.allow_outside_images and not path_inside(path, images_dir):
            report.skip("path_outside_images", f"{where}: ImageID {image_id!r} leads out of {images_dir}")
            return None
        return path

    def record(
        key: str,
        path: str,
        image_id: str,
        label: str,
        box: tuple[float, ...],
        kind: str,
        mask,
        flags: dict,
        annotation_id: str,
    ) -> ObjectRecord:
        return ObjectRecord(
            key=key,
            source="openimages",
            image_path=path,
            image_file=os.path.relpath(path, images_dir),
            image_id=image_id,
            annotation_id=annotation_id,
            category=names.get(label, label),
            category_id=label,
            box=tuple(box),
            box_normalized=True,
            mask_kind=kind,
            mask=mask,
            declared_size=None,
            rotation=rotations.get(image_id, 0),
            flags=flags,
        )

    # Mask rows first (2.8M in V6), so that of the box rows (14.6M in V6 train) only those that
    # carry a mask's flags, or that become samples themselves (mask_from_box), are kept in memory.
    mask_rows: list[tuple] = []
    seen_masks: set[str] = set()
    for p in segmentations:
        for where, row in _rows(Path(p), SEGMENTATION_COLUMNS, "segmentation", report):
            mask_name = row["MaskPath"].strip()
            image_id, label, box_id = row["ImageID"].strip(), row["LabelName"].strip(), row["BoxID"].strip()
            values = _floats(row, ("BoxXMin", "BoxYMin", "BoxXMax", "BoxYMax"))
            if values is None or not mask_name or not image_id or not label:
                report.skip("malformed_row", f"{where}: mask row {mask_name!r}")
                continue
            if mask_name in seen_masks:
                report.skip("duplicate_annotation", f"{where}: mask {mask_name} listed twice")
                continue
            seen_masks.add(mask_name)
            mask_rows.append((where, mask_name, image_id, label, box_id, values))
    masked_keys = {_match_key(r[2], r[3], r[5]) for r in mask_rows}

    flags_of_masked: dict[tuple, tuple[int, ...]] = {}
    box_only: list[tuple] = []
    seen_box_only: set[tuple] = set()
    box_rows = 0
    for p in boxes:
        for where, row in _rows(Path(p), BOX_COLUMNS, "box", report):
            values = _floats(row, ("XMin", "YMin", "XMax", "YMax"))
            image_id, label = row["ImageID"].strip(), row["LabelName"].strip()
            if values is None or not image_id or not label:
                report.skip(
                    "malformed_row",
                    f"{where}: box {row.get('XMin')},{row.get('XMax')},{row.get('YMin')},{row.get('YMax')}",
                )
                continue
            box_rows += 1
            key = _match_key(image_id, label, values)
            flags = tuple(_flag(row.get(k)) for k in FLAG_COLUMNS)
            if key in masked_keys:
                if key in flags_of_masked:
                    report.skip("duplicate_annotation", f"{where}: same image, label and box as an earlier row")
                else:
                    flags_of_masked[key] = flags
            elif not settings.mask_from_box:
                report.skip("no_mask", where)
            elif key in seen_box_only:
                report.skip("duplicate_annotation", f"{where}: same image, label and box as an earlier row")
            else:
                seen_box_only.add(key)
                box_only.append((where, image_id, label, values, flags))

    for where, mask_name, image_id, label, box_id, values in mask_rows:
        matched = flags_of_masked.get(_match_key(image_id, label, values))
        flags = dict(zip(FLAG_COLUMNS.values(), matched or (-1,) * len(FLAG_COLUMNS)), box_matched=matched is not None)
        if not keep(where, image_id, label, values, flags):
            continue
        path = image_path(where, image_id)
        mask_path = mask_index.get(mask_name) or str(Path(masks_dir) / mask_name)
        if path is None:
            continue
        if not path_inside(mask_path, Path(masks_dir)):
            report.skip("path_outside_masks", f"{where}: MaskPath {mask_name!r} leads out of {masks_dir}")
            continue
        key = "oi_" + safe_key_part(os.path.splitext(mask_name)[0])
        records.append(record(key, path, image_id, label, values, "png", mask_path, flags, box_id or mask_name))

    for where, image_id, label, values, flag_values in box_only:
        flags = dict(zip(FLAG_COLUMNS.values(), flag_values), box_matched=True)
        if not keep(where, image_id, label, values, flags):
            continue
        path = image_path(where, image_id)
        if path is None:
            continue
        row_id = safe_key_part(where.replace(".csv:", "_r"))
        key = f"oi_{safe_key_part(image_id)}_{safe_key_part(label)}_{row_id}"
        records.append(record(key, path, image_id, label, values, "box", None, flags, where))

    records.sort(key=lambda r: (r.image_id, r.key))
    records = drop_duplicate_keys(records, report)
    labels = {r.category_id for r in records}
    unnamed = sorted(label for label in labels if label not in names)
    if labels and len(unnamed) == len(labels):
        raise SourceError(
            f"OpenImages classes CSV {classes} names none of the {len(labels)} labels of the annotations "
            f"(e.g. {unnamed[0]}): is it the class list of this dataset (class-descriptions-boxable.csv)?"
        )
    if unnamed:
        logger.warning(
            "openimages: %d label(s) have no name in %s; their category is the label id (e.g. %s)",
            len(unnamed),
            classes,
            ", ".join(unnamed[:3]),
        )
    report.counts.update(
        {
            "labels_without_name": len(unnamed),
            "classes": len(names),
            "box_rows": box_rows,
            "mask_rows": len(seen_masks),
            "images_indexed": len(image_index),
            "masks_indexed": len(mask_index),
            "images_with_rotation": sum(1 for v in rotations.values() if v),
            "records": len(records),
        }
    )
    return records, report
