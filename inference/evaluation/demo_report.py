"""Print what `make demo` made and where: `python -m inference.evaluation.demo_report --demo outputs/demo`.

One line per part of the demo folder (models/sd, models/image_encoder, shards,
encoders, images/<run>), saying whether it is there, how many files and bytes it holds, and for each
generation run its prompts and the grid to look at. `--stage NAME` reports only the parts whose
name contains NAME (e.g. `--stage base` -> images/base). Exit status 1 when a requested part is
missing, so a Makefile stops on an incomplete demo.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIXED_PARTS = ["models/sd", "models/image_encoder", "shards", "encoders"]
LATE_PARTS = ["runs", "images/spatial_guidance.png", "finetune", "eval"]
# what to open in each part (the pictures people would rather look at than read)
LOOK_AT = {
    "shards": ["contact_sheet.png"],
    "images/spatial_guidance.png": [""],
    "runs": ["*/validation/*.png"],
    "finetune": ["*/validation/*.png"],
    "eval": ["results.md", "*/grids/*.png"],
}


def _size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _human(num: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num} B"


def parts_of(demo: Path) -> list[str]:
    """Fixed parts plus one per generation run under images/ (a folder holding settings.json)."""
    runs = sorted(str(p.parent.relative_to(demo)) for p in (demo / "images").glob("**/settings.json"))
    late = [part for part in LATE_PARTS if (demo / part).exists()]
    return FIXED_PARTS + (runs or ["images"]) + late


def describe(demo: Path, part: str) -> tuple[bool, str]:
    folder = demo / part
    if not folder.exists():
        return False, f"  {part:<22} missing ({folder})"
    count, size = _size(folder) if folder.is_dir() else (1, folder.stat().st_size)
    line = f"  {part:<22} {folder}  ({count} files, {_human(size)})"
    if part == "encoders":
        subs = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
        line += f"\n  {'':<22} holds {', '.join(subs) or 'no model yet'}; model card {folder / 'README.md'}"
    for pattern in LOOK_AT.get(part, []):
        for target in sorted(folder.glob(pattern))[:4] if pattern else [folder]:
            line += f"\n  {'':<22} look at {target}"
    settings = folder / "settings.json"
    if settings.is_file():
        data = json.loads(settings.read_text())
        prompts = "; ".join(p["prompt"] for p in data.get("prompts", []))
        images = sum(len(p.get("images", [])) for p in data.get("prompts", []))
        line += f"\n  {'':<22} {images} images for: {prompts}\n  {'':<22} look at {folder / 'grid.png'}"
    return True, line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inference.evaluation.demo_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--demo", default="outputs/demo", help="the demo folder (default: outputs/demo)")
    parser.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="NAME",
        help="report only parts whose name contains NAME (repeatable); default: all parts",
    )
    args = parser.parse_args(argv)
    demo = Path(args.demo)
    parts = parts_of(demo)
    if args.stage:
        parts = [p for p in parts if any(s in p for s in args.stage)] or [f"images/{s}" for s in args.stage]
    print(f"demo outputs under {demo}:")
    missing = False
    for part in parts:
        present, line = describe(demo, part)
        missing |= not present and bool(args.stage)
        print(line)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
