"""`ElitePipeline`: zero-step personalization on top of a diffusers `StableDiffusionPipeline`.

It follows diffusers' adapter conventions: wrap (or load) a base pipeline, `load_encoders` installs
ELITE's attention processors, `set_elite_scale` sets lambda (the weight of the local detail branch),
`unload_encoders` puts the stock processors back. Device and dtype are the pipeline's. Any scheduler
the user swaps into `pipe.scheduler` is used as is.

    from inference import ElitePipeline
    elite = ElitePipeline.from_pretrained("CompVis/stable-diffusion-v1-4", encoders="ORG/elite-encoders")
    teapot = elite.encode_concept("teapot.jpg", mask="teapot_mask.png")     # one forward pass
    teapot.save("teapot.safetensors")                                       # reuse for any prompt
    images = elite("a photo of S* on the beach", teapot, seed=0, num_images_per_prompt=4).images

How a prompt is run (`encoders.conditioning.elite_conditioning`, shared with training): the
placeholder's embedding is replaced by the concept's w0 before the text encoder, the result goes to
the pipeline as `prompt_embeds`; the local tokens, each concept's w0 position and lambda go through
`cross_attention_kwargs` as one `encoders.attention.AttentionContext`, read by the processors for the
conditional half of the guidance batch. Two concepts ("S1 playing with S2") each get their own w0 at
their own token and their local tokens re-weighted by their own token's attention map. Every call
returns an `inference.outputs.EliteOutput`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from encoders.attention import (
    AttentionContext,
    ContextAttnProcessor,
    restore_default_processors,
    set_elite_processors,
)
from encoders.conditioning import elite_conditioning
from encoders.text_injection import DEFAULT_PLACEHOLDER, add_placeholder_tokens

from .concept import Concept
from .encoding import concept_photos, encode_photos
from .guidance import (
    BoxedTokens,
    find_token_indices,
    generate_with_spatial_guidance,
    predict_boxes,
    warn_if_boxes_coincide,
)
from .inputs import ConceptImage, ConceptInputError, ConceptInputWarning, ImageLike, find_placeholders, placeholder_in
from .loading import (
    EliteEncoders,
    ModelLoadError,
    check_encoders_fit,
    is_sdxl_pipeline,
    load_base_pipeline,
    load_encoders,
    text_encoders_of,
    tokenizers_of,
    word_width_of,
)
from .masking import DEFAULT_MASK_MODEL, DEFAULT_MASK_PROMPT, AutoMasker, has_own_alpha
from .outputs import EliteOutput
from .presets import elite_lms_scheduler, paper_elite_scale, preset_settings

DEFAULT_ELITE_SCALE = 0.6  # ELITE's lambda for editing prompts; 0.8 suits plain "a photo of S*"


def default_placeholders(count: int) -> list[str]:
    """S* for one concept; S1, S2, ... for several."""
    return [DEFAULT_PLACEHOLDER] if count == 1 else [f"S{k + 1}" for k in range(count)]


def _same_source(a: str, b: str) -> bool:
    """Whether two model names point at the same folder (or are the same Hub id)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _pipeline_name(pipe) -> str:
    """What the base pipeline was loaded from (a folder or Hub id), or "" when it was built in memory."""
    return str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")


def _base_model_note(what: str, recorded: str | None, pipe) -> str | None:
    """A warning when `what` records another base model than the pipeline was loaded from (same shapes:
    the fit checks passed), or None when they agree or one of them is unknown."""
    loaded = _pipeline_name(pipe)
    if not recorded or not loaded or _same_source(recorded, loaded) or Path(recorded).name == Path(loaded).name:
        return None
    return (
        f"{what} was made for the base model {recorded}, but this pipeline is {loaded} (the same shapes): "
        "results are only meaningful if it is a copy or a fine-tune of that model"
    )


_STATE_KEY = "_zsp_elite"  # where a UNet carries its ELITE (plain attribute, not a module or parameter)


@dataclass
class _EliteState:
    encoders: EliteEncoders
    saved_processors: dict  # the UNet's processors before ELITE's, put back by unload
    installed: dict  # ELITE's processors as installed: another loader replacing them is noticed by identity


def _unet_state(unet) -> _EliteState | None:
    return unet.__dict__.get(_STATE_KEY)


class ElitePipeline:
    """A `StableDiffusionPipeline` plus ELITE encoders: encode a concept photo, generate with it.

    `pipe` stays a plain diffusers pipeline (swap its scheduler, move it, enable offloading); this
    object only adds processors, text injection and the per-call attention context.
    """

    def __init__(self, pipe, encoders: EliteEncoders | None = None, elite_scale: float = DEFAULT_ELITE_SCALE):
        self.pipe = pipe
        self._tokenizer, self._tokenizer_of = (
            None,
            None,
        )  # ELITE's copy of the pipe's tokenizer (see placeholder_tokenizer)
        self.set_elite_scale(elite_scale)
        if encoders is not None:
            self._install(encoders)

    # ---- loading (diffusers adapter conventions) ---------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        encoders: str | Path | None = None,
        image_encoder: str | Path | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        scheduler: str | None = None,
        safety_checker: bool = True,
        elite_scale: float = DEFAULT_ELITE_SCALE,
        allow_sdxl: bool = True,
    ) -> ElitePipeline:
        """Load the base pipeline (folder or Hub id) and, when given, the encoders (folder or Hub repo).
        An SDXL base loads as a `StableDiffusionXLPipeline` (every ELITE feature works on it with
        encoders trained for SDXL); `allow_sdxl=False` refuses it by name instead."""
        pipe = load_base_pipeline(
            base, device=device, dtype=dtype, scheduler=scheduler, safety_checker=safety_checker, allow_sdxl=allow_sdxl
        )
        elite = cls(pipe, elite_scale=elite_scale)
        if encoders is not None:
            elite.load_encoders(encoders, image_encoder=image_encoder)
        return elite

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (its execution device, also under `enable_model_cpu_offload`)."""
        return getattr(self.pipe, "_execution_device", self.pipe.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        self.pipe.scheduler = scheduler

    # ELITE's state lives on the UNet, not on this object: a pipeline made with `from_pipe` shares the UNet, so an
    # ElitePipeline over it (`load_elite(other_pipe)`, `with_pipeline`) sees the same encoders, and unloading from
    # either puts back the processors the UNet had before ELITE.
    @property
    def encoders(self) -> EliteEncoders | None:
        state = _unet_state(self.pipe.unet)
        return None if state is None else state.encoders

    @property
    def saved_processors(self) -> dict | None:
        """The attention processors the UNet had before ELITE (None when ELITE is not loaded)."""
        return self._saved_processors

    @property
    def _saved_processors(self) -> dict | None:
        state = _unet_state(self.pipe.unet)
        return None if state is None else state.saved_processors

    def with_pipeline(self, pipe) -> ElitePipeline:
        """ELITE over another pipeline that shares this one's UNet (made with `from_pipe`: img2img, inpainting,
        ControlNet, ...): the same encoders and lambda, no reloading."""
        if pipe.unet is not self.pipe.unet:
            raise ValueError(
                "with_pipeline needs a pipeline sharing this UNet (make it with PipelineClass.from_pipe(pipe)); "
                "for another UNet, load_elite(other_pipe, encoders)"
            )
        return ElitePipeline(pipe, elite_scale=self.elite_scale)

    @property
    def image_encoder_name(self) -> str | None:
        return None if self.encoders is None else self.encoders.image_encoder_name

    def load_encoders(self, name_or_path: str | Path, image_encoder: str | Path | None = None) -> ElitePipeline:
        """Load an encoders folder / Hub repo onto this pipeline's device and dtype, check it fits, install it."""
        encoders = load_encoders(name_or_path, image_encoder=image_encoder, device=self.device, dtype=self.dtype)
        self._install(encoders)
        return self

    def _install(self, encoders: EliteEncoders) -> None:
        check_encoders_fit(encoders, self.pipe)
        note = _base_model_note(f"the encoders {encoders.source}", encoders.base_model_name, self.pipe)
        if note:
            warnings.warn(note, ConceptInputWarning, stacklevel=3)
        if encoders.local_mapping is None:
            warnings.warn(
                f"the encoders {encoders.source} have no local_mapping/: images come from the global word w0 alone "
                "and elite_scale (lambda, --elite-scale) has no effect",
                ConceptInputWarning,
                stacklevel=3,
            )
        unet = self.pipe.unet
        saved = self._saved_processors if self._saved_processors is not None else dict(unet.attn_processors)
        installed = set_elite_processors(unet, encoders.global_mapping, encoders.local_mapping, keep_custom=True)
        unet.__dict__[_STATE_KEY] = _EliteState(encoders, saved, installed)

    def sync_processors(self) -> None:
        """Re-install ELITE when a loader replaced its processors since (`pipe.load_ip_adapter` /
        `unload_ip_adapter` after `load_elite`): what that loader put there becomes what the UNet has without
        ELITE (so `unload_elite` leaves it), and ELITE goes back on top, keeping an IP-Adapter it finds.
        Every ELITE call runs this first; nothing happens when the processors are ELITE's own."""
        state = _unet_state(self.pipe.unet)
        if state is None:
            return
        unet = self.pipe.unet
        current = unet.attn_processors
        if all(current.get(name) is proc for name, proc in state.installed.items()):
            return
        without_elite = {}
        for name, proc in current.items():
            before = state.saved_processors.get(name, AttnProcessor2_0())
            # ours as installed, or a fresh copy of ours that a diffusers (un)loader made of a layer it leaves alone
            ours = proc is state.installed.get(name) or isinstance(proc, ContextAttnProcessor)
            without_elite[name] = before if ours else proc
        unet.set_attn_processor(dict(without_elite))
        installed = set_elite_processors(
            unet, state.encoders.global_mapping, state.encoders.local_mapping, keep_custom=True
        )
        unet.__dict__[_STATE_KEY] = _EliteState(state.encoders, without_elite, installed)

    def set_elite_scale(self, elite_scale: float) -> None:
        """Default lambda (weight of the local detail branch) for later calls; 0 = global word only."""
        if not 0 <= float(elite_scale) < float("inf"):
            raise ValueError(f"elite_scale (lambda) must be a finite number >= 0, got {elite_scale}")
        self.elite_scale = float(elite_scale)

    def placeholder_tokenizers(self, placeholders: Sequence[str]) -> tuple[list, list[list[int]]]:
        """(tokenizers, ids): private copies of the pipe's tokenizers (SDXL: both) with the placeholders
        added, and the placeholders' ids in each (`[tokenizer][placeholder]`).

        The pipe's own tokenizers are never changed, so `pipe("a photo of S*")` stays a plain prompt and
        `pipe.load_textual_inversion(..., token="S*")` still works. The copies are remade when a pipe
        tokenizer grows (a Textual Inversion token loaded since), so prompts may use both.
        """
        bases = tokenizers_of(self.pipe)
        key = tuple((id(b), len(b)) for b in bases)
        if self._tokenizer is None or self._tokenizer_of != key:
            self._tokenizer, self._tokenizer_of = [copy.deepcopy(b) for b in bases], key
        return self._tokenizer, [add_placeholder_tokens(t, list(placeholders)) for t in self._tokenizer]

    def placeholder_tokenizer(self, placeholders: Sequence[str]) -> tuple:
        """(tokenizer, ids) of the first text encoder (`placeholder_tokenizers`), where token positions are read."""
        tokenizers, ids = self.placeholder_tokenizers(placeholders)
        return tokenizers[0], ids[0]

    def unload_encoders(self) -> None:
        """Put back exactly the attention processors the UNet had before ELITE (stock, xformers, an
        IP-Adapter's, ...) and drop the encoders (the pipe's tokenizer was never changed: the
        placeholders live in ELITE's own copy). What another loader installed after ELITE stays."""
        self.sync_processors()
        if self._saved_processors is not None:
            self.pipe.unet.set_attn_processor(dict(self._saved_processors))
        else:
            restore_default_processors(self.pipe.unet)
        self.pipe.unet.__dict__.pop(_STATE_KEY, None)

    # ---- encoding --------------------------------------------------------------------------
    mask_model: str = DEFAULT_MASK_MODEL  # CLIPSeg for encode_concept(..., auto_mask=...)

    def _auto_masker(self) -> AutoMasker:
        cached = getattr(self, "_masker", None)
        if cached is None or cached.source != str(self.mask_model):
            cached = self._masker = AutoMasker.from_pretrained(self.mask_model, device=self.device)
        return cached

    def _require_encoders(self) -> EliteEncoders:
        if self.encoders is None:
            raise RuntimeError("no encoders loaded: call load_encoders(path_or_repo) first")
        return self.encoders

    @torch.inference_mode()
    def encode_concept(
        self,
        image: ImageLike | ConceptImage,
        mask: ImageLike | None = None,
        crop: bool | None = None,
        return_input: bool = False,
        w0_from: str | None = None,
        auto_mask: bool | str | AutoMasker = False,
    ):
        """Photo (+ mask) -> `Concept` (w0, local tokens, keep-mask, metadata). One forward pass, no optimisation.

        Encoded the way the local mapping's config says (`inference.encoding`; the official ELITE
        inference by default). `image` may also be a ready `ConceptImage`, a list of photos of one
        concept (`mask` then a list too, or None), or a concept folder (its `masks/` are used): w0 is
        their mean, the local tokens all photos' side by side. `crop=True` encodes a
        square around the mask instead of the whole photo (`False`: the whole photo; None: the
        encoders' `concept_crop`). `w0_from`: "image" (the unmasked photo, official) or "object" (the
        object on black); None: the encoders' `w0_source`. With `return_input=True` returns
        `(concept, prepared ConceptImage)`, what the encoders saw (for grids). `auto_mask`: photos
        without a mask (or alpha) get CLIPSeg's (`inference.masking`): True prompts it with "the main
        object", a word (e.g. "dog") with that word, or pass your own `AutoMasker`; the model is
        `self.mask_model` (default `CIDAS/clipseg-rd64-refined`), loaded once.
        """
        encoders = self._require_encoders()
        if auto_mask and not isinstance(image, ConceptImage):
            masker = auto_mask if isinstance(auto_mask, AutoMasker) else self._auto_masker()
            word = auto_mask if isinstance(auto_mask, str) else DEFAULT_MASK_PROMPT
            pairs = [
                (p, masker(p, word) if m is None and not has_own_alpha(p) else m)
                for p, m in concept_photos(image, mask)
            ]
            image, mask = [p for p, _ in pairs], [m for _, m in pairs]
        if encoders.feature_extractor.image_mean.device != torch.device(self.device):  # the pipe was moved since
            encoders.to(self.device)
        return encode_photos(encoders, image, mask, crop=crop, return_input=return_input, w0_from=w0_from)

    # ---- generation --------------------------------------------------------------------------
    def _check_concept(self, concept: Concept, k: int) -> None:
        text_dim = word_width_of(self.pipe)
        if concept.text_dim != text_dim:
            raise ConceptInputError(
                f"concept {k} ({concept.metadata.get('source_image', '?')}) has w0 of size {concept.text_dim}; this "
                "base "
                f"model's text embeddings are {text_dim} (it was made with encoders "
                f"{concept.metadata.get('encoders', '?')})"
            )
        made_with = concept.metadata.get("encoders")
        if made_with and self.encoders is not None and not _same_source(made_with, self.encoders.source):
            warnings.warn(
                f"concept {k} was encoded with the encoders {made_with}, generating with {self.encoders.source}",
                ConceptInputWarning,
                stacklevel=3,
            )
        note = _base_model_note(
            f"concept {k} ({concept.metadata.get('source_image', '?')})", concept.metadata.get("base_model"), self.pipe
        )
        if note:
            warnings.warn(note, ConceptInputWarning, stacklevel=3)

    def _token_ids(self, prompt: str, tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.pipe.tokenizer
        return tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def conditioning(
        self,
        prompt: str,
        concepts: Sequence[Concept],
        placeholders: Sequence[str],
        elite_scales: Sequence[float] | None = None,
        num_images: int = 1,
        attention_store=None,
    ):
        """`encoders.conditioning.EliteConditioning` of `prompt` with each concept at its placeholder:
        the prompt embeddings `[1, L, D]`, each concept's w0 position, and the processors' context."""
        text_encoder = self.pipe.text_encoder
        tokenizers, token_ids = self.placeholder_tokenizers(placeholders)
        ids = [self._token_ids(prompt, tokenizer) for tokenizer in tokenizers]
        tokenizer = tokenizers[0]
        for placeholder, token_id in zip(placeholders, token_ids[0]):
            if not bool((ids[0] == token_id).any()):
                raise ConceptInputError(
                    f"prompt {prompt!r}: the placeholder {placeholder!r} was not found as a token (is the prompt "
                    "longer "
                    f"than {tokenizer.model_max_length} tokens, or is the placeholder glued to another word?)"
                )
        words = [c.w0.to(self.device, text_encoder.dtype)[None, None] for c in concepts]
        local = None
        if self.encoders is not None and self.encoders.local_mapping is not None:
            local = [
                None
                if c.local_tokens is None
                else (c.local_tokens.to(self.device, self.dtype)[None], c.local_keep.to(self.device)[None])
                for c in concepts
            ]
        scales = list(elite_scales) if elite_scales is not None else [self.elite_scale] * len(concepts)
        return elite_conditioning(
            text_encoders_of(self.pipe),
            ids,
            token_ids,
            words,
            local=local,
            scale=scales,
            repeat=num_images,
            attention_store=attention_store,
        )

    def _plain_text(self, text: str, negative_of: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embedding or None) of a prompt without concepts, as the pipe encodes
        it. SDXL: its own `encode_prompt`; an empty negative prompt is zeros when the pipe's
        `force_zeros_for_empty_prompt` says so (`negative_of`: the positive pair it must match)."""
        if not is_sdxl_pipeline(self.pipe):
            return self.pipe.text_encoder(self._token_ids(text))[0], None
        if negative_of is not None and not text and self.pipe.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(negative_of[0]), torch.zeros_like(negative_of[1])
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            text, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    def __call__(
        self,
        prompt: str | Sequence[str],
        concepts: Concept | Sequence[Concept] | None = None,
        placeholders: Sequence[str] | None = None,
        elite_scale: float | Sequence[float] | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        spatial_guidance: bool = False,
        guidance_config=None,
        attention_store=None,
        preset: str | None = None,
        word_boxes: dict[str, Sequence[float]] | None = None,
        **pipe_kwargs,
    ) -> EliteOutput:
        """Generate images of `prompt`, a string in which each concept's placeholder stands for it (or a list
        of prompts: one call each, images joined in order, each prompt's output in `per_prompt`).

        concepts: one `Concept` or a list (order = placeholders); None runs the plain base model.
        placeholders: default S* for one concept, S1, S2, ... for several.
        elite_scale: lambda for the local branch (one value, or one per concept); default `set_elite_scale`'s.
        seed: image i uses `torch.Generator("cpu").manual_seed(seed + i)` (reproducible on any device);
            or pass `generator` yourself.
        boxes / spatial_guidance: keep concepts in places (x0, y0, x1, y1 in 0..1, one per concept), or
            predict the places of two concepts with the encoders' location MLP; steered during the first
            reverse steps by `inference.guidance` (`guidance_config`: its `SpatialGuidanceConfig`). The
            output then also carries the boxes, the location loss per step and the attention maps.
        attention_store: receives the cross-attention maps (`record(name, probs, is_cross)`), e.g. for pictures.
        num_inference_steps / guidance_scale: 50 / 5 unless a preset says otherwise.
        word_boxes: boxes for ordinary words of the prompt, steered with the concepts ("S* playing with a
            dog": `{"dog": (0.5, 0.3, 1, 1)}`); needs `boxes` or `spatial_guidance` for the concepts.
        preset: "paper" = ELITE's sampling (`inference.presets`: its LMS sampler for this call, 100 steps,
            guidance 5, lambda 0.8 or 0.6 by prompt); what you pass explicitly wins.
        Other keyword arguments go to the diffusers pipeline (`output_type`, `callback_on_step_end`...).
        """
        if not isinstance(prompt, str):  # a list of prompts: one call each, the images joined in order
            return EliteOutput.join(
                [
                    self.__call__(
                        p,
                        concepts,
                        placeholders,
                        elite_scale,
                        negative_prompt,
                        num_inference_steps,
                        guidance_scale,
                        num_images_per_prompt,
                        seed,
                        generator,
                        height,
                        width,
                        boxes,
                        spatial_guidance,
                        guidance_config,
                        attention_store,
                        preset,
                        word_boxes,
                        **pipe_kwargs,
                    )
                    for p in prompt
                ]
            )
        concept_list = [] if concepts is None else [concepts] if isinstance(concepts, Concept) else list(concepts)
        if concept_list:
            self._require_encoders()
        self.sync_processors()
        placeholders = list(placeholders) if placeholders is not None else default_placeholders(len(concept_list))
        if concept_list and len(placeholders) != len(concept_list):
            raise ConceptInputError(f"{len(concept_list)} concepts but {len(placeholders)} placeholders: give one each")
        if len(set(placeholders)) != len(placeholders):
            raise ConceptInputError(f"placeholders must differ, got {placeholders}")
        if concept_list:
            find_placeholders(prompt, placeholders)
        for k, concept in enumerate(concept_list):
            self._check_concept(concept, k)
        settings = preset_settings(preset)
        num_inference_steps = num_inference_steps or settings.get("num_inference_steps", 50)
        guidance_scale = settings.get("guidance_scale", 5.0) if guidance_scale is None else guidance_scale
        if preset == "paper" and elite_scale is None:
            elite_scale = paper_elite_scale(prompt, placeholders)
        scales = self._scales(elite_scale, len(concept_list))
        user_scheduler = self.pipe.scheduler
        if settings.get("scheduler") == "lms":  # for this call only
            self.pipe.scheduler = elite_lms_scheduler(user_scheduler.config)
        try:
            return self._generate(
                prompt,
                concept_list,
                placeholders,
                scales,
                negative_prompt,
                num_inference_steps,
                guidance_scale,
                num_images_per_prompt,
                seed,
                generator,
                height,
                width,
                boxes,
                spatial_guidance,
                guidance_config,
                attention_store,
                pipe_kwargs,
                word_boxes or {},
            )
        finally:
            self.pipe.scheduler = user_scheduler

    def _generate(
        self,
        prompt,
        concept_list,
        placeholders,
        scales,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        seed,
        generator,
        height,
        width,
        boxes,
        spatial_guidance,
        guidance_config,
        attention_store,
        pipe_kwargs,
        word_boxes,
    ) -> EliteOutput:
        if generator is None and seed is not None:
            generator = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(num_images_per_prompt)]
        use_guidance = bool(boxes) or spatial_guidance or bool(word_boxes)
        if word_boxes and not (boxes or spatial_guidance) and concept_list:
            raise ConceptInputError(
                "word_boxes steer words with the concepts: give the concepts boxes too (or spatial_guidance)"
            )
        if use_guidance and not concept_list and not word_boxes:
            raise ConceptInputError("spatial guidance needs concepts or word_boxes (boxes steer their attention)")

        grad_mode = torch.no_grad() if use_guidance else torch.inference_mode()
        with grad_mode:
            context = None
            if concept_list:
                cond = self.conditioning(
                    prompt, concept_list, placeholders, scales, num_images_per_prompt, attention_store
                )
                prompt_embeds, positions, context = cond.prompt_embeds, cond.word_positions[0].tolist(), cond.context
                pooled = cond.pooled_prompt_embeds
            else:
                (prompt_embeds, pooled), positions = self._plain_text(prompt), []
                if self.encoders is not None and attention_store is not None:
                    context = AttentionContext(attention_store=attention_store)
            negative = negative_prompt or ""
            in_negative = [placeholder_in(negative, p) for p in placeholders] if concept_list else []
            if any(in_negative):
                negative_cond = self.conditioning(
                    negative,
                    [c for c, hit in zip(concept_list, in_negative) if hit],
                    [p for p, hit in zip(placeholders, in_negative) if hit],
                )
                negative_embeds, negative_pooled = negative_cond.prompt_embeds, negative_cond.pooled_prompt_embeds
            else:
                negative_embeds, negative_pooled = self._plain_text(negative, negative_of=(prompt_embeds, pooled))
            call = dict(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                height=height,
                width=width,
                **pipe_kwargs,
            )
            if pooled is not None:  # SDXL
                call.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
            if context is not None:
                call["cross_attention_kwargs"] = context.as_kwargs()
            if use_guidance:
                return self._guided_call(
                    call, concept_list, positions, placeholders, boxes, guidance_config, prompt, word_boxes
                )
            return EliteOutput(images=self.pipe(**call).images)

    def _scales(self, elite_scale, count: int) -> list[float]:
        if elite_scale is None:
            values = [self.elite_scale] * count
        elif isinstance(elite_scale, (int, float)):
            values = [float(elite_scale)] * count
        else:
            values = [float(v) for v in elite_scale]
            if len(values) != count:
                raise ValueError(f"{len(values)} elite_scale values for {count} concepts: give one, or one per concept")
        if any(not 0 <= v < float("inf") for v in values):
            raise ValueError(f"elite_scale (lambda) must be finite and >= 0, got {values}")
        return values

    def predict_boxes(self, concepts: Sequence[Concept]) -> dict:
        """Boxes (x0, y0, x1, y1 in 0..1) for two concepts from the encoders' location MLP, fed their w0:
        `{"boxes": [a, b], "resolved": [noun_a, noun_b]}` (the nouns whose layout each took). Two concepts
        that resolve to the same noun get the same box: that is warned about (give boxes yourself)."""
        encoders = self._require_encoders()
        if encoders.location_mlp is None:
            raise ModelLoadError(
                f"the encoders {encoders.source} have no location_mlp/: give boxes yourself, or use encoders with one"
            )
        if len(concepts) != 2:
            raise ConceptInputError(f"the location MLP places two concepts, got {len(concepts)}")
        predicted = predict_boxes(encoders.location_mlp, self.pipe, concepts[0].w0, concepts[1].w0)
        warn_if_boxes_coincide(predicted)
        return predicted

    def _guided_call(
        self, call: dict, concepts, positions, placeholders, boxes, guidance_config, prompt="", word_boxes=None
    ) -> EliteOutput:
        """Run the prompt through `inference.guidance` (its own denoising loop) with boxes per concept
        (and per ordinary word of `word_boxes`)."""
        nouns = None
        if boxes is None and concepts:
            predicted = self.predict_boxes(concepts)
            boxes, nouns = predicted["boxes"], predicted["resolved"]
        boxes = list(boxes or [])
        if len(boxes) != len(concepts):
            raise ConceptInputError(f"give one box per concept ({len(concepts)}), got {len(boxes)}")
        context = call.pop("cross_attention_kwargs", {}).get("attention_context")
        unsupported = sorted(
            set(call)
            - {
                "prompt_embeds",
                "negative_prompt_embeds",
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
                "num_inference_steps",
                "guidance_scale",
                "num_images_per_prompt",
                "generator",
                "height",
                "width",
                "output_type",
                "latents",
                "eta",
            }
        )
        if unsupported:
            raise TypeError(f"spatial guidance runs its own denoising loop and does not take {unsupported}")
        guided = [
            BoxedTokens(token_indices=[int(position)], box=box, name=placeholder)
            for position, box, placeholder in zip(positions, boxes, placeholders)
        ]
        for word, box in (word_boxes or {}).items():
            tokenizer, _ = self.placeholder_tokenizer(placeholders)
            guided.append(BoxedTokens(find_token_indices(tokenizer, prompt, word), box, name=word))
        out = generate_with_spatial_guidance(
            self.pipe, guided, attention_context=context, config=guidance_config, **call
        )
        out.box_nouns = nouns
        return out


def load_elite(
    pipe, encoders: str | Path, image_encoder: str | Path | None = None, elite_scale: float = DEFAULT_ELITE_SCALE
) -> ElitePipeline:
    """ELITE on a stock diffusers pipeline (text-to-image, img2img, inpainting, ControlNet; SD or SDXL), in the
    shape of `pipe.load_ip_adapter`: loads the encoders (folder or Hub repo) onto the pipe's device and dtype and
    installs the processors (keeping any custom self-attention processor); returns the `ElitePipeline` for
    encoding and generating, also kept as `pipe.elite`. `unload_elite(pipe)` puts back exactly what was there.

    A pipeline made with `from_pipe` from one that has these encoders loaded shares its UNet, and so its ELITE:
    that is used as it is, not loaded twice."""
    state = _unet_state(pipe.unet)
    if state is not None and _same_source(str(encoders), state.encoders.source):
        elite = ElitePipeline(pipe, elite_scale=elite_scale)
        pipe.elite = elite
        return elite
    elite = ElitePipeline(pipe, elite_scale=elite_scale).load_encoders(encoders, image_encoder=image_encoder)
    pipe.elite = elite
    return elite


def set_elite_scale(pipe, elite_scale: float) -> None:
    """Lambda of the ELITE loaded by `load_elite` (the weight of the local detail branch)."""
    _loaded(pipe).set_elite_scale(elite_scale)


def unload_elite(pipe) -> None:
    """Undo `load_elite`: the pipe's attention processors exactly as they were before, no ELITE state left."""
    _loaded(pipe).unload_encoders()
    del pipe.elite


def _loaded(pipe) -> ElitePipeline:
    elite = getattr(pipe, "elite", None)
    if not isinstance(elite, ElitePipeline):
        raise RuntimeError("no ELITE on this pipeline: call inference.load_elite(pipe, encoders) first")
    return elite
