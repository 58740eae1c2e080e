"""Attention processors for ELITE (diffusers processor API) and the per-call context they read.

Install with one call; per-call data travels as ONE object through `cross_attention_kwargs`, so
`pipe(..., cross_attention_kwargs={"attention_context": ctx})` and `unet(..., cross_attention_kwargs=...)`
both work, classifier-free-guidance batches included::

    from encoders.attention import AttentionContext, LocalTokens, set_elite_processors, restore_default_processors
    set_elite_processors(unet, global_mapping, local_mapping)     # every attention layer gets a processor
    ctx = AttentionContext(local=[LocalTokens(tokens=out.tokens, keep=out.keep, token_index=pos, scale=0.8)])
    noise = unet(latents, t, text, cross_attention_kwargs={CONTEXT_KWARG: ctx}).sample
    restore_default_processors(unet)                              # stock AttnProcessor2_0 everywhere

What the processors do (cross-attention layers, `EliteAttnProcessor`):
- global branch: Q from the frozen `to_q`; K/V of ALL text (conditional and unconditional) from the
  global mapping's projections (`GlobalMapping.key_value(name)`), or the frozen `to_k`/`to_v` when no
  global mapping is given; `softmax(QK^T/sqrt(d)) V`.
- local branch, per concept k and sample b: K/V from the local mapping's projections over the local
  tokens; masked-out tokens (`keep` False) are zero keys and values that stay in the softmax (the
  paper's K_l = W_K(e * m), `local_mask_mode="zero_tokens"`) or take no attention at all
  ("exclude"); the local attention output is re-weighted per query by the global attention map of
  concept k's w0 token (`token_index`), divided by its max over heads and query positions of the
  sample (`w0_map_norm="sample"`; "sample_head": per sample and head; the official code takes one
  max over its whole batch, the same at its inference batch of 1), times the `scale` (lambda), and
  added to the global output before `to_out`. The two settings come from the local mapping's
  config. A sample whose mask is empty gets no local contribution (never NaN).
- `scale = 0` (or no concepts) gives exactly the stock processor's output.

Batch alignment: a concept's tensors have the attention batch size B, or B/2, in which case they
apply to the second half (the conditional half of diffusers' `[uncond, cond]` CFG batch) and the
unconditional half gets no local branch. Repeat them for `num_images_per_prompt`.

Beside a diffusers IP-Adapter (`pipe.load_ip_adapter`): ELITE's processor on a layer holding an IP-Adapter
processor keeps its weights as `image_prompt` and adds its decoupled attention over the image tokens the
UNet passes as `(text, [image tokens])`: `scale * softmax(Q K_ip^T / sqrt(d)) V_ip`, with the same query.
It is installed inside an `EliteImagePromptProcessor`, which diffusers' IP-Adapter functions recognise.

Self-attention layers get a `ContextAttnProcessor`: stock attention that accepts the context kwarg
(no diffusers warning). `set_context_processors(unet)` installs it on every layer: plain-word
attention that only records maps (spatial guidance without ELITE).

Attention store: `AttentionContext.attention_store` is any object with
`record(processor_name, probs, is_cross)`; cross-attention probabilities `[B, heads, Q, T]`
(text keys, global branch) are handed over NOT detached, so guidance can differentiate through them.
Self-attention probabilities are recorded only when the store has `record_self_attention = True`.
`AttentionRecorder` is a ready-made store.

Writing another processor on the same base (e.g. Infusion's value residual on the class token):
subclass `ContextAttnProcessor` and override its hooks, reading per-call data from
`AttentionContext.extras`:
- `key_value(attn, context, is_cross, ctx) -> (key, value)` each `[B, T, inner]` (default frozen to_k/to_v);
- `needs_probs(is_cross, ctx)` -> True to force the explicit softmax path (default: only to record);
- `adjust_probs(attn, probs, is_cross, ctx)` -> probs `[B, H, Q, T]` (e.g. map replacement);
- `extra_output(attn, query, key, hidden, probs, attention_mask, is_cross, ctx)` -> hidden `[B, H, Q, d]`.
Processors are plain objects, not `nn.Module`s: modules they hold (the mappings' projections) stay
owned, saved and optimised by their models, never by the UNet. With gradient checkpointing in the
UNet a processor runs twice per step (forward and recompute); `local_value_l1` then also grows twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch import nn

CONTEXT_KWARG = "attention_context"
PROCESSOR_SUFFIX = ".processor"


def module_name_of(name: str) -> str:
    """Attention module name from a processor name (`...attn2.processor` -> `...attn2`); idempotent."""
    return name[: -len(PROCESSOR_SUFFIX)] if name.endswith(PROCESSOR_SUFFIX) else name


def processor_name_of(name: str) -> str:
    """Processor name (the key of `unet.attn_processors`) from an attention module name; idempotent."""
    return name if name.endswith(PROCESSOR_SUFFIX) else name + PROCESSOR_SUFFIX


def attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Processor name -> attention module, in `unet.attn_processors` order."""
    return {name: unet.get_submodule(module_name_of(name)) for name in unet.attn_processors}


def cross_attention_layers(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """Attention module name -> `(context_dim, inner_dim)` for every cross-attention layer of `unet`."""
    layers = {}
    for name, attn in attention_modules(unet).items():
        if getattr(attn, "is_cross_attention", False):
            if attn.to_v.weight.shape != attn.to_k.weight.shape:
                raise ValueError(f"{name}: to_k and to_v differ in shape; K/V projections need equal widths")
            layers[module_name_of(name)] = (int(attn.to_k.in_features), int(attn.to_k.out_features))
    if not layers:
        raise ValueError("the UNet has no cross-attention layers")
    return layers


@runtime_checkable
class AttentionStore(Protocol):
    """Receives attention probabilities `[B, heads, Q, K]` from the processors (not detached)."""

    def record(self, processor_name: str, probs: torch.Tensor, is_cross: bool) -> None: ...


class AttentionRecorder:
    """A simple `AttentionStore`: keeps every recorded map in `maps[processor_name]` (a list per call).

    `keep_grad=False` stores detached copies (for visualisation); guidance keeps the graph.
    """

    def __init__(self, record_self_attention: bool = False, keep_grad: bool = True):
        self.record_self_attention = record_self_attention
        self.keep_grad = keep_grad
        self.maps: dict[str, list[torch.Tensor]] = {}

    def record(self, processor_name: str, probs: torch.Tensor, is_cross: bool) -> None:
        self.maps.setdefault(processor_name, []).append(probs if self.keep_grad else probs.detach())

    def clear(self) -> None:
        self.maps.clear()


@dataclass
class LocalTokens:
    """One concept's local-branch inputs for a batch (`n` = attention batch or its conditional half).

    tokens: `[n, P, context_dim]` local tokens (`LocalMapping(...).tokens`).
    token_index: `[n]` (or an int for all) index of this concept's w0 in the text sequence; its global
        attention map re-weights the local branch.
    keep: `[n, P]` bool, False for masked-out tokens (zeroed, or excluded: the processor's
        `local_mask_mode`); None keeps all.
    scale: ELITE's lambda, the local branch's weight: a float or a `[n]` tensor (paper: 1 in training,
        0.8 for generation, 0.6 for editing prompts).
    """

    tokens: torch.Tensor
    token_index: torch.Tensor | int
    keep: torch.Tensor | None = None
    scale: float | torch.Tensor = 1.0


@dataclass
class AttentionContext:
    """Per-call data for the processors, passed as `cross_attention_kwargs={"attention_context": ctx}`.

    local: local-branch inputs, one `LocalTokens` per concept in the prompt (K concepts per sample).
    attention_store: optional `AttentionStore` receiving cross-attention probabilities.
    local_value_l1: when a list, each ELITE cross-attention processor appends mean |V_local| of its
        layer (per concept): the local stage's regulariser.
    extras: free-form per-call data for processors built on `ContextAttnProcessor` (e.g. Infusion).
    """

    local: Sequence[LocalTokens] = ()
    attention_store: AttentionStore | None = None
    local_value_l1: list[torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def as_kwargs(self) -> dict[str, AttentionContext]:
        """`{"attention_context": self}`: the `cross_attention_kwargs` to hand to a UNet or pipeline."""
        return {CONTEXT_KWARG: self}


def attention_probs(
    attn: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention probabilities `[B, H, Q, K]` from head-split query/key (softmax in fp32)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        scores = scores + attention_mask
    return scores.float().softmax(dim=-1).to(query.dtype)


def _project(linear: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """Apply a (possibly fp32, trainable) projection to states of another dtype; output in the states' dtype.

    When the projection sits on another device than the states (the pipeline was moved after the
    mappings were installed, or is offloaded), the mapping's weights follow the states there once.
    """
    if linear.weight.device != states.device:
        linear.to(states.device)
    return linear(states.to(linear.weight.dtype)).to(states.dtype)


class ContextAttnProcessor:
    """Stock scaled-dot-product attention that accepts an `AttentionContext` and records maps into its store.

    The base of every processor here; see the module docstring for the hooks subclasses override.
    """

    def __init__(self, name: str | None = None, image_prompt=None):
        self.name = name
        # diffusers' IP-Adapter processor this layer had (its to_k_ip / to_v_ip / scale): its image-prompt
        # attention is added to this processor's output, so ELITE and an IP-Adapter work together
        self.image_prompt = image_prompt

    # ---- hooks -------------------------------------------------------------------------------
    def key_value(self, attn, context: torch.Tensor, is_cross: bool, ctx: AttentionContext | None):
        return attn.to_k(context), attn.to_v(context)

    def needs_probs(self, is_cross: bool, ctx: AttentionContext | None) -> bool:
        return False

    def adjust_probs(self, attn, probs: torch.Tensor, is_cross: bool, ctx: AttentionContext | None) -> torch.Tensor:
        return probs

    def extra_output(self, attn, query, key, hidden, probs, attention_mask, is_cross, ctx) -> torch.Tensor:
        return hidden

    # ---- the attention computation (mirrors diffusers' AttnProcessor2_0) ----------------------
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        attention_context: AttentionContext | None = None,
    ) -> torch.Tensor:
        ctx = attention_context
        if ctx is not None and not isinstance(ctx, AttentionContext):
            raise TypeError(
                f"cross_attention_kwargs[{CONTEXT_KWARG!r}] must be an encoders.attention.AttentionContext, "
                f"got {type(ctx).__name__}"
            )
        image_tokens = None
        if isinstance(encoder_hidden_states, tuple):  # (text, [image tokens]) from an IP-Adapter's projection
            encoder_hidden_states, image_tokens = encoder_hidden_states
            if self.image_prompt is None:
                raise ValueError(
                    f"{self.name}: the UNet passed IP-Adapter image tokens to a layer without IP-Adapter weights; "
                    "load the IP-Adapter before ELITE, or call ELITE again after load_ip_adapter (it re-installs)"
                )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = self.key_value(attn, encoder_hidden_states, is_cross, ctx)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        store = ctx.attention_store if ctx is not None else None
        record = store is not None and (is_cross or getattr(store, "record_self_attention", False))
        probs = None
        if record or self.needs_probs(is_cross, ctx):
            probs = self.adjust_probs(attn, attention_probs(attn, query, key, attention_mask), is_cross, ctx)
            if record:
                store.record(self.name, probs, is_cross)
            hidden_states = torch.matmul(probs.to(value.dtype), value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = self.extra_output(attn, query, key, hidden_states, probs, attention_mask, is_cross, ctx)
        if image_tokens is not None:
            hidden_states = hidden_states + self.image_prompt_output(attn, query, image_tokens)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def image_prompt_output(self, attn, query: torch.Tensor, image_tokens) -> torch.Tensor:
        """IP-Adapter's decoupled attention, `sum_i scale_i * softmax(Q K_ip,i^T / sqrt(d)) V_ip,i`, `[B, H, Q, d]`,
        with the weights and scales of the IP-Adapter processor this layer had (diffusers' formula; masks
        per image prompt are not supported here)."""
        ip = self.image_prompt
        batch, heads, _, head_dim = query.shape
        out = torch.zeros_like(query)
        for tokens, scale, to_k, to_v in zip(image_tokens, ip.scale, ip.to_k_ip, ip.to_v_ip):
            if isinstance(scale, list):
                if any(s != 0 for s in scale):
                    raise ValueError("per-image IP-Adapter scales (with ip_adapter_masks) are not supported with ELITE")
                continue
            if scale == 0:
                continue
            k = to_k(tokens).view(batch, -1, heads, head_dim).transpose(1, 2)
            v = to_v(tokens).view(batch, -1, heads, head_dim).transpose(1, 2)
            out = out + scale * F.scaled_dot_product_attention(query, k, v, dropout_p=0.0, is_causal=False)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _concept_offset(n: int, batch: int, what: str) -> int:
    """Row offset of a concept's n samples inside the attention batch (0, or batch/2 for CFG)."""
    if n == batch:
        return 0
    if 2 * n == batch:
        return n
    raise ValueError(
        f"{what} has batch {n} but the attention batch is {batch}: give one row per sample, or one per "
        "conditional sample of a [uncond, cond] guidance batch (repeat for num_images_per_prompt)"
    )


def _per_row(value: float | torch.Tensor, n: int, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, device=device, dtype=dtype)
    return t.expand(n) if t.ndim == 0 else t.reshape(n)


class EliteAttnProcessor(ContextAttnProcessor):
    """ELITE cross-attention: global K/V for the text, optional local branch fused with lambda.

    `global_kv` / `local_kv`: `(to_k, to_v)` linear pairs (from `GlobalMapping.key_value(name)` /
    `LocalMapping.key_value(name)`); None uses the frozen projections / disables the local branch.
    """

    def __init__(
        self,
        name: str | None = None,
        global_kv: tuple[nn.Linear, nn.Linear] | None = None,
        local_kv: tuple[nn.Linear, nn.Linear] | None = None,
        w0_map_norm: str = "sample",
        local_mask_mode: str = "zero_tokens",
        image_prompt=None,
    ):
        super().__init__(name, image_prompt)
        if w0_map_norm not in ("sample", "sample_head"):
            raise ValueError(f"w0_map_norm must be 'sample' or 'sample_head', got {w0_map_norm!r}")
        if local_mask_mode not in ("zero_tokens", "exclude"):
            raise ValueError(f"local_mask_mode must be 'zero_tokens' or 'exclude', got {local_mask_mode!r}")
        self.global_kv = global_kv
        self.local_kv = local_kv
        self.w0_map_norm = w0_map_norm
        self.local_mask_mode = local_mask_mode

    def key_value(self, attn, context, is_cross, ctx):
        if is_cross and self.global_kv is not None:
            to_k, to_v = self.global_kv
            return _project(to_k, context), _project(to_v, context)
        return attn.to_k(context), attn.to_v(context)

    def extra_output(self, attn, query, key, hidden, probs, attention_mask, is_cross, ctx):
        if not is_cross or ctx is None or not ctx.local or self.local_kv is None:
            return hidden
        batch, heads, queries, head_dim = query.shape
        to_k, to_v = self.local_kv
        text_probs = probs
        for k, concept in enumerate(ctx.local):
            tokens = concept.tokens
            n = tokens.shape[0]
            offset = _concept_offset(n, batch, f"concept {k} local tokens")
            scalar_scale = isinstance(concept.scale, (int, float))
            if scalar_scale and concept.scale == 0 and ctx.local_value_l1 is None:
                continue  # scale 0: the branch adds exactly nothing
            if text_probs is None:
                text_probs = attention_probs(attn, query, key, attention_mask)
            keep = concept.keep
            if keep is None:
                keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=query.device)
            elif keep.dtype != torch.bool:
                keep = keep > 0.5
            if keep.shape != tokens.shape[:2]:
                raise ValueError(
                    f"concept {k}: keep {tuple(keep.shape)} does not match tokens {tuple(tokens.shape[:2])}"
                )
            keep = keep.to(query.device)
            context = tokens.to(query.device)
            if self.local_mask_mode == "zero_tokens":
                # masked-out tokens are zeros that take softmax weight (bias-free projections: zero K and V)
                context = context * keep.unsqueeze(-1).to(context.dtype)
                has_any, attend = None, None
            else:
                has_any = keep.any(dim=-1)  # an empty mask must not give an all -inf softmax row
                attend = (keep | ~has_any[:, None])[:, None, None, :]
            key_l = _project(to_k, context).to(query.dtype)
            value_l = _project(to_v, context).to(query.dtype)
            if ctx.local_value_l1 is not None:
                ctx.local_value_l1.append(value_l.float().abs().mean())
            key_l = key_l.view(n, -1, heads, head_dim).transpose(1, 2)
            value_l = value_l.view(n, -1, heads, head_dim).transpose(1, 2)
            local = F.scaled_dot_product_attention(
                query[offset : offset + n], key_l, value_l, attn_mask=attend, dropout_p=0.0
            )

            index = _per_row(concept.token_index, n, query.device, torch.long)
            if index.device.type == "cpu":  # checking an accelerator tensor would synchronise every layer
                if bool((index < 0).any()) or bool((index >= text_probs.shape[-1]).any()):
                    raise ValueError(
                        f"concept {k}: token_index {index.tolist()} outside the {text_probs.shape[-1]} text tokens"
                    )
            w0_map = (
                text_probs[offset : offset + n]
                .gather(-1, index.view(n, 1, 1, 1).expand(n, heads, queries, 1))
                .squeeze(-1)
            )  # [n, H, Q]
            peak_dims = (1, 2) if self.w0_map_norm == "sample" else (2,)
            w0_map = w0_map / w0_map.amax(dim=peak_dims, keepdim=True).clamp_min(torch.finfo(w0_map.dtype).tiny)
            if scalar_scale:
                row_weight = torch.full((n,), float(concept.scale), device=query.device, dtype=w0_map.dtype)
            else:
                row_weight = _per_row(concept.scale, n, query.device, w0_map.dtype)
            if has_any is not None:
                row_weight = row_weight * has_any.to(w0_map.dtype)
            weight = row_weight[:, None, None] * w0_map
            contribution = weight.unsqueeze(-1).to(local.dtype) * local
            if offset or n != batch:
                pad_before = contribution.new_zeros((offset,) + contribution.shape[1:])
                pad_after = contribution.new_zeros((batch - offset - n,) + contribution.shape[1:])
                contribution = torch.cat([pad_before, contribution, pad_after], dim=0)
            hidden = hidden + contribution.to(hidden.dtype)
        return hidden


STOCK_PROCESSORS = (
    "AttnProcessor",
    "AttnProcessor2_0",
)  # diffusers' plain attention: ContextAttnProcessor computes the same


def set_elite_processors(
    unet: nn.Module, global_mapping=None, local_mapping=None, keep_custom: bool = False
) -> dict[str, ContextAttnProcessor]:
    """Install `EliteAttnProcessor` on every cross-attention layer and `ContextAttnProcessor` elsewhere.

    `keep_custom=True` leaves a self-attention layer's processor alone unless it is diffusers' stock
    one (xformers, a custom processor stay); the cross-attention layers always get ELITE's, which keeps a
    diffusers IP-Adapter processor found there and adds its image-prompt attention (`image_prompt_of`).

    `global_mapping` / `local_mapping`: objects with `key_value(name)` (GlobalMapping / LocalMapping)
    or None; the local branch's `w0_map_norm` and `local_mask_mode` come from the local mapping's
    config. Returns the installed processors by processor name.
    """
    config = getattr(local_mapping, "config", None) or {}
    settings = {key: config[key] for key in ("w0_map_norm", "local_mask_mode") if key in config}
    current = unet.attn_processors
    processors: dict = {}
    for name, attn in attention_modules(unet).items():
        if getattr(attn, "is_cross_attention", False):
            processors[name] = EliteAttnProcessor(
                name,
                global_kv=global_mapping.key_value(name) if global_mapping is not None else None,
                local_kv=local_mapping.key_value(name) if local_mapping is not None else None,
                image_prompt=image_prompt_of(current[name]),
                **settings,
            )
            if processors[name].image_prompt is not None:
                processors[name] = EliteImagePromptProcessor(processors[name])
        elif keep_custom and type(current[name]).__name__ not in STOCK_PROCESSORS and not runs_context(current[name]):
            processors[name] = current[name]
        else:
            processors[name] = ContextAttnProcessor(name)
    unet.set_attn_processor(dict(processors))  # diffusers pops from the dict it is given
    return processors


def image_prompt_of(processor):
    """The IP-Adapter weights a layer's processor holds (diffusers' IP-Adapter processor, or ELITE's over one),
    or None."""
    if isinstance(processor, ContextAttnProcessor):
        return processor.image_prompt
    return processor if isinstance(processor, IPAdapterAttnProcessor2_0) else None


def runs_context(processor) -> bool:
    """Whether a processor takes the `AttentionContext` (and records maps): ours, or ELITE over an IP-Adapter."""
    return isinstance(processor, (ContextAttnProcessor, EliteImagePromptProcessor))


class EliteImagePromptProcessor(IPAdapterAttnProcessor2_0):
    """ELITE on a layer that holds a diffusers IP-Adapter: to diffusers it IS an IP-Adapter processor (its
    `to_k_ip` / `to_v_ip` / `scale`, so `pipe.set_ip_adapter_scale` and `unload_ip_adapter` treat it as one);
    it computes ELITE's attention plus the image prompt's (`ContextAttnProcessor.image_prompt_output`)."""

    def __init__(self, elite: ContextAttnProcessor):
        nn.Module.__init__(self)
        ip = elite.image_prompt
        self.hidden_size, self.cross_attention_dim = ip.hidden_size, ip.cross_attention_dim
        self.num_tokens, self.scale = ip.num_tokens, ip.scale  # the same list: scale changes reach ELITE
        self.to_k_ip, self.to_v_ip = ip.to_k_ip, ip.to_v_ip
        self.__dict__["elite"] = elite  # a plain object, not a submodule
        elite.image_prompt = self

    @property
    def name(self) -> str | None:
        return self.elite.name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        attention_context: AttentionContext | None = None,
        ip_adapter_masks=None,
    ) -> torch.Tensor:
        if ip_adapter_masks is not None:
            raise ValueError("ip_adapter_masks (regional image prompts) are not supported together with ELITE")
        return self.elite(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attention_context)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.elite!r})"


def set_context_processors(unet: nn.Module, processor_class: type[ContextAttnProcessor] = ContextAttnProcessor):
    """Install a context-aware processor (default: plain attention that records maps) on every layer."""
    processors = {name: processor_class(name) for name in unet.attn_processors}
    unet.set_attn_processor(dict(processors))  # diffusers pops from the dict it is given
    return processors


def restore_default_processors(unet: nn.Module) -> None:
    """Put diffusers' stock `AttnProcessor2_0` back on every attention layer."""

    unet.set_attn_processor(AttnProcessor2_0())
