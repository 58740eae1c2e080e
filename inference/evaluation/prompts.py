"""The prompts each protocol uses: DreamBooth's lists, the CoI prompts, the generic ones; one `PromptSpec` each."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from encoders.anchors import coco_class_names

if TYPE_CHECKING:  # annotations only: plan.py reads this module's class table
    from .config import EvalConfig
    from .plan import ConceptFolder

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
# Compositional Inversion's prompts (its reproduce.ipynb): "<concept> and <class>", or "<class> in front of
# <concept>" for a background concept; "{}" is "S* <class word>" when generating and the class word for CLIP-T.
COMPOSITION_TEMPLATE = "{{}} and {}"
COMPOSITION_BACKGROUND_TEMPLATE = "{} in front of {{}}"
COMPOSITION_BACKGROUND_CLASSES = ("barn",)
# Textual Inversion's evaluation prompt and the editing prompts its paper quotes (Section 5.1: background, style
# and composition); its full editing list is not published with the code.
TEXTUAL_INVERSION_PROMPTS = ("A photo of {} on the moon", "An oil painting of {}", "Elmo holding a {}")
# BaTex's text-alignment prompts: the two its paper quotes and, as it follows Textual Inversion's evaluation, two
# that Textual Inversion's paper quotes (its list of four is not published).
BATEX_PROMPTS = (
    "A photo of {} on the beach",
    "a waterfall in the style of {}",
    "A photo of {} on the moon",
    "An oil painting of {}",
)
RECONSTRUCTION_PROMPT = "A photo of {}"
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
class PromptSpec:
    """One prompt template ("{}" = the concept). kind: `concept` (about the concept), `coi` (the concept
    and another object the detector looks for) or `generic` (no concept: what customisation must not change)."""

    index: int
    template: str
    coi_target: str | None = None
    kind: str = "concept"
    num_images: int | None = None  # only the first N seeds for this prompt (None: every seed)
    image_alignment: bool = True  # scored by CLIP-I / DINO-I against the concept's photos
    text_alignment: bool = True  # scored by CLIP-T


def prompt_specs(config: EvalConfig, concept: ConceptFolder) -> list[PromptSpec]:
    """The prompts of a concept: DreamBooth's list, a file, Textual Inversion's or BaTex's sets, or the composition
    prompts; the CoI prompts with `coi`; the generic prompts when the overfitting measures are on."""
    limit = config.num_prompts
    if config.prompts == "textual_inversion":  # its code scores both alignments of every prompt it is given
        specs = [PromptSpec(0, RECONSTRUCTION_PROMPT)]
        specs += [PromptSpec(1 + k, t, image_alignment=False) for k, t in enumerate(TEXTUAL_INVERSION_PROMPTS)]
        specs = specs[:limit]
    elif config.prompts == "batex":  # 64 reconstructions for image alignment, 4 x 16 edits for text alignment
        specs = [PromptSpec(0, RECONSTRUCTION_PROMPT, text_alignment=False)]
        specs += [PromptSpec(1 + k, t, num_images=16, image_alignment=False) for k, t in enumerate(BATEX_PROMPTS)]
        specs = specs[:limit]
    elif config.prompts == "composition":  # every class, the concept's own included (the official prompts)
        objects = list(config.coi_objects or coco_class_names())[:limit]
        background = concept.class_word in COMPOSITION_BACKGROUND_CLASSES
        template = COMPOSITION_BACKGROUND_TEMPLATE if background else COMPOSITION_TEMPLATE
        specs = [PromptSpec(k, template.format(obj), obj, "coi") for k, obj in enumerate(objects)]
    else:
        if config.prompts == "dreambooth":
            live = concept.class_word in LIVE_CLASSES
            templates = list(DREAMBOOTH_LIVE_PROMPTS if live else DREAMBOOTH_OBJECT_PROMPTS)
        else:
            templates = _read_prompt_file(Path(config.prompts))
        specs = [PromptSpec(i, t) for i, t in enumerate(templates[:limit])]
        if config.coi:
            objects = [o for o in (config.coi_objects or COI_OBJECTS) if o != concept.class_word]
            specs += [
                PromptSpec(len(specs) + k, COI_TEMPLATE.format("{}", obj), obj, "coi") for k, obj in enumerate(objects)
            ]
    if config.infusion_measures:
        generic = [p for p in GENERIC_PROMPTS if not _mentions(p, concept.class_word)][:limit]
        specs += [PromptSpec(len(specs) + k, text, None, "generic") for k, text in enumerate(generic)]
    return specs


def _read_prompt_file(path: Path) -> list[str]:
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
    return templates


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", text.lower()) is not None
