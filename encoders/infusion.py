"""Infusion: one residual value vector per cross-attention layer for a concept's class word.

Infusion (Zeng et al., "Infusion: Preventing Customized Text-to-Image Diffusion from Overfitting") keeps the base
model intact and learns, for every cross-attention
layer i, a residual Delta_i (1 x d, d = that layer's value width) that is added to the *value* of the
class word's token ("cat") only (Eq. 7):

    Atten(Q, K, V') = sum_{k != obj} m_k v_k + m_obj (v_obj + Delta_obj)

The attention maps m stay the base model's: in the paper's dual stream the foundational pipeline
(F) runs beside the customised one (C) and C's cross-attention maps are replaced by F's. The released
code (its xformers attention path) differs: it also learns a key residual for the class word's token and
keeps the customised model's own maps; `variant="released"` stores both residuals and is sampled without
the map swap, `variant="paper"` (the default) is Eq. 7. Here both
streams run as rows of one batch: `map_source[b]` names the row whose maps row b uses (itself for
F rows, its F twin for C rows), so one UNet call serves training (both streams on the same noisy
latent) and sampling (two trajectories from the same noise; the F images come for free). Without a
`map_source`, every row keeps the maps it computes itself.

Pieces:
- `InfusionResiduals(ModelMixin, ConfigMixin)`: the learned vectors (a few KB: one per layer) plus
  the class word and the layer names/widths they were trained for.
- `InfusionAttnProcessor`: built on `encoders.attention.ContextAttnProcessor` (so attention stores,
  spatial guidance and the `AttentionContext` plumbing work as for ELITE); reads its per-call data
  from `AttentionContext.extras["infusion"]` (an `InfusionCall`).
- `set_infusion_processors(unet, [residuals, ...])`: several concepts at once (multi-concept).
- `class_token_mask(...)`, `infusion_call(...)`: where each concept's class word sits in a batch;
  `dual_stream_call(...)`: the F and C rows of the dual stream (training, sampling, Fisher divergence).
Sampling with them (`generate_with_infusion`, the dual stream inside a diffusers pipeline call) is the
Infusion method of `inference.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import (
    AttentionContext,
    ContextAttnProcessor,
    attention_modules,
    cross_attention_layers,
    module_name_of,
)

EXTRAS_KEY = "infusion"
VARIANTS = ("paper", "released")


class InfusionResiduals(ModelMixin, ConfigMixin):
    """Residual value vectors Delta_i of one concept, one per cross-attention layer of the UNet.

    `layer_names` are attention module names (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`);
    `layer_dims` their value widths. Starts at zero, so an untrained concept changes nothing.
    """

    @register_to_config
    def __init__(
        self,
        layer_names: Sequence[str],
        layer_dims: Sequence[int],
        class_word: str = "",
        base_model: str | None = None,
        variant: str = "paper",
    ):
        super().__init__()
        if len(layer_names) != len(layer_dims):
            raise ValueError(f"{len(layer_names)} layer names but {len(layer_dims)} layer widths")
        if variant not in VARIANTS:
            raise ValueError(f"Infusion variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.residuals = nn.ParameterList([nn.Parameter(torch.zeros(int(d))) for d in layer_dims])
        # the released code's key residual on the class token (its xformers path); none in the paper's Eq. 7
        self.key_residuals = nn.ParameterList(
            [nn.Parameter(torch.zeros(int(d))) for d in layer_dims] if variant == "released" else []
        )
        self._index = {module_name_of(n): i for i, n in enumerate(layer_names)}

    @property
    def replaces_maps(self) -> bool:
        """Whether this concept is sampled with the base model's maps (the paper) or its own (the released code)."""
        return self.config.variant != "released"

    @classmethod
    def for_unet(
        cls, unet: nn.Module, class_word: str, base_model: str | None = None, variant: str = "paper"
    ) -> InfusionResiduals:
        """Zero residuals shaped for every cross-attention layer of `unet`."""
        layers = cross_attention_layers(unet)
        return cls(
            layer_names=list(layers),
            layer_dims=[inner for _, inner in layers.values()],
            class_word=class_word,
            base_model=base_model,
            variant=variant,
        )

    def residual(self, name: str) -> torch.Tensor:
        """The Delta of layer `name` (attention module or processor name)."""
        key = module_name_of(name)
        if key not in self._index:
            raise KeyError(f"no Infusion residual for layer {key!r} (concept {self.config.class_word!r})")
        return self.residuals[self._index[key]]

    def key_residual(self, name: str) -> torch.Tensor | None:
        """The key Delta of layer `name` (variant "released"), or None."""
        if not len(self.key_residuals):
            return None
        self.residual(name)  # the same check of the layer name
        return self.key_residuals[self._index[module_name_of(name)]]

    def check_fits(self, unet: nn.Module) -> None:
        """Raise a ValueError naming the first layer whose name or width differs from `unet`'s."""
        layers = cross_attention_layers(unet)
        if set(layers) != set(self._index):
            missing = sorted(set(layers) ^ set(self._index))[:3]
            raise ValueError(
                f"Infusion residuals for {self.config.class_word!r} were trained for other cross-attention layers "
                f"(differences: {missing}); base model recorded: {self.config.base_model}"
            )
        for name, (_, inner) in layers.items():
            if self.residual(name).shape[0] != inner:
                raise ValueError(
                    f"Infusion residual of {name} has width {self.residual(name).shape[0]}, the UNet's value width is "
                    f"{inner}; base model recorded: {self.config.base_model}"
                )

    def forward(self) -> torch.Tensor:
        """All residuals concatenated, value then key ones (for norms and logging)."""
        return torch.cat([*self.residuals, *self.key_residuals])


@dataclass
class InfusionCall:
    """Per-call Infusion data for the processors (`AttentionContext.extras["infusion"]`).

    token_masks: one `[n, T]` bool tensor per installed concept (in `set_infusion_processors` order, or
        None for a concept absent from this call): True where that concept's Delta joins the value.
    map_source: `[n]` long, the row whose cross-attention maps each row uses (None: own maps).
    `n` is the attention batch B, or B/2 for diffusers' `[uncond, cond]` guidance batch: masks then
    apply to the conditional half only, and `map_source` indexes within each half.
    """

    token_masks: Sequence[torch.Tensor | None]
    map_source: torch.Tensor | None = None


def _half_offset(n: int, batch: int, what: str) -> int | None:
    if n == batch:
        return None
    if 2 * n == batch:
        return n
    raise ValueError(
        f"Infusion {what} has {n} rows but the attention batch is {batch}: give one row per sample or per "
        "conditional sample of a [uncond, cond] guidance batch"
    )


class InfusionAttnProcessor(ContextAttnProcessor):
    """Cross-attention with the base K/V plus, on masked tokens, each concept's value residual.

    `residuals`: the Delta of this layer for each installed concept (tensors or parameters, shared with
    the `InfusionResiduals` that own them, so training updates them in place); `key_residuals`: the key
    Delta of each concept (variant "released") or None.
    """

    def __init__(self, name: str, residuals: Sequence[torch.Tensor], key_residuals: Sequence[torch.Tensor | None] = ()):
        super().__init__(name)
        self.residuals = list(residuals)
        self.key_residuals = list(key_residuals) or [None] * len(self.residuals)

    @staticmethod
    def _call(ctx: AttentionContext | None) -> InfusionCall | None:
        call = ctx.extras.get(EXTRAS_KEY) if ctx is not None else None
        if call is not None and not isinstance(call, InfusionCall):
            raise TypeError(
                f"AttentionContext.extras[{EXTRAS_KEY!r}] must be an InfusionCall, got {type(call).__name__}"
            )
        return call

    def key_value(self, attn, context, is_cross, ctx):
        key, value = attn.to_k(context), attn.to_v(context)
        call = self._call(ctx)
        if not is_cross or call is None:
            return key, value
        if len(call.token_masks) != len(self.residuals):
            raise ValueError(
                f"{self.name}: the call gives {len(call.token_masks)} concept masks but {len(self.residuals)} concepts "
                "are installed"
            )
        batch = value.shape[0]
        added, added_key = torch.zeros_like(value), torch.zeros_like(key)
        for mask, delta, key_delta in zip(call.token_masks, self.residuals, self.key_residuals):
            if mask is None:
                continue
            if mask.shape[-1] != value.shape[1]:
                raise ValueError(
                    f"{self.name}: token mask covers {mask.shape[-1]} tokens, the text has {value.shape[1]}"
                )
            offset = _half_offset(mask.shape[0], batch, "token mask")
            weights = mask.to(device=value.device, dtype=value.dtype)[..., None]
            if offset is not None:  # the conditional half of a [uncond, cond] batch
                weights = torch.cat([torch.zeros_like(weights), weights], dim=0)
            added = added + weights * delta.to(value.dtype)
            if key_delta is not None:
                added_key = added_key + weights * key_delta.to(key.dtype)
        return key + added_key, value + added

    def needs_probs(self, is_cross, ctx):
        call = self._call(ctx)
        return is_cross and call is not None and call.map_source is not None

    def adjust_probs(self, attn, probs, is_cross, ctx):
        call = self._call(ctx)
        if not is_cross or call is None or call.map_source is None:
            return probs
        source = call.map_source.to(probs.device, torch.long)
        offset = _half_offset(source.shape[0], probs.shape[0], "map_source")
        if offset is not None:
            source = torch.cat([source, source + offset])
        return probs[source]


def set_infusion_processors(unet: nn.Module, concepts: Sequence[InfusionResiduals]) -> dict[str, ContextAttnProcessor]:
    """Install `InfusionAttnProcessor` on every cross-attention layer (one residual per concept) and
    `ContextAttnProcessor` on self-attention layers. Returns the processors by processor name.

    The processors hold references to the concepts' parameters: move the concepts to the UNet's device
    first (`residuals.to(unet.device)`); dtype is matched per call.
    """
    concepts = list(concepts)
    for concept in concepts:
        concept.check_fits(unet)
    processors: dict[str, ContextAttnProcessor] = {}
    for name, attn in attention_modules(unet).items():
        if getattr(attn, "is_cross_attention", False):
            processors[name] = InfusionAttnProcessor(
                name, [c.residual(name) for c in concepts], [c.key_residual(name) for c in concepts]
            )
        else:
            processors[name] = ContextAttnProcessor(name)
    unet.set_attn_processor(dict(processors))  # diffusers pops the entries of the dict it is given
    return processors


def word_token_ids(tokenizer, word: str) -> list[int]:
    """The token ids a word (or short phrase) becomes inside a prompt, without BOS/EOS."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"class word {word!r} gives no tokens")
    return list(ids)


def class_token_mask(input_ids: torch.Tensor, word_ids: Sequence[int]) -> torch.Tensor:
    """`[B, T]` bool: True on every token of every occurrence of the token sequence `word_ids`."""
    word = torch.as_tensor(list(word_ids), device=input_ids.device)
    n = len(word)
    batch, length = input_ids.shape
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    if n > length:
        return mask
    windows = input_ids.unfold(1, n, 1)  # [B, T - n + 1, n]
    starts = (windows == word).all(dim=-1)  # [B, T - n + 1]
    for j in range(n):
        mask[:, j : j + starts.shape[1]] |= starts
    return mask


def infusion_call(
    tokenizer,
    prompts: Sequence[str],
    concepts: Sequence[InfusionResiduals],
    map_source: torch.Tensor | None = None,
    require_all: bool = False,
) -> InfusionCall:
    """Token masks of each concept's class word in `prompts` (tokenized like the pipeline does).

    `require_all`: raise a ValueError when a prompt lacks a concept's class word (training prompts
    must contain it; at inference a concept absent from a prompt simply does nothing there).
    Two concepts with the same class word would share its tokens: that is an error.
    """
    words = [c.config.class_word for c in concepts]
    dups = {w for w in words if words.count(w) > 1}
    if dups:
        raise ValueError(f"several Infusion concepts use the class word(s) {sorted(dups)}; give each its own word")
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    masks = []
    for concept in concepts:
        mask = class_token_mask(ids, word_token_ids(tokenizer, concept.config.class_word))
        if require_all and not bool(mask.any(dim=1).all()):
            missing = [p for p, m in zip(prompts, mask.any(dim=1).tolist()) if not m][:3]
            raise ValueError(f"class word {concept.config.class_word!r} is missing from prompts {missing}")
        masks.append(mask if bool(mask.any()) else None)
    return InfusionCall(token_masks=masks, map_source=map_source)


def dual_stream_call(
    tokenizer,
    prompts: Sequence[str],
    concepts: Sequence[InfusionResiduals],
    require_all: bool = False,
    replace_maps: bool = True,
) -> InfusionCall:
    """Infusion's dual stream as 2n rows of one batch: rows 0..n-1 are the foundational model F (no
    residual, their own maps), rows n..2n-1 the customised model C (residuals on the class tokens,
    cross-attention maps taken from their F twin; with `replace_maps=False`, their own, as the released
    code). Run the UNet on `prompts + prompts`."""
    n = len(prompts)
    source = torch.cat([torch.arange(n), torch.arange(n)]) if replace_maps else None
    call = infusion_call(tokenizer, list(prompts) * 2, concepts, map_source=source, require_all=require_all)
    call.token_masks = [None if m is None else torch.cat([torch.zeros_like(m[:n]), m[n:]]) for m in call.token_masks]
    return call
