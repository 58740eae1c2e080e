"""`python -m data_prep pairs coco|generate`: the command line of the location-pair shards.

`coco` reads real layouts from COCO instance annotations (`data_prep.pairs`); `generate` makes them
with a text-to-image pipeline and an object detector (`data_prep.pairs_generate`). Both write pair
samples (`encoders.common.shards`: `KEY.json` with `words`, `boxes` in 0..1, `source`).
"""

from __future__ import annotations

from encoders.anchors import load_vocabulary

from .cli import add_writer_arguments, register_subcommand, shard_job_from_args
from .pairs import write_coco_pairs
from .pairs_generate import GenerationSettings, write_generated_pairs
from .sources import SourceError


def _configure_pairs(parser) -> None:
    sources = parser.add_subparsers(dest="pairs_source", metavar="SOURCE", required=True)
    coco = sources.add_parser(
        "coco",
        help="real layouts: COCO instance annotations -> pair shards (JSON only)",
        description="One sample per unordered category pair of every COCO image with >= 2 categories, "
        "each category's largest instance, boxes normalised to 0..1.",
    )
    coco.add_argument("--annotations", required=True, help="COCO instances JSON (e.g. instances_train2017.json)")
    coco.add_argument("--include-crowd", action="store_true", help="let crowd regions stand for a category")
    coco.add_argument(
        "--min-area-fraction", type=float, default=0.0, help="ignore instances smaller than this fraction of the image"
    )
    add_writer_arguments(coco, default_name="pairs-coco")

    gen = sources.add_parser(
        "generate",
        help="generated layouts: noun-pair prompts -> Stable Diffusion -> object detector -> pair shards (+ images)",
        description="Generate images for prompts made of noun pairs, detect both nouns, keep the images where "
        "both are found above --threshold, and write image + pair sample. Resumable per shard.",
    )
    gen.add_argument(
        "--base",
        "--pipeline",
        dest="pipeline",
        default="CompVis/stable-diffusion-v1-4",
        help="diffusers text-to-image pipeline, folder or Hub id (--pipeline is the same option)",
    )
    gen.add_argument(
        "--detector", default="facebook/detr-resnet-50", help="transformers object detector (folder or Hub id)"
    )
    gen.add_argument(
        "--detector-revision",
        default=None,
        help="Hub revision of the detector, e.g. no_timm for facebook/detr-resnet-50 without the timm package",
    )
    gen.add_argument(
        "--vocab", default="coco", help="noun list: 'coco' (80 classes), a YAML list or a text file (one per line)"
    )
    gen.add_argument("--images-per-pair", type=int, default=4, help="images generated per noun pair (default 4)")
    gen.add_argument("--max-pairs", type=int, default=None, help="use only the first N noun pairs (quick runs)")
    gen.add_argument("--template", default="a photo of {a} and {b}", help="prompt; {a}/{b} become 'a dog', 'an apple'")
    gen.add_argument(
        "--threshold", type=float, default=0.7, help="minimum detector probability for each noun (default 0.7)"
    )
    gen.add_argument("--batch-size", type=int, default=8, help="prompts generated and detected together (default 8)")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    gen.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    gen.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it and its key")
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    gen.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="auto: fp16 on GPU, fp32 on CPU"
    )
    add_writer_arguments(gen, default_name="pairs-gen")
    gen.set_defaults(workers=1, shard_size=256)  # one pipeline per process; small shards resume finer


@register_subcommand(
    "pairs",
    help="location-pair shards for the location MLP (from COCO layouts or generated + detected images)",
    configure=_configure_pairs,
    description="Location-pair shards: KEY.json with words [a, b], boxes in 0..1 and source (coco | generated).",
)
def _run_pairs(args) -> int:
    job = shard_job_from_args(args, unit="pairs" if args.pairs_source == "coco" else "images")
    if args.pairs_source == "coco":
        write_coco_pairs(args.annotations, job, args.include_crowd, args.min_area_fraction)
        return 0
    try:
        vocabulary = load_vocabulary(args.vocab)
    except (OSError, ValueError) as err:
        raise SourceError(f"--vocab: {err}") from None
    settings = GenerationSettings(
        pipeline=args.pipeline,
        detector=args.detector,
        detector_revision=args.detector_revision,
        threshold=args.threshold,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    try:
        write_generated_pairs(vocabulary, settings, job, args.images_per_pair, args.seed, args.template, args.max_pairs)
    except ValueError as err:  # a vocabulary the detector cannot detect, a bad template or threshold
        raise SourceError(str(err)) from None
    return 0
