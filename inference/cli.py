"""Command line: `python -m inference generate|encode|guide ...`.

    # a concept photo (+ mask) and prompts with S*: zero optimisation steps
    python -m inference generate --base CompVis/stable-diffusion-v1-4 --encoders ORG/elite-encoders \\
        --image teapot.jpg --mask teapot_mask.png --prompt "a photo of S* on the beach" --out out/

    # two concepts in one prompt: repeat --image/--mask, write S1 and S2
    python -m inference generate ... --image dog.jpg --image cat.jpg --prompt "S1 playing with S2" --out out/

    # encode once, generate many
    python -m inference encode --encoders ORG/elite-encoders --image teapot.jpg --mask m.png --out teapot.safetensors
    python -m inference generate ... --concept teapot.safetensors --prompt "S* in the snow" --out out/

    # no encoders and no image: the plain base pipeline (a prompt without placeholders)
    python -m inference generate --base PATH --prompt "a photo of a dog" --out out/

    # the result of a per-concept fine-tune (Textual Inversion / BaTex: its token; Infusion: its class word)
    python -m inference generate --base PATH --finetune out/dog_ti --prompt "a photo of S* on the beach" --out out/
    python -m inference generate --base PATH --finetune out/dog_infusion --prompt "a dog on the beach" --out out/

    # spatial guidance off | on for two words, boxes from the location MLP, drawn side by side
    python -m inference guide --base PATH --location-mlp ORG/elite-encoders --prompt "a cat and a dog" \
        --words cat dog --out cmp.png

`generate` writes one PNG per image, `grid.png` (per prompt: input | outputs) and `settings.json`
(every setting used, the files written, timings) into --out; each file is written under a
temporary name and renamed, and settings.json is written last, so its presence means the run
finished. Errors about inputs name the file or prompt and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
import transformers

from encoders.anchors import coco_class_names
from encoders.common.config import parse_keyed_args, program_name
from encoders.common.device import resolve_device
from encoders.common.files import (
    OutputPathError,
    atomic_write_json,
    check_writable_file,
    check_writable_folder,
    describe_write_error,
)
from encoders.common.version import DISTRIBUTION, package_version

from .composition import default_words, parse_token_box, plan_guidance
from .concept import Concept, ConceptFileError
from .encoding import concept_photos, encode_concept_standalone
from .families import FamilyInputs, family_pipeline, load_ip_adapter, load_loras
from .finetuned import FinetuneFolderError, read_finetune, seeded_noise
from .guidance import SpatialGuidanceConfig, concepts_from_words, generate_with_spatial_guidance, predict_boxes
from .inputs import (
    ConceptInputError,
    ConceptInputWarning,
    check_placeholders,
    find_placeholders,
    load_concept_image,
    placeholder_in,
    truncated_prompt,
)
from .loading import SCHEDULERS, ModelLoadError, default_image_size, load_base_pipeline, load_location_mlp
from .masking import DEFAULT_MASK_MODEL, DEFAULT_MASK_PROMPT, auto_masker_or_none, fill_masks, has_own_alpha
from .methods import Elite, MethodError, check_guidance, generate_guided_words, generate_together, load_run
from .pictures import make_grid, mask_preview, render_comparison, save_image_atomic
from .pipeline import DEFAULT_ELITE_SCALE, ElitePipeline, default_placeholders
from .presets import PRESETS, preset_settings

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0  # ELITE's classifier-free guidance scale


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def _token_box(text: str):
    try:
        return parse_token_box(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _boxes(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"box {text!r}: expected x0,y0,x1,y1 numbers in 0..1") from err
    if len(values) != 4 or not (0 <= values[0] < values[2] <= 1 and 0 <= values[1] < values[3] <= 1):
        raise argparse.ArgumentTypeError(
            f"box {text!r}: expected x0,y0,x1,y1 with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1"
        )
    return values


def _number(kind: type, low: float | None = None, high: float | None = None, multiple: int | None = None):
    """An argparse type: an int or float, finite, within [low, high], a multiple of `multiple`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            span = (
                f"between {low:g} and {high:g}"
                if low is not None and high is not None
                else (f"at least {low:g}" if low is not None else f"at most {high:g}")
            )
            raise argparse.ArgumentTypeError(f"{text} must be {span}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"{text} must be a multiple of {multiple}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = _number(int, 1)
SIZE_PX = _number(int, 8, 8192, multiple=8)  # Stable Diffusion's VAE and UNet need multiples of 8
ELITE_SCALE = _number(float, 0.0, 2.0)  # lambda: ELITE uses 0.6-1
NONNEGATIVE = _number(float, 0.0)
SEED = _number(int, 0, 2**63 - 1 - 10_000)  # torch.Generator takes 64-bit seeds; image i adds i


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when X says something and the help does not already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        says_nothing = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or says_nothing or not action.option_strings:
            return text
        return f"{text} (default: {default})"


def _add_model_options(parser: argparse.ArgumentParser, base_required: bool) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--base",
        required=base_required,
        metavar="PATH_OR_ID",
        help="base Stable Diffusion pipeline: a diffusers folder or Hub id (e.g. CompVis/stable-diffusion-v1-4)"
        + ("" if base_required else "; optional here, used only to check the encoders fit it"),
    )
    group.add_argument(
        "--encoders",
        metavar="PATH_OR_ID",
        help="ELITE encoders folder or Hub repo (global_mapping/, local_mapping/, optional location_mlp/)",
    )
    group.add_argument(
        "--image-encoder",
        metavar="PATH_OR_ID",
        help="CLIP vision model the encoders read (default: the one recorded in the encoders folder)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights dtype (auto: float16 on CUDA, float32 elsewhere)",
    )


def _add_concept_options(parser: argparse.ArgumentParser, generate: bool = False) -> None:
    group = parser.add_argument_group("concept input")
    group.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE_OR_DIR",
        help=(
            "photo of the concept, or a concept folder (its photos and masks/: one concept from all); repeat for a "
            "second concept; an RGBA image's alpha is its mask"
        )
        if generate
        else "photo of the concept, or a concept folder; repeat for several photos of the one concept (w0 averaged, "
        "local tokens side by side); an RGBA image's alpha is its mask",
    )
    group.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="FILE",
        help="object mask for the --image at the same position (white = object; resized if its size differs; "
        "'-' for none); without one an automatic mask is made (below)",
    )
    group.add_argument(
        "--auto-mask",
        metavar="WORD",
        default=None,
        help="segment photos that have no mask with the mask model prompted by WORD (e.g. the class word: dog); "
        f"by default photos without a mask are segmented as {DEFAULT_MASK_PROMPT!r} when the mask model loads, "
        "else used whole with a warning. The masks used are saved beside the outputs",
    )
    group.add_argument("--no-auto-mask", action="store_true", help="photos without a mask are the object as a whole")
    group.add_argument(
        "--mask-model",
        default=DEFAULT_MASK_MODEL,
        metavar="ID_OR_DIR",
        help=f"CLIPSeg model for automatic masks (default: {DEFAULT_MASK_MODEL})",
    )
    group.add_argument(
        "--crop",
        choices=("none", "square"),
        default=None,
        help="what the image encoder sees: the whole photo (none, the official ELITE inference) or a square "
        "around the mask (square, as data_prep crops); default: the encoders' concept_crop setting",
    )
    group.add_argument("--no-crop", dest="crop", action="store_const", const="none", help="the same as --crop none")
    if generate:
        group.add_argument(
            "--concept",
            action="append",
            default=[],
            metavar="FILE",
            help="a concept file written by `python -m inference encode` (repeatable; instead of --image)",
        )
        group.add_argument(
            "--placeholder",
            action="append",
            default=[],
            metavar="TOKEN",
            help="placeholder word of each concept, in order (default: S* for one concept, S1 S2 ... for several)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("python -m inference"),
        description="Zero-step personalized text-to-image generation with ELITE encoders (no fine-tuning).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate images of a concept (or of a plain prompt)",
        description="Encode concept photos and generate images for prompts containing their placeholders "
        "(S* for one concept, S1 and S2 for two). Without --encoders/--image/--concept it runs the plain "
        "base pipeline. Writes the images, grid.png and settings.json into --out.",
        formatter_class=_HelpFormatter,
    )
    _add_model_options(gen, base_required=True)
    _add_concept_options(gen, generate=True)
    prompts = gen.add_argument_group("prompts and sampling")
    prompts.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="prompt; repeat for several prompts from one encode",
    )
    prompts.add_argument("--negative-prompt", default=None, metavar="TEXT", help="negative prompt for guidance")
    prompts.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="paper: ELITE's sampling (its LMS sampler, 100 steps, guidance 5, lambda 0.8 for prompts "
        "that only describe the concept and 0.6 for the others); options given explicitly win",
    )
    prompts.add_argument(
        "--elite-scale",
        "--lam",
        dest="elite_scale",
        type=ELITE_SCALE,
        default=None,
        help=f"lambda, the weight of ELITE's local (detail) branch: 0 = global word only (default "
        f"{DEFAULT_ELITE_SCALE}; ELITE uses 0.6 for editing prompts and 0.8 for 'a photo of S*'; --lam is "
        "the same option)",
    )
    prompts.add_argument("--steps", type=POSITIVE_INT, default=None, help=f"denoising steps (default {DEFAULT_STEPS})")
    prompts.add_argument(
        "--guidance",
        type=NONNEGATIVE,
        default=None,
        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})",
    )
    prompts.add_argument("--seed", type=SEED, default=0, help="seed of image 0; image i uses seed + i")
    prompts.add_argument("--num-images", type=POSITIVE_INT, default=1, help="images per prompt")
    prompts.add_argument(
        "--height",
        type=SIZE_PX,
        default=None,
        help="image height in px (default: the UNet's sample size x the VAE factor)",
    )
    prompts.add_argument(
        "--width", type=SIZE_PX, default=None, help="image width in px, a multiple of 8 (default: as --height)"
    )
    prompts.add_argument(
        "--scheduler",
        default=None,
        choices=sorted(SCHEDULERS),
        help="sampler (default: the base model's own; lms is ELITE's: LMS with SD v1's published "
        "noise schedule, which needs scipy)",
    )
    tuned = gen.add_argument_group("per-concept fine-tunes (instead of ELITE concepts)")
    tuned.add_argument(
        "--finetune",
        action="append",
        default=[],
        metavar="DIR[=TOKEN]",
        help="output_dir of training.textual_inversion (TI or BaTex: write its placeholder token, or TOKEN, in the "
        "prompt) or of training.infusion (write its class word in the prompt); repeatable",
    )
    layout = gen.add_argument_group("spatial guidance (compositional inversion)")
    layout.add_argument(
        "--box",
        action="append",
        default=[],
        type=_token_box,
        metavar="[TOKEN=]X0,Y0,X1,Y1",
        help="where a token should go (0..1): TOKEN=x0,y0,x1,y1 for any placed token (S*, a fine-tune's "
        "token, a --guide-word), or x0,y0,x1,y1 once per ELITE concept in order; steers its attention",
    )
    layout.add_argument(
        "--guide-word",
        action="append",
        default=[],
        metavar="WORD",
        help="an ordinary word of the prompt to place too (e.g. dog); default with --spatial-guidance: "
        "the prompt's nouns the location MLP knows, as many as make two placed tokens",
    )
    layout.add_argument(
        "--spatial-guidance",
        action="store_true",
        help="predict the boxes of the two placed tokens without --box with the location MLP",
    )
    layout.add_argument(
        "--location-mlp",
        default=None,
        metavar="PATH_OR_ID",
        help="encoders folder / Hub repo with location_mlp/ (default: the --encoders' own)",
    )
    family = gen.add_argument_group(
        "other pipelines (the text-to-image pipeline's UNet shared through from_pipe; ELITE acts there too)"
    )
    family.add_argument("--init-image", default=None, metavar="IMG", help="img2img: start from this picture")
    family.add_argument(
        "--strength",
        type=_number(float, low=0.0, high=1.0),
        default=0.8,
        metavar="S",
        help="img2img / inpainting: how much of --init-image is repainted (0..1, default 0.8, diffusers' default)",
    )
    family.add_argument(
        "--inpaint-mask", default=None, metavar="MASK", help="inpainting: white = repaint (needs --init-image)"
    )
    family.add_argument("--control-image", default=None, metavar="IMG", help="ControlNet: the conditioning image")
    family.add_argument(
        "--controlnet", default=None, metavar="PATH_OR_ID", help="ControlNet: the model (folder or Hub id)"
    )
    family.add_argument(
        "--controlnet-scale",
        type=_number(float, low=0.0),
        default=1.0,
        metavar="S",
        help="ControlNet conditioning scale",
    )
    family.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH_OR_ID",
        help="a LoRA in diffusers' layout (folder, Hub repo or .safetensors), loaded with load_lora_weights (peft); "
        "repeatable",
    )
    family.add_argument("--lora-scale", type=_number(float), default=1.0, metavar="S", help="weight of every --lora")
    family.add_argument(
        "--ip-adapter",
        default=None,
        metavar="PATH_OR_ID",
        help="an IP-Adapter (training.ip_adapter's export, or a Hub repo with ip_adapter/), loaded with diffusers' "
        "load_ip_adapter; with ELITE both act (needs --ip-adapter-image)",
    )
    family.add_argument("--ip-adapter-image", default=None, metavar="IMG", help="the IP-Adapter's image prompt")
    family.add_argument(
        "--ip-adapter-scale",
        type=_number(float, low=0.0),
        default=1.0,
        metavar="S",
        help="weight of the image prompt (default 1.0)",
    )
    out = gen.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="folder for images, grid.png and settings.json")
    out.add_argument("--save-concepts", action="store_true", help="also write each encoded concept as safetensors")
    out.add_argument("--no-safety-checker", action="store_true", help="do not load the base model's safety checker")
    out.add_argument("--quiet", action="store_true", help="no progress bars")

    enc = sub.add_parser(
        "encode",
        help="encode a concept photo once into a concept file (safetensors)",
        description="Encode one concept photo (+ mask) into a small safetensors file that `generate --concept` "
        "reuses for any number of prompts.",
        formatter_class=_HelpFormatter,
    )
    _add_model_options(enc, base_required=False)
    _add_concept_options(enc)
    enc.add_argument("--out", required=True, metavar="FILE", help="concept file to write (.safetensors)")

    guide = sub.add_parser(
        "guide",
        help="one two-object image with spatial guidance off and on (same seed), side by side",
        description="Generate one two-object image with spatial guidance off and on (same seed) and save a "
        "side-by-side picture with the boxes and each concept's cross-attention map, plus a .json of the numbers.",
        formatter_class=_HelpFormatter,
    )
    models = guide.add_argument_group("models")
    models.add_argument(
        "--base", required=True, metavar="PATH_OR_ID", help="Stable Diffusion pipeline folder or Hub id"
    )
    models.add_argument(
        "--location-mlp",
        metavar="PATH_OR_ID",
        help="encoders folder / Hub repo with location_mlp/ (boxes when --boxes is not given)",
    )
    models.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    models.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights dtype (auto: float16 on CUDA, float32 elsewhere)",
    )
    what = guide.add_argument_group("prompt and boxes")
    what.add_argument("--prompt", required=True, help='e.g. "a photo of a cat and a dog"')
    what.add_argument("--words", nargs=2, required=True, metavar=("A", "B"), help="the two concept words of the prompt")
    what.add_argument(
        "--boxes", nargs=2, type=_boxes, metavar=("BOX_A", "BOX_B"), help="x0,y0,x1,y1 in 0..1 for each word"
    )
    sampling = guide.add_argument_group("sampling and guidance")
    sampling.add_argument("--steps", type=POSITIVE_INT, default=50, help="reverse steps")
    sampling.add_argument("--guidance-scale", type=NONNEGATIVE, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument(
        "--guidance-steps", type=_number(int, 0), default=10, help="reverse steps with latent updates (paper: 10)"
    )
    sampling.add_argument("--iterations", type=_number(int, 0), default=5, help="gradient iterations per guided step")
    sampling.add_argument(
        "--step-size",
        type=NONNEGATIVE,
        default=30.0,
        help="latent step scale, times (1 - alphabar_t) (layout guidance's for SD; "
        "the random tiny demo model needs ~1e5 to show a change)",
    )
    sampling.add_argument(
        "--loss-threshold", type=NONNEGATIVE, default=0.2, help="stop a step's iterations below this L_loc"
    )
    sampling.add_argument("--seed", type=SEED, default=0, help="same seed for both images")
    guide.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="PNG file for the side-by-side picture (a .json with the numbers is written beside it)",
    )
    return parser


def _check_generate_args(parser: argparse.ArgumentParser, args) -> None:
    n_concepts = len(args.image) + len(args.concept)
    if args.image and args.concept:
        parser.error("give concepts either as --image (+ --mask) or as --concept files, not both")
    if args.mask and len(args.mask) != len(args.image):
        parser.error(
            f"{len(args.mask)} --mask for {len(args.image)} --image: give one --mask per --image ('-' for none)"
        )
    if args.image and not args.encoders:
        parser.error("--image needs --encoders (the ELITE encoders folder or Hub repo)")
    if args.concept and not args.encoders:
        parser.error("--concept needs --encoders (for the attention processors that read its local tokens)")
    if args.placeholder and len(args.placeholder) != n_concepts:
        parser.error(f"{len(args.placeholder)} --placeholder for {n_concepts} concepts: give one per concept")
    plain_boxes = [box for token, box in args.box if token is None]
    if plain_boxes and len(plain_boxes) != n_concepts:
        parser.error(
            f"{len(plain_boxes)} --box x0,y0,x1,y1 for {n_concepts} ELITE concepts: give one per concept, "
            "or name the token (--box TOKEN=x0,y0,x1,y1)"
        )
    if plain_boxes and args.spatial_guidance:
        parser.error(
            "--box x0,y0,x1,y1 per concept and --spatial-guidance both choose the concepts' boxes: give one "
            "of them (--box TOKEN=... may go with --spatial-guidance)"
        )
    if args.finetune and n_concepts:
        parser.error("--finetune applies a per-concept fine-tune; give it without --image/--concept")
    try:
        _family_inputs(args).check()
    except ConceptInputError as err:
        parser.error(str(err))
    if bool(args.ip_adapter) != bool(args.ip_adapter_image):
        parser.error("--ip-adapter and --ip-adapter-image go together (the adapter reads the image prompt)")
    if args.ip_adapter and (args.box or args.spatial_guidance or args.guide_word):
        parser.error("spatial guidance runs its own text-to-image denoising loop: not with --ip-adapter")
    if _family_inputs(args).any and (args.box or args.spatial_guidance or args.guide_word):
        parser.error(
            "spatial guidance runs its own text-to-image denoising loop: not with --init-image / --inpaint-mask / "
            "--control-image"
        )
    try:
        check_writable_folder(args.out, "--out")
    except OutputPathError as err:
        parser.error(str(err))


def _family_inputs(args) -> FamilyInputs:
    return FamilyInputs(
        init_image=args.init_image,
        strength=args.strength,
        inpaint_mask=args.inpaint_mask,
        control_image=args.control_image,
        controlnet=args.controlnet,
        controlnet_scale=args.controlnet_scale,
    )


def _versions() -> dict[str, str]:
    return {
        DISTRIBUTION: package_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _crop(args) -> bool | None:
    """`--crop` as `encode_concept`'s `crop`: None leaves it to the encoders' setting."""
    return None if args.crop is None else args.crop == "square"


def _resolve_sampling(args) -> None:
    """Fill --steps, --guidance, --scheduler from --preset (or the defaults); --elite-scale stays None
    under the paper preset, which picks it per prompt."""
    preset = preset_settings(args.preset)
    args.steps = args.steps or preset.get("num_inference_steps", DEFAULT_STEPS)
    args.guidance = preset.get("guidance_scale", DEFAULT_GUIDANCE) if args.guidance is None else args.guidance
    args.scheduler = args.scheduler or preset.get("scheduler")
    if args.elite_scale is None and args.preset is None:
        args.elite_scale = DEFAULT_ELITE_SCALE


def _placed_tokens(args, prompt: str, personalized: dict, placeholders: list[str], location_mlp, pipe) -> list:
    """The tokens guidance places in `prompt` (`inference.composition`), with their boxes."""
    named = {token: box for token, box in args.box if token is not None}
    plain = [box for token, box in args.box if token is None]
    named.update(zip(placeholders, plain))
    words = list(args.guide_word) + [t for t in named if t not in personalized and t not in args.guide_word]
    if args.spatial_guidance and not args.guide_word:
        present = [t for t in personalized if placeholder_in(prompt, t)]
        vocabulary = list(location_mlp.vocabulary or [])
        candidates = default_words(prompt, vocabulary, exclude=present) if vocabulary else []
        if not candidates:  # a noun the MLP never saw ("dog") is placed like its nearest known noun
            candidates = default_words(prompt, coco_class_names(), exclude=present)
        words += [w for w in candidates if w not in words][: max(0, 2 - len(present) - len(words))]
        unboxed = [t for t in present + words if t not in named]
        if len(unboxed) == 1:
            known = (
                ", ".join(vocabulary[:12]) + (" ..." if len(vocabulary) > 12 else "") if vocabulary else "none recorded"
            )
            raise ConceptInputError(
                f"--spatial-guidance places two tokens, but {prompt!r} has only {unboxed[0]!r} to place: none of its "
                f"other words is a noun the location MLP knows (its nouns: {known}) or a COCO object name. Name the "
                "word to place with --guide-word WORD (it is placed like its nearest known noun), or give --box "
                "TOKEN=x0,y0,x1,y1"
            )
    return plan_guidance(prompt, personalized, words, named, location_mlp, pipe)


def _run_generate(args) -> dict:
    """Everything `generate` does after argument checks; returns the settings record it wrote."""
    _resolve_sampling(args)
    # read and check every input before loading any model: a typo fails in a second, not after minutes
    # (with the most permissive mask rule; the encoders read each photo again with their own)
    masks = [None if mask in (None, "-") else mask for mask in (args.mask or [None] * len(args.image))]
    pairs = [
        concept_photos(image, mask) for image, mask in zip(args.image, masks)
    ]  # a folder: one concept, several photos
    photos = [[_checked_photo(args, img, m) for img, m in concept] for concept in pairs]
    loaded_concepts = [Concept.load(path) for path in args.concept]
    placeholders = args.placeholder or default_placeholders(len(photos) + len(loaded_concepts))
    check_placeholders(placeholders)
    if photos or loaded_concepts:
        for prompt in args.prompt:
            find_placeholders(prompt, placeholders)
    finetunes = [(read_finetune(spec.partition("=")[0]), spec.partition("=")[2] or None) for spec in args.finetune]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    masker: dict = {}
    pairs = [_with_auto_masks(args, concept, out_dir, f"mask-{k}", masker) for k, concept in enumerate(pairs)]
    started = time.perf_counter()
    generator_api = ElitePipeline.from_pretrained(
        args.base,
        encoders=args.encoders,
        image_encoder=args.image_encoder,
        device=args.device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        safety_checker=not args.no_safety_checker,
        allow_sdxl=True,  # SDXL loads as StableDiffusionXLPipeline; what a method cannot do there is refused by it
    )
    pipe = generator_api.pipe
    pipe.set_progress_bar_config(disable=args.quiet)
    load_s = time.perf_counter() - started
    if args.placeholder:
        check_placeholders(placeholders, pipe.tokenizer)

    concepts, inputs_shown, concept_records = [], [], []
    encode_s = 0.0
    for k, (image, mask) in enumerate(zip(args.image, masks)):
        tick = time.perf_counter()
        with warnings.catch_warnings():  # said once already, when the inputs were checked
            warnings.simplefilter("ignore", ConceptInputWarning)
            concept, prepared = generator_api.encode_concept(
                [p for p, _ in pairs[k]], [m for _, m in pairs[k]], crop=_crop(args), return_input=True
            )
        encode_s += time.perf_counter() - tick
        concepts.append(concept)
        inputs_shown.append(mask_preview(prepared.image, prepared.mask))
        made = [str(m.name) for _, m in pairs[k] if isinstance(m, Path) and m.parent == out_dir]
        record = {"image": image, "mask": mask, **({"auto_masks": made} if made else {}), **concept.metadata}
        if args.save_concepts:
            record["saved"] = concept.save(out_dir / f"concept_{k}.safetensors").name
        concept_records.append(record)
    for path, concept in zip(args.concept, loaded_concepts):
        concepts.append(concept)
        if concept.preview is not None:
            inputs_shown.append(concept.preview_image())
        concept_records.append({"concept_file": path, **concept.metadata})

    height, width = args.height, args.width
    default_h, default_w = default_image_size(pipe)
    height = height or (width if width else default_h)
    width = width or (args.height if args.height else default_w)

    finetune_records, methods = _apply_finetunes(pipe, finetunes, args.prompt)
    residuals = [r for method in methods for r in method.residuals()]
    loras = load_loras(pipe, args.lora, args.lora_scale)
    family = _family_inputs(args)
    family_kwargs: dict = {}
    if family.any:
        if residuals:
            raise ConceptInputError(
                "an Infusion fine-tune samples through its own dual-stream call: not with --init-image / "
                "--inpaint-mask / --control-image"
            )
        pipe, family_kwargs = family_pipeline(pipe, family, width, height)
        pipe.set_progress_bar_config(disable=args.quiet)
        generator_api = generator_api.with_pipeline(pipe)
    if args.ip_adapter:
        if residuals:
            raise ConceptInputError(
                "an Infusion fine-tune samples through its own dual-stream call: not with --ip-adapter"
            )
        family_kwargs = {
            **family_kwargs,
            **load_ip_adapter(pipe, args.ip_adapter, args.ip_adapter_image, args.ip_adapter_scale),
        }
    guided = bool(args.box) or args.spatial_guidance or bool(args.guide_word)
    if guided:
        try:
            check_guidance(methods)
        except MethodError as err:
            raise ConceptInputError(str(err)) from None
    elite = Elite(generator_api)  # without encoders: the base model through the same call
    location_mlp = None
    if args.spatial_guidance:
        location_mlp = (
            load_location_mlp(args.location_mlp, device=pipe.device)
            if args.location_mlp
            else generator_api.encoders.location_mlp
            if generator_api.encoders is not None
            else None
        )
        if location_mlp is None:
            raise ConceptInputError(
                "--spatial-guidance needs a location MLP: --encoders with location_mlp/, or --location-mlp"
            )
    personalized = (
        {p: c.w0 for p, c in zip(placeholders, concepts)}
        if concepts
        else {r["prompt_word"]: None for r in finetune_records}
    )

    rows, files, prompt_records = [], [], []
    truncations = [truncated_prompt(pipe.tokenizer, prompt) for prompt in args.prompt]
    for prompt, cut in zip(args.prompt, truncations):
        if cut:  # the text encoder reads only the first tokens: say so, and which words it will see
            print(
                f"warning: prompt {prompt!r} has {cut['tokens']} tokens; the text encoder reads {cut['limit']}, "
                f"so it generates from {cut['kept']!r}",
                file=sys.stderr,
            )
    tick = time.perf_counter()
    for p, prompt in enumerate(args.prompt):
        placed = _placed_tokens(args, prompt, personalized, placeholders, location_mlp, pipe) if guided else []
        by_token = {t.name: list(t.box) for t in placed}
        if placed and not args.quiet:
            print(
                f"{prompt!r}: "
                + ", ".join(
                    f"{t.name} {[round(v, 3) for v in t.box]}" + (f" (as {t.resolved!r})" if t.resolved else "")
                    for t in placed
                )
            )
        guidance_losses = None
        if residuals or (methods and not concepts and not placed and not family.any):  # fine-tunes: seeded noise
            latents, generators = seeded_noise(pipe, range(args.seed, args.seed + args.num_images), height, width)
            images = generate_together(
                methods,
                [prompt] * args.num_images,
                latents,
                generators,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=height,
                width=width,
            )
            location_losses = None
        elif placed and not concepts:  # fine-tune tokens and plain words: guidance on the plain prompt
            result = generate_guided_words(
                pipe,
                prompt,
                by_token,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=height,
                width=width,
                num_images_per_prompt=args.num_images,
                generator=[torch.Generator("cpu").manual_seed(args.seed + i) for i in range(args.num_images)],
            )
            images, location_losses, guidance_losses = result.images, result.location_losses, result.guidance_losses
        else:
            elite.concepts, elite.placeholders, elite.elite_scale = concepts, placeholders, args.elite_scale
            elite_scale = elite.scale_for(prompt)  # None (the paper preset): by prompt
            result = elite(
                prompt,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                num_images_per_prompt=args.num_images,
                seed=args.seed,
                height=height,
                width=width,
                boxes=[by_token[p] for p in placeholders] if placed else None,
                word_boxes={t: b for t, b in by_token.items() if t not in placeholders} or None,
                **family_kwargs,
            )
            images, location_losses, guidance_losses = result.images, result.location_losses, result.guidance_losses
        maps = result.attention_maps if placed else None
        map_names = list(by_token) if not concepts else placeholders + [t for t in by_token if t not in placeholders]
        names, map_files = [], []
        for i, image in enumerate(images):
            name = f"{p:02d}-{_slug(prompt)}-{i:02d}.png"
            save_image_atomic(image, out_dir / name)
            names.append(name)
            if maps:  # beside each guided image: its boxes and each token's cross-attention map
                sheet = _attention_sheet(
                    prompt, image, location_losses, [m[i : i + 1] for m in maps], map_names, by_token
                )
                map_files.append(name.replace(".png", "-attention.png"))
                save_image_atomic(sheet, out_dir / map_files[-1])
        files.extend(names + map_files)
        rows.append((prompt, inputs_shown, images))
        record = {"prompt": prompt, "images": names, "seeds": [args.seed + i for i in range(args.num_images)]}
        if truncations[p]:
            record["truncated"] = truncations[p]
        if concepts and not residuals:
            record["elite_scale"] = elite_scale
        if placed:
            record["placed"] = [t.record() for t in placed]
        if map_files:
            record["attention_maps"] = map_files
        if location_losses is not None:  # spatial guidance: how well attention stayed in the boxes, per step
            record["location_loss_per_step"] = [round(v, 5) for v in location_losses]
        if guidance_losses:  # at each guided step: the loss before the latent updates, and after the last one
            record["location_loss_guided_steps"] = [
                {"before": round(g[0], 5), "after": round(g[-1], 5)} for g in guidance_losses
            ]
        prompt_records.append(record)
    generate_s = time.perf_counter() - tick

    save_image_atomic(make_grid(rows), out_dir / "grid.png")
    settings = {
        "command": "python -m inference generate",
        "base": args.base,
        "encoders": args.encoders,
        "image_encoder": generator_api.image_encoder_name,
        "concepts": concept_records,
        "placeholders": placeholders,
        "prompts": prompt_records,
        "negative_prompt": args.negative_prompt,
        "preset": args.preset,
        "elite_scale": (args.elite_scale if args.elite_scale is not None else "by prompt (paper preset)")
        if concepts
        else None,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "height": height,
        "width": width,
        "scheduler": type(pipe.scheduler).__name__,
        "pipeline": type(pipe).__name__,
        "family": {
            "init_image": family.init_image,
            "strength": family.strength if family.init_image else None,
            "inpaint_mask": family.inpaint_mask,
            "control_image": family.control_image,
            "controlnet": family.controlnet,
            "controlnet_scale": family.controlnet_scale if family.controlnet else None,
        }
        if family.any
        else None,
        "loras": [{"source": s, "adapter": a, "scale": args.lora_scale} for s, a in zip(args.lora, loras)],
        "ip_adapter": {"source": args.ip_adapter, "image": args.ip_adapter_image, "scale": args.ip_adapter_scale}
        if args.ip_adapter
        else None,
        "finetunes": finetune_records,
        "spatial_guidance": {
            "boxes_given": [{"token": t, "box": list(b)} for t, b in args.box],
            "location_mlp": bool(location_mlp is not None),
            "guide_words": args.guide_word,
        }
        if guided
        else None,
        "crop": args.crop or "encoders' setting",
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "files": files + ["grid.png"],
        "seconds": {"load": round(load_s, 3), "encode": round(encode_s, 3), "generate": round(generate_s, 3)},
        "versions": _versions(),
    }
    atomic_write_json(out_dir / "settings.json", settings)
    torch_threads = torch.get_num_threads()
    if not args.quiet:
        print(
            f"wrote {len(files)} images, grid.png and settings.json to {out_dir} "
            f"({generate_s:.1f}s generating, {torch_threads} threads)"
        )
    return settings


def _checked_photo(args, image, mask):
    """Read and check a photo (+ mask) with the most permissive mask rule; a photo that will get an
    automatic mask is not warned about as maskless (`_with_auto_masks` says if that fails)."""
    with warnings.catch_warnings():
        if mask is None and not args.no_auto_mask:
            warnings.filterwarnings("ignore", message="no mask for concept image", category=ConceptInputWarning)
        return load_concept_image(image, mask, mask_threshold=0)


def _with_auto_masks(args, pairs: list[tuple], out_dir: Path, stem: str, loaded: dict | None = None) -> list[tuple]:
    """Photos without a mask get an automatic one (`inference.masking`), saved as out_dir/<stem>-<k>.png,
    unless --no-auto-mask; with --auto-mask WORD a mask model that does not load is an error. `loaded`
    keeps the mask model between calls (one load for several concepts)."""
    missing = [p for p, m in pairs if m is None and not has_own_alpha(p)]
    if args.no_auto_mask or not missing:
        return pairs
    loaded = {} if loaded is None else loaded
    if "masker" not in loaded:
        loaded["masker"] = auto_masker_or_none(
            args.mask_model, resolve_device(args.device), required=args.auto_mask is not None
        )
    masker = loaded["masker"]
    if masker is None:
        return pairs
    return fill_masks(pairs, masker, args.auto_mask or DEFAULT_MASK_PROMPT, out_dir, stem)


def _attention_sheet(prompt: str, image, location_losses, maps, names: list[str], boxes: dict):
    """One row: the image with the boxes drawn, then each placed token's cross-attention map (mean over
    the steps and guided layers) with its box, and the mean L_loc (`render_comparison`'s layout)."""
    shown = SimpleNamespace(images=[image], location_losses=location_losses or [], attention_maps=maps)
    tokens = [SimpleNamespace(name=name, box=boxes[name]) for name in names]
    return render_comparison([("guided", shown)], tokens, prompt)


def _apply_finetunes(pipe, finetunes, prompts: list[str]) -> tuple[list[dict], list]:
    """Load each fine-tune's method (`inference.methods`) into the pipeline; warn about prompts that use none."""
    records, methods = [], []
    for run, token in finetunes:
        method = load_run(pipe, run, token)
        methods.append(method)
        word = method.prompt_word(run.class_word)
        records.append({"folder": str(run.folder), "method": run.method, "prompt_word": word})
        if not any(word in method.prompt_for(prompt) for prompt in prompts):
            warnings.warn(
                f"{run.folder} ({run.method}) applies to {word!r}, which no prompt contains",
                ConceptInputWarning,
                stacklevel=2,
            )
    return records, methods


def _run_encode(args) -> Path:
    masks = [None if m in (None, "-") else m for m in (args.mask or [None] * len(args.image))]
    if len(masks) != len(args.image):
        raise ConceptInputError(f"{len(masks)} --mask for {len(args.image)} --image: one per photo ('-' for none)")
    pairs = [pair for image, mask in zip(args.image, masks) for pair in concept_photos(image, mask)]
    out = Path(args.out)
    pairs = _with_auto_masks(args, pairs, out.parent, f"{out.stem}.mask")
    concept = encode_concept_standalone(
        args.encoders,
        [p for p, _ in pairs],
        [m for _, m in pairs],
        base=args.base,
        image_encoder=args.image_encoder,
        device=args.device,
        dtype=args.dtype,
        crop=_crop(args),
    )
    path = concept.save(args.out)
    print(f"wrote {path}: {concept.describe()}")
    return path


def _run_guide(args) -> Path:
    """`guide`: the same seed with guidance off and on, drawn side by side (`inference.pictures`)."""
    pipe = load_base_pipeline(args.base, device=args.device, dtype=args.dtype, safety_checker=False, allow_sdxl=True)
    pipe.set_progress_bar_config(disable=True)
    resolved = list(args.words)
    if args.boxes:
        boxes = [list(b) for b in args.boxes]
    else:
        predicted = predict_boxes(load_location_mlp(args.location_mlp, device=pipe.device), pipe, *args.words)
        boxes, resolved = predicted["boxes"], predicted["resolved"]
        print(
            f"location MLP boxes: {args.words[0]} -> {resolved[0]} {[round(v, 3) for v in boxes[0]]}, "
            f"{args.words[1]} -> {resolved[1]} {[round(v, 3) for v in boxes[1]]}"
        )
    concepts = concepts_from_words(pipe.tokenizer, args.prompt, args.words, boxes)
    runs = []
    for label, steps in (("guidance off", 0), ("guidance on", args.guidance_steps)):
        config = SpatialGuidanceConfig(steps, args.iterations, args.step_size, args.loss_threshold)
        out = generate_with_spatial_guidance(
            pipe,
            concepts,
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
            config=config,
        )
        runs.append((label, out))
    out_path = Path(args.out)
    save_image_atomic(render_comparison(runs, concepts, args.prompt), out_path)
    guided = max(args.guidance_steps, 1)
    summary = {
        "prompt": args.prompt,
        "words": args.words,
        "resolved": resolved,
        "boxes": [list(c.box) for c in concepts],
        "seed": args.seed,
        "steps": args.steps,
        "guidance_steps": args.guidance_steps,
        "iterations": args.iterations,
        "step_size": args.step_size,
        "mean_loc_loss": {label: sum(o.location_losses) / len(o.location_losses) for label, o in runs},
        "mean_loc_loss_guided_steps": {label: sum(o.location_losses[:guided]) / guided for label, o in runs},
    }
    atomic_write_json(out_path.with_suffix(".json"), summary, indent=1)
    print(
        f"wrote {out_path} (L_loc off {summary['mean_loc_loss']['guidance off']:.4f}, "
        f"on {summary['mean_loc_loss']['guidance on']:.4f})"
    )
    return out_path


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Input notes as one readable line ("warning: ..."); other warnings in Python's usual form."""
    if issubclass(category, ConceptInputWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_keyed_args(parser, argv)
    if args.command == "generate":
        _check_generate_args(parser, args)
    else:
        if args.command == "encode" and not args.encoders:
            parser.error("encode needs --encoders")
        if args.command == "guide" and not args.boxes and not args.location_mlp:
            parser.error("give --boxes or --location-mlp")
        try:
            check_writable_file(args.out, "--out")
        except OutputPathError as err:
            parser.error(str(err))
    if getattr(args, "quiet", False):
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each note once
        warnings.showwarning = _show_warning
        try:
            if args.command == "generate":
                _run_generate(args)
            elif args.command == "guide":
                _run_guide(args)
            else:
                _run_encode(args)
        except (ConceptInputError, ConceptFileError, ModelLoadError, FinetuneFolderError, OutputPathError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # a full disk or a folder made read-only while running: never half a file
            reason = describe_write_error(err)
            if reason is None:
                raise
            print(f"error: cannot write {getattr(err, 'filename', None) or args.out}: {reason}", file=sys.stderr)
            return 2
    return 0
