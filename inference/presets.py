"""Sampling presets: the settings a paper generated its figures with, by name.

`"paper"` is ELITE's (Wei et al., "ELITE: Encoding Visual Concepts into Textual Embeddings for
Customized Text-to-Image Generation", ICCV 2023; its official `inference_local.py`): the LMS sampler
with Stable Diffusion v1's published noise schedule, 100 steps, classifier-free guidance 5, and
lambda 0.8 for prompts that only describe the concept ("a photo of S*") or 0.6 for prompts that put
it somewhere or change it ("a photo of S* on the beach"). Which of the two a prompt is: with its
placeholders, articles and the words photo / picture / image / of / rendering / close-up taken out,
0.8 when nothing is left, else 0.6. Anything the caller gives explicitly wins over the preset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from diffusers import LMSDiscreteScheduler

# Stable Diffusion v1's published noise schedule, which ELITE's LMS sampler is built with.
SD_V1_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
PRESETS = {"paper": dict(scheduler="lms", num_inference_steps=100, guidance_scale=5.0)}
DESCRIBE_ONLY_SCALE, EDITING_SCALE = 0.8, 0.6
_NEUTRAL_WORDS = {"a", "an", "the", "photo", "picture", "image", "of", "rendering", "close-up", "my"}


def elite_lms_scheduler(base_config=None) -> LMSDiscreteScheduler:
    """ELITE's sampler: LMS with SD v1's published betas and linspace timesteps, whatever the model
    folder's scheduler says; only its prediction type (epsilon / v) is kept."""
    prediction = (base_config or {}).get("prediction_type", "epsilon")
    return LMSDiscreteScheduler(**SD_V1_BETAS, prediction_type=prediction)


def paper_elite_scale(prompt: str, placeholders: Sequence[str]) -> float:
    """Lambda of the paper preset for `prompt`: 0.8 when it only describes the concept, else 0.6."""
    text = prompt.lower()
    for placeholder in placeholders:
        text = text.replace(placeholder.lower(), " ")
    words = [w for w in re.split(r"[\s,.;:!?]+", text) if w]
    return DESCRIBE_ONLY_SCALE if all(w in _NEUTRAL_WORDS for w in words) else EDITING_SCALE


def preset_settings(name: str | None) -> dict:
    """The preset's sampler name, steps and guidance scale (`{}` for None)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
