"""Location pairs from generated images.

`python -m data_prep pairs generate --pipeline ID --detector ID --vocab FILE --out DIR`:

The recipe for location-MLP data of "Compositional Inversion for Stable Diffusion Models" (Zhang et al., AAAI 2024,
"Spatial Inversion"):
combine frequent nouns (COCO's 80 classes) in prompts, generate images with Stable Diffusion, detect
the nouns with DETR, and keep the boxes as ground truth. Here:

- work items are (noun pair, image index) for every unordered pair of the vocabulary, in vocabulary
  order, `--images-per-pair` each; every item has its own seed (derived from `--seed` and its key),
  so an image does not depend on batching, workers or nodes;
- images are generated in batches of `--batch-size` prompts with the diffusers pipeline (each with
  its own `torch.Generator`) and detected in the same batches with a transformers object detector;
- an image is kept when both nouns are found: for each noun, the detector query with the highest
  probability for that noun's label; kept when it is at least `--threshold` (with a threshold above
  0.5 a query can vouch for one label only). Rejected images are counted as `not_detected` in the
  manifest (`skipped`), never silently dropped;
- a kept sample is `KEY.jpg` + `KEY.json` (the pair contract of `encoders.common.shards`, `source` "generated", plus
  the prompt, seed, scores and the models used), written through the generic shard writer: whole
  shards are resumable, byte-identical on a rerun, split over `--workers` and `--node-rank/--num-nodes`.

Models load lazily once per process, so a worker pool pickles paths, not pipelines.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from encoders.common.shards import PAIR_SCHEMA, check_pair_sample

from .records import safe_key_part
from .writer import ShardJob, Skip, write_shards

logger = logging.getLogger("data_prep")

DEFAULT_TEMPLATE = "a photo of {a} and {b}"


def with_article(noun: str) -> str:
    """'a dog', 'an apple' (the template's {a}/{b}); nouns that are already plural-like are left alone."""
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate: which nouns, which prompt, which seed, and its position in the plan."""

    key: str
    words: tuple[str, str]
    prompt: str
    seed: int
    position: int

    def describe(self) -> str:
        return f"{self.key} ({self.prompt!r}, seed {self.seed})"


def item_seed(base_seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and the item key (independent of order, batching and workers)."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_items(
    vocabulary: Sequence[str],
    images_per_pair: int,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    max_pairs: int | None = None,
) -> list[GenerationItem]:
    """Every unordered noun pair (vocabulary order) x `images_per_pair`, each with its prompt and seed."""
    if images_per_pair < 1:
        raise ValueError(f"images_per_pair must be >= 1, got {images_per_pair}")
    if "{a}" not in template or "{b}" not in template:
        raise ValueError(f"the prompt template must contain {{a}} and {{b}}, got {template!r}")
    pairs = list(combinations(vocabulary, 2))
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    items = []
    for a, b in pairs:
        for k in range(images_per_pair):
            key = f"gen_{safe_key_part(a)}__{safe_key_part(b)}__{k:04d}".replace(" ", "_")
            prompt = template.format(a=with_article(a), b=with_article(b))
            items.append(GenerationItem(key, (a, b), prompt, item_seed(seed, key), len(items)))
    return items


def match_labels(vocabulary: Sequence[str], id2label: dict) -> dict[str, int]:
    """Vocabulary noun -> detector label id (case-insensitive); an error lists the nouns it cannot detect."""
    by_name: dict[str, int] = {}
    for index, name in id2label.items():
        by_name.setdefault(str(name).strip().lower(), int(index))
    missing = [w for w in vocabulary if w.strip().lower() not in by_name]
    if missing:
        known = ", ".join(sorted(n for n in by_name if n != "n/a")[:20])
        raise ValueError(
            f"the detector has no label for: {', '.join(missing)}. Its labels include: {known} ... "
            "(use a vocabulary of the detector's classes)"
        )
    return {w: by_name[w.strip().lower()] for w in vocabulary}


def best_detections(logits, pred_boxes, label_ids: Sequence[int], no_object_class: bool = True):
    """Per image and label: the highest probability over the detector's queries and that query's box.

    `logits` `[B, Q, C+1]` (DETR-style: softmax with a trailing no-object class) or, with
    `no_object_class=False`, `[B, Q, C]` scored by per-class sigmoid (e.g. Deformable DETR);
    `pred_boxes` `[B, Q, 4]` (cx, cy, w, h in 0..1). Returns scores `[B, L]` and xyxy boxes
    `[B, L, 4]` clipped to 0..1.
    """
    import torch

    num_labels = logits.shape[-1]
    if label_ids and max(label_ids) >= num_labels:
        raise ValueError(f"label id {max(label_ids)} is outside the detector's {num_labels} outputs")
    probs = logits.float().softmax(-1)[..., :-1] if no_object_class else logits.float().sigmoid()
    index = torch.as_tensor(list(label_ids), device=logits.device)
    scores, query = probs[..., index].max(dim=1)  # [B, L]
    boxes = pred_boxes.float().gather(1, query[..., None].expand(-1, -1, 4))  # [B, L, 4]
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0.0, 1.0)
    return scores, xyxy


@dataclass
class GenerationSettings:
    pipeline: str
    detector: str
    detector_revision: str | None = None
    threshold: float = 0.7
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    jpeg_quality: int = 95

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_MODELS: dict = {}  # per process: (pipeline, detector, device, dtype) -> (pipe, detector, processor)


def _load_models(settings: GenerationSettings):
    from encoders.common.device import dtype_kwargs, resolve_device, resolve_dtype

    device = resolve_device(settings.device or "auto")
    dtype = resolve_dtype(settings.dtype, device)
    cache_key = (settings.pipeline, settings.detector, settings.detector_revision, str(device), str(dtype))
    if cache_key not in _MODELS:
        from diffusers import DiffusionPipeline
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        pipe = DiffusionPipeline.from_pretrained(settings.pipeline, safety_checker=None, **dtype_kwargs(dtype))
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        revision = {"revision": settings.detector_revision} if settings.detector_revision else {}
        detector = AutoModelForObjectDetection.from_pretrained(settings.detector, **revision).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(settings.detector, **revision)
        _MODELS.clear()
        _MODELS[cache_key] = (pipe, detector, processor, device)
    return _MODELS[cache_key]


class PairGenerator:
    """The writer's `process`: generates and detects a batch on the first request for its first item,
    then serves the batch's samples (or `Skip`s) from a cache. Batches never cross a shard boundary,
    so a resumed shard is batched exactly like the first run."""

    def __init__(
        self, items: Sequence[GenerationItem], settings: GenerationSettings, shard_size: int, label_ids: dict[str, int]
    ):
        self.items = list(items)
        self.settings = settings
        self.shard_size = shard_size
        self.label_ids = label_ids
        self._cache: dict[str, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __call__(self, item: GenerationItem):
        if item.key not in self._cache:
            self._cache.clear()
            self._run_batch(item.position)
        result = self._cache.pop(item.key)
        if isinstance(result, Exception):
            raise result
        return result

    def _run_batch(self, position: int) -> None:
        shard_end = (position // self.shard_size + 1) * self.shard_size
        batch = self.items[position : min(position + self.settings.batch_size, shard_end, len(self.items))]
        try:
            samples = self.generate_batch(batch)
        except Exception as err:  # the whole batch failed (e.g. out of memory): count each item
            samples = [err] * len(batch)
        self._cache.update({it.key: s for it, s in zip(batch, samples)})

    def generate_batch(self, batch: Sequence[GenerationItem]) -> list:
        import torch

        pipe, detector, processor, device = _load_models(self.settings)
        s = self.settings
        generators = [torch.Generator(device=device).manual_seed(it.seed) for it in batch]
        images = pipe(
            prompt=[it.prompt for it in batch],
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            generator=generators,
            output_type="pil",
        ).images
        with torch.no_grad():
            inputs = processor(images=images, return_tensors="pt").to(device)
            outputs = detector(**inputs)
        logits = outputs.logits
        no_object = logits.shape[-1] == len(detector.config.id2label) + 1  # sigmoid-scored detectors have none
        results = []
        for row, (it, image) in enumerate(zip(batch, images)):
            ids = [self.label_ids[w] for w in it.words]
            scores, boxes = best_detections(logits[row : row + 1], outputs.pred_boxes[row : row + 1], ids, no_object)
            scores, boxes = scores[0].tolist(), boxes[0].tolist()
            if min(scores) < s.threshold:
                missing = [f"{w} {p:.3f}" for w, p in zip(it.words, scores) if p < s.threshold]
                results.append(Skip("not_detected", f"{it.key}: below threshold {s.threshold}: {', '.join(missing)}"))
                continue
            if any(b[2] <= b[0] or b[3] <= b[1] for b in boxes):
                results.append(Skip("degenerate_box", f"{it.key}: detected boxes {boxes}"))
                continue
            meta = {
                "schema": PAIR_SCHEMA,
                "source": "generated",
                "words": list(it.words),
                "boxes": boxes,
                "scores": scores,
                "prompt": it.prompt,
                "seed": it.seed,
                "image_size": list(image.size),
                "pipeline": s.pipeline,
                "detector": s.detector,
                "threshold": s.threshold,
            }
            check_pair_sample(meta, it.key)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=s.jpeg_quality)
            results.append(
                {"__key__": it.key, "jpg": buffer.getvalue(), "json": json.dumps(meta, sort_keys=True).encode()}
            )
        return results


def write_generated_pairs(
    vocabulary: Sequence[str],
    settings: GenerationSettings,
    job: ShardJob,
    images_per_pair: int = 4,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    max_pairs: int | None = None,
) -> dict:
    """Plan the items, check the detector knows every noun, and write this node's shards."""
    from transformers import AutoConfig

    if not 0.0 <= settings.threshold <= 1.0:
        raise ValueError(f"threshold must be in 0..1, got {settings.threshold}")
    if settings.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {settings.batch_size}")
    revision = {"revision": settings.detector_revision} if settings.detector_revision else {}
    detector_config = AutoConfig.from_pretrained(settings.detector, **revision)
    label_ids = match_labels(vocabulary, detector_config.id2label)
    items = plan_items(vocabulary, images_per_pair, seed, template, max_pairs)
    if not items:
        raise ValueError("the vocabulary gives no noun pairs (it needs at least two words)")
    process = PairGenerator(items, settings, job.shard_size, label_ids)
    run_settings = {
        "kind": "pairs-generate",
        **settings.to_dict(),
        "images_per_pair": images_per_pair,
        "seed": seed,
        "template": template,
        "vocabulary": list(vocabulary),
    }
    run_settings.pop("device")  # where it ran does not change what it writes (up to kernels)
    return write_shards(
        items,
        process,
        job,
        settings=run_settings,
        source={
            "vocabulary_size": len(vocabulary),
            "pairs": len(items) // images_per_pair,
            "images_planned": len(items),
        },
    )
