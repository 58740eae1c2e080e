"""What each paper's evaluation does, as data `inference.evaluate` runs (`protocol=elite|compositional|infusion|all`).

Every protocol fixes the prompts, the images per prompt, the sampler and guidance of each method, and
the metrics of its paper's table; `key=value` settings still override the quick knobs (`num_prompts`,
`seeds`, `num_inference_steps`, ...) for CPU runs.

- elite: "ELITE: Encoding Visual Concepts into Textual Embeddings for Customized Text-to-Image
  Generation" (Wei et al., ICCV 2023): DreamBooth's editing prompts, 5 images each, CLIP-T / CLIP-I /
  DINO-I; ELITE sampled with 100 LMS steps, guidance 5, lambda 0.8 for "a photo of S*" and 0.6 for
  editing prompts (the `paper` preset).
- compositional: "Compositional Inversion for Stable Diffusion Models" (Zhang et al., AAAI 2024),
  Table 1: each concept "and" each of COCO's 80 classes ("a photo of S* cat and a dog"), 10 images per
  prompt, 50 DDPM steps and guidance 7.5 for every method (the paper's rule), the learned word followed
  by its class word; rows Textual Inversion, + semantic (trained with anchors), + spatial (location-MLP
  boxes steering the first steps), + both; CLIP-T with S* replaced by the class word, CoI likelihood
  (DETR over COCO's classes finds the other object), CLIP-I.
- infusion: "Infusion: Preventing Customized Text-to-Image Diffusion from Overfitting" (Zeng et al.,
  2024): Infusion sampled with DDIM 50 and guidance 8; the latent Fisher divergence (noise predictions of
  the base vs the customised model, uniform timesteps) on non-customised prompts and on prompts with
  the class word, and the latent 2-Wasserstein distance between Gaussians fitted to base and customised
  images, for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("elite", "compositional", "infusion")


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


# Each method with its own paper's sampling. Textual Inversion and BaTex were run through diffusers'
# StableDiffusionPipeline, whose SD v1 defaults are PNDM, 50 steps, guidance 7.5.
METHOD_SAMPLING = {
    "elite": Sampling("lms", 100, 5.0, "ELITE: 100 LMS steps, guidance 5"),
    "textual_inversion": Sampling("pndm", 50, 7.5, "diffusers' StableDiffusionPipeline defaults"),
    "batex": Sampling("pndm", 50, 7.5, "diffusers' StableDiffusionPipeline defaults"),
    "infusion": Sampling("ddim", 50, 8.0, "Infusion: DDIM 50 steps, guidance 8"),
}
BASE_SAMPLING = Sampling("pndm", 50, 7.5, "diffusers' StableDiffusionPipeline defaults")
CUSTOM_SAMPLING = Sampling("ddim", 50, 7.5, "inference.evaluate's defaults")
COMPOSITIONAL_SAMPLING = Sampling("ddpm", 50, 7.5, "Compositional Inversion: 50 DDPM steps, scale 7.5 for all methods")


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
    overfitting: bool = False  # Fisher + W2 on non-customised and class-word prompts

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
PROTOCOL_TABLE = {p.name: p for p in (ELITE_PROTOCOL, COMPOSITIONAL_PROTOCOL, INFUSION_PROTOCOL)}


def protocols_for(name: str) -> list[Protocol]:
    """`elite`, `compositional`, `infusion` or `all` (the three, in that order)."""
    if name == "all":
        return [PROTOCOL_TABLE[n] for n in PROTOCOLS]
    if name not in PROTOCOL_TABLE:
        raise ValueError(f"unknown protocol {name!r}; choose among {', '.join(PROTOCOLS)}, all (or custom)")
    return [PROTOCOL_TABLE[name]]
