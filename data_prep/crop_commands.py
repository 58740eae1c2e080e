"""`python -m data_prep coco ...` and `python -m data_prep openimages ...`: object-crop shards.

Both read their annotations into records (failing early on a bad file), then hand the records and
`make_crop_sample` to the generic shard writer. Settings come from `--config configs/data/*.yaml`
and trailing `key=value` overrides (`resolution=128 min_side=32`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os

from encoders.common.shards import CROP_SCHEMA

from .cli import (
    add_config_arguments,
    add_writer_arguments,
    register_subcommand,
    settings_from_args,
    shard_job_from_args,
)
from .objects import make_crop_sample
from .records import CropSettings, ObjectRecord
from .sources import SourceReport
from .writer import ShardJob, write_shards

logger = logging.getLogger("data_prep")


def write_crop_shards(records: list[ObjectRecord], report: SourceReport, settings: CropSettings, job) -> dict:
    """Shard `records` as crops with `settings` (the part both subcommands share)."""
    if not records:
        logger.warning(
            "%s: no object passed the source checks (%s); writing an empty manifest",
            report.name,
            dict(report.skipped) or "no annotations",
        )
    logger.info("%s: %d objects to crop at %d px", report.name, len(records), settings.resolution)
    return write_shards(
        records,
        functools.partial(make_crop_sample, settings=settings),
        job,
        settings={"sample_schema": CROP_SCHEMA, "source": report.name, **settings.to_dict()},
        source=report.to_dict(),
        source_skipped=report.skipped,
    )


def _as_list(value) -> list:
    """None -> [], one path -> [path], several -> list."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def build_coco_shards(annotations, images, out_dir, settings: CropSettings | None = None, **job) -> dict:
    """Python API of `python -m data_prep coco`: returns the manifest. `job` takes ShardJob fields
    (name, shard_size, workers, node_rank, num_nodes, overwrite, progress, log_first)."""
    from .sources.coco import read_coco

    settings = settings or CropSettings()
    job_spec = ShardJob(out_dir=out_dir, **{"name": "coco", "unit": "objects", **job})
    records, report = read_coco(annotations, images, settings, log_first=job_spec.log_first)
    return write_crop_shards(records, report, settings, job_spec)


def build_openimages_shards(
    boxes, segmentations, masks, images, classes, out_dir, settings: CropSettings | None = None, image_info=None, **job
) -> dict:
    """Python API of `python -m data_prep openimages`: returns the manifest (`job` as in build_coco_shards)."""
    from .sources.openimages import read_openimages

    settings = settings or CropSettings()
    job_spec = ShardJob(out_dir=out_dir, **{"name": "openimages", "unit": "objects", **job})
    records, report = read_openimages(
        _as_list(boxes),
        _as_list(segmentations),
        masks,
        images,
        classes,
        settings,
        image_info=_as_list(image_info),
        log_first=job_spec.log_first,
    )
    return write_crop_shards(records, report, settings, job_spec)


def _configure_coco(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (e.g. instances_train2017.json)")
    parser.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    add_writer_arguments(parser, default_name="coco")
    add_config_arguments(parser, CropSettings)


@register_subcommand(
    "coco",
    help="COCO instance annotations -> object crop shards",
    configure=_configure_coco,
    description="Crop every usable COCO object (polygon or RLE mask) into WebDataset shards with a manifest.",
)
def run_coco(args: argparse.Namespace) -> int:
    from .sources.coco import read_coco

    settings = settings_from_args(args, CropSettings)
    job = shard_job_from_args(args, unit="objects")
    records, report = read_coco(args.annotations, args.images, settings, log_first=job.log_first)
    write_crop_shards(records, report, settings, job)
    return 0


def _configure_openimages(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--boxes", nargs="+", required=True, help="box CSV(s), e.g. oidv6-train-annotations-bbox.csv")
    parser.add_argument(
        "--segmentations", nargs="*", default=[], help="object-segmentation CSV(s) (MaskPath, BoxID, ...)"
    )
    parser.add_argument("--masks", help="folder of the mask PNGs (searched recursively)")
    parser.add_argument("--images", required=True, help="folder of the images, named by ImageID (searched recursively)")
    parser.add_argument("--classes", required=True, help="class-descriptions-boxable.csv (LabelName,DisplayName)")
    parser.add_argument(
        "--image-info", nargs="*", default=[], help="optional image_ids_and_rotation.csv for the Rotation column"
    )
    add_writer_arguments(parser, default_name="openimages")
    add_config_arguments(parser, CropSettings)


@register_subcommand(
    "openimages",
    help="OpenImages V6/V7 boxes + segmentation masks -> object crop shards",
    configure=_configure_openimages,
    description="Crop every usable OpenImages object (mask PNG, or the box with mask_from_box=true) into WebDataset "
    "shards.",
)
def run_openimages(args: argparse.Namespace) -> int:
    from .sources.openimages import read_openimages

    settings = settings_from_args(args, CropSettings)
    job = shard_job_from_args(args, unit="objects")
    records, report = read_openimages(
        args.boxes,
        args.segmentations,
        args.masks,
        args.images,
        args.classes,
        settings,
        image_info=args.image_info,
        log_first=job.log_first,
    )
    write_crop_shards(records, report, settings, job)
    return 0
