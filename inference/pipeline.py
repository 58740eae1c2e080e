"""`ElitePipeline`: zero-step personalization on top of a diffusers `StableDiffusionPipeline`.

It follows diffusers' adapter conventions: wrap (or load) a base pipeline, `load_encoders` installs
ELITE's attention processors, `set_elite_scale` sets lambda, `unload_encoders` puts the stock
processors back. Device and dtype are the pipeline's. Any scheduler the user swaps into
`pipe.scheduler` is used as is.

    from inference import ElitePipeline
    elite = ElitePipeline.from_pretrained("CompVis/stable-diffusion-v1-4", encoders="ORG/elite-encoders")
    teapot = elite.encode_concept("teapot.jpg", mask="teapot_mask.png")     # one forward pass
    teapot.save("teapot.safetensors")                                       # reuse for any prompt
    images = elite("a photo of S* on the beach", teapot, seed=0, num_images_per_prompt=4).images

How a prompt is run: the placeholder's embedding is replaced by the concept's w0 before the text
encoder (`encoders.text_injection`), the result goes to the pipeline as `prompt_embeds`; the local
tokens, each concept's w0 position and lambda go through `cross_attention_kwargs` as one
`encoders.attention.AttentionContext`, read by the processors for the conditional half of the
guidance batch. Two concepts ("S1 playing with S2") each get their own w0 at their own token and
their local tokens re-weighted by their own token's attention map.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from encoders.attention import AttentionContext, LocalConcept, restore_default_processors, set_elite_processors
from encoders.text_injection import DEFAULT_PLACEHOLDER, add_placeholder_tokens, encode_text_with_words

from .concept import Concept
from .inputs import ConceptInputError, ConceptImage, ImageLike, find_placeholders, load_concept_image, prepare_concept_image
from .loading import ModelLoadError, dtype_kwargs, load_base_pipeline, resolve_device, resolve_dtype

DEFAULT_LAMBDA = 0.6  # ELITE's lambda for editing prompts; 0.8 suits plain "a photo of S*"
PREVIEW_SIZE = 96  # side of the picture a concept file keeps of what was encoded (for grids)


def default_placeholders(count: int) -> list[str]:
    """S* for one concept; S1, S2, ... for several."""
    return [DEFAULT_PLACEHOLDER] if count == 1 else [f"S{k + 1}" for k in range(count)]


@dataclass
class EliteEncoders:
    """What an encoders folder / Hub repo holds, loaded and ready: mappings, image encoder, origin."""

    global_mapping: torch.nn.Module
    local_mapping: torch.nn.Module | None
    location_mlp: torch.nn.Module | None
    feature_extractor: torch.nn.Module  # encoders.clip_features.CLIPFeatureExtractor
    source: str
    image_encoder_name: str
    base_model_name: str | None

    @property
    def text_dim(self) -> int:
        return int(self.global_mapping.config.output_dim)


def _load_subfolder(cls, name_or_path: str, subfolder: str, required: bool, dtype: torch.dtype):
    """`cls.from_pretrained(name_or_path, subfolder=...)`; None when optional and absent."""
    local = Path(name_or_path)
    if local.exists():
        if not (local / subfolder / "config.json").is_file():
            if required:
                raise ModelLoadError(f"encoders folder {local}: no {subfolder}/config.json (is this an encoders folder?)")
            return None
    try:
        return cls.from_pretrained(str(name_or_path), subfolder=subfolder, **dtype_kwargs(dtype))
    except (OSError, ValueError, EnvironmentError) as err:
        if not required and not local.exists():
            return None  # a Hub repo without the optional subfolder
        raise ModelLoadError(f"cannot load {subfolder}/ from the encoders {name_or_path}: {err}") from err


def load_encoders(
    name_or_path: str | Path,
    image_encoder: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> EliteEncoders:
    """Load global_mapping/ (required), local_mapping/ and location_mlp/ (optional) and the image encoder.

    The image encoder is the one recorded in the global mapping's config unless `image_encoder`
    overrides it (e.g. a local copy of `openai/clip-vit-large-patch14`).
    """
    from encoders.clip_features import CLIPFeatureExtractor
    from encoders.global_mapping import GlobalMapping
    from encoders.local_mapping import LocalMapping
    from encoders.location_mlp import LocationMLP

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    global_mapping = _load_subfolder(GlobalMapping, name, "global_mapping", True, dtype)
    local_mapping = _load_subfolder(LocalMapping, name, "local_mapping", False, dtype)
    location_mlp = _load_subfolder(LocationMLP, name, "location_mlp", False, torch.float32)

    image_encoder_name = str(image_encoder or global_mapping.config.image_encoder_name_or_path or "")
    if not image_encoder_name:
        raise ModelLoadError(
            f"encoders {name}: global_mapping/config.json records no image_encoder_name_or_path; pass the CLIP "
            "vision model it was trained with (--image-encoder / image_encoder=)"
        )
    # one CLIP pass taps every layer either mapping reads
    layers = [int(v) for v in global_mapping.config.feature_layers]
    if local_mapping is not None:
        layers += [int(v) for v in local_mapping.config.feature_layers if int(v) not in layers]
    try:
        extractor = CLIPFeatureExtractor.from_pretrained(image_encoder_name, layers=tuple(layers), torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load the image encoder {image_encoder_name} for the encoders {name}: {err}") from err
    if extractor.hidden_size != global_mapping.config.input_dim:
        raise ModelLoadError(
            f"encoders {name} read image features of width {global_mapping.config.input_dim}, but the image "
            f"encoder {image_encoder_name} gives {extractor.hidden_size}: pass the image encoder they were trained with"
        )
    if local_mapping is not None and local_mapping.config.input_dim != global_mapping.config.input_dim:
        raise ModelLoadError(f"encoders {name}: local_mapping and global_mapping expect different image-feature widths")
    for model in (global_mapping, local_mapping, location_mlp, extractor):
        if model is not None:
            model.to(device).eval().requires_grad_(False)
    return EliteEncoders(
        global_mapping=global_mapping,
        local_mapping=local_mapping,
        location_mlp=location_mlp,
        feature_extractor=extractor,
        source=name,
        image_encoder_name=image_encoder_name,
        base_model_name=global_mapping.config.pretrained_model_name_or_path,
    )


def check_encoders_fit(encoders: EliteEncoders, pipe) -> None:
    """Raise `ModelLoadError` unless the encoders were made for this base model's shapes.

    Checks the text embedding width and, for each mapping, the UNet's cross-attention layer names
    and their (context_dim, inner_dim): what a folder trained for another base model gets wrong.
    """
    from encoders.attention import cross_attention_layers

    made_for = encoders.base_model_name or "an unrecorded base model"
    text_dim = int(pipe.text_encoder.config.hidden_size)
    if encoders.text_dim != text_dim:
        raise ModelLoadError(
            f"encoders {encoders.source} make word embeddings of size {encoders.text_dim} but this base model's "
            f"text encoder uses {text_dim}: they were trained for {made_for}, not for this base model"
        )
    unet_layers = {name: tuple(dims) for name, dims in cross_attention_layers(pipe.unet).items()}
    for label, model in (("global_mapping", encoders.global_mapping), ("local_mapping", encoders.local_mapping)):
        if model is None:
            continue
        theirs = {name: tuple(int(d) for d in dims) for name, dims in (model.config.kv_layers or {}).items()}
        missing = sorted(set(unet_layers) - set(theirs))
        extra = sorted(set(theirs) - set(unet_layers))
        if missing or extra:
            raise ModelLoadError(
                f"encoders {encoders.source}: {label} has K/V projections for {len(theirs)} cross-attention layers but "
                f"this UNet has {len(unet_layers)} (missing e.g. {missing[:1]}, unknown e.g. {extra[:1]}); "
                f"they were trained for {made_for}"
            )
        wrong = [(n, theirs[n], unet_layers[n]) for n in unet_layers if theirs[n] != unet_layers[n]]
        if wrong:
            name, got, want = wrong[0]
            raise ModelLoadError(
                f"encoders {encoders.source}: {label} layer {name} projects {got[0]} -> {got[1]} but this UNet's "
                f"layer is {want[0]} -> {want[1]}; they were trained for {made_for}"
            )
    if encoders.location_mlp is not None and int(encoders.location_mlp.config.embedding_dim) != text_dim:
        raise ModelLoadError(
            f"encoders {encoders.source}: location_mlp reads embeddings of size "
            f"{encoders.location_mlp.config.embedding_dim}, this base model's are {text_dim}"
        )


def _image_tensor(image, size: int, device, resample) -> torch.Tensor:
    """PIL image -> `[1, C, size, size]` float in [0, 1] (antialiased PIL resize, as the reference)."""
    array = np.asarray(image.resize((size, size), resample), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)


class ElitePipeline:
    """A `StableDiffusionPipeline` plus ELITE encoders: encode a concept photo, generate with it.

    `pipe` stays a plain diffusers pipeline (swap its scheduler, move it, enable offloading); this
    object only adds processors, text injection and the per-call attention context.
    """

    def __init__(self, pipe, encoders: EliteEncoders | None = None, lam: float = DEFAULT_LAMBDA):
        self.pipe = pipe
        self.encoders: EliteEncoders | None = None
        self.lam = float(lam)
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
        lam: float = DEFAULT_LAMBDA,
    ) -> "ElitePipeline":
        """Load the base pipeline (folder or Hub id) and, when given, the encoders (folder or Hub repo)."""
        pipe = load_base_pipeline(base, device=device, dtype=dtype, scheduler=scheduler, safety_checker=safety_checker)
        elite = cls(pipe, lam=lam)
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

    @property
    def image_encoder_name(self) -> str | None:
        return None if self.encoders is None else self.encoders.image_encoder_name

    def load_encoders(self, name_or_path: str | Path, image_encoder: str | Path | None = None) -> "ElitePipeline":
        """Load an encoders folder / Hub repo onto this pipeline's device and dtype, check it fits, install it."""
        encoders = load_encoders(name_or_path, image_encoder=image_encoder, device=self.device, dtype=self.dtype)
        self._install(encoders)
        return self

    def _install(self, encoders: EliteEncoders) -> None:
        check_encoders_fit(encoders, self.pipe)
        set_elite_processors(self.pipe.unet, encoders.global_mapping, encoders.local_mapping)
        self.encoders = encoders

    def set_elite_scale(self, lam: float) -> None:
        """Default lambda (weight of the local detail branch) for later calls; 0 = global word only."""
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        self.lam = float(lam)

    def unload_encoders(self) -> None:
        """Put diffusers' stock attention processors back and drop the encoders (placeholder tokens stay
        in the tokenizer: they are unused by any prompt without them)."""
        restore_default_processors(self.pipe.unet)
        self.encoders = None

    # ---- encoding --------------------------------------------------------------------------
    def _require_encoders(self) -> EliteEncoders:
        if self.encoders is None:
            raise RuntimeError("no encoders loaded: call load_encoders(path_or_repo) first")
        return self.encoders

    @torch.inference_mode()
    def encode_concept(
        self,
        image: ImageLike | ConceptImage,
        mask: ImageLike | None = None,
        crop: bool = True,
        return_input: bool = False,
        w0_from: str | None = None,
    ):
        """Photo (+ mask) -> `Concept` (w0, local tokens, keep-mask, metadata). One forward pass, no optimisation.

        `image` may also be a ready `ConceptImage`. `crop=False` encodes the whole photo instead of a
        square around the mask. `w0_from`: "object" (the object on black, as the local training stage
        reads it; the default with a local mapping) or "crop" (with background, as the global stage;
        the default without). With `return_input=True` returns `(concept, prepared ConceptImage)`, the
        crop the encoders saw (for grids).
        """
        encoders = self._require_encoders()
        return encode_with(encoders, image, mask, crop=crop, return_input=return_input, w0_from=w0_from)

    # ---- generation --------------------------------------------------------------------------
    def _concept_list(self, concepts) -> list[Concept]:
        if concepts is None:
            return []
        if isinstance(concepts, Concept):
            return [concepts]
        return list(concepts)

    def _check_concept(self, concept: Concept, k: int) -> None:
        text_dim = int(self.pipe.text_encoder.config.hidden_size)
        if concept.text_dim != text_dim:
            raise ConceptInputError(
                f"concept {k} ({concept.metadata.get('source_image', '?')}) has w0 of size {concept.text_dim}; this base "
                f"model's text embeddings are {text_dim} (it was made with encoders {concept.metadata.get('encoders', '?')})"
            )
        made_with = concept.metadata.get("encoders")
        if made_with and self.encoders is not None and not _same_source(made_with, self.encoders.source):
            warnings.warn(
                f"concept {k} was encoded with the encoders {made_with}, generating with {self.encoders.source}",
                stacklevel=3,
            )

    def encode_prompt(
        self, prompt: str, concepts: Sequence[Concept], placeholders: Sequence[str]
    ) -> tuple[torch.Tensor, list[int]]:
        """Text-encoder hidden states `[1, L, D]` for `prompt` with each concept's w0 at its placeholder,
        and the token index of each concept's w0 (for the local branch's re-weighting)."""
        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        if not concepts:
            return self._plain_text(prompt), []
        token_ids = add_placeholder_tokens(tokenizer, list(placeholders))
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        for placeholder, token_id in zip(placeholders, token_ids):
            if not bool((ids == token_id).any()):
                raise ConceptInputError(
                    f"prompt {prompt!r}: the placeholder {placeholder!r} was not found as a token (is the prompt longer "
                    f"than {tokenizer.model_max_length} tokens, or is the placeholder glued to another word?)"
                )
        words = [c.w0.to(self.device, text_encoder.dtype)[None, None] for c in concepts]
        out = encode_text_with_words(text_encoder, ids, token_ids, words)
        return out.hidden_states, out.word_positions[0].tolist()

    def _plain_text(self, text: str) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.pipe.text_encoder(ids)[0]

    def __call__(
        self,
        prompt: str,
        concepts: Concept | Sequence[Concept] | None = None,
        placeholders: Sequence[str] | None = None,
        lam: float | Sequence[float] | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        spatial_guidance: bool = False,
        guidance_config=None,
        attention_store=None,
        **pipe_kwargs,
    ):
        """Generate images of `prompt`, a string in which each concept's placeholder stands for it.

        concepts: one `Concept` or a list (order = placeholders); None runs the plain base model.
        placeholders: default S* for one concept, S1, S2, ... for several.
        lam: lambda for the local branch (one value, or one per concept); default `set_elite_scale`'s.
        seed: image i uses `torch.Generator("cpu").manual_seed(seed + i)` (reproducible on any device);
            or pass `generator` yourself.
        boxes / spatial_guidance: keep concepts in places (x0, y0, x1, y1 in 0..1, one per concept), or
            predict the places of two concepts with the encoders' location MLP; steered during the first
            reverse steps by `inference.guidance` (`guidance_config`: its `SpatialGuidanceConfig`). The
            result then also carries the location loss per step and the concepts' attention maps.
        attention_store: receives the cross-attention maps (`record(name, probs, is_cross)`), e.g. for pictures.
        Other keyword arguments go to the diffusers pipeline (`output_type`, `callback_on_step_end`...).
        Returns the pipeline's output (`.images`).
        """
        concept_list = self._concept_list(concepts)
        if concept_list:
            self._require_encoders()
        placeholders = list(placeholders) if placeholders is not None else default_placeholders(len(concept_list))
        if concept_list and len(placeholders) != len(concept_list):
            raise ConceptInputError(f"{len(concept_list)} concepts but {len(placeholders)} placeholders: give one each")
        if len(set(placeholders)) != len(placeholders):
            raise ConceptInputError(f"placeholders must differ, got {placeholders}")
        if concept_list:
            find_placeholders(prompt, placeholders)
        for k, concept in enumerate(concept_list):
            self._check_concept(concept, k)
        lams = self._lambdas(lam, len(concept_list))
        if generator is None and seed is not None:
            generator = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(num_images_per_prompt)]
        use_guidance = bool(boxes) or spatial_guidance
        if use_guidance and len(concept_list) < 1:
            raise ConceptInputError("spatial guidance needs concepts (boxes steer the concepts' attention)")

        grad_mode = torch.no_grad() if use_guidance else torch.inference_mode()
        with grad_mode:
            prompt_embeds, positions = self.encode_prompt(prompt, concept_list, placeholders)
            negative = negative_prompt or ""
            if concept_list and any(p in negative for p in placeholders):
                negative_embeds, _ = self.encode_prompt(
                    negative, [c for c, p in zip(concept_list, placeholders) if p in negative],
                    [p for p in placeholders if p in negative],
                )
            else:
                negative_embeds = self._plain_text(negative)
            context = None
            if self.encoders is not None:
                context = self._attention_context(concept_list, positions, lams, num_images_per_prompt, attention_store)
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
            if context is not None:
                call["cross_attention_kwargs"] = context.as_kwargs()
            if use_guidance:
                return self._guided_call(
                    call, concept_list, positions, placeholders, boxes, spatial_guidance, guidance_config
                )
            return self.pipe(**call)

    def _lambdas(self, lam, count: int) -> list[float]:
        if lam is None:
            values = [self.lam] * count
        elif isinstance(lam, (int, float)):
            values = [float(lam)] * count
        else:
            values = [float(v) for v in lam]
            if len(values) != count:
                raise ValueError(f"{len(values)} lambda values for {count} concepts: give one, or one per concept")
        if any(v < 0 for v in values):
            raise ValueError(f"lambda must be >= 0, got {values}")
        return values

    def _attention_context(self, concepts, positions, lams, num_images: int, attention_store) -> AttentionContext:
        """The per-call `AttentionContext`: local tokens for the conditional half, repeated per image."""
        local = []
        for concept, position, lam in zip(concepts, positions, lams):
            if concept.local_tokens is None or self.encoders.local_mapping is None:
                continue
            tokens = concept.local_tokens.to(self.device, self.dtype)[None].expand(num_images, -1, -1)
            keep = concept.local_keep.to(self.device)[None].expand(num_images, -1)
            local.append(LocalConcept(tokens=tokens, token_index=int(position), keep=keep, lam=lam))
        return AttentionContext(concepts=local, attention_store=attention_store)

    def predict_boxes(self, concepts: Sequence[Concept]) -> list[list[float]]:
        """Boxes (x0, y0, x1, y1 in 0..1) for two concepts from the encoders' location MLP, fed their w0."""
        from .guidance import predict_boxes

        encoders = self._require_encoders()
        if encoders.location_mlp is None:
            raise ModelLoadError(
                f"the encoders {encoders.source} have no location_mlp/: give boxes yourself, or use encoders with one"
            )
        if len(concepts) != 2:
            raise ConceptInputError(f"the location MLP places two concepts, got {len(concepts)}")
        return predict_boxes(encoders.location_mlp, self.pipe, concepts[0].w0, concepts[1].w0)["boxes"]

    def _guided_call(self, call: dict, concepts, positions, placeholders, boxes, spatial_guidance, guidance_config):
        """Run the prompt through `inference.guidance` (its own denoising loop) with boxes per concept."""
        from .guidance import GuidedConcept, generate_with_spatial_guidance

        if boxes is None:
            boxes = self.predict_boxes(concepts) if spatial_guidance else None
        if boxes is None or len(boxes) != len(concepts):
            raise ConceptInputError(f"give one box per concept ({len(concepts)}), got {0 if boxes is None else len(boxes)}")
        context = call.pop("cross_attention_kwargs", {}).get("attention_context")
        unsupported = sorted(set(call) - {
            "prompt_embeds", "negative_prompt_embeds", "num_inference_steps", "guidance_scale",
            "num_images_per_prompt", "generator", "height", "width", "output_type", "latents", "eta",
        })
        if unsupported:
            raise TypeError(f"spatial guidance runs its own denoising loop and does not take {unsupported}")
        guided = [
            GuidedConcept(token_indices=[int(position)], box=box, name=placeholder)
            for position, box, placeholder in zip(positions, boxes, placeholders)
        ]
        return generate_with_spatial_guidance(
            self.pipe, guided, attention_context=context, config=guidance_config, **call
        )


def _same_source(a: str, b: str) -> bool:
    """Whether two encoders names point at the same folder (or are the same Hub id)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _file_name(source: str) -> str:
    """A photo's file name for metadata (no local directories); descriptions stay as they are."""
    return source if source.startswith("<") or source in ("alpha channel", "whole image") else Path(source).name


def _w0_source(encoders: EliteEncoders, w0_from: str | None) -> str:
    """Which view of the photo w0 is read from: as the last training stage did, unless told otherwise.

    The local stage computes w0 from the object on black (the view its local tokens come from), the
    global stage from the whole crop; so "object" with a local mapping, "crop" without one.
    """
    if w0_from is None:
        return "object" if encoders.local_mapping is not None else "crop"
    if w0_from not in ("object", "crop"):
        raise ValueError(f"w0_from must be 'object' or 'crop', got {w0_from!r}")
    return w0_from


def encode_with(
    encoders: EliteEncoders,
    image: ImageLike | ConceptImage,
    mask: ImageLike | None = None,
    crop: bool = True,
    return_input: bool = False,
    w0_from: str | None = None,
):
    """Encode a concept photo with loaded encoders (see `ElitePipeline.encode_concept`)."""
    from PIL import Image

    from encoders.clip_features import mask_background

    loaded = image if isinstance(image, ConceptImage) else load_concept_image(image, mask)
    prepared = prepare_concept_image(loaded, crop=crop)
    source = _w0_source(encoders, w0_from)
    extractor = encoders.feature_extractor
    device = extractor.image_mean.device
    size = extractor.image_size
    w0_layer = int(encoders.global_mapping.config.feature_layers[0])
    with torch.inference_mode():
        pixels = _image_tensor(prepared.image, size, device, Image.BICUBIC)
        mask_t = (_image_tensor(prepared.mask, size, device, Image.NEAREST) > 0.5).float()
        views = {}
        if source == "crop":
            views["crop"] = dict(zip(extractor.layers, extractor.encode(pixels)))
        if source == "object" or encoders.local_mapping is not None:
            views["object"] = dict(zip(extractor.layers, extractor.encode(mask_background(pixels, mask_t))))
        w0 = encoders.global_mapping([views[source][w0_layer]], num_words=1)[0, 0].float().cpu()
        tokens = keep = None
        if encoders.local_mapping is not None:
            feats = [views["object"][int(layer)] for layer in encoders.local_mapping.config.feature_layers]
            out = encoders.local_mapping(feats, mask_t)
            tokens, keep = out.tokens[0].float().cpu(), out.keep[0].cpu()
    metadata = {
        "encoders": encoders.source,
        "base_model": encoders.base_model_name or "",
        "image_encoder": encoders.image_encoder_name,
        "source_image": _file_name(prepared.source),
        "mask_source": _file_name(prepared.mask_source),
        "crop_xyxy": ",".join(str(v) for v in prepared.crop_xyxy),
        "mask_fraction": f"{prepared.mask_fraction:.4f}",
        "w0_from": source,
    }
    from .outputs import mask_preview

    thumb = mask_preview(prepared.image, prepared.mask).resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.BICUBIC)
    preview = torch.from_numpy(np.asarray(thumb, dtype=np.uint8).copy())
    concept = Concept(w0=w0, local_tokens=tokens, local_keep=keep, metadata=metadata, preview=preview)
    return (concept, prepared) if return_input else concept


def encode_concept_standalone(
    encoders: str | Path,
    image: ImageLike,
    mask: ImageLike | None = None,
    base: str | Path | None = None,
    image_encoder: str | Path | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    crop: bool = True,
) -> Concept:
    """Encode without a UNet in memory (only the image encoder and mappings); with `base`, check the
    encoders fit it first (loads the base pipeline's configs and weights)."""
    loaded = load_encoders(encoders, image_encoder=image_encoder, device=device, dtype=dtype)
    if base is not None:
        check_encoders_fit(loaded, load_base_pipeline(base, device="cpu", dtype="float32", safety_checker=False))
    return encode_with(loaded, image, mask, crop=crop)

