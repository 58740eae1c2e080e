"""The shard contract: what `data_prep` writes and `training` (and any WebDataset reader) reads.

Writers and readers import their names from here, so a member or file name is defined once.

Folders. A shard folder holds `NAME-000000.tar`, `NAME-000001.tar`, ... (each written under a
temporary name and renamed when complete), one index per shard `NAME-000000.index.jsonl` (one JSON
line per sample, in tar order: `key`, the `INDEX_FIELDS` its JSON holds (`source`, `category`,
`image_size`, `mask_source`, ...) and `members`, each member's byte offset and size in the tar, so
readers can filter, or read any sample by seeking, without opening the tar), the per-shard stats the writer resumes
from (`_shard_stats/`),
and `manifest.json` (`MANIFEST_SCHEMA`: samples, per-shard counts and sha256, skipped by reason,
the settings and files read). A multi-node job writes `manifest.node-R-of-K.json` until merged.

Crop samples (`CROP_SCHEMA`): `KEY.jpg` (RGB, square), `KEY.mask.png` (mode L, 0/255, same size),
`KEY.json` with one schema for every source (so `datasets.load_dataset("webdataset")` reads COCO and
OpenImages shards together): strings for `image_id`, `annotation_id`, `category_id`; a fixed set of
`flags` (`CROP_FLAGS`, each 1, 0, or -1 where the source does not say); `notes` a string (the repairs
made, comma-separated, "" for none); `box_in_crop` and
`valid_in_crop` in 0..1 of the crop, `bbox_xyxy` / `crop_xyxy` in source-image pixels.
`python -m data_prep latents` adds `KEY.latent.npy` (`LATENT_MEMBER`: the VAE posterior moments).

Pair samples (`PAIR_SCHEMA`): `KEY.json` with `words` [a, b], `boxes` [[x0, y0, x1, y1], ...] in
0..1 and `source` ("coco" | "generated"); generated pairs also hold `KEY.jpg`. `check_pair_sample`
is the reader's check.

Shard specs (`expand_shard_spec`): a folder (every .tar below it), a glob, a brace pattern
(`coco-{000000..000009}.tar`), a `::`-joined list, or a list of these.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MANIFEST_SCHEMA = "zsp-shards/1"
MANIFEST_NAME = "manifest.json"
STATS_DIR = "_shard_stats"
INDEX_SUFFIX = ".index.jsonl"

CROP_SCHEMA = "zsp-crop/2"
CROP_SCHEMAS_READ = ("zsp-crop/1", CROP_SCHEMA)  # readers accept the first layout too
CROP_MEMBERS = ("jpg", "mask.png", "json")
LATENT_MEMBER = "latent.npy"
# Object flags every crop sample carries, whatever its source: 1 yes, 0 no, -1 not recorded by the source.
# box_matched: the mask was matched to an annotated box (always 1 for COCO; OpenImages joins two CSVs).
CROP_FLAGS = ("box_matched", "is_crowd", "is_depiction", "is_group_of", "is_inside", "is_occluded", "is_truncated")
FLAG_UNKNOWN = -1


def crop_flags(flags: dict) -> dict[str, int]:
    """A source's flags as the fixed set of `CROP_FLAGS` (ints; -1 where the source does not say)."""
    unknown = sorted(set(flags) - set(CROP_FLAGS))
    if unknown:
        raise ValueError(f"flags {unknown} are not in the crop contract ({', '.join(CROP_FLAGS)})")
    return {name: FLAG_UNKNOWN if flags.get(name) is None else int(flags[name]) for name in CROP_FLAGS}


PAIR_SCHEMA = "zsp-pair/1"
# Fields of a sample's JSON that the shard index repeats (when present), so readers can filter without the tar.
INDEX_FIELDS = ("source", "category", "category_id", "image_id", "image_size", "mask_source", "resolution", "words")


class ShardSpecError(ValueError):
    """A shard spec that names no shard, or a shard folder / manifest that is not what it claims."""


def shard_file_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def index_file_name(shard: str | os.PathLike) -> Path:
    """The index beside a shard: `NAME-000003.tar` -> `NAME-000003.index.jsonl`."""
    shard = Path(shard)
    stem = shard.name[: -len(".tar")] if shard.name.endswith(".tar") else shard.name
    return shard.with_name(stem + INDEX_SUFFIX)


def node_manifest_name(node_rank: int, num_nodes: int) -> str:
    return f"manifest.node-{node_rank:05d}-of-{num_nodes:05d}.json"


def is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def expand_shard_spec(spec: str | os.PathLike | Sequence) -> list[str]:
    """Shard paths from a spec (see the module docstring); URLs pass through unchanged.

    Raises `ShardSpecError` when nothing matches, naming the spec.
    """
    import glob

    import braceexpand

    if isinstance(spec, (list, tuple)):
        return [path for part in spec for path in expand_shard_spec(part)]
    urls: list[str] = []
    for part in str(spec).split("::"):
        for pattern in braceexpand.braceexpand(part):
            if os.path.isdir(pattern):
                urls.extend(sorted(str(p) for p in Path(pattern).rglob("*.tar")))
            elif any(c in pattern for c in "*?["):
                urls.extend(sorted(glob.glob(pattern, recursive=True)))
            elif pattern:
                urls.append(pattern)
    if not urls:
        raise ShardSpecError(f"no shards found for {str(spec)!r} (a folder, glob, brace pattern or list of .tar files)")
    return urls


def expand_local_shards(spec: str | os.PathLike | Sequence, what: str = "train_shards") -> list[str]:
    """`expand_shard_spec`, then require every shard to be an existing local file.

    The error names the spec and the first missing file (a typo fails at start-up, in a second).
    """
    urls = expand_shard_spec(spec)
    remote = [u for u in urls if is_url(u)]
    if remote:
        raise ShardSpecError(
            f"{what}={spec!r}: {remote[0]} is not a local file; the loaders read shards by random access "
            "(exact, constant-time resume), so copy or mount them locally"
        )
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise ShardSpecError(f"{what}={spec!r}: shard {missing[0]} does not exist{more}")
    return urls


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard folder (or the file itself), with a clear error when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardSpecError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ShardSpecError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise ShardSpecError(f"{path} is not a shard manifest (schema {MANIFEST_SCHEMA!r})")
    return data


def manifest_of(shard: str | os.PathLike) -> dict | None:
    """The manifest of the folder a shard lies in, or None when it has none (or an unreadable one)."""
    try:
        return read_manifest(Path(shard).parent)
    except ShardSpecError:
        return None


def check_pair_sample(meta: Any, where: str = "pair sample") -> None:
    """Raise ValueError naming `where` when a decoded pair JSON breaks the pair contract."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: a pair sample's JSON must be an object, got {type(meta).__name__}")
    words, boxes = meta.get("words"), meta.get("boxes")
    if not (isinstance(words, list) and len(words) == 2 and all(isinstance(w, str) and w for w in words)):
        raise ValueError(f"{where}: 'words' must be two non-empty strings, got {words!r}")
    if not (isinstance(boxes, list) and len(boxes) == 2 and all(isinstance(b, list) and len(b) == 4 for b in boxes)):
        raise ValueError(f"{where}: 'boxes' must be two [x0, y0, x1, y1] lists, got {boxes!r}")
    for box in boxes:
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: box {box} holds something that is not a number") from None
        if not (all(math.isfinite(v) for v in (x0, y0, x1, y1)) and 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"{where}: box {box} is not inside 0..1 with x0 < x1, y0 < y1")
