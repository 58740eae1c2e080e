"""Scoring a row's images: CLIP-T against the prompt as the protocol's text rule words it, CLIP-I and DINO-I
against the concept's reference photos, and whether the detector finds the other object (CoI)."""

from __future__ import annotations

from PIL import Image

from .config import EvalConfig
from .metrics import (
    ClipScorer,
    DinoScorer,
    cosine_matrix,
    load_presence_model,
    paired_similarity,
)
from .plan import ConceptFolder, Row
from .protocols import DREAMBENCH_REFERENCE_PHOTO, Protocol, TextAlignment


class Scorer:
    """The scoring models (CLIP for CLIP-T / CLIP-I, DINO for DINO-I, the detector for CoI), each loaded on first
    use, and the per-image scores of a row, by the protocol's rules (text, references, DINO's preprocessing)."""

    def __init__(self, config: EvalConfig, device, protocol: Protocol | None = None):
        self.config, self.device = config, device
        self._clip = self._dino = self._detector = None
        self.use(protocol)

    def use(self, protocol: Protocol | None) -> None:
        """Score by `protocol`'s rules from now on (the models stay loaded)."""
        self.protocol = protocol
        self.text_alignment = protocol.text_alignment if protocol is not None else TextAlignment()
        self.reference_photos = protocol.reference_photos if protocol is not None else "all"
        preprocessing = protocol.dino_preprocessing if protocol is not None else "processor"
        if self._dino is not None:
            self._dino.preprocessing = preprocessing
        self._dino_preprocessing = preprocessing

    @property
    def clip(self):
        if self._clip is None:
            self._clip = ClipScorer(self.config.clip_model, device=self.device)
        return self._clip

    @property
    def dino(self):
        if self._dino is None:
            self._dino = DinoScorer(self.config.dino_model, device=self.device, preprocessing=self._dino_preprocessing)
        return self._dino

    @property
    def detector(self):
        if self._detector is None:
            self._detector = load_presence_model(
                self.config.detector_model,
                device=self.device,
                threshold=self.config.detection_threshold,
                revision=self.config.detector_revision,
            )
        return self._detector

    def reference_paths(self, concept: ConceptFolder) -> list:
        """The photos the images are compared with: all of the concept's, or DreamBench's one fixed photo
        (`DREAMBENCH_REFERENCE_PHOTO`, else the first by name)."""
        paths = concept.photos
        if not paths:
            raise FileNotFoundError(f"concept folder {concept.photos_dir} has no photos")
        if self.reference_photos == "dreambench":
            return [next((p for p in paths if p.name == DREAMBENCH_REFERENCE_PHOTO), paths[0])]
        return paths

    def references(self, concept: ConceptFolder) -> tuple:
        """(CLIP embeddings, DINO embeddings, first photo) of the concept's reference photos."""
        photos = [Image.open(p).convert("RGB") for p in self.reference_paths(concept)]
        return self.clip.image_embeds(photos), self.dino.image_embeds(photos), photos[0]

    def score(self, row: Row, items, clip_refs, dino_refs) -> list[dict]:
        """Per image: CLIP-T against its prompt worded by the protocol's text rule (prompts for text alignment),
        CLIP-I / DINO-I against the reference photos (prompts about the concept for image alignment), the CoI hit,
        and guidance's record."""
        concept = row.concept
        images = [image for _, _, image, _ in items]
        rule = self.text_alignment
        texts = [
            rule.text_for(spec.template, concept.class_word) if spec.kind != "generic" else spec.template
            for spec, _, _, _ in items
        ]
        clip_images = self.clip.image_embeds(images)
        clip_t = rule.score(paired_similarity(clip_images, self.clip.text_embeds(texts)))
        about = [k for k, (spec, _, _, _) in enumerate(items) if spec.kind != "generic" and spec.image_alignment]
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
                    "clip_t": clip_t[k].item() if spec.text_alignment else None,
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
