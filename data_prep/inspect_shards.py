"""`python -m data_prep inspect SHARDS --out sheet.png`: look at crop shards before training on them.

Reads every sample with plain `tarfile` (what any user can do), prints stats (samples per source,
classes, box sizes, mask sources, repairs, skipped by reason from the manifest) and checks what
the writer promises: every sample has its three members, its mask's box agrees with
`box_in_crop`, and the shards hold as many samples as the manifest says (`--verify` also checks
each shard's sha256). The contact sheet shows a fixed random selection of crops with the mask
overlaid (red), the object box (green) and, for letterboxed crops, the real-pixel region (blue).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import statistics
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from encoders.common.shards import MANIFEST_NAME, ShardSpecError, expand_shard_spec, read_manifest

from .cli import register_subcommand
from .crops import box_iou
from .images import mask_bbox
from .writer import sha256_file

logger = logging.getLogger("data_prep")
REQUIRED_MEMBERS = ("jpg", "mask.png", "json")


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one shard, grouping members by key like WebDataset."""
    current_key, current = None, {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{directory}/{stem}" if directory else stem
            if key != current_key and current:
                yield current_key, current
                current = {}
            current_key = key
            current[ext] = tar.extractfile(member).read()
    if current:
        yield current_key, current


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def draw_tile(jpg: bytes, mask_png: bytes, meta: dict, tile: int) -> Image.Image:
    """One contact-sheet tile: crop, translucent mask, object box, label."""
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    mask = Image.open(io.BytesIO(mask_png)).convert("L").resize(image.size, Image.NEAREST)
    red = Image.new("RGB", image.size, (255, 40, 40))
    image = Image.composite(Image.blend(image, red, 0.45), image, mask)
    image = image.resize((tile, tile), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * tile for v in meta.get("box_in_crop", (0, 0, 1, 1)))
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(40, 255, 40), width=2)
    valid = meta.get("valid_in_crop", (0, 0, 1, 1))
    if tuple(valid) != (0, 0, 1, 1):
        vx0, vy0, vx1, vy1 = (v * tile for v in valid)
        draw.rectangle((vx0, vy0, vx1 - 1, vy1 - 1), outline=(60, 120, 255), width=1)
    label = f"{meta.get('category', '?')} [{meta.get('source', '?')}]"
    font = _font(max(10, tile // 14))
    text_box = draw.textbbox((0, 0), label, font=font)
    draw.rectangle((0, tile - (text_box[3] - text_box[1]) - 6, tile, tile), fill=(0, 0, 0))
    draw.text((3, tile - (text_box[3] - text_box[1]) - 5), label, fill=(255, 255, 255), font=font)
    return image


def contact_sheet(tiles: list[Image.Image], columns: int, tile: int, title: str) -> Image.Image:
    rows = max(1, -(-len(tiles) // columns))
    header = max(18, tile // 8)
    sheet = Image.new("RGB", (columns * tile + (columns + 1) * 4, rows * tile + (rows + 1) * 4 + header), (30, 30, 30))
    ImageDraw.Draw(sheet).text((6, 3), title, fill=(230, 230, 230), font=_font(max(11, header - 6)))
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet.paste(t, (4 + c * (tile + 4), header + 4 + r * (tile + 4)))
    return sheet


def inspect_shards(
    spec, max_tiles: int = 48, seed: int = 0, verify: bool = False
) -> tuple[dict, list[tuple[str, dict, dict]]]:
    """Stats over every sample of the shards, problems found, and a seeded random pick for the sheet."""
    paths = expand_shard_spec(spec)
    rng = random.Random(seed)
    picked: list[tuple[str, dict, dict]] = []
    seen = 0
    per_shard: dict[str, int] = {}
    sources, categories, mask_sources, notes, resolutions = Counter(), Counter(), Counter(), Counter(), Counter()
    short_sides, area_fractions, ious = [], [], []
    problems: list[str] = []
    letterboxed = 0
    for path in paths:
        count = 0
        try:
            for key, members in iter_tar_samples(path):
                missing = [m for m in REQUIRED_MEMBERS if m not in members]
                if missing:
                    problems.append(f"{path}: sample {key} lacks {', '.join(missing)}")
                    continue
                meta = json.loads(members["json"])
                count += 1
                sources[meta.get("source", "?")] += 1
                categories[meta.get("category", "?")] += 1
                mask_sources[meta.get("mask_source", "?")] += 1
                raw_notes = meta.get("notes", "")  # a comma-separated string (zsp-crop/2) or a list (zsp-crop/1)
                notes.update(n for n in (raw_notes.split(",") if isinstance(raw_notes, str) else raw_notes) if n)
                resolutions[meta.get("resolution", 0)] += 1
                x0, y0, x1, y1 = meta["bbox_xyxy"]
                short_sides.append(min(x1 - x0, y1 - y0))
                area_fractions.append(meta.get("area_fraction", 0.0))
                letterboxed += tuple(meta.get("valid_in_crop", (0, 0, 1, 1))) != (0, 0, 1, 1)
                mask = np.asarray(Image.open(io.BytesIO(members["mask.png"])).convert("L")) > 127
                tight = mask_bbox(mask)
                r = mask.shape[0]
                iou = (
                    box_iou(tuple(float(v) for v in tight), tuple(v * r for v in meta["box_in_crop"])) if tight else 0.0
                )
                ious.append(iou)
                if iou < 0.5:
                    problems.append(f"{path}: sample {key}: mask box and box_in_crop disagree (IoU {iou:.2f})")
                seen += 1
                entry = (key, members, meta)
                if len(picked) < max_tiles:
                    picked.append(entry)
                else:
                    j = rng.randrange(seen)
                    if j < max_tiles:
                        picked[j] = entry
        except (tarfile.TarError, OSError) as err:
            problems.append(f"{path}: unreadable shard: {err}")
        per_shard[path] = count

    manifests = {}
    for folder in sorted({str(Path(p).parent) for p in paths}):
        if (Path(folder) / MANIFEST_NAME).exists():
            try:
                manifests[folder] = read_manifest(folder)
            except ShardSpecError as err:
                problems.append(str(err))
    skipped: Counter = Counter()
    for folder, manifest in manifests.items():
        skipped.update(manifest.get("skipped", {}))
        for shard in manifest.get("shards", []):
            path = str(Path(folder) / shard["file"])
            if path in per_shard and per_shard[path] != shard["samples"]:
                problems.append(
                    f"{path}: the manifest says {shard['samples']} samples, the shard holds {per_shard[path]}"
                )
            if verify and path in per_shard and sha256_file(Path(path)) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest's")

    def spread(values: list[float]) -> dict:
        if not values:
            return {}
        return {
            "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "max": round(max(values), 3),
        }

    stats = {
        "shards": len(paths),
        "samples": seen,
        "samples_per_source": dict(sources),
        "classes": len(categories),
        "top_classes": dict(categories.most_common(15)),
        "mask_sources": dict(mask_sources),
        "resolutions": {str(k): v for k, v in resolutions.items()},
        "box_short_side_px": spread(short_sides),
        "box_area_fraction": spread(area_fractions),
        "mask_box_iou": spread(ious),
        "letterboxed": letterboxed,
        "notes": dict(notes),
        "skipped": dict(sorted(skipped.items())),
        "manifests": sorted(manifests),
        "problems": problems,
    }
    picked.sort(key=lambda e: e[0])
    return stats, picked


def _print_stats(stats: dict) -> None:
    def line(name: str, value) -> None:
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        print(f"{name:<22} {value}")

    line("shards", stats["shards"])
    line("samples", stats["samples"])
    line("per source", stats["samples_per_source"])
    line("classes", stats["classes"])
    line("top classes", stats["top_classes"])
    line("mask sources", stats["mask_sources"])
    line("crop sizes", stats["resolutions"])
    line("box short side (px)", stats["box_short_side_px"])
    line("box area fraction", stats["box_area_fraction"])
    line("mask/box IoU", stats["mask_box_iou"])
    line("letterboxed", stats["letterboxed"])
    line("repairs (notes)", stats["notes"])
    line("skipped (manifest)", stats["skipped"] if stats["manifests"] else "no manifest found")
    line("problems", len(stats["problems"]))
    for problem in stats["problems"][:20]:
        print(f"  - {problem}")


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard folder(s), .tar files, globs or brace patterns")
    parser.add_argument("--out", help="contact sheet PNG to write (e.g. sheet.png)")
    parser.add_argument("--max", type=int, default=48, help="crops on the sheet (default 48)")
    parser.add_argument("--columns", type=int, default=8, help="sheet columns (default 8)")
    parser.add_argument("--tile", type=int, default=160, help="tile size in pixels (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pick (default 0)")
    parser.add_argument("--verify", action="store_true", help="also check each shard's sha256 against its manifest")
    parser.add_argument("--json", help="write the stats to this JSON file too")


@register_subcommand(
    "inspect",
    help="stats and a contact sheet (crop, mask, box) of crop shards",
    configure=_configure,
    description=__doc__.split("\n\n")[1] if __doc__ else None,
)
def run_inspect(args: argparse.Namespace) -> int:
    stats, picked = inspect_shards(args.shards, max_tiles=args.max, seed=args.seed, verify=args.verify)
    _print_stats(stats)
    if args.out:
        tiles = [draw_tile(m["jpg"], m["mask.png"], meta, args.tile) for _, m, meta in picked]
        title = f"{stats['samples']} samples in {stats['shards']} shards; showing {len(tiles)} (red: mask, green: box)"
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(tiles, min(args.columns, max(1, len(tiles))), args.tile, title).save(out)
        print(f"contact sheet: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
    return 1 if stats["problems"] else 0
