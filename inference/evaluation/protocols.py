"""What each paper's evaluation does, as data `inference.evaluate` runs (`protocol=NAME` or `all`).

Every protocol fixes the prompts, the images per prompt, the sampler and guidance of each method, the
reference photos and the metrics of its paper's table, as the official evaluation code computes them
(the paper where there is no code); `key=value` settings still override the quick knobs (`num_prompts`,
`seeds`, `num_inference_steps`, ...) for CPU runs. docs/recipes.md sets each beside its source.

- elite: "ELITE: Encoding Visual Concepts into Textual Embeddings for Customized Text-to-Image
  Generation" (Wei et al., ICCV 2023): DreamBooth's editing prompts, 5 images each, CLIP-T / CLIP-I /
  DINO-I; ELITE sampled with 100 LMS steps, guidance 5, lambda 0.8 for "a photo of S*" and 0.6 for
  editing prompts (the `paper` preset); every other method with its own paper's sampler.
- compositional: "Compositional Inversion for Stable Diffusion Models" (Zhang et al., AAAI 2024),
  Table 1, as its `reproduce.ipynb` and `utils/clip_eval.py`: "S* cat and <each of COCO's 80 classes>"
  (the concept's own class included; "<class> in front of S* barn" for a background concept), 10 images
  per prompt, plain rows with the pipeline's default sampler (PNDM 50, guidance 7.5), "+ spatial" rows
  with its layout control (LMS 50, guidance 7.5, the constant boxes concept [0.1, 0.2, 0.5, 0.8], other
  object [0.6, 0.2, 0.95, 0.8]; boxes from this repository's location MLP are an extra row); CLIP-T =
  2.5 x cosine (CLIP ViT-B/32) against the prompt with the concept replaced by its class ("cat and
  dog"), the CoI likelihood (DETR ResNet-50 at score 0.8 finds the other object), CLIP-I; image k of every
  prompt starts from the k-th draw of one generator seeded 8888, as its notebook.
- infusion: "Infusion: Preventing Customized Text-to-Image Diffusion from Overfitting" (Zeng et al.,
  2024): Infusion sampled with DDIM 50 and guidance 8; the latent Fisher divergence (noise predictions of
  the base vs the customised model, uniform timesteps) on non-customised prompts and on prompts with
  the class word, and the latent 2-Wasserstein distance between Gaussians fitted to base and customised
  images, for every method.
- textual_inversion: "An Image is Worth One Word" (Gal et al., ICLR 2023), its `evaluation/clip_eval.py`:
  64 images of "A photo of S*" (and of the editing prompts the paper quotes), DDIM 50, eta 0, guidance
  10 (its README); image alignment = mean CLIP cosine over (training photo, image) pairs, text
  alignment = mean CLIP cosine with the prompt with S* removed.
- batex: "Efficient Personalized Text-to-image Generation by Leveraging Textual Subspace" (Du et al.):
  64 images of "A photo of S*" for image alignment, 4 prompts x 16 images for text alignment scored by
  CLIPScore (2.5 x max(cos, 0), the placeholder left in the text as "*"), PNDM 50, guidance 7.5.
- dreambench: DreamBench as the zero-shot papers report it: its 30 subjects x 25 prompts x 4 images, one
  fixed reference photo per subject (`DREAMBENCH_REFERENCE_PHOTO`), DINO ViT-S/16 CLS cosine after
  Resize(256, bicubic) + CenterCrop(224) + ImageNet normalisation, CLIP-I (ViT-B/32, mean over pairs),
  CLIP-T with the class noun in place of the identifier; each method with its own sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("elite", "compositional", "infusion", "textual_inversion", "batex", "dreambench")
# `all`: the three papers this repository's methods compete in; the others are named one by one
ALL_PROTOCOLS = ("elite", "compositional", "infusion")
# DreamBench's fixed reference photo of every subject (the DreamBooth dataset names its photos 00.jpg, 01.jpg, ...)
DREAMBENCH_REFERENCE_PHOTO = "00.jpg"
# Compositional Inversion's constant layout (its reproduce.ipynb `get_constant_layout`): concept left, other right
CONSTANT_LAYOUT = {"concept": (0.1, 0.2, 0.5, 0.8), "other": (0.6, 0.2, 0.95, 0.8)}


@dataclass(frozen=True)
class Sampling:
    """A sampler, its steps and the classifier-free guidance scale; `source` says whose setting it is."""

    scheduler: str
    steps: int
    guidance: float
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.scheduler}-{self.steps}-g{self.guidance:g}"

    def describe(self) -> str:
        return f"{self.scheduler.upper()} {self.steps} steps, guidance {self.guidance:g}"


# Each method with its own paper's sampling. BaTex was run through diffusers' StableDiffusionPipeline, whose SD v1
# defaults are PNDM, 50 steps, guidance 7.5; Textual Inversion's README samples with DDIM 50, eta 0, scale 10.
METHOD_SAMPLING = {
    "elite": Sampling("lms", 100, 5.0, "ELITE: 100 LMS steps, guidance 5"),
    "textual_inversion": Sampling("ddim", 50, 10.0, "Textual Inversion's README: DDIM 50, eta 0, scale 10"),
    "batex": Sampling("pndm", 50, 7.5, "diffusers' StableDiffusionPipeline defaults"),
    "infusion": Sampling("ddim", 50, 8.0, "Infusion: DDIM 50 steps, guidance 8"),
}
BASE_SAMPLING = Sampling("pndm", 50, 7.5, "diffusers' StableDiffusionPipeline defaults")
CUSTOM_SAMPLING = Sampling("ddim", 50, 7.5, "inference.evaluate's defaults")
COMPOSITIONAL_SAMPLING = Sampling(
    "pndm", 50, 7.5, "Compositional Inversion's reproduce.ipynb: the pipeline's default (PNDM) 50 steps, scale 7.5"
)
COMPOSITIONAL_SPATIAL_SAMPLING = Sampling(
    "lms", 50, 7.5, "Compositional Inversion's layout_control.py: LMS 50 steps, scale 7.5"
)
TEXTUAL_INVERSION_SAMPLING = Sampling("ddim", 50, 10.0, "Textual Inversion's README: DDIM 50, eta 0, scale 10")


@dataclass(frozen=True)
class TextAlignment:
    """How CLIP-T reads an image against its prompt: the text, then `scale` x cosine (floored at 0 with `floor`).

    text: `class` puts the class word where the concept is ("a S* dog on the beach" -> "a dog on the beach");
    `omit` drops the placeholder (Textual Inversion's `target_text.replace("*", "")`); `placeholder` leaves it
    as "*" (BaTex's CLIPScore)."""

    text: str = "class"
    scale: float = 1.0
    floor: bool = False

    def text_for(self, template: str, class_word: str) -> str:
        if self.text == "class":
            return template.format(class_word)
        if self.text == "omit":
            return " ".join(template.format("").split())
        if self.text == "placeholder":
            return template.format("*")
        raise ValueError(f"unknown CLIP-T text rule {self.text!r}; choose class, omit or placeholder")

    def score(self, cosine):
        """`scale` x cosine, each floored at 0 first with `floor` (CLIPScore's w x max(cos, 0), w = 2.5)."""
        return self.scale * (cosine.clamp_min(0) if self.floor else cosine)

    def describe(self) -> str:
        value = "max(cos, 0)" if self.floor else "cos"
        text = {"class": "class word for S*", "omit": "S* removed", "placeholder": "S* left as *"}[self.text]
        return f"{'' if self.scale == 1 else f'{self.scale:g} x '}{value}, text with {text}"


@dataclass(frozen=True)
class Protocol:
    """One paper's evaluation. `sampling` None: each method with its own (`METHOD_SAMPLING`)."""

    name: str
    paper: str
    prompts: str  # "dreambooth" | "composition"
    seeds: int
    sampling: Sampling | None
    metrics: tuple[str, ...]
    elite_preset: str | None = None  # "paper": lambda by prompt kind
    append_class_word: bool = False
    spatial_rows: bool = False
    spatial_sampling: Sampling | None = None  # the "+ spatial" rows' sampler (None: the row's own)
    overfitting: bool = False  # Fisher + W2 on non-customised and class-word prompts
    text_alignment: TextAlignment = TextAlignment()
    reference_photos: str = "all"  # "all" the concept's photos, or "dreambench" (`DREAMBENCH_REFERENCE_PHOTO`)
    noise_seed: int | None = None  # None: image of seed s from seed s; else image k from the k-th draw of this seed
    dino_preprocessing: str = "processor"  # "processor" (the model's own) or "dreambench" (Resize 256 + CenterCrop)

    def sampling_for(self, method: str) -> Sampling:
        if self.sampling is not None:
            return self.sampling
        return METHOD_SAMPLING.get(method, BASE_SAMPLING)


ELITE_PROTOCOL = Protocol(
    "elite",
    "ELITE (Wei et al., ICCV 2023)",
    "dreambooth",
    5,
    None,
    ("clip_t", "clip_i", "dino_i"),
    elite_preset="paper",
)
COMPOSITIONAL_PROTOCOL = Protocol(
    "compositional",
    "Compositional Inversion (Zhang et al., AAAI 2024), Table 1",
    "composition",
    10,
    COMPOSITIONAL_SAMPLING,
    ("clip_t", "coi_likelihood", "clip_i"),
    append_class_word=True,
    spatial_rows=True,
    spatial_sampling=COMPOSITIONAL_SPATIAL_SAMPLING,
    text_alignment=TextAlignment("class", scale=2.5),
    noise_seed=8888,
)
INFUSION_PROTOCOL = Protocol(
    "infusion",
    "Infusion (Zeng et al., 2024)",
    "dreambooth",
    5,
    None,
    ("clip_t", "clip_i", "dino_i", "fisher_generic", "fisher_class", "w2_generic", "w2_concept"),
    overfitting=True,
)
TEXTUAL_INVERSION_PROTOCOL = Protocol(
    "textual_inversion",
    "Textual Inversion (Gal et al., ICLR 2023)",
    "textual_inversion",
    64,
    TEXTUAL_INVERSION_SAMPLING,
    ("clip_t", "clip_i"),
    text_alignment=TextAlignment("omit"),
)
BATEX_PROTOCOL = Protocol(
    "batex",
    "BaTex (Du et al.)",
    "batex",
    64,
    BASE_SAMPLING,
    ("clip_t", "clip_i"),
    text_alignment=TextAlignment("placeholder", scale=2.5, floor=True),
)
DREAMBENCH_PROTOCOL = Protocol(
    "dreambench",
    "DreamBench (Ruiz et al., CVPR 2023) as the zero-shot papers report it",
    "dreambooth",
    4,
    None,
    ("dino_i", "clip_i", "clip_t"),
    reference_photos="dreambench",
    dino_preprocessing="dreambench",
)
PROTOCOL_TABLE = {
    p.name: p
    for p in (
        ELITE_PROTOCOL,
        COMPOSITIONAL_PROTOCOL,
        INFUSION_PROTOCOL,
        TEXTUAL_INVERSION_PROTOCOL,
        BATEX_PROTOCOL,
        DREAMBENCH_PROTOCOL,
    )
}


def protocols_for(name: str) -> list[Protocol]:
    """One protocol by name, or `all`: elite, compositional and infusion, in that order."""
    if name == "all":
        return [PROTOCOL_TABLE[n] for n in ALL_PROTOCOLS]
    if name not in PROTOCOL_TABLE:
        raise ValueError(f"unknown protocol {name!r}; choose among {', '.join(PROTOCOLS)}, all (or custom)")
    return [PROTOCOL_TABLE[name]]
