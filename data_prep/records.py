"""The plain record a source produces for each object, and the settings that turn it into a crop.

Sources (`data_prep.sources.*`) only read annotation files and emit `ObjectRecord`s: which image,
which box, where the mask comes from, which category, which flags. They never touch pixels, so a
bad annotation file fails before any shard is written and the pixel work (`data_prep.objects`)
can run in worker processes on records alone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .crops import Box, BoxFilters

MaskKind = Literal["polygon", "rle", "rle_compressed", "png", "box"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_key_part(value: Any) -> str:
    """A key fragment WebDataset will not split: letters, digits, '_' and '-' only."""
    return _UNSAFE.sub("_", str(value)).strip("_") or "x"


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """One object of one image, as the annotation file describes it (no pixels read yet)."""

    key: str  # unique, deterministic sample key, e.g. coco_128372_185837
    source: str  # "coco" | "openimages"
    image_path: str
    image_file: str  # the image's name as the annotations give it (recorded in the sample)
    image_id: str | int
    annotation_id: str | int
    category: str  # readable name
    category_id: str | int  # COCO category id / OpenImages label (/m/...)
    box: Box  # xyxy; pixels of the declared image size (COCO) or 0..1 (OpenImages, box_normalized)
    box_normalized: bool
    mask_kind: MaskKind
    mask: Any = None  # COCO segmentation (polygons / RLE dict) or the mask PNG path; None for "box"
    declared_size: tuple[int, int] | None = None  # (w, h) from the annotations, when they give one
    rotation: int = 0  # degrees counter-clockwise that image, mask and box should be turned (OpenImages)
    flags: dict = field(default_factory=dict)

    def describe(self) -> str:
        """How the record is named in logs: the key and the files it reads."""
        mask = f", mask {self.mask}" if self.mask_kind == "png" else ""
        return f"{self.key} (image {self.image_path}{mask})"


@dataclass
class CropSettings:
    """How objects become crops: size, padding, filters, repairs. YAML files in configs/data/.

    Every key can be set on the command line as key=value (e.g. `resolution=128 min_side=32`).
    """

    resolution: int = field(default=512, metadata={"help": "side of the square crop in pixels"})
    padding: float = field(
        default=0.1, metadata={"help": "margin around the box per edge, as a fraction of its longest side"}
    )
    min_area_fraction: float = field(
        default=0.02, metadata={"help": "drop boxes smaller than this fraction of the image"}
    )
    max_area_fraction: float = field(
        default=0.8, metadata={"help": "drop boxes larger than this fraction of the image"}
    )
    min_side: float = field(
        default=100.0, metadata={"help": "drop boxes whose shorter side is below this many image pixels"}
    )
    max_aspect_ratio: float = field(default=2.0, metadata={"help": "drop boxes longer than this times their width"})
    min_mask_box_iou: float = field(
        default=0.5, metadata={"help": "drop objects whose mask's box overlaps the annotated box less"}
    )
    mask_from_box: bool = field(
        default=False, metadata={"help": "objects without a mask get the box as mask (mask_source 'box')"}
    )
    include_crowd: bool = field(default=False, metadata={"help": "COCO: keep iscrowd annotations"})
    include_group_of: bool = field(default=False, metadata={"help": "OpenImages: keep IsGroupOf boxes"})
    include_depiction: bool = field(default=True, metadata={"help": "OpenImages: keep IsDepiction boxes"})
    include_occluded: bool = field(default=True, metadata={"help": "OpenImages: keep IsOccluded boxes"})
    include_truncated: bool = field(default=True, metadata={"help": "OpenImages: keep IsTruncated boxes"})
    categories: list[str] = field(
        default_factory=list, metadata={"help": "keep only these category names or ids (empty: all)"}
    )
    letterbox: bool = field(
        default=True, metadata={"help": "allow a square crop past the image edge (filled; valid_in_crop says where)"}
    )
    exif_transpose: bool = field(default=True, metadata={"help": "turn images upright by their EXIF orientation"})
    convert_modes: bool = field(
        default=True, metadata={"help": "convert CMYK/palette/16-bit/grey/alpha images to RGB (else skip them)"}
    )
    apply_rotation: bool = field(
        default=True, metadata={"help": "OpenImages: apply the Rotation column of --image-info"}
    )
    rescale_annotations: bool = field(
        default=False,
        metadata={
            "help": "COCO: an image whose pixels differ in size from the JSON's width/height (same aspect ratio) "
            "gets its "
            "annotations scaled to it (resized copies of COCO); off: such images are skipped (image_size_mismatch)"
        },
    )
    allow_outside_images: bool = field(
        default=False,
        metadata={
            "help": "read annotation file names that are absolute or lead out of --images (../); off: skipped "
            "(path_outside_images)"
        },
    )
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of the crops"})

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    @property
    def filters(self) -> BoxFilters:
        return BoxFilters(self.min_area_fraction, self.max_area_fraction, self.min_side, self.max_aspect_ratio)

    def to_dict(self) -> dict:
        return asdict(self)
