"""Generating a row's images: through the row's method in `inference.methods`, from the same seeded noise for
every method, saved under `out/images/` and reused on a re-run (an interrupted evaluation resumes)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from encoders.common.files import atomic_write_json

from ..composition import plan_guidance
from ..finetuned import seeded_noise, stream_noise
from ..loading import (
    ModelLoadError,
    load_location_mlp,
    make_scheduler,
)
from ..methods import Elite, GenerationMethod, IPAdapter, load_run, method_class
from ..pictures import save_image_atomic
from .config import EvalConfig
from .plan import Row, file_slug
from .prompts import PromptSpec
from .protocols import CONSTANT_LAYOUT, Sampling


class RowGenerator:
    """Generates (or reuses from disk) every image of a row through the row's method (`inference.methods`), from
    the same seeded noise for every method; holds the loaded methods and the location MLP for "+ spatial" rows."""

    def __init__(
        self,
        config: EvalConfig,
        pipe,
        seeds: Sequence[int],
        height: int,
        width: int,
        reuse=None,
        noise_seed: int | None = None,
    ):
        self.config, self.pipe, self.seeds = config, pipe, list(seeds)
        self.noise_seed = noise_seed  # None: each image's noise from its own seed; else the k-th draw of this seed
        self.out = Path(config.out)
        self.height, self.width = height, width
        self._scheduler_config = reuse._scheduler_config if reuse else pipe.scheduler.config
        self._methods: dict = reuse._methods if reuse else {}  # loaded methods: "elite", or a fine-tune folder
        self._location_mlp = reuse._location_mlp if reuse else False  # False: not looked for yet
        self._coi_by_text: dict[str, list] = {}

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

    def _generator_for(self, row: Row) -> tuple[Callable, str]:
        """A function (texts, latents, generators) -> [(PIL image, extra record)], and the phrase for the templates."""
        cfg, concept, sampling = self.config, row.concept, row.sampling
        common = dict(
            num_inference_steps=sampling.steps, guidance_scale=sampling.guidance, height=self.height, width=self.width
        )
        method = self.method_for(row)
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
                placed = self._placed(text, {word: method.embedding()}, row.layout)
                result = method.generate_guided(text, lat, gen, {p.name: p.box for p in placed}, **common)
                out.append((result.images[0], {**method.record(text), **_guidance_record(placed, result)}))
            return out

        return generate, phrase

    def method_for(self, row: Row) -> GenerationMethod:
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
        if row.method == "ip_adapter":  # loaded for its rows, taken out after each (the UNet then needs its image)
            method = self._methods.get("ip_adapter")
            if method is None:
                method = IPAdapter.load(self.pipe, self.config.ip_adapter, scale=self.config.ip_adapter_scale)
                self._methods["ip_adapter"] = method
            photo = row.concept.photos[min(self.config.elite_image, len(row.concept.photos) - 1)]
            method.encode(photo, mask=row.concept.mask_for(photo, self.config.mask_dir))
            return method
        if row.payload is None:
            return method_class(row.method).load(self.pipe)
        if row.payload.folder not in self._methods:
            token = f"<{file_slug(row.payload.label)}-{len(self._methods)}>"
            self._methods[row.payload.folder] = load_run(self.pipe, row.payload, token=token)
        return self._methods[row.payload.folder]

    def _placed(self, text: str, personalized: dict, layout: str | None = "constant") -> list:
        """Boxes for the learned token and the prompt's other object: the protocol's constant layout (the learned
        token left, each word of the other object right, as Compositional Inversion's `get_constant_layout`), or
        the location MLP's."""
        target = next((obj for obj in (self._coi_by_text or {}).get(text, []) if obj), None)
        if target is None:
            raise ValueError(
                f"{text!r}: spatial guidance places the learned token and a CoI object; this prompt has none"
            )
        if layout == "location_mlp":
            return plan_guidance(text, personalized, [target], {}, self.location_mlp, self.pipe)
        words = target.split()
        boxes = {token: CONSTANT_LAYOUT["concept"] for token in personalized}
        boxes.update({w: CONSTANT_LAYOUT["other"] for w in words})
        return plan_guidance(text, personalized, words, boxes)

    def release_elite(self) -> None:
        method = self._methods.get("elite")
        if method is not None:
            method.unload()

    def release_ip_adapter(self) -> None:
        method = self._methods.pop("ip_adapter", None)
        if method is not None:
            method.unload()

    def noise(self, seeds: Sequence[int]) -> tuple:
        """The images' initial noise and generators: from their own seeds, or the k-th draws of `noise_seed`."""
        if self.noise_seed is None:
            return seeded_noise(self.pipe, seeds, self.height, self.width)
        positions = [self.seeds.index(seed) for seed in seeds]
        return stream_noise(self.pipe, positions, self.noise_seed, self.height, self.width)

    def _use_sampler(self, sampling: Sampling) -> None:
        self.pipe.scheduler = make_scheduler(sampling.scheduler, self._scheduler_config)

    def generate(self, row: Row, specs: list[PromptSpec]):
        """Generate (or reuse) every (prompt, seed) image of one row; returns [(spec, seed, image, extra)]."""
        folder = self.out / "images" / file_slug(row.name) / file_slug(row.concept.name)
        todo, done = [], []
        for spec in specs:
            for seed in self.seeds[: spec.num_images]:
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
                    latents, generators = self.noise([seed for _, seed, _ in batch])
                    with torch.no_grad():
                        outputs = generate(texts, latents, generators)
                    for (_spec, _seed, path), (image, extra) in zip(batch, outputs):
                        if extra:
                            atomic_write_json(path.with_suffix(".json"), extra)
                        save_image_atomic(image, path)
            finally:
                if row.method == "elite":
                    self.release_elite()
                elif row.method == "ip_adapter":
                    self.release_ip_adapter()
        items = sorted(todo + done, key=lambda item: (item[0].index, item[1]))
        out = []
        for spec, seed, path in items:
            side = path.with_suffix(".json")
            extra = json.loads(side.read_text()) if side.is_file() else {}
            out.append((spec, seed, Image.open(path).convert("RGB"), extra))
        return out


def _guidance_record(placed, result) -> dict:
    """What a guided image records: the boxes and where they came from, L_loc at the first and last step."""
    losses = result.location_losses or []
    return {
        "placed": [p.record() for p in placed],
        "location_loss_first": losses[0] if losses else None,
        "location_loss_last": losses[-1] if losses else None,
    }
