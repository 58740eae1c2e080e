"""Automatic object masks for concept photos: text-prompted segmentation through transformers.

ELITE's local branch reads the object's patches through a mask; users rarely have one. CLIPSeg
("Image Segmentation Using Text and Image Prompts", Lüddecke and Ecker, CVPR 2022) segments what a
word names, which is how the Infusion authors made their concept masks too (prompted with the class
word). The model is `CIDAS/clipseg-rd64-refined` by default (any CLIPSeg folder or Hub id loads);
its 352 px map is resized to the photo and thresholded, so the mask is a plain 0/255 image that is
saved beside the outputs and read by the same code as a hand-made one.

    masker = AutoMasker.from_pretrained()                  # or a local folder
    mask = masker(Image.open("dog.jpg"), "dog")            # PIL "L", 0/255, the photo's size
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .inputs import ConceptInputError, ConceptInputWarning, ImageLike, _has_alpha
from .loading import ModelLoadError
from .pictures import save_image_atomic

DEFAULT_MASK_MODEL = "CIDAS/clipseg-rd64-refined"
DEFAULT_MASK_PROMPT = "the main object"  # when no class word is known
DEFAULT_MASK_THRESHOLD = 0.4  # on CLIPSeg's sigmoid; its authors' demos use 0.3-0.5


class AutoMasker:
    """CLIPSeg prompted with a word: photo -> object mask (PIL "L", 0/255, the photo's size)."""

    def __init__(self, model, processor, threshold: float = DEFAULT_MASK_THRESHOLD, source: str = ""):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {threshold}")
        self.model, self.processor, self.threshold, self.source = model.eval(), processor, float(threshold), source

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MASK_MODEL,
        device: str | torch.device = "cpu",
        threshold: float = DEFAULT_MASK_THRESHOLD,
        revision: str | None = None,
    ) -> AutoMasker:
        """Load a CLIPSeg folder or Hub id; a ModelLoadError names it when it cannot be read."""
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        try:
            processor = CLIPSegProcessor.from_pretrained(str(name_or_path), revision=revision)
            model = CLIPSegForImageSegmentation.from_pretrained(str(name_or_path), revision=revision)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load the mask model {name_or_path}: {err}") from err
        return cls(model.to(device), processor, threshold, source=str(name_or_path))

    @torch.no_grad()
    def probabilities(self, image: Image.Image, prompt: str) -> np.ndarray:
        """CLIPSeg's object probability per pixel of `image` (`[H, W]` float in [0, 1])."""
        rgb = image.convert("RGB")
        inputs = self.processor(text=[prompt], images=[rgb], padding="max_length", return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        logits = self.model(**inputs).logits
        logits = logits.reshape(1, 1, *logits.shape[-2:]).float()  # CLIPSeg drops the batch axis for one image
        probs = torch.nn.functional.interpolate(
            torch.sigmoid(logits), size=(rgb.height, rgb.width), mode="bilinear", align_corners=False
        )
        return probs[0, 0].cpu().numpy()

    def __call__(self, image: ImageLike, prompt: str = DEFAULT_MASK_PROMPT) -> Image.Image:
        photo = image if isinstance(image, Image.Image) else Image.open(image)
        probs = self.probabilities(photo, prompt)
        mask = probs > self.threshold
        if not mask.any():  # nothing above the threshold: keep the most likely tenth rather than nothing
            warnings.warn(
                f"automatic mask of {_name(image)} for {prompt!r}: no pixel above {self.threshold}; "
                "keeping the most likely 10% of the photo",
                ConceptInputWarning,
                stacklevel=2,
            )
            mask = probs >= np.quantile(probs, 0.9)
        return Image.fromarray((mask * 255).astype(np.uint8), mode="L")


def _read(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def _name(image: ImageLike) -> str:
    return str(image) if isinstance(image, (str, Path)) else "the photo"


def has_own_alpha(photo: ImageLike) -> bool:
    """A cut-out with transparency carries its mask (`load_concept_image` reads it): no automatic one."""
    try:
        if isinstance(photo, Image.Image):
            return _has_alpha(photo)
        with Image.open(photo) as image:
            return _has_alpha(image)
    except (OSError, ValueError, AttributeError):
        return False  # unreadable here: load_concept_image names the problem


def fill_masks(pairs: list[tuple], masker: AutoMasker, prompt: str, out_dir: str | Path, stem: str) -> list[tuple]:
    """(photo, mask) pairs with every missing mask made by `masker` and saved as
    `out_dir/<stem>-<k>.png` (the mask used, beside the outputs); given masks are kept."""
    filled = []
    for k, (photo, mask) in enumerate(pairs):
        if mask is None:
            if has_own_alpha(photo):  # an RGBA cut-out brings its own mask
                filled.append((photo, mask))
                continue
            try:
                made = masker(photo, prompt)
            except (OSError, ValueError) as err:
                raise ConceptInputError(f"automatic mask of {_name(photo)}: {err}") from err
            mask = Path(out_dir) / f"{stem}-{k}.png"
            save_image_atomic(made, mask)
        filled.append((photo, mask))
    return filled


def auto_masker_or_none(model: str, device, required: bool) -> AutoMasker | None:
    """The masker, or None with a warning when it cannot load and was not asked for explicitly
    (e.g. offline without the model cached): the photo is then used whole, as before."""
    try:
        return AutoMasker.from_pretrained(model, device=device)
    except ModelLoadError as err:
        if required:
            raise
        warnings.warn(
            f"{err}; photos without a mask are used whole (give --mask, or --no-auto-mask to silence this)",
            ConceptInputWarning,
            stacklevel=2,
        )
        return None
