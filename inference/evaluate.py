"""One command that generates with every method on the same concepts, prompts and seeds, and scores them.

    python -m inference.evaluate base=CompVis/stable-diffusion-v1-4 \\
        runs=out/dog_ti,out/dog_batex,out/cat_infusion encoders=ORG/elite-encoders out=eval/ protocol=all

Methods (rows of the table), each on every concept it has, with the same initial noise per seed:
- `base`: the base model with the class word ("a dog in the jungle"), the reference;
- `elite`: the ELITE encoders (`inference.ElitePipeline`), one photo (+ its mask when found) -> S*;
- `textual_inversion` / `batex`: a fine-tune's `learned_embeds.safetensors`, loaded with diffusers'
  own `load_textual_inversion` (labelled "+ semantic" when trained with the anchor loss);
- `infusion`: a fine-tune's `infusion/` residuals (sampled through its dual stream);
- "+ spatial" rows: the same concept with the location MLP's boxes for the learned token and the
  other object steering the first steps (`inference.guidance`), in the compositional protocol.
Each row generates through its method's class in `inference.methods` (the registry the command line uses
too), so a method registered there with a trainer that writes fine-tune folders gets rows here unchanged.
Fine-tune folders (or Hub repos) are found by their `concept.json`, which names the concept photos
and class word; `concepts=DIR[=class]` adds concepts for `base` / `elite` alone.

`protocol` picks what is generated and how (`inference.protocols`): `elite`, `compositional` and
`infusion` each reproduce their paper's evaluation (prompts, images per prompt, each method's sampler
and guidance, metrics), `all` runs the three into `out/<protocol>/` with one combined `results.md`;
`custom` (the default) runs the keys below as given. Quick CPU runs keep a protocol and shrink it
with `num_prompts`, `seeds`, `num_inference_steps` (which then apply to every method).

Prompts (custom): DreamBooth's 25 editing prompts (the live-subject list for cats and dogs, the
object list otherwise; shipped here), or a text file with one prompt per line and `{}` for the
concept; `coi=true` adds "a photo of {} and a <object>" prompts. Scores (`inference.metrics`): CLIP-T
with S* replaced by the class word, CLIP-I and DINO-I against the concept photos, CoI likelihood (does
the detector find the other object?); with `infusion_measures=true` (the infusion protocol) also, for
every method against the base model, the latent Fisher divergence of the noise predictions on
non-customised prompts and on class-word prompts, and the latent 2-Wasserstein distance between
their images on the same two kinds of prompts.

Writes under `out`: `images/<row>/<concept>/<prompt>_s<seed>.png` (reused on a re-run, so an
interrupted evaluation resumes), `scores.csv` (one row per image), `summary.csv`, `results.md` (the
table), `results.json` (the exact settings of every row), and `grids/<concept>.png` (one row per method).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from encoders.anchors import coco_class_names
from encoders.common.config import ConfigError, config_to_dict, keyed_field, parse_config_cli
from encoders.common.files import atomic_write_json, atomic_write_text
from encoders.common.images import find_mask, list_photos
from encoders.common.version import package_version
from encoders.conditioning import sdxl_added_conditioning

from .composition import plan_guidance
from .finetuned import CONCEPT_FILE, FinetuneFolderError, FinetuneRun, read_finetune, seeded_noise
from .loading import (
    ModelLoadError,
    default_image_size,
    is_sdxl_pipeline,
    load_base_pipeline,
    load_location_mlp,
    make_scheduler,
)
from .methods import METHODS, Elite, GenerationMethod, load_run, method_class
from .metrics import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_DETECTOR_MODEL,
    DEFAULT_DINO_MODEL,
    ClipScorer,
    DinoScorer,
    ObjectDetector,
    cosine_matrix,
    gaussian_w2,
    latent_fisher_divergence,
    paired_similarity,
)
from .pictures import make_grid, save_image_atomic
from .protocols import CUSTOM_SAMPLING, PROTOCOLS, Protocol, Sampling, protocols_for

ELITE_PLACEHOLDER = Elite.placeholder

# DreamBooth's evaluation prompts (google/dreambooth dataset/prompts_and_classes.txt), "{}" = the concept.
DREAMBOOTH_OBJECT_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
DREAMBOOTH_LIVE_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)
# DreamBooth's 30 subjects and their classes; live subjects (cats, dogs) get the live prompts.
DREAMBOOTH_CLASSES = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl",
    "can": "can",
    "candle": "candle",
    "cat": "cat",
    "cat2": "cat",
    "clock": "clock",
    "colorful_sneaker": "sneaker",
    "dog": "dog",
    "dog2": "dog",
    "dog3": "dog",
    "dog5": "dog",
    "dog6": "dog",
    "dog7": "dog",
    "dog8": "dog",
    "duck_toy": "toy",
    "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy",
    "pink_sunglasses": "glasses",
    "poop_emoji": "toy",
    "rc_car": "toy",
    "red_cartoon": "cartoon",
    "robot_toy": "toy",
    "shiny_sneaker": "sneaker",
    "teapot": "teapot",
    "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
LIVE_CLASSES = ("cat", "dog")
COI_TEMPLATE = "a photo of {} and a {}"
COI_OBJECTS = ("dog", "cat", "car", "chair", "bicycle", "bottle", "cup", "bench", "umbrella", "potted plant")
# Non-customised captions for the latent Fisher divergence (concept-agnostic overfitting).
GENERIC_PROMPTS = (
    "a man riding a bicycle down a city street",
    "a plate of food on a wooden table",
    "a living room with a sofa and a television",
    "a train stopped at a station",
    "two people playing frisbee in a park",
    "a bowl of fruit next to a window",
    "a red bus parked on the side of the road",
    "a small boat on a calm lake",
)


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts and seeds, with which scoring models."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {  # other spellings of the same keys
        "elite_lambda": "elite_scale",
        "pretrained_model_name_or_path": "base",
    }

    base: str = keyed_field("base Stable Diffusion pipeline (folder or Hub id)", "CompVis/stable-diffusion-v1-4")
    out: str = keyed_field("output folder", "outputs/eval")
    protocol: str = keyed_field(
        f"custom (the keys as given), {', '.join(PROTOCOLS)} (each paper's evaluation) or all", "custom"
    )
    runs: list[str] = keyed_field(
        "fine-tune output folders (with concept.json): Textual Inversion, BaTex, Infusion", factory=list
    )
    encoders: str | None = keyed_field("ELITE encoders folder or Hub repo (enables the elite method)", None)
    image_encoder: str | None = keyed_field("image encoder for the ELITE encoders (default: the one they record)", None)
    location_mlp: str | None = keyed_field(
        "location MLP for the '+ spatial' rows (folder or Hub repo; default: the encoders' location_mlp/)", None
    )
    concepts: list[str] = keyed_field("extra concept photo folders for base/elite: DIR or DIR=class word", factory=list)
    methods: list[str] = keyed_field(f"methods to run, among {', '.join(METHODS)}", factory=lambda: list(METHODS))
    prompts: str = keyed_field(
        "custom protocol: dreambooth, or a text file with one prompt per line ({} = the concept)", "dreambooth"
    )
    num_prompts: int | None = keyed_field("use only the first N prompts of each kind (quick runs)", None)
    seeds: list[int] | None = keyed_field(
        "one image per prompt and seed (default: 0-4, or the protocol's count: ELITE 5, Compositional 10, Infusion 5)",
        None,
    )
    coi: bool = keyed_field(
        "custom protocol: add 'a photo of {} and a <object>' prompts and score the CoI likelihood", False
    )
    coi_objects: list[str] | None = keyed_field(
        "objects for the CoI prompts (detector label names; default: 10 common ones, COCO's 80 in the compositional "
        "protocol)",
        None,
    )
    append_class_word: bool = keyed_field(
        "prompt learned tokens as 'S* dog' instead of 'S*' (compositional: always)", False
    )
    num_inference_steps: int | None = keyed_field(
        "sampling steps for every method (default: 50, or each method's paper's)", None
    )
    guidance_scale: float | None = keyed_field(
        "classifier-free guidance for every method (default: 7.5, or each paper's)", None
    )
    scheduler: str | None = keyed_field(
        "sampler for every method: ddim, lms, pndm, ddpm, euler, euler_a, dpm (default: ddim, or each paper's)", None
    )
    resolution: int | None = keyed_field("image size (default: the base model's)", None)
    elite_scale: float | None = keyed_field(
        "ELITE's lambda, the local branch's weight (default: its paper's rule, 0.8 for 'a photo of S*', else 0.6)", None
    )
    elite_image: int = keyed_field("which concept photo (sorted by name) ELITE encodes", 0)
    mask_dir: str | None = keyed_field(
        "folder of concept masks for ELITE (<stem>.png or <concept>_<stem>.png); default <concept>/masks/", None
    )
    infusion_measures: bool = keyed_field(
        "also the latent Fisher divergence and W2 against the base model, on non-customised and class-word prompts "
        "(infusion protocol: always)",
        False,
    )
    fisher_timesteps: list[int] = keyed_field(
        "timesteps for the latent Fisher divergence", factory=lambda: [100, 300, 500, 700, 900]
    )
    clip_model: str = keyed_field("CLIP for CLIP-T / CLIP-I", DEFAULT_CLIP_MODEL)
    dino_model: str = keyed_field("DINO ViT for DINO-I", DEFAULT_DINO_MODEL)
    detector_model: str = keyed_field("object detector for the CoI likelihood", DEFAULT_DETECTOR_MODEL)
    detection_threshold: float = keyed_field("detector score threshold", DEFAULT_DETECTION_THRESHOLD)
    detector_revision: str | None = keyed_field(
        "Hub revision of the detector (DETR's main branch needs timm; some repos have a no_timm branch)", None
    )
    batch_size: int = keyed_field("images generated per pipeline call", 4)
    grid_prompts: int = keyed_field("prompts shown per row of the grids", 8)
    regenerate: bool = keyed_field("regenerate images that already exist under out/images", False)
    device: str = keyed_field("auto, cpu, cuda, cuda:1, mps", "auto")
    dtype: str = keyed_field("auto (fp16 on CUDA, fp32 elsewhere), float32, float16, bfloat16", "auto")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose among {', '.join(METHODS)} (inference.methods)")
        if self.protocol != "custom":
            try:
                protocols_for(self.protocol)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.seeds is not None and not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be positive, got {self.num_prompts}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:  # 0 must not mean "the default"
            raise ConfigError(
                f"num_inference_steps must be at least 1, got {self.num_inference_steps} "
                "(leave it unset for each protocol's own number)"
            )
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise ConfigError(f"guidance_scale must be a finite number, got {self.guidance_scale}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.scheduler is not None:
            try:
                make_scheduler(self.scheduler, DDPMScheduler().config)
            except ValueError as err:
                raise ConfigError(str(err)) from None


def protocol_config(config: EvalConfig, protocol: Protocol) -> EvalConfig:
    """The settings one paper's protocol runs with: its prompts, image count and measures, in out/<name>/;
    what the user set for quick runs (num_prompts, seeds, steps, ...) still applies."""
    return replace(
        config,
        out=str(Path(config.out) / protocol.name),
        protocol=protocol.name,
        prompts=protocol.prompts,
        seeds=config.seeds if config.seeds is not None else list(range(protocol.seeds)),
        coi=False,
        append_class_word=config.append_class_word or protocol.append_class_word,
        infusion_measures=config.infusion_measures or protocol.overfitting,
    )


# --------------------------------------------------------------------------------------------------
# What is evaluated
# --------------------------------------------------------------------------------------------------


@dataclass
class ConceptFolder:
    """A folder of photos of one concept (DreamBooth layout) and its class word."""

    name: str
    photos_dir: Path
    class_word: str

    @property
    def photos(self) -> list[Path]:
        return list_photos(self.photos_dir)

    def mask_for(self, photo: Path, mask_dir: str | Path | None = None) -> Path | None:
        """The photo's mask (`encoders.common.images.find_mask`, the rule the fine-tunes use too)."""
        return find_mask(photo, mask_dir)


@dataclass
class Run(FinetuneRun):
    """A fine-tune to evaluate: its folder, method, concept.json and concept."""

    concept: ConceptFolder = None


@dataclass
class PromptSpec:
    """One prompt template ("{}" = the concept). kind: `concept` (about the concept), `coi` (the concept
    and another object the detector looks for) or `generic` (no concept: what customisation must not change)."""

    index: int
    template: str
    coi_target: str | None = None
    kind: str = "concept"


@dataclass
class Row:
    """One row of the table: a method on a concept, with the sampling it is generated with."""

    method: str
    label: str
    concept: ConceptFolder
    payload: Run | None
    sampling: Sampling
    spatial: bool = False

    @property
    def name(self) -> str:
        return self.label if self.payload is None else f"{self.label} ({self.payload.label})"

    def record(self) -> dict:
        return {
            "row": self.name,
            "method": self.method,
            "concept": self.concept.name,
            "run": None if self.payload is None else str(self.payload.folder),
            "spatial_guidance": self.spatial,
            "sampling": asdict(self.sampling),
        }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "concept"


def _class_from_name(folder: Path) -> str:
    if folder.name in DREAMBOOTH_CLASSES:
        return DREAMBOOTH_CLASSES[folder.name]
    raise ConfigError(f"concept {folder}: give its class word as {folder}=<class word>")


def resolve_concepts_and_runs(config: EvalConfig) -> tuple[list[ConceptFolder], list[Run]]:
    """Concepts from the runs' concept.json files and from `concepts`, deduplicated by photo folder."""
    concepts: dict[Path, ConceptFolder] = {}

    def concept_for(folder: Path, class_word: str | None) -> ConceptFolder:
        folder = folder.resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"concept folder {folder} does not exist")
        if folder not in concepts:
            name = folder.name
            taken = {c.name for c in concepts.values()}
            suffix = 2
            while name in taken:
                name, suffix = f"{folder.name}_{suffix}", suffix + 1
            concepts[folder] = ConceptFolder(name, folder, class_word or _class_from_name(folder))
        return concepts[folder]

    runs = []
    for entry in config.runs:
        run = read_finetune(entry)
        if "concept_dir" not in run.info:
            raise FinetuneFolderError(f"{run.folder / CONCEPT_FILE}: no concept_dir (the photos to score against)")
        concept = concept_for(Path(run.info["concept_dir"]), run.class_word or None)
        runs.append(Run(run.method, run.folder, run.info, concept))
    for entry in config.concepts:
        path, _, word = entry.partition("=")
        concept_for(Path(path), word.strip() or None)
    if not concepts:
        raise ConfigError("nothing to evaluate: give runs=DIR,... (fine-tune outputs) and/or concepts=DIR,...")
    return list(concepts.values()), runs


def prompt_specs(config: EvalConfig, concept: ConceptFolder) -> list[PromptSpec]:
    """The prompts of a concept: DreamBooth's list or a file (or the composition prompts), the CoI
    prompts with `coi`, and the generic prompts when the overfitting measures are on."""
    limit = config.num_prompts
    if config.prompts == "composition":
        templates = []
    elif config.prompts == "dreambooth":
        templates = list(DREAMBOOTH_LIVE_PROMPTS if concept.class_word in LIVE_CLASSES else DREAMBOOTH_OBJECT_PROMPTS)
    else:
        path = Path(config.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist (or use prompts=dreambooth)")
        templates = [
            line.strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise ValueError(f"prompts file {path}: every line needs exactly one {{}} for the concept (bad: {bad[:2]})")
    specs = [PromptSpec(i, t) for i, t in enumerate(templates[:limit])]
    if config.coi or config.prompts == "composition":
        default = coco_class_names() if config.prompts == "composition" else COI_OBJECTS
        objects = [o for o in (config.coi_objects or default) if o != concept.class_word]
        if config.prompts == "composition":
            objects = objects[:limit]
        specs += [
            PromptSpec(len(specs) + k, COI_TEMPLATE.format("{}", obj), obj, "coi") for k, obj in enumerate(objects)
        ]
    if config.infusion_measures:
        generic = [p for p in GENERIC_PROMPTS if not _mentions(p, concept.class_word)][:limit]
        specs += [PromptSpec(len(specs) + k, text, None, "generic") for k, text in enumerate(generic)]
    return specs


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", text.lower()) is not None


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


class Evaluator:
    """Holds the pipeline and scoring models; `run()` does one protocol's evaluation (`evaluate()` all of them).

    `reuse`: an Evaluator of an earlier protocol whose pipeline and scoring models are taken over.
    """

    def __init__(self, config: EvalConfig, protocol: Protocol | None = None, reuse: Evaluator | None = None):
        self.config = config
        self.protocol = protocol
        self.out = Path(config.out)
        self.seeds = list(config.seeds) if config.seeds is not None else [0, 1, 2, 3, 4]
        if reuse is not None:
            self.pipe, self._scheduler_config = reuse.pipe, reuse._scheduler_config
            self._methods = reuse._methods
            self._clip, self._dino, self._detector = reuse._clip, reuse._dino, reuse._detector
            self._location_mlp = reuse._location_mlp
        else:
            self.pipe = load_base_pipeline(
                config.base, device=config.device, dtype=config.dtype, safety_checker=False, allow_sdxl=True
            )
            self.pipe.set_progress_bar_config(disable=True)
            self._scheduler_config = self.pipe.scheduler.config
            self._methods: dict = {}  # loaded generation methods: "elite", or a fine-tune folder
            self._clip = self._dino = self._detector = None
            self._location_mlp = False  # not looked for yet
        self._coi_by_text: dict[str, list] = {}
        if config.resolution:
            self.height = self.width = int(config.resolution)
        else:
            self.height, self.width = default_image_size(self.pipe)
        self.concepts, self.runs = resolve_concepts_and_runs(config)

    # ---- scoring models, loaded on first use ------------------------------------------------------
    @property
    def clip(self):
        if self._clip is None:
            self._clip = ClipScorer(self.config.clip_model, device=self.pipe.device)
        return self._clip

    @property
    def dino(self):
        if self._dino is None:
            self._dino = DinoScorer(self.config.dino_model, device=self.pipe.device)
        return self._dino

    @property
    def detector(self):
        if self._detector is None:
            self._detector = ObjectDetector(
                self.config.detector_model,
                device=self.pipe.device,
                threshold=self.config.detection_threshold,
                revision=self.config.detector_revision,
            )
        return self._detector

    @property
    def location_mlp(self):
        """The location MLP of `location_mlp=`, else the encoders' `location_mlp/`, else None."""
        if self._location_mlp is False:
            source, self._location_mlp = self.config.location_mlp, None
            if source:
                self._location_mlp = load_location_mlp(source, device=self.pipe.device)
            elif self.config.encoders:
                try:
                    self._location_mlp = load_location_mlp(self.config.encoders, device=self.pipe.device)
                except ModelLoadError:
                    self._location_mlp = None  # encoders without location_mlp/: no "+ spatial" rows (warned in jobs)
        return self._location_mlp

    # ---- rows ---------------------------------------------------------------------------------------
    def sampling_for(self, method: str) -> Sampling:
        """The method's sampler, steps and guidance: the protocol's (or the custom defaults), with what
        the user set for every method on top."""
        cfg = self.config
        paper = self.protocol.sampling_for(method) if self.protocol is not None else CUSTOM_SAMPLING
        given = [
            k
            for k, v in (
                ("scheduler", cfg.scheduler),
                ("steps", cfg.num_inference_steps),
                ("guidance", cfg.guidance_scale),
            )
            if v is not None
        ]
        return Sampling(
            cfg.scheduler or paper.scheduler,
            paper.steps if cfg.num_inference_steps is None else cfg.num_inference_steps,
            paper.guidance if cfg.guidance_scale is None else float(cfg.guidance_scale),
            paper.source
            + (f"; {', '.join(given)} set for every method" if given and self.protocol is not None else ""),
        )

    def jobs(self) -> list[Row]:
        """Every row to generate, in table order: per concept its base row(s), then each method's."""
        methods = self.config.methods
        spatial = self.protocol is not None and self.protocol.spatial_rows
        if spatial and self.location_mlp is None:
            warnings.warn(
                "no location MLP (location_mlp=, or encoders with location_mlp/): the '+ spatial' rows are left out",
                stacklevel=2,
            )
            spatial = False
        out = []
        for concept in self.concepts:
            rows = []
            candidates = [("elite", None)] if "elite" in methods and self.config.encoders else []
            candidates += [(run.method, run) for run in self.runs if run.concept is concept and run.method in methods]
            for method, run in candidates:
                label = method + (" + semantic" if run is not None and run.semantic_inversion else "")
                rows.append(Row(method, label, concept, run, self.sampling_for(method)))
                if spatial and method != "base" and method_class(method).spatial_guidance:
                    rows.append(
                        Row(method, f"{label} + spatial", concept, run, self.sampling_for(method), spatial=True)
                    )
            if self.config.infusion_measures:  # a reference for each sampling the rows use
                samplings = list(dict.fromkeys(r.sampling for r in rows)) or [self.sampling_for("base")]
                base = [
                    Row("base", "base" if len(samplings) == 1 else f"base [{s.key}]", concept, None, s)
                    for s in samplings
                ]
            else:
                base = [Row("base", "base", concept, None, self.sampling_for("base"))] if "base" in methods else []
            out += base + rows
        return out

    def _base_row_for(self, row: Row, rows: Sequence[Row]) -> Row | None:
        return next(
            (r for r in rows if r.method == "base" and r.concept is row.concept and r.sampling == row.sampling), None
        )

    def _generator_for(self, row: Row) -> tuple[Callable, str]:
        """A function (texts, latents, generators) -> [(PIL image, extra record)], and the phrase for the templates."""
        cfg, concept, sampling = self.config, row.concept, row.sampling
        common = dict(
            num_inference_steps=sampling.steps, guidance_scale=sampling.guidance, height=self.height, width=self.width
        )
        method = self._method(row)
        word = method.prompt_word(concept.class_word)
        phrase = f"{word} {concept.class_word}" if cfg.append_class_word and method.appends_class_word else word

        def generate(texts, latents, generators):
            if not row.spatial:
                images = method.generate(texts, latents, generators, **common)
                return [(image, method.record(text)) for image, text in zip(images, texts)]
            out = []
            for text, lat, gen in zip(texts, latents.split(1), generators):
                if word not in text:
                    out.append((method.generate([text], lat, [gen], **common)[0], method.record(text)))
                    continue
                placed = self._placed(text, {word: method.embedding()})
                result = method.generate_guided(text, lat, gen, {p.name: p.box for p in placed}, **common)
                out.append((result.images[0], {**method.record(text), **_guidance_record(placed, result)}))
            return out

        return generate, phrase

    def _method(self, row: Row) -> GenerationMethod:
        """The row's generation method, loaded into the pipeline once (embeddings under a token of their own, as
        several runs may use S*); ELITE's encoders are loaded for its rows and taken out after each."""
        if row.method == "elite":
            method = self._methods.get("elite")
            if method is None or method.elite.encoders is None:
                elite = method.elite if method is not None else None
                method = Elite.load(
                    self.pipe, self.config.encoders, image_encoder=self.config.image_encoder, elite=elite
                )
                self._methods["elite"] = method
            method.elite_scale = self.config.elite_scale
            photo = row.concept.photos[min(self.config.elite_image, len(row.concept.photos) - 1)]
            method.encode(photo, mask=row.concept.mask_for(photo, self.config.mask_dir))
            return method
        if row.payload is None:
            return method_class(row.method).load(self.pipe)
        if row.payload.folder not in self._methods:
            token = f"<{_slug(row.payload.label)}-{len(self._methods)}>"
            self._methods[row.payload.folder] = load_run(self.pipe, row.payload, token=token)
        return self._methods[row.payload.folder]

    def _placed(self, text: str, personalized: dict) -> list:
        """Boxes for the learned token and the prompt's other object, from the location MLP."""
        target = next((obj for obj in (self._coi_by_text or {}).get(text, []) if obj), None)
        if target is None:
            raise ValueError(
                f"{text!r}: spatial guidance places the learned token and a CoI object; this prompt has none"
            )
        return plan_guidance(text, personalized, [target], {}, self.location_mlp, self.pipe)

    def _release_elite(self) -> None:
        method = self._methods.get("elite")
        if method is not None:
            method.unload()

    def _use_sampler(self, sampling: Sampling) -> None:
        self.pipe.scheduler = make_scheduler(sampling.scheduler, self._scheduler_config)

    def generate(self, row: Row, specs: list[PromptSpec]):
        """Generate (or reuse) every (prompt, seed) image of one row; returns [(spec, seed, image, extra)]."""
        folder = self.out / "images" / _slug(row.name) / _slug(row.concept.name)
        todo, done = [], []
        for spec in specs:
            for seed in self.seeds:
                path = folder / f"{spec.index:02d}_s{seed}.png"
                (done if path.is_file() and not self.config.regenerate else todo).append((spec, seed, path))
        if todo:
            self._use_sampler(row.sampling)
            generate, phrase = self._generator_for(row)
            self._coi_by_text = {s.template.format(phrase): [s.coi_target] for s in specs if s.coi_target}
            batches = [todo[i : i + self.config.batch_size] for i in range(0, len(todo), self.config.batch_size)]
            try:
                for batch in tqdm(batches, desc=f"{row.name} / {row.concept.name}", leave=False):
                    texts = [spec.template.format(phrase) for spec, _, _ in batch]
                    latents, generators = seeded_noise(
                        self.pipe, [seed for _, seed, _ in batch], self.height, self.width
                    )
                    with torch.no_grad():
                        outputs = generate(texts, latents, generators)
                    for (_spec, _seed, path), (image, extra) in zip(batch, outputs):
                        if extra:
                            atomic_write_json(path.with_suffix(".json"), extra)
                        save_image_atomic(image, path)
            finally:
                if row.method == "elite":
                    self._release_elite()
        items = sorted(todo + done, key=lambda item: (item[0].index, item[1]))
        out = []
        for spec, seed, path in items:
            side = path.with_suffix(".json")
            extra = json.loads(side.read_text()) if side.is_file() else {}
            out.append((spec, seed, Image.open(path).convert("RGB"), extra))
        return out

    # ---- scoring ------------------------------------------------------------------------------------
    def score(self, row: Row, items, clip_refs, dino_refs) -> list[dict]:
        """Per image: CLIP-T against its prompt with the class word for the concept, CLIP-I / DINO-I against
        the concept photos (prompts about the concept only), the CoI hit, and guidance's record."""
        concept = row.concept
        images = [image for _, _, image, _ in items]
        texts = [spec.template.format(concept.class_word) for spec, _, _, _ in items]
        clip_images = self.clip.image_embeds(images)
        clip_t = paired_similarity(clip_images, self.clip.text_embeds(texts))
        about = [k for k, (spec, _, _, _) in enumerate(items) if spec.kind != "generic"]
        clip_i = dino_i = {}
        if about:
            chosen = [images[k] for k in about]
            clip_i = dict(zip(about, cosine_matrix(clip_images[about], clip_refs).mean(dim=1).tolist()))
            dino_i = dict(zip(about, cosine_matrix(self.dino.image_embeds(chosen), dino_refs).mean(dim=1).tolist()))
        coi = {}
        targets = [(k, spec.coi_target) for k, (spec, _, _, _) in enumerate(items) if spec.coi_target]
        if targets:
            found = self.detector.detect([images[k] for k, _ in targets])
            coi = {k: float(t.lower() in {f.lower() for f in labels}) for (k, t), labels in zip(targets, found)}
        rows = []
        for k, (spec, seed, _, extra) in enumerate(items):
            rows.append(
                {
                    "prompt_index": spec.index,
                    "kind": spec.kind,
                    "prompt": texts[k],
                    "seed": seed,
                    "clip_t": clip_t[k].item(),
                    "clip_i": clip_i.get(k),
                    "dino_i": dino_i.get(k),
                    "coi_target": spec.coi_target or "",
                    "coi_hit": coi.get(k),
                    "elite_scale": extra.get("elite_scale"),
                    "location_loss_first": extra.get("location_loss_first"),
                    "location_loss_last": extra.get("location_loss_last"),
                }
            )
        return rows

    @torch.no_grad()
    def image_latents(self, images) -> torch.Tensor:
        """VAE posterior means of generated images (the latents the Gaussians are fitted to)."""
        vae = self.pipe.vae
        out = []
        for i in range(0, len(images), 8):
            arrays = [
                np.asarray(im.convert("RGB").resize((self.width, self.height)), dtype=np.float32)
                for im in images[i : i + 8]
            ]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            out.append(dist.mean.float().cpu() * vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def fisher_divergence(self, row: Row, z0: torch.Tensor, prompts: Sequence[str]) -> float:
        """The latent Fisher divergence between the base and the customised model (Infusion's measure):
        mean squared difference of their noise predictions on the same noisy latents, prompts and timesteps.

        z0 are the base model's own images of `prompts` (VAE latents, one per prompt, standing in for
        data), noised with DDPM's forward process at `fisher_timesteps` from the first seed's noise.
        The customised model is each method's (`GenerationMethod.noise_predictions`): Textual Inversion /
        BaTex the base UNet with the token loaded (the prompts have none of it: the text is the same); ELITE
        the UNet with its cross-attention K/V (which every prompt goes through); Infusion the residual stream
        of its dual call (row 1; row 0 is the base stream). 0 for the base row.
        """
        if row.method == "base":
            return 0.0
        pipe = self.pipe
        noising = DDPMScheduler.from_config(self._scheduler_config)
        generator = torch.Generator("cpu").manual_seed(int(self.seeds[0]))

        def text_embeds(prompt: str, rows: int) -> dict:
            """The UNet's text keywords for `rows` copies of `prompt` (SDXL: with pooled embedding and size numbers)."""
            if is_sdxl_pipeline(pipe):
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=prompt, device=pipe.device, num_images_per_prompt=rows, do_classifier_free_guidance=False
                )
                added = sdxl_added_conditioning(pooled.to(embeds.dtype), self.height, self.width)
                return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}
            ids = pipe.tokenizer(
                [prompt] * rows,
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(pipe.device)
            return {"encoder_hidden_states": pipe.text_encoder(ids)[0]}

        inputs = []  # (noisy latent, timestep, prompt), the same for every method
        for z, prompt in zip(z0.split(1), prompts):
            for t in self.config.fisher_timesteps:
                timestep = torch.tensor([int(t)])
                noisy = noising.add_noise(z, torch.randn(z.shape, generator=generator), timestep)
                inputs.append((noisy.to(pipe.device, pipe.unet.dtype), timestep.to(pipe.device), prompt))
        method = self._method(row)  # its `noise_predictions`: the base and the customised model on the same inputs
        try:
            eps_base, eps_custom = method.noise_predictions(inputs, text_embeds)
        finally:
            self._release_elite()
        return latent_fisher_divergence(torch.cat(eps_base), torch.cat(eps_custom))

    # ---- the whole evaluation --------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        per_image: list[dict] = []
        summary: list[dict] = []
        rows_for_grid: dict[str, list] = {}
        jobs = self.jobs()
        if not jobs:
            raise ConfigError(f"nothing to run: methods={self.config.methods} match no run/encoders/concept given")
        refs: dict[str, tuple] = {}
        base_latents: dict[tuple, dict] = {}  # (concept, sampling) -> {kind: latents}
        fisher_data: dict[str, dict] = {}  # concept -> {kind: (z0, prompts)}
        for row in tqdm(jobs, desc=f"evaluate ({self.config.protocol})"):
            concept = row.concept
            if concept.name not in refs:
                photos = [Image.open(p).convert("RGB") for p in concept.photos]
                refs[concept.name] = (self.clip.image_embeds(photos), self.dino.image_embeds(photos), photos[0])
            clip_refs, dino_refs, first_photo = refs[concept.name]
            specs = prompt_specs(self.config, concept)
            items = self.generate(row, specs)
            scores = self.score(row, items, clip_refs, dino_refs)
            for record in scores:
                per_image.append(
                    {
                        "row": row.name,
                        "method": row.method,
                        "run": "" if row.payload is None else str(row.payload.folder),
                        "concept": concept.name,
                        **record,
                    }
                )
            entry = {
                "method": row.name,
                "concept": concept.name,
                "sampling": row.sampling.describe(),
                "images": len(scores),
                **_means(scores),
            }
            if self.config.infusion_measures:
                entry.update(self._overfitting(row, items, base_latents, fisher_data))
            if row.method != "base" or "base" in self.config.methods:
                summary.append(entry)
                first_seed = self.seeds[0]
                shown = [
                    (spec, image) for spec, seed, image, _ in items if seed == first_seed and spec.kind != "generic"
                ]
                shown = shown[: self.config.grid_prompts]
                columns = " | ".join(spec.template.format("*") for spec, _ in shown)
                fits = (len(shown) + 1) * (max(96, self.width) + 4) // 6  # the default font is ~6 px a character
                rows_for_grid.setdefault(concept.name, []).append(
                    (f"{row.name}: {columns}"[:fits], [first_photo], [image for _, image in shown])
                )
        summary = _with_overall(summary)
        self._write(per_image, summary, rows_for_grid, jobs)
        return {"summary": summary, "out": str(self.out), "protocol": self.config.protocol}

    def _overfitting(self, row: Row, items, base_latents: dict, fisher_data: dict) -> dict:
        """Latent W2 to the base model with the same sampling, on class-word and generic prompts; latent
        Fisher divergence on the same two kinds of prompts."""
        concept = row.concept
        by_kind = {kind: [image for spec, _, image, _ in items if spec.kind == kind] for kind in ("concept", "generic")}
        latents = {kind: self.image_latents(images) for kind, images in by_kind.items() if images}
        if row.method == "base":
            base_latents[(concept.name, row.sampling)] = latents
            if concept.name not in fisher_data:  # the first seed's images of each prompt stand in for data
                first = [(spec, image) for spec, seed, image, _ in items if seed == self.seeds[0]]
                fisher_data[concept.name] = {
                    kind: (
                        self.image_latents([im for spec, im in first if spec.kind == kind]),
                        [spec.template.format(concept.class_word) for spec, _ in first if spec.kind == kind],
                    )
                    for kind in ("concept", "generic")
                    if any(spec.kind == kind for spec, _ in first)
                }
        reference = base_latents.get((concept.name, row.sampling), {})
        out = {}
        for kind, key in (("generic", "w2_generic"), ("concept", "w2_concept")):
            if kind in latents and kind in reference and len(latents[kind]) >= 2:
                out[key] = 0.0 if row.method == "base" else gaussian_w2(reference[kind], latents[kind])
        for kind, key in (("generic", "fisher_generic"), ("concept", "fisher_class")):
            if kind in fisher_data.get(concept.name, {}):
                z0, prompts = fisher_data[concept.name][kind]
                out[key] = self.fisher_divergence(row, z0, prompts)
        return out

    def _write(self, per_image: list[dict], summary: list[dict], grids: dict[str, list], jobs: Sequence[Row]) -> None:
        def write_csv(rows: list[dict], path: Path) -> None:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows([{k: _fmt(row.get(k)) for k in keys} for row in rows])
            atomic_write_text(path, buffer.getvalue())

        write_csv(per_image, self.out / "scores.csv")
        write_csv(summary, self.out / "summary.csv")
        atomic_write_text(self.out / "results.md", self.report(summary))
        atomic_write_json(
            self.out / "results.json",
            {
                "config": config_to_dict(self.config),
                "protocol": None if self.protocol is None else asdict(self.protocol),
                "seeds": self.seeds,
                "rows": [row.record() for row in jobs],
                "package_version": package_version(),
                "summary": summary,
            },
        )
        for name, rows in grids.items():
            save_image_atomic(make_grid(rows), self.out / "grids" / f"{_slug(name)}.png")

    def report(self, summary: Sequence[dict]) -> str:
        """The markdown table, headed by the protocol and its settings when it is a paper's."""
        if self.protocol is None:
            return markdown_table(summary)
        p = self.protocol
        lines = [
            f"## {p.name}: {p.paper}",
            "",
            f"{len(self.seeds)} images per prompt (seeds {', '.join(map(str, self.seeds))}); "
            f"each row's sampler in its `sampling` column.",
            "",
        ]
        return "\n".join(lines) + markdown_table(summary)


def _guidance_record(placed, result) -> dict:
    """What a guided image records: the boxes and where they came from, L_loc at the first and last step."""
    losses = result.location_losses or []
    return {
        "placed": [p.record() for p in placed],
        "location_loss_first": losses[0] if losses else None,
        "location_loss_last": losses[-1] if losses else None,
    }


def _means(rows: list[dict]) -> dict:
    """Row means: CLIP-T over the prompts about the concept (the CoI prompts where there are no others),
    CLIP-I / DINO-I over every prompt with the concept, CoI over the CoI prompts; generic prompts only
    feed the overfitting measures."""
    about = [r for r in rows if r["kind"] != "generic"]
    plain = [r for r in about if r["kind"] == "concept"] or about

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    out = {
        "clip_t": mean(plain, "clip_t"),
        "clip_i": mean(about, "clip_i"),
        "dino_i": mean(about, "dino_i"),
        "coi_likelihood": mean(about, "coi_hit"),
    }
    guided = mean(about, "location_loss_last")
    if guided is not None:
        out["location_loss"] = guided
    return out


def _with_overall(summary: list[dict]) -> list[dict]:
    """Append one `all` row per method (mean over its concepts) when there are several concepts."""
    concepts = {row["concept"] for row in summary}
    if len(concepts) < 2:
        return summary
    out = list(summary)
    for method in dict.fromkeys(row["method"] for row in summary):
        rows = [r for r in summary if r["method"] == method]
        overall = {
            "method": method,
            "concept": "all",
            "sampling": rows[0].get("sampling"),
            "images": sum(r["images"] for r in rows),
        }
        for key in rows[0]:
            if key in overall or key == "concept":
                continue
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            overall[key] = sum(values) / len(values) if values else None
        out.append(overall)
    return out


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


COLUMNS = (
    ("method", "method"),
    ("concept", "concept"),
    ("sampling", "sampling"),
    ("images", "images"),
    ("clip_t", "CLIP-T"),
    ("clip_i", "CLIP-I"),
    ("dino_i", "DINO-I"),
    ("coi_likelihood", "CoI likelihood"),
    ("location_loss", "L_loc (last step)"),
    ("fisher_generic", "latent Fisher, generic prompts"),
    ("fisher_class", "latent Fisher, class-word prompts"),
    ("w2_generic", "latent W2, generic prompts"),
    ("w2_concept", "latent W2, concept prompts"),
)


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a markdown table (columns without any value are left out)."""
    present = [(key, title) for key, title in COLUMNS if any(row.get(key) is not None for row in summary)]
    lines = ["| " + " | ".join(title for _, title in present) + " |", "|" + "---|" * len(present)]
    for row in summary:
        lines.append("| " + " | ".join(_fmt(row.get(key)) or "-" for key, _ in present) + " |")
    return "\n".join(lines) + "\n"


def evaluate(config: EvalConfig) -> dict:
    """Run `config.protocol`: the custom evaluation, one paper's, or all three (one pipeline, scoring
    models loaded once; `out/<protocol>/` each and one combined `out/results.md`)."""
    if config.protocol == "custom":
        return Evaluator(config).run()
    results, reports, evaluator = {}, [], None
    for protocol in protocols_for(config.protocol):
        evaluator = Evaluator(protocol_config(config, protocol), protocol, reuse=evaluator)
        results[protocol.name] = evaluator.run()
        reports.append(evaluator.report(results[protocol.name]["summary"]))
    atomic_write_text(Path(config.out) / "results.md", "# Evaluation\n\n" + "\n".join(reports))
    return {"protocols": results, "out": config.out}


def main(argv: list[str] | None = None) -> dict:
    config = parse_config_cli(
        EvalConfig,
        argv,
        prog="python -m inference.evaluate",
        description="Generate with base / ELITE / Textual Inversion / BaTex / Infusion on the same concepts, "
        "prompts and seeds, and score them (CLIP-T, CLIP-I, DINO-I, CoI likelihood, latent Fisher and W2); "
        "protocol=elite|compositional|infusion|all reproduces each paper's evaluation.",
    )
    try:
        result = evaluate(config)
    except (ConfigError, FileNotFoundError, ValueError, ModelLoadError) as err:
        print(f"python -m inference.evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    if "summary" in result:
        print(markdown_table(result["summary"]))
        print(f"wrote {config.out}/results.md, summary.csv, scores.csv, results.json, grids/ and images/")
    else:
        print((Path(config.out) / "results.md").read_text(encoding="utf-8"))
        print(
            f"wrote {config.out}/results.md and, per protocol, {config.out}/<protocol>/ (tables, scores, grids, images)"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
