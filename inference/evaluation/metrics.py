"""Evaluation metrics of the personalization papers, as plain functions plus thin model wrappers.

The functions take embeddings, detections or tensors and return numbers, so each has a known value on
constructed inputs (identical images give CLIP-I 1, identical models give a latent Fisher divergence
of 0). The wrappers turn PIL images and prompts into those inputs with `from_pretrained` models whose
ids are configurable; the defaults are the models the papers use:

- CLIP-T / CLIP-I: CLIP ViT-B/32 (`openai/clip-vit-base-patch32`), as in DreamBooth, whose protocol
  ELITE and Infusion follow. CLIP-T scores the image against the prompt with S* replaced by the
  class word; CLIP-I is the mean pairwise cosine between generated and concept images.
- DINO-I: DINO ViT-S/16 (`facebook/dino-vits16`) CLS embeddings, mean pairwise cosine; the images
  through the model's processor, or DreamBench's Resize(256, bicubic) + CenterCrop(224) + ImageNet
  normalisation (`dreambench_pixels`).
- CoI likelihood (compositional inversion): the fraction of images in which a COCO-trained DETR
  (ResNet-50, score above 0.8, as its `utils/clip_eval.py`) finds the *other* object of the prompt
  ("S* cat and dog": is there a dog?).
- Infusion's overfitting measures: the latent Fisher divergence (half the mean squared difference of
  the two models' noise predictions on non-customized prompts) and the 2-Wasserstein distance between
  Gaussians fitted to the latents of two sets of generations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_DETECTOR_MODEL = "facebook/detr-resnet-50"  # Compositional Inversion's utils/clip_eval.py
DEFAULT_DETECTION_THRESHOLD = 0.8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# Plain functions
# --------------------------------------------------------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [M, D] -> [N, M] cosine similarities (computed in float32)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_matrix needs [N, D] and [M, D] embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def mean_pairwise_similarity(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Average cosine over every (generated, reference) pair: CLIP-I and DINO-I on embeddings."""
    if len(generated) == 0 or len(references) == 0:
        raise ValueError("mean_pairwise_similarity needs at least one generated and one reference embedding")
    return cosine_matrix(generated, references).mean().item()


def paired_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of `image_embeds` with row i of `text_embeds`: per-image CLIP-T."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"paired_similarity needs equal shapes, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


def replace_placeholder(prompt: str, placeholder: str, class_word: str) -> str:
    """The prompt CLIP-T scores against: S* replaced by the class word ("a S* dog" -> "a dog").

    A placeholder already followed by the class word ("S* dog", DreamBooth style) collapses to one
    class word, so the text never says "dog dog".
    """
    if not placeholder:
        return prompt
    pattern = re.escape(placeholder) + r"(\s+" + re.escape(class_word) + r"\b)?"
    return re.sub(pattern, class_word, prompt)


def coi_likelihood(detected_labels: Sequence[Iterable[str]], targets: Sequence[str]) -> float:
    """Fraction of images whose detections include that image's other object (CoI likelihood).

    `detected_labels[i]` holds the label names the detector found in image i; `targets[i]` is the name
    of the object the prompt asked for next to the concept. Names compare case-insensitively.
    """
    if len(detected_labels) != len(targets):
        raise ValueError(f"coi_likelihood: {len(detected_labels)} detection lists for {len(targets)} targets")
    if not targets:
        raise ValueError("coi_likelihood needs at least one image")
    hits = sum(t.strip().lower() in {d.strip().lower() for d in found} for found, t in zip(detected_labels, targets))
    return hits / len(targets)


def latent_fisher_divergence(eps_base: torch.Tensor, eps_custom: torch.Tensor) -> float:
    """Infusion's latent Fisher divergence: 1/2 E ||eps_theta(z_t, t, c) - eps_theta'(z_t, t, c)||^2.

    Both tensors are noise predictions of the original and the customised model for the same noisy
    latents, timesteps and non-customised prompts, batch first; the squared norm sums over each
    sample's latent, the expectation averages over the batch.
    """
    if eps_base.shape != eps_custom.shape:
        raise ValueError(f"noise predictions differ in shape: {tuple(eps_base.shape)} vs {tuple(eps_custom.shape)}")
    diff = (eps_base.float() - eps_custom.float()).flatten(1)
    return 0.5 * diff.pow(2).sum(dim=1).mean().item()


def gaussian_w2(samples_a: torch.Tensor, samples_b: torch.Tensor) -> float:
    """2-Wasserstein distance between Gaussians fitted to two sample sets ([N, ...] and [M, ...]).

    W2^2 = ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2). With C_a = A A^T and
    C_b = B B^T (A = centred samples / sqrt(N - 1)), the last trace is the nuclear norm of A^T B, so
    the distance is exact without forming a D x D covariance: latents of 4 x 64 x 64 stay cheap.
    """
    a = samples_a.double().flatten(1)
    b = samples_b.double().flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("gaussian_w2 needs at least two samples per set to fit a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    fa = (a - mu_a) / math.sqrt(len(a) - 1)
    fb = (b - mu_b) / math.sqrt(len(b) - 1)
    cross = torch.linalg.matrix_norm(fa @ fb.T, ord="nuc")
    w2_sq = (mu_a - mu_b).pow(2).sum() + fa.pow(2).sum() + fb.pow(2).sum() - 2 * cross
    return math.sqrt(max(w2_sq.item(), 0.0))


def gaussian_w2_from_moments(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """The same distance from means and (small) covariance matrices, via symmetric square roots."""

    def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    cov_a, cov_b = cov_a.double(), cov_b.double()
    root_a = sqrtm_psd(cov_a)
    middle = sqrtm_psd(root_a @ cov_b @ root_a)
    w2_sq = (mu_a.double() - mu_b.double()).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * middle)
    return math.sqrt(max(w2_sq.item(), 0.0))


# --------------------------------------------------------------------------------------------------
# Model wrappers
# --------------------------------------------------------------------------------------------------


def _as_rgb_list(images) -> list:
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    return [im.convert("RGB") for im in images]


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output with the projected `pooler_output`; older ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP image and text embeddings for CLIP-T and CLIP-I (`from_pretrained` id or folder)."""

    def __init__(
        self, model_name_or_path: str = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_name_or_path).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        return _embed_images(
            self,
            images,
            self.model.config.projection_dim,
            lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)),
        )

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            out.append(_features(self.model.get_text_features(**tok)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.projection_dim)

    def clip_i(self, generated, references) -> float:
        """Mean pairwise image-image cosine between generated and concept images."""
        return mean_pairwise_similarity(self.image_embeds(generated), self.image_embeds(references))

    def clip_t(self, generated, prompts: Sequence[str]) -> float:
        """Mean image-text cosine; `prompts[i]` (placeholder already replaced) describes `generated[i]`."""
        return paired_similarity(self.image_embeds(generated), self.text_embeds(prompts)).mean().item()


def _embed_images(scorer, images, dim: int, embed, to_pixels=None) -> torch.Tensor:
    """`[N, dim]` float32 CPU embeddings of `images`, `scorer.batch_size` at a time through `to_pixels` (default:
    the scorer's processor)."""
    if to_pixels is None:

        def to_pixels(chunk):
            return scorer.processor(images=chunk, return_tensors="pt")["pixel_values"]

    images = _as_rgb_list(images)
    out = []
    for i in range(0, len(images), scorer.batch_size):
        out.append(embed(to_pixels(images[i : i + scorer.batch_size]).to(scorer.device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, dim)


def dreambench_pixels(images, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """DreamBench's DINO view, `[N, 3, crop, crop]`: shorter side to `resize` (bicubic, the longer one keeping the
    aspect, truncated as torchvision's Resize), the centre `crop` x `crop` (offsets rounded as its CenterCrop), scaled
    to 0..1 and normalised by ImageNet's mean and std; not a squash to 224."""
    from PIL import Image

    out = []
    for image in _as_rgb_list(images):
        w, h = image.size
        short, long = min(w, h), max(w, h)
        size_long = int(resize * long / short)
        size = (resize, size_long) if w <= h else (size_long, resize)
        image = image.resize(size, Image.BICUBIC)
        left, top = round((image.width - crop) / 2.0), round((image.height - crop) / 2.0)
        array = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
        array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
        out.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(out)


class DinoScorer:
    """DINO ViT CLS embeddings for DINO-I; `preprocessing`: "processor" (the model's image processor) or
    "dreambench" (`dreambench_pixels`)."""

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_DINO_MODEL,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        preprocessing: str = "processor",
    ):
        from transformers import AutoImageProcessor, ViTModel

        if preprocessing not in ("processor", "dreambench"):
            raise ValueError(f"DINO preprocessing must be processor or dreambench, got {preprocessing!r}")
        self.model = ViTModel.from_pretrained(model_name_or_path, add_pooling_layer=False).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.preprocessing = preprocessing

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        def embed(pixels):
            return self.model(pixel_values=pixels).last_hidden_state[:, 0]

        to_pixels = None  # the model's processor
        if self.preprocessing == "dreambench":
            crop = int(self.model.config.image_size)  # 224 for ViT-S/16; a smaller model keeps DreamBench's 256 : 224
            resize = round(crop * 256 / 224)

            def to_pixels(chunk):
                return dreambench_pixels(chunk, resize, crop)

        return _embed_images(self, images, self.model.config.hidden_size, embed, to_pixels)

    def dino_i(self, generated, references) -> float:
        return mean_pairwise_similarity(self.image_embeds(generated), self.image_embeds(references))


class ObjectDetector:
    """A transformers object detector (DETR by default) that returns the label names it finds per image."""

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_DETECTOR_MODEL,
        device: str | torch.device = "cpu",
        threshold: float = DEFAULT_DETECTION_THRESHOLD,
        batch_size: int = 8,
        revision: str | None = None,
    ):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        kwargs = {"revision": revision} if revision else {}
        try:
            self.model = AutoModelForObjectDetection.from_pretrained(model_name_or_path, **kwargs).to(device).eval()
        except ImportError as err:  # the Hub's DETR configs name a timm backbone
            raise ImportError(
                f"the detector {model_name_or_path} needs a package that is not installed ({err}); for DETR either "
                "`pip install timm` or use a revision with a transformers backbone (detector_revision=no_timm, "
                "where the repository has that branch)"
            ) from err
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path, **kwargs)
        self.device = torch.device(device)
        self.threshold = threshold
        self.batch_size = batch_size

    @property
    def label_names(self) -> list[str]:
        """The detector's class names (COCO's for DETR), without the "N/A" filler ids."""
        names = self.model.config.id2label.values()
        return [n for n in names if n and n.upper() != "N/A"]

    @torch.no_grad()
    def detect(self, images) -> list[set[str]]:
        images = _as_rgb_list(images)
        found: list[set[str]] = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            sizes = torch.tensor([[im.height, im.width] for im in chunk])
            results = self.processor.post_process_object_detection(
                outputs, threshold=self.threshold, target_sizes=sizes
            )
            id2label = self.model.config.id2label
            for res in results:
                found.append({id2label[int(k)] for k in res["labels"]})
        return found

    def coi_likelihood(self, images, targets: Sequence[str]) -> float:
        return coi_likelihood(self.detect(images), targets)


class PresenceClassifier:
    """A multi-label image classifier used where the protocols ask a detector "is this object there?" (CoI).

    Its labels may be grouped as `group:name` (the miniature world's classifier: `shape:heart`, `colour:red`); an
    image holds every name whose sigmoid is above `threshold`. It stands in for DETR on data DETR was not trained
    for, such as the world's shapes."""

    def __init__(self, model_name_or_path: str, device: str | torch.device = "cpu", threshold: float = 0.5):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.model = AutoModelForImageClassification.from_pretrained(model_name_or_path).to(device).eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        except OSError:  # a folder without preprocessor_config.json: the model's own size, pixels in [-1, 1]
            self.processor = None
        self.device = torch.device(device)
        self.threshold = threshold

    @property
    def label_names(self) -> list[str]:
        return sorted({name.split(":", 1)[-1] for name in self.model.config.id2label.values()})

    @torch.no_grad()
    def probabilities(self, images) -> list[dict[str, float]]:
        """Per image, every label's sigmoid under its full name (`colour:green` and `background:green` apart)."""
        images = _as_rgb_list(images)
        if self.processor is not None:
            pixels = self.processor(images=images, return_tensors="pt").pixel_values
        else:
            size = int(getattr(self.model.config, "image_size", 0) or images[0].width)
            arrays = [np.asarray(im.resize((size, size)), dtype=np.float32) for im in images]
            pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        probs = torch.sigmoid(self.model(pixel_values=pixels.to(self.device)).logits.float()).cpu()
        names = [self.model.config.id2label[i] for i in range(probs.shape[1])]
        return [dict(zip(names, row.tolist())) for row in probs]

    def detect(self, images) -> list[set[str]]:
        return [
            {name.split(":", 1)[-1] for name, p in probs.items() if p > self.threshold}
            for probs in self.probabilities(images)
        ]

    def coi_likelihood(self, images, targets: Sequence[str]) -> float:
        return coi_likelihood(self.detect(images), targets)


def load_presence_model(model_name_or_path: str, device, threshold: float, revision: str | None = None):
    """The CoI model: an object detector (DETR, ...), or a multi-label image classifier (`PresenceClassifier`, e.g.
    the miniature world's), told apart by the architecture its config names."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name_or_path, **({"revision": revision} if revision else {}))
    if any(a.endswith("ForImageClassification") for a in (config.architectures or [])):
        return PresenceClassifier(model_name_or_path, device=device, threshold=threshold)
    return ObjectDetector(model_name_or_path, device=device, threshold=threshold, revision=revision)
