"""Generation methods as one registry: base, ELITE, Textual Inversion, BaTex, Infusion and IP-Adapter.

Every way this package generates with a concept is one `GenerationMethod` subclass, registered by name. The
command line (`generate --finetune DIR`), the evaluation (`inference.evaluate`, one row per method) and the
web demo (ELITE) go through it. A new method is one class here plus its trainer, which writes a fine-tune
folder whose `concept.json` names the method (`encoders.common.finetune_folder`):

    @register_method
    class MyMethod(GenerationMethod):
        name = "my_method"
        from_runs = True  # its concepts come from fine-tune folders

        @classmethod
        def load(cls, pipe, run, token=None):  # put the run's result into the pipeline
            ...

        def prompt_word(self, class_word):  # what stands for the concept in a prompt
            ...

What a method may override, with the defaults:
- `generate(prompts, latents, generators, **sampling)`: one image per prompt from the given noise (the base
  pipeline, with the UNet additions of `residuals()`).
- `generate_guided(prompt, latents, generator, boxes, **sampling)`: spatial guidance with a box per token or
  word (`spatial_guidance = False` and a `refusal` where a method cannot combine with it).
- `removed()`: a context without the method's change to the UNet, and `noise_predictions(...)`: the base and
  customised models' noise predictions on the same inputs, for the measures on the UNet (Fisher divergence).
- `unload()`: take the method out of the pipeline again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from encoders.attention import CONTEXT_KWARG, AttentionContext
from encoders.common.finetune_folder import EMBEDDING_METHODS, FinetuneFolderError, FinetuneRun
from encoders.infusion import (
    EXTRAS_KEY,
    InfusionResiduals,
    dual_stream_call,
    infusion_call,
    set_infusion_processors,
)

from .guidance import concepts_from_words, generate_with_spatial_guidance
from .loading import default_image_size, is_sdxl_pipeline
from .pipeline import ElitePipeline, default_placeholders
from .presets import paper_elite_scale

METHODS: dict[str, type[GenerationMethod]] = {}


class MethodError(ValueError):
    """A method that is not registered, or asked for what it cannot do (e.g. spatial guidance with Infusion)."""


def register_method(cls: type[GenerationMethod]) -> type[GenerationMethod]:
    """Class decorator: make `cls` the method of its `name` (for fine-tune folders whose concept.json says so)."""
    if not cls.name:
        raise MethodError(f"{cls.__name__} needs a name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise MethodError(f"generation method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[GenerationMethod]:
    if name not in METHODS:
        raise MethodError(f"unknown generation method {name!r}; the registered ones: {', '.join(METHODS)}")
    return METHODS[name]


def load_run(pipe, run: FinetuneRun, token: str | None = None) -> GenerationMethod:
    """The method of a fine-tune folder, loaded into `pipe` (`token`: load an embedding under another token)."""
    try:
        cls = method_class(run.method)
    except MethodError as err:
        raise FinetuneFolderError(f"{run.folder}: {err}") from None
    if not cls.from_runs:
        raise FinetuneFolderError(f"{run.folder}: {run.method} does not load from a fine-tune folder")
    return cls.load(pipe, run, token=token)


def check_guidance(methods: Sequence[GenerationMethod]) -> None:
    """Refuse spatial guidance for a method that cannot combine with it, saying why (its `refusal`)."""
    for method in methods:
        if not method.spatial_guidance:
            raise MethodError(f"spatial guidance with {method.name} is not supported: {method.refusal}")


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], latents: torch.Tensor, generators=None, residuals=(), **sampling) -> list:
    """The one sampling call of every method: `pipe` on `prompts` (one per row of `latents`), through Infusion's
    dual stream when `residuals` are given. Other keywords (steps, guidance, size, negative prompt) go to the
    pipeline."""
    prompts = list(prompts)
    if latents.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {latents.shape[0]} initial latents")
    latents = latents.to(pipe.device, pipe.unet.dtype)
    if generators is not None:
        sampling["generator"] = generators
    if residuals:
        return generate_with_infusion(pipe, prompts, list(residuals), latents=latents, **sampling).images
    negative = sampling.pop("negative_prompt", None)
    if negative is not None:
        sampling["negative_prompt"] = [negative] * len(prompts)
    return pipe(prompt=prompts, latents=latents, **sampling).images


def generate_together(methods: Sequence[GenerationMethod], prompts, latents, generators=None, **sampling) -> list:
    """Images with several fine-tunes loaded at once. One method generates its own way; several combine in the
    shared call (their tokens in the tokenizer, every method's UNet residuals), which each must allow by keeping
    the default `generate`."""
    if len(methods) == 1:
        return methods[0].generate(prompts, latents, generators, **sampling)
    own = [m.name for m in methods if type(m).generate is not GenerationMethod.generate]
    if own:
        raise MethodError(
            f"{', '.join(own)} generate their own way and do not combine with other fine-tunes in one call"
        )
    residuals = [r for m in methods for r in m.residuals()]
    for method in methods:
        prompts = [method.prompt_for(p) for p in prompts]
    return sample(methods[0].pipe, prompts, latents, generators, residuals=residuals, **sampling)


def generate_guided_words(pipe, prompt: str, boxes: dict[str, Sequence[float]], latents=None, generator=None, **kw):
    """Spatial guidance on the plain pipeline: each token or word of `boxes` steered into its box."""
    if latents is not None:
        kw["latents"] = latents.to(pipe.device, pipe.unet.dtype)
    if generator is not None:
        kw["generator"] = generator if isinstance(generator, list) else [generator]
    concepts = concepts_from_words(pipe.tokenizer, prompt, list(boxes), [list(b) for b in boxes.values()])
    return generate_with_spatial_guidance(pipe, concepts, prompt=prompt, **kw)


def embedding_rows(path) -> int:
    """How many vectors an embedding file holds for its token (1 for a legacy `.bin`, read without unpickling)."""
    from pathlib import Path

    path = Path(path)
    if path.suffix != ".safetensors":
        return 1
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        shape = handle.get_slice(next(iter(handle.keys()))).get_shape()
    return int(shape[0]) if len(shape) == 2 else 1


def load_embedding(pipe, run: FinetuneRun, token: str | None = None) -> str:
    """Load a Textual Inversion / BaTex embedding with diffusers' `load_textual_inversion`; returns its token.

    `token` defaults to the run's placeholder token; give another one to load several runs that
    were all trained as S*.
    """
    if run.method not in EMBEDDING_METHODS:
        raise FinetuneFolderError(f"{run.folder} is a {run.method} run, not an embedding")
    token = token or run.placeholder_token
    if embedding_rows(run.result_path()) > 1:
        # diffusers expands "S*" into "S* S*_1 ..." by looking the prompt's tokens up among the added ones, but the
        # CLIP tokenizer lowercases the prompt first: a token with capitals would get its first vector only
        token = token.lower()
    if token in pipe.tokenizer.get_vocab():
        raise FinetuneFolderError(
            f"token {token!r} of {run.folder} is already in the tokenizer: give each run its own token (DIR=TOKEN)"
        )
    path = run.result_path()
    keys: set[str] = set()
    if path.suffix == ".safetensors":  # (a legacy learned_embeds.bin is one-encoder)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    if keys == {"clip_l", "clip_g"}:  # an SDXL embedding: one vector per text encoder (diffusers' SDXL layout)
        if not is_sdxl_pipeline(pipe):
            raise FinetuneFolderError(
                f"{run.folder}: an SDXL embedding (clip_l / clip_g), but the base is not SDXL "
                f"(trained for {run.info.get('base_model', 'an unrecorded base model')})"
            )
        from safetensors.torch import load_file

        state = load_file(str(path))
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        return token
    if is_sdxl_pipeline(pipe):
        raise FinetuneFolderError(f"{run.folder}: a one-encoder embedding, but the base is SDXL (two text encoders)")
    if path.suffix == ".safetensors" and len(keys) == 1:  # say both widths (diffusers' own message leaves them out)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            width = int(handle.get_slice(next(iter(keys))).get_shape()[-1])
        expected = int(pipe.text_encoder.get_input_embeddings().weight.shape[-1])
        if width != expected:
            raise FinetuneFolderError(
                f"{run.folder}: its embedding is {width} wide, but this base's text encoder takes {expected}-wide "
                "words "
                f"(trained for {run.info.get('base_model', 'an unrecorded base model')}; load it with that base)"
            )
    try:
        pipe.load_textual_inversion(str(path.parent), token=token, weight_name=path.name)
    except ValueError as err:  # e.g. an embedding of another width: trained for another base model
        raise FinetuneFolderError(
            f"{run.folder}: {err} (trained for {run.info.get('base_model', 'an unrecorded base model')})"
        ) from err
    return token


def load_infusion(pipe, run: FinetuneRun) -> InfusionResiduals:
    """Infusion residuals of a run, on the pipeline's device, checked against its UNet."""
    if run.method != "infusion":
        raise FinetuneFolderError(f"{run.folder} is a {run.method} run, not Infusion")
    path = run.result_path()
    residuals = InfusionResiduals.from_pretrained(str(path.parent), subfolder=path.name).to(pipe.device)
    try:
        residuals.check_fits(pipe.unet)
    except ValueError as err:
        raise FinetuneFolderError(f"{run.folder}: {err}") from err
    return residuals


class GenerationMethod:
    """One way to generate with a concept (see the module docstring for what to override)."""

    name: ClassVar[str] = ""
    from_runs: ClassVar[bool] = False  # loaded from fine-tune folders (`load_run`)
    appends_class_word: ClassVar[bool] = False  # its word may be followed by the class word ("S* dog")
    spatial_guidance: ClassVar[bool] = True
    refusal: ClassVar[str] = ""

    def __init__(self, pipe, run: FinetuneRun | None = None):
        self.pipe = pipe
        self.run = run

    @classmethod
    def load(cls, pipe, source: Any = None, token: str | None = None) -> GenerationMethod:
        return cls(pipe, source)

    def prompt_word(self, class_word: str) -> str:
        """What stands for the concept in a prompt; the base model's is the class word itself."""
        return class_word

    def embedding(self) -> torch.Tensor | None:
        """The concept's input embedding where it is not a row of the tokenizer's table (ELITE's w0)."""
        return None

    def residuals(self) -> list:
        """What the method adds to the UNet's call (Infusion's residuals); several methods combine in one call."""
        return []

    def record(self, prompt: str) -> dict:
        """What to write beside an image of `prompt` (e.g. ELITE's lambda)."""
        return {}

    def prompt_for(self, prompt: str) -> str:
        """The prompt as this method's pipeline must read it (a token written another way put right)."""
        return prompt

    def generate(self, prompts: Sequence[str], latents: torch.Tensor, generators=None, **sampling) -> list:
        prompts = [self.prompt_for(p) for p in prompts]
        return sample(self.pipe, prompts, latents, generators, residuals=self.residuals(), **sampling)

    def generate_guided(self, prompt: str, latents, generator, boxes: dict[str, Sequence[float]], **sampling):
        check_guidance([self])
        return generate_guided_words(self.pipe, prompt, boxes, latents, generator, **sampling)

    @contextlib.contextmanager
    def removed(self):
        """The pipeline without this method's change to the UNet (none by default: a token does not touch it)."""
        yield

    @torch.no_grad()
    def noise_predictions(self, inputs, text_kwargs: Callable[[str, int], dict]) -> tuple[list, list]:
        """(base, customised) noise predictions for each (noisy latent, timestep, prompt) of `inputs`."""
        unet = self.pipe.unet
        with self.removed():
            base = [unet(noisy, step, **text_kwargs(prompt, 1)).sample.float().cpu() for noisy, step, prompt in inputs]
        if type(self).removed is GenerationMethod.removed:  # the UNet is the base's: the same predictions
            return base, base
        custom = [unet(noisy, step, **text_kwargs(prompt, 1)).sample.float().cpu() for noisy, step, prompt in inputs]
        return base, custom

    def unload(self) -> None:
        """Take the method out of the pipeline; the default has nothing to take out (the base model adds nothing)."""


@register_method
class BaseModel(GenerationMethod):
    """The base model as it is: prompts with the class word."""

    name = "base"


@register_method
class TextualInversion(GenerationMethod):
    """A learned token in the tokenizer (Gal et al., "An Image is Worth One Word", 2022), loaded with diffusers'
    `load_textual_inversion`."""

    name = "textual_inversion"
    from_runs = True
    appends_class_word = True

    def __init__(self, pipe, run: FinetuneRun, token: str, typed: str | None = None):
        super().__init__(pipe, run)
        self.token = token  # as loaded into the tokenizer
        self.typed = typed or token  # as prompts write it (S* for a multi-vector embedding loaded as s*)

    @classmethod
    def load(cls, pipe, source: FinetuneRun = None, token: str | None = None) -> TextualInversion:
        return cls(pipe, source, load_embedding(pipe, source, token=token), typed=token or source.placeholder_token)

    def prompt_for(self, prompt: str) -> str:
        return prompt.replace(self.typed, self.token) if self.typed != self.token else prompt

    def prompt_word(self, class_word: str) -> str:
        return self.token

    def tokens(self) -> list[str]:
        """The token and, for an embedding of N vectors, the `token_1` ... `token_{N-1}` diffusers added for it."""
        vocab = self.pipe.tokenizer.get_vocab()
        tokens = [self.token]
        while f"{self.token}_{len(tokens)}" in vocab:
            tokens.append(f"{self.token}_{len(tokens)}")
        return tokens

    def unload(self) -> None:
        tokens = self.tokens()
        self.pipe.unload_textual_inversion(tokens)
        if is_sdxl_pipeline(self.pipe):
            self.pipe.unload_textual_inversion(tokens, self.pipe.tokenizer_2, self.pipe.text_encoder_2)


@register_method
class BaTex(TextualInversion):
    """BaTex's word (a combination of vocabulary rows), stored and loaded as a Textual Inversion embedding."""

    name = "batex"


@register_method
class Infusion(GenerationMethod):
    """Value residuals on the class word's tokens with the base model's attention maps (Zeng et al., "Infusion:
    Preventing Customized Text-to-Image Diffusion from Overfitting"), sampled through its dual stream."""

    name = "infusion"
    from_runs = True
    spatial_guidance = False
    refusal = "Infusion's two-stream attention and guidance's map recording both replace the attention processors"

    def __init__(self, pipe, run: FinetuneRun, concept: InfusionResiduals):
        super().__init__(pipe, run)
        self.concept = concept

    @classmethod
    def load(cls, pipe, source: FinetuneRun = None, token: str | None = None) -> Infusion:
        return cls(pipe, source, load_infusion(pipe, source))

    def prompt_word(self, class_word: str) -> str:
        return self.concept.config.class_word

    def residuals(self) -> list:
        return [self.concept]

    @torch.no_grad()
    def noise_predictions(self, inputs, text_kwargs):
        """One dual call per input: row 0 the base stream, row 1 the residual stream (with row 0's maps, or its own
        for the released variant), so a prompt without the class word gives the same prediction twice (a Fisher
        divergence of exactly 0)."""
        unet = self.pipe.unet
        saved = dict(unet.attn_processors)
        set_infusion_processors(unet, [self.concept])
        base, custom = [], []
        try:
            for noisy, step, prompt in inputs:
                call = dual_stream_call(
                    self.pipe.tokenizer, [prompt], [self.concept], replace_maps=self.concept.replaces_maps
                )
                ctx = AttentionContext(extras={EXTRAS_KEY: call})
                pred = unet(
                    torch.cat([noisy, noisy]),
                    step.repeat(2),
                    **text_kwargs(prompt, 2),
                    cross_attention_kwargs={CONTEXT_KWARG: ctx},
                ).sample
                base.append(pred[:1].float().cpu())
                custom.append(pred[1:].float().cpu())
        finally:
            unet.set_attn_processor(saved)
        return base, custom


@register_method
class Elite(GenerationMethod):
    """ELITE's encoders on the pipeline (Wei et al., ICCV 2023): each photo encoded once into w0 at its placeholder
    and local tokens through extra cross-attention, weighted by lambda (`elite_scale`; None: by prompt, as the
    paper's inference). One concept at S*, or several at S1, S2, ..."""

    name = "elite"
    placeholder = "S*"

    def __init__(self, elite, concepts=(), placeholders: Sequence[str] | None = None, elite_scale=None):
        super().__init__(elite.pipe)
        self.elite = elite  # an `inference.ElitePipeline` with its encoders loaded
        self.concepts = list(concepts)
        self.placeholders = list(placeholders) if placeholders else default_placeholders(max(1, len(self.concepts)))
        self.elite_scale = elite_scale

    @classmethod
    def load(cls, pipe, source=None, token=None, image_encoder=None, elite=None) -> Elite:
        """ELITE's encoders (`source`: a folder or Hub id) on `pipe`, or on an existing `ElitePipeline`."""
        elite = elite if elite is not None else ElitePipeline(pipe)
        if elite.encoders is None:
            elite.load_encoders(source, image_encoder=image_encoder)
        return cls(elite)

    def encode(self, photo, mask=None, **kwargs):
        """Encode one photo (+ mask) as the concept this method generates at S*; returns the `Concept`."""
        self.concepts, self.placeholders = [self.elite.encode_concept(photo, mask=mask, **kwargs)], [self.placeholder]
        return self.concepts[0]

    def prompt_word(self, class_word: str) -> str:
        return self.placeholders[0]

    def embedding(self) -> torch.Tensor | None:
        return self.concepts[0].w0 if self.concepts else None

    def scale_for(self, prompt: str) -> float:
        if self.elite_scale is not None:
            return self.elite_scale
        return paper_elite_scale(prompt, self.placeholders)

    def record(self, prompt: str) -> dict:
        return {"elite_scale": self.scale_for(prompt)} if self._concerns(prompt) else {}

    def _concerns(self, prompt: str) -> bool:
        return any(p in prompt for p in self.placeholders)

    def __call__(self, prompt: str, **kwargs):
        """`ElitePipeline`'s call with this method's concepts, placeholders and lambda (`EliteOutput`)."""
        kwargs.setdefault("elite_scale", self.scale_for(prompt))
        return self.elite(prompt, concepts=self.concepts, placeholders=self.placeholders, **kwargs)

    def generate(self, prompts, latents, generators=None, **sampling) -> list:
        generators = generators if generators is not None else [None] * len(prompts)
        images = []
        for text, lat, gen in zip(prompts, latents.split(1), generators):
            gens = None if gen is None else [gen]
            if not self._concerns(text):  # ELITE's global K/V act on every prompt: its model, no concept
                images += sample(self.pipe, [text], lat, gens, **sampling)
            else:
                images.append(self(text, latents=lat, generator=gens, **sampling).images[0])
        return images

    def generate_guided(self, prompt, latents, generator, boxes, **sampling):
        boxes = {name: list(box) for name, box in boxes.items()}
        concept_boxes = [boxes.pop(p) for p in self.placeholders]
        generator = None if generator is None else generator if isinstance(generator, list) else [generator]
        return self(
            prompt, latents=latents, generator=generator, boxes=concept_boxes, word_boxes=boxes or None, **sampling
        )

    @contextlib.contextmanager
    def removed(self):
        unet, installed = self.pipe.unet, dict(self.pipe.unet.attn_processors)
        unet.set_attn_processor(dict(self.elite.saved_processors))
        try:
            yield
        finally:
            unet.set_attn_processor(installed)

    def unload(self) -> None:
        if self.elite.encoders is not None:
            self.elite.unload_encoders()


def locate_ip_adapter(source) -> tuple[str, str | None]:
    """`(folder, subfolder)` for `load_ip_adapter` from an export folder (holding `ip_adapter/ip_adapter.safetensors`,
    what `training.ip_adapter` writes), the `ip_adapter/` folder itself, or a Hub repo (its `ip_adapter/`)."""
    from pathlib import Path

    from encoders.ip_adapter import EXPORT_FILE

    path = Path(str(source))
    if (path / "ip_adapter" / EXPORT_FILE).is_file():
        return str(path), "ip_adapter"
    if (path / EXPORT_FILE).is_file():
        return str(path.parent), path.name
    if path.exists():
        raise MethodError(f"{path}: no ip_adapter/{EXPORT_FILE} nor {EXPORT_FILE} (a training.ip_adapter export)")
    return str(source), "ip_adapter"


@register_method
class IPAdapter(GenerationMethod):
    """An IP-Adapter (Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion
    Models", 2023) loaded with diffusers' own `load_ip_adapter`: the concept photo is the image prompt (the object
    on black when the adapter was trained with `condition=object`), the prompt names the class word; `scale` is
    the image prompt's weight (1.0: the paper's image-prompt setting)."""

    name = "ip_adapter"
    spatial_guidance = False
    refusal = "spatial guidance runs its own denoising loop, which does not pass the image prompt"

    def __init__(self, pipe, scale: float = 1.0, condition: str = "image"):
        super().__init__(pipe)
        self.scale, self.condition, self.image = scale, condition, None

    @classmethod
    def load(cls, pipe, source=None, token=None, scale: float = 1.0) -> IPAdapter:
        """Load the IP-Adapter at `source` into `pipe` (its image encoder from `ip_adapter/image_encoder/`)."""
        from pathlib import Path

        import yaml

        folder, subfolder = locate_ip_adapter(source)
        pipe.load_ip_adapter(folder, subfolder=subfolder, weight_name="ip_adapter.safetensors")
        pipe.set_ip_adapter_scale(scale)
        recorded = Path(folder) / "training_config_ip_adapter.yaml"  # written by training.ip_adapter's export
        condition = (
            (yaml.safe_load(recorded.read_text()) or {}).get("condition", "image") if recorded.is_file() else "image"
        )
        return cls(pipe, scale, condition)

    def encode(self, photo, mask=None, **kwargs):
        """The image prompt: the photo (RGB), or the object on black with its mask for `condition=object`."""
        from PIL import Image

        image = Image.open(photo).convert("RGB") if not isinstance(photo, Image.Image) else photo.convert("RGB")
        if self.condition == "object" and mask is not None:
            alpha = (Image.open(mask) if not isinstance(mask, Image.Image) else mask).convert("L").resize(image.size)
            image = Image.composite(image, Image.new("RGB", image.size), alpha)
        self.image = image
        return image

    def record(self, prompt: str) -> dict:
        return {"ip_adapter_scale": self.scale}

    def generate(self, prompts, latents, generators=None, **sampling) -> list:
        if self.image is None:
            raise MethodError("ip_adapter: encode(photo) first (the image prompt)")
        return sample(self.pipe, prompts, latents, generators, ip_adapter_image=self.image, **sampling)

    @torch.no_grad()
    def noise_predictions(self, inputs, text_kwargs):
        """The base (image prompt at scale 0: the decoupled attention adds nothing) and the adapted UNet's noise
        predictions, the concept photo as image prompt."""
        pipe = self.pipe
        embeds = pipe.prepare_ip_adapter_image_embeds(self.image, None, pipe.device, 1, False)

        def kwargs(prompt):
            kw = text_kwargs(prompt, 1)
            return {**kw, "added_cond_kwargs": {**(kw.get("added_cond_kwargs") or {}), "image_embeds": embeds}}

        out = []
        for scale in (0.0, self.scale):
            pipe.set_ip_adapter_scale(scale)
            out.append(
                [pipe.unet(noisy, step, **kwargs(prompt)).sample.float().cpu() for noisy, step, prompt in inputs]
            )
        pipe.set_ip_adapter_scale(self.scale)
        return out[0], out[1]

    def unload(self) -> None:
        self.pipe.unload_ip_adapter()


@dataclass
class InfusionOutput:
    images: list  # customised (C stream)
    base_images: list  # the foundational model's images from the same noise (F stream); [] without replacement


def _same_state(generator: torch.Generator) -> torch.Generator:
    """A new generator in the same state (it will draw the same numbers)."""
    twin = torch.Generator(generator.device)
    twin.set_state(generator.get_state())
    return twin


@torch.no_grad()
def generate_with_infusion(
    pipe,
    prompts: str | Sequence[str],
    concepts: Sequence[InfusionResiduals],
    replace_maps: bool | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    negative_prompt: str | None = None,
    **pipe_kwargs,
) -> InfusionOutput:
    """Sample a `StableDiffusionPipeline` (or `StableDiffusionXLPipeline`) with Infusion concepts installed.

    The paper samples with DDIM, 50 steps, guidance 8. With `replace_maps` (the paper's dual stream) every
    prompt runs twice from the same initial noise: an F row (base model) and a C row (residuals on the class
    tokens, cross-attention maps taken from the F row). `replace_maps` None: the dual stream unless every concept
    is the released variant (its own maps, no F row). The pipeline's processors are restored afterwards.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    default_h, default_w = default_image_size(pipe)
    height = pipe_kwargs.pop("height", None) or default_h
    width = pipe_kwargs.pop("width", None) or default_w
    if pipe_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("generate_with_infusion: repeat the prompts instead of num_images_per_prompt")
    shape = (n, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = pipe_kwargs.pop("latents", None)
    if latents is None:
        if isinstance(generator, (list, tuple)):  # one generator per prompt, as diffusers takes them
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
        else:
            device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    latents = latents.to(pipe.device, pipe.unet.dtype)

    concepts = [c.to(pipe.device) for c in concepts]
    if replace_maps is None:
        replace_maps = any(getattr(c, "replaces_maps", True) for c in concepts)
    if replace_maps:
        rows = prompts + prompts
        latents = torch.cat([latents, latents])
        call = dual_stream_call(pipe.tokenizer, prompts, concepts)
        if isinstance(generator, (list, tuple)):  # a stochastic sampler: both streams of a prompt draw the same noise
            generator = [_same_state(g) for g in generator] + list(generator)
    else:
        rows = prompts
        call = infusion_call(pipe.tokenizer, rows, concepts)
    ctx = AttentionContext(extras={EXTRAS_KEY: call})
    previous = pipe.unet.attn_processors
    set_infusion_processors(pipe.unet, concepts)
    try:
        out = pipe(
            prompt=rows,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(rows),
            latents=latents,
            height=height,
            width=width,
            cross_attention_kwargs={CONTEXT_KWARG: ctx},
            generator=generator,
            **pipe_kwargs,
        )
    finally:
        pipe.unet.set_attn_processor(previous)
    images = out.images if hasattr(out, "images") else out[0]
    if replace_maps:
        return InfusionOutput(images=list(images[n:]), base_images=list(images[:n]))
    return InfusionOutput(images=list(images), base_images=[])
