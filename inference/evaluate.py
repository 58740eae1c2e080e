"""One command that generates with every method on the same concepts, prompts and seeds, and scores them.

    python -m inference.evaluate base=CompVis/stable-diffusion-v1-4 \\
        runs=out/dog_ti,out/dog_batex,out/cat_infusion encoders=ORG/elite-encoders out=eval/

Methods (rows of the table), each on every concept it has, with the same initial noise per seed:
- `base`: the base model with the class word ("a dog in the jungle"), the reference;
- `elite`: the ELITE encoders (`inference.ElitePipeline`), one photo (+ its mask when found) -> S*;
- `textual_inversion` / `batex`: a fine-tune's `learned_embeds.safetensors`, loaded with diffusers'
  own `load_textual_inversion`;
- `infusion`: a fine-tune's `infusion/` residuals (`encoders.infusion.generate_with_infusion`).
Fine-tune folders are found by their `concept.json` (written by `training.textual_inversion` and
`training.infusion`), which names the concept photos and class word; `concepts=DIR[=class]` adds
concepts for `base` / `elite` alone.

Prompts: DreamBooth's 25 editing prompts (the live-subject list for cats and dogs, the object list
otherwise; shipped here), or a text file with one prompt per line and `{}` for the concept. With
`coi=true`, "a photo of {} and a <object>" prompts measure the CoI likelihood (does the detector find
the other object?). Scores (`inference.metrics`): CLIP-T with S* replaced by the class word, CLIP-I
and DINO-I against the concept photos, CoI likelihood; with `infusion_measures=true` also the latent
2-Wasserstein distance to the base model's images and, for Infusion, the latent Fisher divergence.

Writes under `out`: `images/<method>/<concept>/<prompt>_s<seed>.png` (reused on a re-run, so an
interrupted evaluation resumes), `scores.csv` (one row per image), `summary.csv`, `results.md` (the
table), `results.json`, and `grids/<concept>.png` (one row per method).
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from encoders.attention import CONTEXT_KWARG, AttentionContext
from encoders.common.config import ConfigError, config_to_dict, keyed_field, parse_config_cli
from encoders.common.files import atomic_write_json, atomic_write_text
from encoders.common.images import find_mask, list_photos
from encoders.common.version import package_version
from encoders.infusion import EXTRAS_KEY, dual_stream_call, set_infusion_processors

from .finetuned import (
    CONCEPT_FILE,
    FinetuneFolderError,
    FinetuneRun,
    generate_finetuned,
    load_embedding,
    load_infusion,
    read_finetune,
    seeded_latents,
)
from .loading import default_image_size, load_base_pipeline
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
from .pipeline import ElitePipeline

METHODS = ("base", "elite", "textual_inversion", "batex", "infusion")

# DreamBooth's evaluation prompts (google/dreambooth dataset/prompts_and_classes.txt), "{}" = the concept.
DREAMBOOTH_OBJECT_PROMPTS = (
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest", "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background", "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water", "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it", "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road", "a {} on top of a white rug",
    "a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
)
DREAMBOOTH_LIVE_PROMPTS = (
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest", "a {} wearing a red hat", "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf", "a {} wearing a black top hat and a monocle", "a {} in a chef outfit",
    "a {} in a firefighter outfit", "a {} in a police outfit", "a {} wearing pink glasses",
    "a {} wearing a yellow shirt", "a {} in a purple wizard outfit",
    "a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
)
# DreamBooth's 30 subjects and their classes; live subjects (cats, dogs) get the live prompts.
DREAMBOOTH_CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneaker",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon", "robot_toy": "toy",
    "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase", "wolf_plushie": "stuffed animal",
}
LIVE_CLASSES = ("cat", "dog")
COI_TEMPLATE = "a photo of {} and a {}"
COI_OBJECTS = ("dog", "cat", "car", "chair", "bicycle", "bottle", "cup", "bench", "umbrella", "potted plant")
# Non-customised captions for the latent Fisher divergence (concept-agnostic overfitting).
GENERIC_PROMPTS = (
    "a man riding a bicycle down a city street", "a plate of food on a wooden table",
    "a living room with a sofa and a television", "a train stopped at a station",
    "two people playing frisbee in a park", "a bowl of fruit next to a window",
    "a red bus parked on the side of the road", "a small boat on a calm lake",
)


@dataclass
class EvalConfig:
    """What to evaluate, on which prompts and seeds, with which scoring models."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {  # other spellings of the same keys
        "elite_lambda": "elite_scale", "pretrained_model_name_or_path": "base"}

    base: str = keyed_field("base Stable Diffusion pipeline (folder or Hub id)", "CompVis/stable-diffusion-v1-4")
    out: str = keyed_field("output folder", "outputs/eval")
    runs: list[str] = keyed_field("fine-tune output folders (with concept.json): Textual Inversion, BaTex, Infusion", factory=list)
    encoders: Optional[str] = keyed_field("ELITE encoders folder or Hub repo (enables the elite method)", None)
    image_encoder: Optional[str] = keyed_field("image encoder for the ELITE encoders (default: the one they record)", None)
    concepts: list[str] = keyed_field("extra concept photo folders for base/elite: DIR or DIR=class word", factory=list)
    methods: list[str] = keyed_field(f"methods to run, among {', '.join(METHODS)}", factory=lambda: list(METHODS))
    prompts: str = keyed_field("dreambooth, or a text file with one prompt per line ({} = the concept)", "dreambooth")
    num_prompts: Optional[int] = keyed_field("use only the first N prompts (quick runs)", None)
    seeds: list[int] = keyed_field("one image per prompt and seed (papers: 5 per prompt)", factory=lambda: [0, 1, 2, 3, 4])
    coi: bool = keyed_field("add 'a photo of {} and a <object>' prompts and score the CoI likelihood with the detector", False)
    coi_objects: list[str] = keyed_field("objects for the CoI prompts (detector label names)", factory=lambda: list(COI_OBJECTS))
    append_class_word: bool = keyed_field("prompt learned tokens as 'S* dog' instead of 'S*'", False)
    num_inference_steps: int = keyed_field("sampling steps", 50)
    guidance_scale: float = keyed_field("classifier-free guidance scale", 7.5)
    scheduler: str = keyed_field("sampler for every method: ddim, lms, pndm, euler, euler_a, dpm", "ddim")
    resolution: Optional[int] = keyed_field("image size (default: the base model's)", None)
    elite_scale: float = keyed_field("ELITE's lambda, the local branch's weight (paper: 0.6 for editing prompts)", 0.6)
    elite_image: int = keyed_field("which concept photo (sorted by name) ELITE encodes", 0)
    mask_dir: Optional[str] = keyed_field(
        "folder of concept masks for ELITE (<stem>.png or <concept>_<stem>.png); default <concept>/masks/", None
    )
    infusion_measures: bool = keyed_field("also compute latent W2 to the base model and Infusion's latent Fisher divergence", False)
    fisher_timesteps: list[int] = keyed_field("timesteps for the latent Fisher divergence", factory=lambda: [100, 300, 500, 700, 900])
    clip_model: str = keyed_field("CLIP for CLIP-T / CLIP-I", DEFAULT_CLIP_MODEL)
    dino_model: str = keyed_field("DINO ViT for DINO-I", DEFAULT_DINO_MODEL)
    detector_model: str = keyed_field("object detector for the CoI likelihood", DEFAULT_DETECTOR_MODEL)
    detection_threshold: float = keyed_field("detector score threshold", DEFAULT_DETECTION_THRESHOLD)
    detector_revision: Optional[str] = keyed_field(
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
            raise ConfigError(f"unknown methods {unknown}; choose among {', '.join(METHODS)}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be positive, got {self.num_prompts}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")


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
    index: int
    template: str  # "{}" = the concept
    coi_target: str | None = None


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
    """The prompt templates for a concept (DreamBooth's list or a file), then the CoI prompts."""
    if config.prompts == "dreambooth":
        templates = list(DREAMBOOTH_LIVE_PROMPTS if concept.class_word in LIVE_CLASSES else DREAMBOOTH_OBJECT_PROMPTS)
    else:
        path = Path(config.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist (or use prompts=dreambooth)")
        templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise ValueError(f"prompts file {path}: every line needs exactly one {{}} for the concept (bad: {bad[:2]})")
    if config.num_prompts:
        templates = templates[: config.num_prompts]
    specs = [PromptSpec(i, t) for i, t in enumerate(templates)]
    if config.coi:
        objects = [o for o in config.coi_objects if o != concept.class_word]
        specs += [PromptSpec(len(specs) + k, COI_TEMPLATE.format("{}", obj), obj) for k, obj in enumerate(objects)]
    return specs


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


class Evaluator:
    """Holds the pipeline and scoring models; `run()` does everything `python -m inference.evaluate` does."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.out = Path(config.out)
        self.pipe = load_base_pipeline(
            config.base, device=config.device, dtype=config.dtype, scheduler=config.scheduler, safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        if config.resolution:
            self.height = self.width = int(config.resolution)
        else:
            self.height, self.width = default_image_size(self.pipe)
        self.concepts, self.runs = resolve_concepts_and_runs(config)
        self._elite = None
        self._ti_tokens: dict[Path, str] = {}
        self._clip = self._dino = self._detector = None

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
                self.config.detector_model, device=self.pipe.device, threshold=self.config.detection_threshold,
                revision=self.config.detector_revision,
            )
        return self._detector

    # ---- jobs ---------------------------------------------------------------------------------------
    def jobs(self) -> list[tuple[str, str, ConceptFolder, object]]:
        """(method, row label, concept, payload) for everything to generate, in table order."""
        methods = self.config.methods
        out = []
        for concept in self.concepts:
            if "base" in methods or self.config.infusion_measures:
                out.append(("base", "base", concept, None))
            if "elite" in methods and self.config.encoders:
                out.append(("elite", "elite", concept, None))
            for run in self.runs:
                if run.concept is concept and run.method in methods:
                    out.append((run.method, run.method, concept, run))
        return out

    def _generator_for(self, method: str, concept: ConceptFolder, payload) -> tuple[Callable, str]:
        """A function (texts, latents) -> PIL images, and the phrase that fills the prompt templates."""
        cfg = self.config
        common = dict(
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            height=self.height, width=self.width,
        )
        if method == "base":
            return (lambda texts, latents: generate_finetuned(self.pipe, texts, latents, **common)), concept.class_word
        if method in ("textual_inversion", "batex"):
            token = self._load_embedding(payload)
            phrase = f"{token} {concept.class_word}" if cfg.append_class_word else token
            return (lambda texts, latents: generate_finetuned(self.pipe, texts, latents, **common)), phrase
        if method == "infusion":
            residuals = load_infusion(self.pipe, payload)

            def infuse(texts, latents):
                return generate_finetuned(self.pipe, texts, latents, infusions=[residuals], **common)

            return infuse, residuals.config.class_word
        if method == "elite":
            elite = self._elite_pipeline()
            photo = concept.photos[min(cfg.elite_image, len(concept.photos) - 1)]
            encoded = elite.encode_concept(photo, mask=concept.mask_for(photo, cfg.mask_dir))

            def generate(texts, latents):
                images = []
                for text, lat in zip(texts, latents.split(1)):
                    images += elite(text, encoded, elite_scale=cfg.elite_scale, latents=lat, **common).images
                return images

            return generate, "S*"
        raise ValueError(f"unknown method {method!r}")

    def _load_embedding(self, run: Run) -> str:
        """Load a Textual Inversion / BaTex file once under a token of its own (several runs may use S*)."""
        if run.folder not in self._ti_tokens:
            token = f"<{_slug(run.label)}-{len(self._ti_tokens)}>"
            self._ti_tokens[run.folder] = load_embedding(self.pipe, run, token=token)
        return self._ti_tokens[run.folder]

    def _elite_pipeline(self):
        if self._elite is None:
            self._elite = ElitePipeline(self.pipe, elite_scale=self.config.elite_scale)
            self._elite.load_encoders(self.config.encoders, image_encoder=self.config.image_encoder)
        elif self._elite.encoders is None:
            self._elite.load_encoders(self.config.encoders, image_encoder=self.config.image_encoder)
        return self._elite

    def _release_elite(self) -> None:
        if self._elite is not None and self._elite.encoders is not None:
            self._elite.unload_encoders()

    def generate(self, method: str, label: str, concept: ConceptFolder, payload, specs: list[PromptSpec]):
        """Generate (or reuse) every (prompt, seed) image of one row; returns [(spec, seed, path)]."""
        folder = self.out / "images" / _slug(label if payload is None else f"{label}-{payload.label}") / _slug(concept.name)
        todo, done = [], []
        for spec in specs:
            for seed in self.config.seeds:
                path = folder / f"{spec.index:02d}_s{seed}.png"
                (done if path.is_file() and not self.config.regenerate else todo).append((spec, seed, path))
        if todo:
            generate, phrase = self._generator_for(method, concept, payload)
            batches = [todo[i : i + self.config.batch_size] for i in range(0, len(todo), self.config.batch_size)]
            try:
                for batch in tqdm(batches, desc=f"{label} / {concept.name}", leave=False):
                    texts = [spec.template.format(phrase) for spec, _, _ in batch]
                    latents = seeded_latents(self.pipe, [seed for _, seed, _ in batch], self.height, self.width)
                    with torch.no_grad():
                        images = generate(texts, latents)
                    for (spec, seed, path), image in zip(batch, images):
                        save_image_atomic(image, path)
            finally:
                if method == "elite":
                    self._release_elite()
        items = sorted(todo + done, key=lambda item: (item[0].index, item[1]))
        return [(spec, seed, Image.open(path).convert("RGB")) for spec, seed, path in items]

    # ---- scoring ------------------------------------------------------------------------------------
    def score(self, concept: ConceptFolder, items, clip_refs, dino_refs) -> list[dict]:
        images = [image for _, _, image in items]
        texts = [spec.template.format(concept.class_word) for spec, _, _ in items]
        clip_images = self.clip.image_embeds(images)
        clip_t = paired_similarity(clip_images, self.clip.text_embeds(texts))
        clip_i = cosine_matrix(clip_images, clip_refs).mean(dim=1)
        dino_i = cosine_matrix(self.dino.image_embeds(images), dino_refs).mean(dim=1)
        coi = {}
        targets = [(k, spec.coi_target) for k, (spec, _, _) in enumerate(items) if spec.coi_target]
        if targets:
            found = self.detector.detect([images[k] for k, _ in targets])
            coi = {k: float(t.lower() in {f.lower() for f in labels}) for (k, t), labels in zip(targets, found)}
        rows = []
        for k, (spec, seed, _) in enumerate(items):
            rows.append({
                "prompt_index": spec.index,
                "prompt": texts[k],
                "seed": seed,
                "clip_t": None if spec.coi_target else clip_t[k].item(),
                "clip_i": clip_i[k].item(),
                "dino_i": dino_i[k].item(),
                "coi_target": spec.coi_target or "",
                "coi_hit": coi.get(k),
            })
        return rows

    @torch.no_grad()
    def image_latents(self, images) -> torch.Tensor:
        """VAE posterior means of generated images (the latents the Gaussians are fitted to)."""
        vae = self.pipe.vae
        out = []
        for i in range(0, len(images), 8):
            arrays = [np.asarray(im.convert("RGB").resize((self.width, self.height)), dtype=np.float32) for im in images[i : i + 8]]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            out.append(dist.mean.float().cpu() * vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def fisher_divergence(self, run: Run, base_latents: torch.Tensor) -> float:
        """Infusion's latent Fisher divergence on non-customised prompts: base vs customised noise predictions.

        z0 are the base model's own images (VAE latents) standing in for generic data; prompts are
        captions without the class word; timesteps `fisher_timesteps`; noise from the first seed.
        """
        pipe = self.pipe
        residuals = load_infusion(pipe, run)
        prompts = [p for p in GENERIC_PROMPTS if residuals.config.class_word.lower() not in p.lower()]
        previous = pipe.unet.attn_processors
        set_infusion_processors(pipe.unet, [residuals])
        g = torch.Generator("cpu").manual_seed(int(self.config.seeds[0]))
        eps_base, eps_custom = [], []
        try:
            for i, z0 in enumerate(base_latents.split(1)):
                prompt = prompts[i % len(prompts)]
                ids = pipe.tokenizer([prompt] * 2, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids.to(pipe.device)
                text = pipe.text_encoder(ids)[0]
                call = dual_stream_call(pipe.tokenizer, [prompt], [residuals])  # row 0 base, row 1 customised
                ctx = {CONTEXT_KWARG: AttentionContext(extras={EXTRAS_KEY: call})}
                for t in self.config.fisher_timesteps:
                    noise = torch.randn(z0.shape, generator=g)
                    timestep = torch.tensor([int(t)])
                    noisy = pipe.scheduler.add_noise(z0, noise, timestep) if hasattr(pipe.scheduler, "add_noise") else z0
                    noisy = torch.cat([noisy, noisy]).to(pipe.device, pipe.unet.dtype)
                    pred = pipe.unet(noisy, timestep.repeat(2).to(pipe.device), text, cross_attention_kwargs=ctx).sample
                    eps_base.append(pred[:1].float().cpu())
                    eps_custom.append(pred[1:].float().cpu())
        finally:
            pipe.unet.set_attn_processor(previous)
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
        base_latents: dict[str, torch.Tensor] = {}
        for method, label, concept, payload in tqdm(jobs, desc="evaluate"):
            if concept.name not in refs:
                photos = [Image.open(p).convert("RGB") for p in concept.photos]
                refs[concept.name] = (self.clip.image_embeds(photos), self.dino.image_embeds(photos), photos[0])
            clip_refs, dino_refs, first_photo = refs[concept.name]
            specs = prompt_specs(self.config, concept)
            items = self.generate(method, label, concept, payload, specs)
            rows = self.score(concept, items, clip_refs, dino_refs)
            row_label = label if payload is None else f"{label} ({payload.label})"
            for row in rows:
                per_image.append({"method": method, "run": "" if payload is None else str(payload.folder), "concept": concept.name, **row})
            entry = {"method": row_label, "concept": concept.name, "images": len(rows), **_means(rows)}
            if self.config.infusion_measures:
                plain = [image for spec, _, image in items if not spec.coi_target]
                latents = self.image_latents(plain)
                if method == "base":
                    base_latents[concept.name] = latents
                    entry["latent_w2_vs_base"] = 0.0
                elif concept.name in base_latents and len(latents) >= 2:
                    entry["latent_w2_vs_base"] = gaussian_w2(base_latents[concept.name], latents)
                if method == "infusion" and concept.name in base_latents:
                    entry["latent_fisher"] = self.fisher_divergence(payload, base_latents[concept.name])
            if method != "base" or "base" in self.config.methods:
                summary.append(entry)
                first_seed = self.config.seeds[0]
                shown = [(spec, image) for spec, seed, image in items if seed == first_seed and not spec.coi_target]
                shown = shown[: self.config.grid_prompts]
                columns = " | ".join(spec.template.format("*") for spec, _ in shown)
                same_method = sum(1 for m, _, c, _ in jobs if m == method and c is concept) > 1
                caption = f"{row_label if same_method else label}: {columns}"
                fits = (len(shown) + 1) * (max(96, self.width) + 4) // 6  # the default font is ~6 px a character
                rows_for_grid.setdefault(concept.name, []).append(
                    (caption[:fits], [first_photo], [image for _, image in shown])
                )
        summary = _with_overall(summary)
        self._write(per_image, summary, rows_for_grid)
        return {"summary": summary, "out": str(self.out)}

    def _write(self, per_image: list[dict], summary: list[dict], grids: dict[str, list]) -> None:
        def write_csv(rows: list[dict], path: Path) -> None:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows([{k: _fmt(row.get(k)) for k in keys} for row in rows])
            atomic_write_text(path, buffer.getvalue())

        write_csv(per_image, self.out / "scores.csv")
        write_csv(summary, self.out / "summary.csv")
        table = markdown_table(summary)
        atomic_write_text(self.out / "results.md", table)
        atomic_write_json(self.out / "results.json", {"config": config_to_dict(self.config), "package_version": package_version(),
                                                          "summary": summary})
        for name, rows in grids.items():
            save_image_atomic(make_grid(rows), self.out / "grids" / f"{_slug(name)}.png")


def _means(rows: list[dict]) -> dict:
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"clip_t": mean("clip_t"), "clip_i": mean("clip_i"), "dino_i": mean("dino_i"), "coi_likelihood": mean("coi_hit")}


def _with_overall(summary: list[dict]) -> list[dict]:
    """Append one `all` row per method (mean over its concepts) when there are several concepts."""
    concepts = {row["concept"] for row in summary}
    if len(concepts) < 2:
        return summary
    out = list(summary)
    for method in dict.fromkeys(row["method"] for row in summary):
        rows = [r for r in summary if r["method"] == method]
        overall = {"method": method, "concept": "all", "images": sum(r["images"] for r in rows)}
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
    ("method", "method"), ("concept", "concept"), ("images", "images"), ("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"),
    ("dino_i", "DINO-I"), ("coi_likelihood", "CoI likelihood"), ("latent_w2_vs_base", "latent W2 vs base"),
    ("latent_fisher", "latent Fisher"),
)


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a markdown table (columns without any value are left out)."""
    present = [(key, title) for key, title in COLUMNS if any(row.get(key) is not None for row in summary)]
    lines = ["| " + " | ".join(title for _, title in present) + " |", "|" + "---|" * len(present)]
    for row in summary:
        lines.append("| " + " | ".join(_fmt(row.get(key)) or "-" for key, _ in present) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    config = parse_config_cli(
        EvalConfig,
        argv,
        prog="python -m inference.evaluate",
        description="Generate with base / ELITE / Textual Inversion / BaTex / Infusion on the same concepts, "
        "prompts and seeds, and score CLIP-T, CLIP-I, DINO-I and CoI likelihood.",
    )
    try:
        result = Evaluator(config).run()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"python -m inference.evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(markdown_table(result["summary"]))
    print(f"wrote {config.out}/results.md, summary.csv, scores.csv, results.json, grids/ and images/")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
