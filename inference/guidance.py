"""Spatial guidance (compositional inversion's spatial inversion): steer concept tokens into boxes.

Each concept token i of the prompt gets a box; the box becomes a mask M_i at the resolution of the
cross-attention map A_i of the chosen UNet layers. The default loss (`loss="official"`) is the official
code's (Zhang et al., "Compositional Inversion for Stable Diffusion Models", AAAI 2024; its
`utils/layout_control.py`, from layout guidance, Chen et al. 2023): per layer, concept and token and
per attention head h, a_h = sum(M_i * A_ih) / sum(A_ih), and

    L = mean over layers and concepts of mean over the concept's tokens of mean_h (1 - a_h)^2

with M_i the cells [int(y0 H), int(y1 H)) x [int(x0 W), int(x1 W)) and, as the official code's
`chunk(2)[1]` of a conditional-only pass, the second half of the heads. Its step size 30 and stop
threshold 0.2 were tuned for this squared loss. `loss="paper"` is Eq. 9 as printed, linear, on
head-averaged maps averaged over the concept's tokens, box cells by their centres:

    L_loc = 1/N * sum_i (1 - sum(M_i * A_i) / sum(A_i))
(its default threshold is sqrt(0.2) ~ 0.447, the same attention share as 0.2 squared).

During the first `guidance_steps` reverse steps (paper: 10) the latent is moved down the gradient of
L_loc for a few iterations before the normal denoising step, as in layout guidance (Chen et al.
2023): each iteration runs the UNet on the conditional prompt only, reads its cross-attention
probabilities (kept differentiable by the attention store), and steps the UNet *input* by
`-step_size * (1 - alphabar_t) * grad`. For the k-diffusion style schedulers (LMS, Euler) that is
exactly the reference's `latents -= grad * sigma_t**2` on their unscaled latents; for DDIM/PNDM/DDPM
style schedulers it is the same move expressed in their latents, so any diffusers scheduler with
`alphas_cumprod` works. Stopping (`stop`): "official", as the official `layout_control.py`, each iteration
computes L_loc and steps the latent; once a computed L_loc is below `loss_threshold` that step ends and
guidance is over for the rest of the run (its loss variable outlives the step loop); "per_step" checks
L_loc before each iteration, steps only while it is above the threshold, and looks again at every guided step.

Entry point for the inference API: `generate_with_spatial_guidance(pipe, concepts, prompt=... or
prompt_embeds=...)`, with concepts from `concepts_from_words` (plain words), from token indices (ELITE's
S*, whose position `encoders.text_injection` knows) and boxes from the user or from a `LocationMLP`.
Works with the StableDiffusionPipeline's components; it writes its own denoising loop (the pipeline's
callbacks run after a step, too late to move the latent the step itself uses). The picture of a run
(guidance off / on, boxes, attention maps) is `inference.pictures.render_comparison`; the command
line is `python -m inference guide` (`inference.cli`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from encoders.anchors import embed_words
from encoders.attention import CONTEXT_KWARG, AttentionContext, runs_context, set_context_processors
from encoders.conditioning import sdxl_added_conditioning

from .inputs import ConceptInputError, ConceptInputWarning
from .loading import is_sdxl_pipeline, text_encoders_of, tokenizers_of
from .outputs import EliteOutput

Box = Sequence[float]  # (x0, y0, x1, y1) in 0..1 of the image
LOSS_FORMS = ("official", "paper")
STOP_RULES = ("official", "per_step")


@dataclass
class SpatialGuidanceConfig:
    """How hard and how long to steer. Defaults follow the paper (10 steps) and layout guidance (5, 30, 0.2)."""

    guidance_steps: int = 10
    iterations: int = 5
    step_size: float = 30.0
    loss_threshold: float | None = None  # None: 0.2 for the official loss, sqrt(0.2) for the paper's linear one
    layers: Sequence[str] | None = (
        None  # substrings of cross-attention processor names; None = `default_guidance_layers`
    )
    loss: str = "official"  # "official" (per head, squared) or "paper" (Eq. 9, linear); see the module docstring
    stop: str = "official"  # "official" (under the threshold once: guidance over) or "per_step"; module docstring

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {self.stop!r}")
        if self.guidance_steps < 0 or self.iterations < 0:
            raise ValueError("guidance_steps and iterations must be >= 0")
        if self.step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {self.step_size}")
        if self.loss not in LOSS_FORMS:
            raise ValueError(f"loss must be one of {', '.join(LOSS_FORMS)}, got {self.loss!r}")
        if self.loss_threshold is None:
            self.loss_threshold = 0.2 if self.loss == "official" else math.sqrt(0.2)


@dataclass
class BoxedTokens:
    """One concept of the prompt: its token positions (in the tokenized prompt, BOS = 0) and its box."""

    token_indices: list[int]
    box: Box
    name: str = ""

    def __post_init__(self) -> None:
        self.box = validate_box(self.box, self.name or str(self.token_indices))
        if not self.token_indices:
            raise ValueError(f"concept {self.name!r} has no token positions")


def validate_box(box: Box, what: str = "box") -> tuple[float, float, float, float]:
    """Check an (x0, y0, x1, y1) box in 0..1 with x0 < x1 and y0 < y1; return it as floats."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: a box is four numbers x0,y0,x1,y1, got {box!r}") from None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"{what}: box {box!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def find_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s tokens in the tokenized `prompt` (with BOS at 0), from the tokenizer's ids.

    The first occurrence wins; a word the tokenizer splits into several tokens gives several positions.
    """
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not word_ids:
        raise ConceptInputError(f"word {word!r} gives no tokens; name a word of the prompt")
    n = len(word_ids)
    for start in range(len(prompt_ids) - n + 1):
        if prompt_ids[start : start + n] == word_ids:
            return list(range(start, start + n))
    raise ConceptInputError(
        f"word {word!r} is not in the prompt {prompt!r}; --words names words of the prompt, one per box"
    )


def concepts_from_words(tokenizer, prompt: str, words: Sequence[str], boxes: Sequence[Box]) -> list[BoxedTokens]:
    """`BoxedTokens`s for words of the prompt, one box each."""
    if len(words) != len(boxes):
        raise ValueError(f"{len(words)} words but {len(boxes)} boxes")
    return [BoxedTokens(find_token_indices(tokenizer, prompt, w), b, name=w) for w, b in zip(words, boxes)]


def box_mask(box: Box, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`[height, width]` mask: 1 where a cell's centre lies inside the box; never empty (the cell at the box centre)."""
    x0, y0, x1, y1 = validate_box(box)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    if not inside.any():
        cy = min(int((y0 + y1) / 2 * height), height - 1)
        cx = min(int((x0 + x1) / 2 * width), width - 1)
        inside[cy, cx] = True
    return inside.to(dtype)


def official_box_mask(box: Box, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The official code's mask: cells [int(y0 H), int(y1 H)) x [int(x0 W), int(x1 W)) (never empty here:
    at least the cell holding the box's corner)."""
    x0, y0, x1, y1 = validate_box(box)
    mask = torch.zeros(height, width, device=device, dtype=dtype)
    r0, c0 = min(int(y0 * height), height - 1), min(int(x0 * width), width - 1)
    mask[r0 : max(int(y1 * height), r0 + 1), c0 : max(int(x1 * width), c0 + 1)] = 1
    return mask


def map_shape(num_queries: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """(h, w) of an attention map with `num_queries` pixels for a latent of the given size."""
    factor = math.sqrt(latent_height * latent_width / num_queries)
    h, w = round(latent_height / factor), round(latent_width / factor)
    if h * w != num_queries:
        raise ValueError(f"cannot lay {num_queries} queries out on a {latent_height}x{latent_width} latent's grid")
    return h, w


class AttentionMapStore:
    """An `encoders.attention` store: receives cross-attention probabilities (`record`), keeps them per layer.

    Probabilities come as `[batch, heads, queries, tokens]` and stay attached to the graph, so L_loc
    can be differentiated w.r.t. the latent. Only layers whose processor name contains one of
    `layers` are kept (None keeps every cross-attention layer). `rows` selects the samples whose maps
    matter (the conditional half of a classifier-free-guidance batch).
    """

    def __init__(self, layers: Sequence[str] | None = None):
        self.layers = list(layers) if layers is not None else None
        self.rows: slice = slice(None)
        self.maps: dict[str, torch.Tensor] = {}
        self.forward_to: Any = None  # the caller's own store, if any, also receives the denoising passes' maps

    def wanted(self, processor_name: str) -> bool:
        return self.layers is None or any(key in processor_name for key in self.layers)

    @property
    def record_self_attention(self) -> bool:
        return bool(getattr(self.forward_to, "record_self_attention", False))

    def record(self, processor_name: str, probs: torch.Tensor, is_cross: bool) -> None:
        if self.forward_to is not None:
            self.forward_to.record(processor_name, probs, is_cross)
        if not is_cross or not self.wanted(processor_name):
            return
        if probs.ndim != 4:
            raise ValueError(
                f"{processor_name}: expected probabilities [batch, heads, queries, tokens], got {tuple(probs.shape)}"
            )
        self.maps[processor_name] = probs[self.rows].float()  # [B, H, Q, T], fp32

    def reset(self, rows: slice = slice(None)) -> None:
        self.rows, self.maps = rows, {}

    def concept_maps(self, concepts: Sequence[BoxedTokens], latent_hw: tuple[int, int]) -> list[list[torch.Tensor]]:
        """Per layer, per concept: `[B, h, w]` maps (mean over the concept's tokens)."""
        if not self.maps:
            raise RuntimeError(
                "no cross-attention maps were recorded: are the recording processors installed and the "
                f"layers {self.layers} present in this UNet?"
            )
        out = []
        for probs in self.maps.values():
            averaged = probs.mean(dim=1)  # [B, Q, T], heads averaged
            h, w = map_shape(averaged.shape[1], *latent_hw)
            out.append([averaged[:, :, c.token_indices].mean(dim=-1).reshape(-1, h, w) for c in concepts])
        return out


def location_loss(
    store: AttentionMapStore, concepts: Sequence[BoxedTokens], latent_hw: tuple[int, int], form: str = "official"
) -> torch.Tensor:
    """The location loss averaged over the recorded layers and the batch: the official per-head squared
    form (default) or the paper's Eq. 9 (`form="paper"`); see the module docstring."""
    if form == "official":
        return _official_location_loss(store, concepts, latent_hw)
    if form != "paper":
        raise ValueError(f"form must be one of {', '.join(LOSS_FORMS)}, got {form!r}")
    per_layer = []
    for maps in store.concept_maps(concepts, latent_hw):
        terms = []
        for concept, a in zip(concepts, maps):
            m = box_mask(concept.box, a.shape[1], a.shape[2], device=a.device, dtype=a.dtype)
            inside = (a * m).sum(dim=(1, 2))
            terms.append(1.0 - inside / a.sum(dim=(1, 2)).clamp_min(1e-12))
        per_layer.append(torch.stack(terms).mean(dim=0))  # [B]
    return torch.stack(per_layer).mean()


def _official_location_loss(store: AttentionMapStore, concepts: Sequence[BoxedTokens], latent_hw: tuple[int, int]):
    if not store.maps:
        store.concept_maps(concepts, latent_hw)  # raises the no-maps error
    per_layer = []
    for probs in store.maps.values():  # [B, H, Q, T]
        heads = probs.shape[1]
        probs = probs[:, heads // 2 :] if heads > 1 else probs  # the official chunk(2)[1] of a conditional-only pass
        h, w = map_shape(probs.shape[2], *latent_hw)
        terms = []
        for concept in concepts:
            m = official_box_mask(concept.box, h, w, device=probs.device, dtype=probs.dtype).flatten()
            per_token = []
            for index in concept.token_indices:
                a = probs[..., index]  # [B, H', Q]
                share = (a * m).sum(dim=-1) / a.sum(dim=-1).clamp_min(1e-12)
                per_token.append(((1.0 - share) ** 2).mean(dim=1))  # [B], mean over heads
            terms.append(torch.stack(per_token).mean(dim=0))
        per_layer.append(torch.stack(terms).mean(dim=0))
    return torch.stack(per_layer).mean()


def default_guidance_layers(unet) -> list[str]:
    """The mid block and the lowest-resolution up block with cross-attention (SD at 512 px: 8x8 and 16x16,
    the maps the reference uses; SDXL at 1024 px: 32x32 for both, 1/32 of the image like SD's 16x16, as it
    has no lower level)."""
    names = [n for n in unet.attn_processors if "attn2" in n]
    up_ids = sorted({int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")})
    layers = [n for n in names if n.startswith("mid_block.")]
    if up_ids:
        layers += [n for n in names if n.startswith(f"up_blocks.{up_ids[0]}.")]
    if not layers:
        raise ValueError("this UNet has no cross-attention layers to guide")
    return layers


def _alphabar(scheduler, timestep) -> float:
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(
            f"{type(scheduler).__name__} has no alphas_cumprod: spatial guidance needs a DDPM-family scheduler"
        )
    table = scheduler.alphas_cumprod
    index = int(round(float(timestep)))
    return float(table[min(max(index, 0), len(table) - 1)])


def _upsample_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average `[B, h, w]` maps of different resolutions at the largest one."""
    size = max((m.shape[-2], m.shape[-1]) for m in maps)
    return torch.stack([F.interpolate(m[:, None].float(), size=size, mode="bilinear")[:, 0] for m in maps]).mean(0)


@contextmanager
def recording_processors(unet) -> Iterator[None]:
    """Make sure every attention layer runs a processor that hands maps to an attention store.

    ELITE's processors (and anything built on `encoders.attention.ContextAttnProcessor`) already do;
    otherwise the plain-word recording processors are installed for the duration and the UNet's own
    processors are put back afterwards.
    """
    current = dict(unet.attn_processors)
    if all(runs_context(p) for p in current.values()):
        yield
        return
    set_context_processors(unet)
    try:
        yield
    finally:
        unet.set_attn_processor(current)


def _context_kwargs(base: Any, store: AttentionMapStore, tee: bool = False) -> dict:
    """`cross_attention_kwargs` carrying `store`, on top of the caller's `AttentionContext` (ELITE) if any.

    With `tee`, the caller's own attention store (if it set one) receives the same maps (denoising passes).
    """
    if base is None:
        store.forward_to = None
        ctx = AttentionContext(attention_store=store)
    elif isinstance(base, AttentionContext):
        store.forward_to = base.attention_store if tee else None
        ctx = dataclasses.replace(base, attention_store=store)
    else:
        raise TypeError(f"attention_context must be an encoders.attention.AttentionContext, got {type(base).__name__}")
    return {CONTEXT_KWARG: ctx}


def guide_latents(
    unet,
    scheduler,
    latents: torch.Tensor,
    timestep,
    cond_embeds: torch.Tensor,
    concepts: Sequence[BoxedTokens],
    config: SpatialGuidanceConfig,
    store: AttentionMapStore,
    attention_context: Any = None,
    latent_hw: tuple[int, int] | None = None,
    added_cond_kwargs: dict | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """A few gradient steps of L_loc on `latents` at `timestep` (conditional prompt only).

    Returns the moved latents (detached) and L_loc before each iteration (plus after the last one).
    The step is `-step_size * (1 - alphabar_t) * grad` on the UNet input (see the module docstring);
    `config.stop` "official" steps after every computed L_loc and ends once one is under the threshold,
    "per_step" ends before stepping.
    `added_cond_kwargs`: SDXL's pooled embedding and size numbers of the conditional prompt.
    """
    latent_hw = latent_hw or (latents.shape[-2], latents.shape[-1])
    alphabar = _alphabar(scheduler, timestep)
    kwargs = _context_kwargs(attention_context, store)
    losses: list[float] = []
    latents = latents.detach()
    stop_after = False  # official: an L_loc under the threshold still steps once; then the measurement, then stop
    for iteration in range(config.iterations + 1):
        with torch.enable_grad():
            model_in = scheduler.scale_model_input(latents, timestep).detach().requires_grad_(True)
            store.reset()
            unet(
                model_in,
                timestep,
                encoder_hidden_states=cond_embeds,
                cross_attention_kwargs=kwargs,
                added_cond_kwargs=added_cond_kwargs,
            )
            loss = location_loss(store, concepts, latent_hw, config.loss)
            losses.append(float(loss.detach()))
            below = losses[-1] < config.loss_threshold
            if iteration == config.iterations or stop_after or (below and config.stop == "per_step"):
                break
            stop_after = below
            (grad,) = torch.autograd.grad(loss, model_in)
        store.reset()
        scale = float(model_in.detach().flatten().norm() / latents.flatten().norm().clamp_min(1e-12))
        moved_in = model_in.detach() - config.step_size * (1.0 - alphabar) * grad
        latents = (moved_in / scale).to(latents.dtype)
    store.reset()
    return latents.detach(), losses


@torch.no_grad()
def generate_with_spatial_guidance(
    pipe,
    concepts: Sequence[BoxedTokens],
    prompt: str | list[str] | None = None,
    *,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    eta: float = 0.0,
    config: SpatialGuidanceConfig | None = None,
    attention_context: Any = None,
    output_type: str = "pil",
) -> EliteOutput:
    """Text-to-image with spatial guidance, on a `StableDiffusionPipeline`'s (or `StableDiffusionXLPipeline`'s)
    components; SDXL's pooled embeddings come with the prompt embeddings (or from its `encode_prompt`)
    and its size numbers say an uncropped `height` x `width` image, as that pipeline's defaults.

    `concepts`: token positions + boxes (`concepts_from_words`, or `BoxedTokens(token_indices=[i], box=...)`
    for ELITE's S*). Give `prompt` or `prompt_embeds` (+ `negative_prompt_embeds`), as with the pipeline.
    `attention_context`: the `encoders.attention.AttentionContext` of ELITE's processors (local
    tokens), if they are installed; the attention store is added to it. `config.guidance_steps=0`
    is plain generation through the same loop (the "off" half of a comparison).
    Returns images, L_loc of each denoising pass, the guidance iterations' L_loc, and per-concept
    attention maps averaged over the steps (for pictures).
    """
    config = config or SpatialGuidanceConfig()
    if not concepts:
        raise ValueError("spatial guidance needs at least one concept with a box")
    unet, scheduler = pipe.unet, pipe.scheduler
    device = pipe._execution_device
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    do_cfg = guidance_scale > 1.0
    if prompt is not None:
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
    elif prompt_embeds is not None:
        batch_size = prompt_embeds.shape[0]
    else:
        raise ValueError("give a prompt or prompt_embeds")
    added = added_cfg = None
    if is_sdxl_pipeline(pipe):
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )
        added = sdxl_added_conditioning(pooled.to(prompt_embeds.dtype), height, width)
        if do_cfg:
            added_cfg = sdxl_added_conditioning(
                torch.cat([negative_pooled, pooled]).to(prompt_embeds.dtype), height, width
            )
    else:
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
    for c in concepts:
        if max(c.token_indices) >= prompt_embeds.shape[1]:
            raise ValueError(
                f"concept {c.name!r}: token index {max(c.token_indices)} beyond the {prompt_embeds.shape[1]} text "
                "tokens"
            )
    n = batch_size * num_images_per_prompt
    latents = pipe.prepare_latents(
        n, unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
    )
    latent_hw = (latents.shape[-2], latents.shape[-1])
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
    layers = list(config.layers) if config.layers is not None else default_guidance_layers(unet)

    store = AttentionMapStore(layers)
    location_losses: list[float] = []
    guidance_losses: list[list[float]] = []
    summed_maps: list[torch.Tensor] | None = None
    guidance_over = False  # the official rule: once L_loc is under the threshold, no more guidance in this run
    with recording_processors(unet):
        for i, t in enumerate(pipe.progress_bar(timesteps)):
            if i < config.guidance_steps and config.iterations > 0 and not guidance_over:
                latents, losses = guide_latents(
                    unet,
                    scheduler,
                    latents,
                    t,
                    prompt_embeds,
                    concepts,
                    config,
                    store,
                    attention_context,
                    latent_hw,
                    added,
                )
                guidance_losses.append(losses)
                if config.stop == "official":
                    guidance_over = any(value < config.loss_threshold for value in losses[:-1])
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            store.reset(rows=slice(n, 2 * n) if do_cfg else slice(None))
            noise_pred = unet(
                model_in,
                t,
                encoder_hidden_states=embeds,
                cross_attention_kwargs=_context_kwargs(attention_context, store, tee=True),
                added_cond_kwargs=added_cfg if do_cfg else added,
            ).sample
            location_losses.append(float(location_loss(store, concepts, latent_hw, config.loss)))
            step_maps = [_upsample_mean(per_layer) for per_layer in zip(*store.concept_maps(concepts, latent_hw))]
            summed_maps = step_maps if summed_maps is None else [a + b for a, b in zip(summed_maps, step_maps)]
            store.reset()
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

    if output_type == "latent":
        images = latents
    else:
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type=output_type)
    maps = [m / len(timesteps) for m in (summed_maps or [])]
    return EliteOutput(
        images=images,
        boxes=[list(c.box) for c in concepts],
        location_losses=location_losses,
        guidance_losses=guidance_losses,
        attention_maps=maps,
    )


# ---- boxes from a trained location MLP ----------------------------------------------------------


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def warn_if_boxes_coincide(predicted: dict, iou: float = 0.9) -> bool:
    """Warn (and return True) when the location MLP gave two concepts the same place: both resolved to
    the same noun, or boxes overlapping by more than `iou`. Guidance then cannot tell them apart."""
    (a, b), nouns = predicted["boxes"], predicted.get("resolved") or [None, None]
    same_noun = nouns[0] is not None and nouns[0] == nouns[1]
    overlap = box_iou(a, b)
    if same_noun or overlap > iou:
        why = (
            f"both took the layout of the noun {nouns[0]!r}"
            if same_noun
            else f"their boxes overlap (IoU {overlap:.2f})"
        )
        warnings.warn(
            f"the location MLP put both concepts in nearly the same place: {why}; spatial guidance cannot separate "
            "them. Give boxes yourself (--box x0,y0,x1,y1 per concept)",
            ConceptInputWarning,
            stacklevel=3,
        )
        return True
    return False


def predict_boxes(location_mlp, pipe, concept_a: str | torch.Tensor, concept_b: str | torch.Tensor) -> dict:
    """Boxes for two concepts from a `LocationMLP`: each a word of the prompt or an input embedding
    (ELITE's w0, a Textual Inversion vector). Out-of-vocabulary concepts take their nearest noun's layout.
    Returns `{"boxes": [box_a, box_b], "resolved": [noun_a, noun_b]}`."""

    def embedding(concept) -> torch.Tensor:
        if isinstance(concept, str):
            # SDXL: the noun's rows of both tables side by side, the width of its w0
            return embed_words([concept], tokenizers_of(pipe), text_encoders_of(pipe))[0]
        return concept.detach().reshape(-1)

    emb_a, emb_b = embedding(concept_a), embedding(concept_b)
    device = location_mlp.device
    return location_mlp.predict_for_embeddings(emb_a.to(device, torch.float32), emb_b.to(device, torch.float32))
