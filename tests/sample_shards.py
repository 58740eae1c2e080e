"""The bundled COCO and OpenImages samples as 64 px crop shards: the tests' `crop_shards` fixture and
`benchmarks/bench_resume.py` build them with this one function."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).parent.parent


def build_sample_crop_shards(root: Path) -> Path:
    """`root/coco/` and `root/openimages/`, each shards + manifest.json (`configs/data/demo.yaml` filters, 64 px,
    4 samples a shard). Pass `root` (or a glob of its .tar files) as `train_shards`."""
    from data_prep.crop_commands import build_coco_shards, build_openimages_shards
    from data_prep.records import CropSettings
    from encoders.common.config import load_config

    settings = load_config(CropSettings, REPO_ROOT / "configs/data/demo.yaml", ["resolution=64"])
    job = dict(shard_size=4, workers=1, progress=False)
    build_coco_shards(
        DATA_DIR / "coco_sample/annotations.json", DATA_DIR / "coco_sample/images", root / "coco", settings, **job
    )
    oi = DATA_DIR / "openimages/from_coco_sample"
    build_openimages_shards(
        oi / "annotations/validation-annotations-bbox.csv",
        oi / "annotations/validation-annotations-object-segmentation.csv",
        oi / "masks",
        oi / "images",
        DATA_DIR / "openimages/class-descriptions-boxable.csv",
        root / "openimages",
        settings,
        **job,
    )
    return root
