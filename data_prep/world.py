"""The miniature world: a procedural, deterministic object world small enough to train models from scratch.

Each image is 64 px: one or two objects on a plain background. An object is a shape (circle, square,
triangle, star, heart, cross, diamond, hexagon) in a colour (red, orange, yellow, green, blue, purple,
pink, white) with a pattern (plain, striped, dotted, checkered; the pattern is drawn in a darker
shade of the same colour), on a background (black, gray, white, blue, green, brown). Every instance
differs by nuisance: rotation, size, position, and a small hue/value jitter. Captions say what is
there: "a photo of a red striped star on a blue background" (a plain object has no pattern word),
"a red star and a blue heart on a gray background" for two-object scenes.

Some shape x colour x pattern triples never appear in the `train` split (`HELD_OUT_TRIPLES`): the
`heldout` split holds only those, so composition and personalization are tested on objects no model
has seen. `render_scene(seed, index, split)` is a pure function of its arguments, so a training job
can render the same images on the fly that `python -m data_prep world` writes to disk:

    python -m data_prep world --out world/train --images 2000 --seed 0
    python -m data_prep coco --annotations world/train/instances.json --images world/train/images --out shards/world

The folder is in the COCO layout (images/, instances.json with RLE masks and boxes, captions.json),
so every downstream command is the one a real dataset takes. The category of an object is its shape.
"""

from __future__ import annotations

import argparse
import colorsys
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .cli import register_subcommand

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
COLOURS = {
    "red": (215, 40, 40),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 35),
    "green": (45, 165, 60),
    "blue": (40, 75, 215),
    "purple": (135, 55, 185),
    "pink": (240, 125, 185),
    "white": (240, 240, 240),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "black": (22, 22, 22),
    "gray": (125, 125, 125),
    "white": (232, 232, 232),
    "blue": (110, 150, 225),
    "green": (95, 150, 85),
    "brown": (120, 85, 50),
}
# an object is never drawn on a background of its own name (a white square on white would not be there)
_CLASHES = {("white", "white"), ("blue", "blue"), ("green", "green")}


def backgrounds_for(*colours: str) -> list[str]:
    """The backgrounds objects of these colours may be drawn on (never one of their own name)."""
    return [b for b in BACKGROUNDS if all((c, b) not in _CLASHES for c in colours)]


SIZE = 64
SPLITS = ("train", "heldout", "all")
TWO_OBJECT_FRACTION = 0.25


def _held_out(shape: int, colour: int, pattern: int) -> bool:
    """32 of the 256 triples: each shape and each colour 4 times, each pattern 8 times."""
    return (shape + 3 * colour + 5 * pattern) % 8 == 0


HELD_OUT_TRIPLES = tuple(
    (s, c, p)
    for s in SHAPES
    for c in COLOURS
    for p in PATTERNS
    if _held_out(SHAPES.index(s), list(COLOURS).index(c), PATTERNS.index(p))
)


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene: its attributes and where it was drawn."""

    shape: str
    colour: str
    pattern: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in px
    mask: np.ndarray  # bool [SIZE, SIZE]

    @property
    def phrase(self) -> str:
        pattern = "" if self.pattern == "plain" else f" {self.pattern}"
        return f"{self.colour}{pattern} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    background: str
    objects: tuple[WorldObject, ...]

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"a photo of a {self.objects[0].phrase} on a {self.background} background"
        return " and ".join(f"a {o.phrase}" for o in self.objects) + f" on a {self.background} background"


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """The outline of `shape` in [-1, 1]^2 (None: drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "diamond":
        return [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    if shape == "triangle":
        return [(0, -0.95), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in (math.pi / 3 * k for k in range(6))]
    if shape == "star":
        return [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        a, b = 0.32, 0.95
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -y / 17.0 + 0.1))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _outline(shape: str) -> list[tuple[float, float]] | None:
    """The unit outline scaled to fit the unit circle, so a rotated shape of radius r stays inside r."""
    poly = _unit_polygon(shape)
    if poly is None:
        return None
    reach = max(math.hypot(x, y) for x, y in poly)
    return [(x / reach, y / reach) for x, y in poly]


def _shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, scale: int = 4) -> np.ndarray:
    """A float [SIZE, SIZE] coverage (0..1) of the shape, drawn at `scale`x and averaged (anti-aliased)."""
    big = Image.new("L", (SIZE * scale, SIZE * scale), 0)
    draw = ImageDraw.Draw(big)
    poly = _outline(shape)
    if poly is None:
        r = radius * 0.9 * scale
        draw.ellipse([cx * scale - r, cy * scale - r, cx * scale + r, cy * scale + r], fill=255)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [((cx + radius * (x * ca - y * sa)) * scale, (cy + radius * (x * sa + y * ca)) * scale) for x, y in poly]
        draw.polygon(pts, fill=255)
    arr = np.asarray(big, dtype=np.float32).reshape(SIZE, scale, SIZE, scale).mean(axis=(1, 3)) / 255.0
    return arr


def _pattern_field(pattern: str, cx: float, cy: float, angle: float, period: float) -> np.ndarray:
    """Bool [SIZE, SIZE]: where the pattern's darker shade goes (in the object's own rotated frame)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xs - cx) * ca + (ys - cy) * sa
    v = -(xs - cx) * sa + (ys - cy) * ca
    if pattern == "plain":
        return np.zeros((SIZE, SIZE), dtype=bool)
    if pattern == "striped":
        return np.mod(u, period) < period / 2
    if pattern == "checkered":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 0
    if pattern == "dotted":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return du * du + dv * dv < (period * 0.28) ** 2
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, hue: float = 0.02, value: float = 0.08) -> np.ndarray:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-hue, hue)) % 1.0
    v = float(np.clip(v * (1 + rng.uniform(-value, value)), 0, 1))
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _draw_object(
    canvas: np.ndarray,
    shape: str,
    colour: str,
    pattern: str,
    cx: float,
    cy: float,
    radius: float,
    rng: np.random.Generator,
) -> WorldObject:
    angle = float(rng.uniform(-0.5, 0.5)) if shape not in ("circle",) else 0.0
    coverage = _shape_mask(shape, cx, cy, radius, angle)
    base = _jitter(COLOURS[colour], rng)
    shade = base * 0.45 if colour != "white" else base * 0.55
    field = _pattern_field(pattern, cx, cy, angle, period=max(4.0, radius * 0.5))
    fill = np.where(field[..., None], shade[None, None], base[None, None])
    canvas[:] = canvas * (1 - coverage[..., None]) + fill * coverage[..., None]
    mask = coverage > 0.5
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return WorldObject(shape, colour, pattern, box, mask)


def _triples(split: str) -> list[tuple[str, str, str]]:
    every = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    if split == "all":
        return every
    held = set(HELD_OUT_TRIPLES)
    return [t for t in every if (t in held) == (split == "heldout")]


def render_scene(
    seed: int, index: int, split: str = "train", two_object_fraction: float = TWO_OBJECT_FRACTION
) -> Scene:
    """Scene `index` of the world drawn with `seed` (a pure function: the same arguments, the same pixels)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    triples = _triples(split)
    count = 2 if rng.random() < two_object_fraction else 1
    chosen = [triples[int(rng.integers(len(triples)))] for _ in range(count)]
    backgrounds = backgrounds_for(*(c for _, c, _ in chosen))
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    canvas[:] = _jitter(BACKGROUNDS[background], rng, hue=0.01, value=0.05)
    objects = []
    if count == 1:
        radius = float(rng.uniform(11, 26))
        cx, cy = (float(rng.uniform(radius + 1, SIZE - radius - 1)) for _ in range(2))
        objects.append(_draw_object(canvas, *chosen[0], cx, cy, radius, rng))
    else:  # side by side, left then right, so boxes never overlap much
        for k, triple in enumerate(chosen):
            radius = float(rng.uniform(8, 13))
            cx = float(rng.uniform(radius + 1, SIZE / 2 - 1)) + k * SIZE / 2
            cy = float(rng.uniform(radius + 1, SIZE - radius - 1))
            objects.append(_draw_object(canvas, *triple, cx, cy, radius, rng))
    noise = rng.normal(0, 2.0, canvas.shape).astype(np.float32)
    image = Image.fromarray(np.clip(canvas + noise, 0, 255).round().astype(np.uint8), "RGB")
    return Scene(image, background, tuple(objects))


# The world's attribute labels, one list for every classifier and metric: "group:value".
ATTRIBUTE_GROUPS = {"background": tuple(BACKGROUNDS), "colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS}
ATTRIBUTE_LABELS = tuple(f"{group}:{value}" for group, values in ATTRIBUTE_GROUPS.items() for value in values)


def scene_labels(scene: Scene) -> np.ndarray:
    """Multi-hot float [len(ATTRIBUTE_LABELS)]: the background and every object's colour, shape and pattern."""
    out = np.zeros(len(ATTRIBUTE_LABELS), dtype=np.float32)
    out[ATTRIBUTE_LABELS.index(f"background:{scene.background}")] = 1
    for obj in scene.objects:
        for group in ("colour", "shape", "pattern"):
            out[ATTRIBUTE_LABELS.index(f"{group}:{getattr(obj, group)}")] = 1
    return out


def render_object(shape: str, colour: str, pattern: str, background: str, seed: int = 0) -> Scene:
    """One scene of a chosen object on a chosen background (nuisance drawn from `seed`): concept photos."""
    for name, value, known in (
        ("shape", shape, SHAPES),
        ("colour", colour, COLOURS),
        ("pattern", pattern, PATTERNS),
        ("background", background, BACKGROUNDS),
    ):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    rng = np.random.default_rng([seed, 1_000_003])
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    canvas[:] = _jitter(BACKGROUNDS[background], rng, hue=0.01, value=0.05)
    radius = float(rng.uniform(16, 26))
    cx, cy = (float(rng.uniform(radius + 1, SIZE - radius - 1)) for _ in range(2))
    obj = _draw_object(canvas, shape, colour, pattern, cx, cy, radius, rng)
    noise = rng.normal(0, 2.0, canvas.shape).astype(np.float32)
    image = Image.fromarray(np.clip(canvas + noise, 0, 255).round().astype(np.uint8), "RGB")
    return Scene(image, background, (obj,))


def iter_scenes(seed: int, count: int, split: str = "train", start: int = 0) -> Iterator[tuple[int, Scene]]:
    for index in range(start, start + count):
        yield index, render_scene(seed, index, split)


def vocabulary() -> dict:
    """The world's words, as written into world.json beside every rendered folder."""
    return {
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "patterns": list(PATTERNS),
        "backgrounds": list(BACKGROUNDS),
        "held_out_triples": [list(t) for t in HELD_OUT_TRIPLES],
        "size": SIZE,
    }


def write_world(out: str | Path, images: int, seed: int = 0, split: str = "train", progress: bool = True) -> dict:
    """Render `images` scenes into `out` in the COCO layout; returns the summary written to world.json.

    Files are written under temporary names and renamed, and the annotation files last, so a folder
    with instances.json is complete; a rerun with the same arguments rewrites identical files.
    """
    from pycocotools import mask as mask_utils
    from tqdm.auto import tqdm

    from encoders.common.files import atomic_write, atomic_write_json, check_writable_folder

    out = Path(out)
    check_writable_folder(out / "images", "--out")
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    coco_images, annotations, captions = [], [], []
    for index, scene in tqdm(
        iter_scenes(seed, images, split), total=images, desc=f"world {split}", disable=not progress
    ):
        file_name = f"{split}_{seed}_{index:07d}.png"
        atomic_write(out / "images" / file_name, lambda tmp, im=scene.image: im.save(tmp, format="PNG"))
        image_id = index + 1
        coco_images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
        captions.append({"id": image_id, "image_id": image_id, "caption": scene.caption})
        for k, obj in enumerate(scene.objects):
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {
                    "id": image_id * 10 + k,
                    "image_id": image_id,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(obj.mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle,
                    "attributes": {
                        "colour": obj.colour,
                        "pattern": obj.pattern,
                        "background": scene.background,
                        "phrase": obj.phrase,
                    },
                }
            )
    summary = {"images": images, "seed": seed, "split": split, "objects": len(annotations), **vocabulary()}
    atomic_write_json(out / "captions.json", {"images": coco_images, "annotations": captions})
    atomic_write_json(out / "world.json", summary)
    atomic_write_json(
        out / "instances.json", {"images": coco_images, "annotations": annotations, "categories": categories}
    )
    return summary


def write_concept_folder(
    out: str | Path, shape: str, colour: str, pattern: str, photos: int = 4, seed: int = 0
) -> list[Path]:
    """Photos of one object on different backgrounds, with masks in `masks/` (the layout every fine-tune and
    `inference encode` reads): a personal concept of the world."""
    from encoders.common.files import atomic_write, check_writable_folder

    out = Path(out)
    check_writable_folder(out / "masks", "--out")
    backgrounds = backgrounds_for(colour)
    written = []
    for k in range(photos):
        scene = render_object(shape, colour, pattern, backgrounds[(seed + k) % len(backgrounds)], seed=seed * 1000 + k)
        name = f"{k:02d}.png"
        atomic_write(out / name, lambda tmp, im=scene.image: im.save(tmp, format="PNG"))
        mask = Image.fromarray(scene.objects[0].mask.astype(np.uint8) * 255, "L")
        atomic_write(out / "masks" / name, lambda tmp, im=mask: im.save(tmp, format="PNG"))
        written.append(out / name)
    return written


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder that receives images/, instances.json, captions.json")
    parser.add_argument("--images", type=int, default=2000, help="number of scenes (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="world seed: the same seed draws the same scenes")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="train",
        help="train: never the held-out shape x colour x pattern triples; heldout: only those",
    )
    parser.add_argument(
        "--object",
        metavar="COLOUR,PATTERN,SHAPE",
        default=None,
        help="instead of a COCO folder: --images photos of this one object on different backgrounds, "
        "with masks/ (a concept folder for encode and the fine-tunes), e.g. red,striped,star",
    )
    parser.add_argument("--no-progress", action="store_true")


@register_subcommand("world", help="render the procedural miniature world in the COCO layout", configure=_configure)
def run_world(args) -> int:
    if args.images < 1:
        from encoders.common.config import ConfigError

        raise ConfigError(f"--images must be at least 1, got {args.images}")
    if args.object:
        parts = [p.strip() for p in args.object.split(",")]
        if len(parts) != 3:
            from encoders.common.config import ConfigError

            raise ConfigError(f"--object takes COLOUR,PATTERN,SHAPE (e.g. red,striped,star), got {args.object!r}")
        try:
            photos = write_concept_folder(args.out, parts[2], parts[0], parts[1], args.images, args.seed)
        except ValueError as err:
            from encoders.common.config import ConfigError

            raise ConfigError(f"--object {args.object}: {err}") from None
        print(f"world: {len(photos)} photos of a {' '.join(parts)} with masks/ in {args.out}")
        return 0
    summary = write_world(args.out, args.images, args.seed, args.split, progress=not args.no_progress)
    print(f"world: {summary['images']} images, {summary['objects']} objects ({args.split}) in {args.out}")
    return 0
