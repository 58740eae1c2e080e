"""ELITE's conditioning of one denoising call: prompt ids + concepts -> text embeddings + attention context.

Every place that runs the UNet with ELITE concepts goes through `elite_conditioning`: both training
stages, their validation pictures and `inference.ElitePipeline` (the validation pictures are made by
the pipeline users run, which calls this). For each concept k of a prompt:

- its words (`[B, N_k, D]`: w0 alone at inference and in stage 2, all N words in stage 1) replace its
  placeholder token before the frozen text encoder runs (`encoders.text_injection`);
- when it has local tokens (stage 2 and inference with a local mapping), a `LocalTokens` entry carries
  them, their keep-mask, the position its w0 landed at (whose attention map re-weights the local
  branch) and its scale lambda into the `AttentionContext` the processors read.

    cond = elite_conditioning(text_encoder, input_ids, [s_id], [w0], local=[(tokens, keep)], scale=0.8)
    unet(latents, t, cond.prompt_embeds, cross_attention_kwargs=cond.context.as_kwargs())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import AttentionContext, AttentionStore, LocalTokens
from .text_injection import encode_prompt_with_words


@dataclass
class EliteConditioning:
    """What one call of the UNet needs: `prompt_embeds` `[B, L, D]`, where each concept's w0 sits
    (`word_positions` `[B, K]`), the processors' per-call `context`, and on SDXL the pooled
    embedding `[B, P]` (the second text encoder's, with the words injected there too)."""

    prompt_embeds: torch.Tensor
    word_positions: torch.Tensor
    context: AttentionContext
    pooled_prompt_embeds: torch.Tensor | None = None


def elite_conditioning(
    text_encoder: torch.nn.Module | Sequence[torch.nn.Module],
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    placeholder_ids: Sequence[int] | Sequence[Sequence[int]],
    words: Sequence[torch.Tensor],
    local: Sequence[tuple[torch.Tensor, torch.Tensor | None] | None] | None = None,
    scale: float | torch.Tensor | Sequence[float | torch.Tensor] = 1.0,
    repeat: int = 1,
    local_value_l1: list | None = None,
    attention_store: AttentionStore | None = None,
) -> EliteConditioning:
    """Inject each concept's words at its placeholder and gather its local tokens for the processors.

    input_ids `[B, L]`; words: per concept `[B, N, D]` (or `[B, D]`). SDXL: both text encoders, one
    ids tensor per encoder, placeholder ids per encoder (or the same for both) and words `D` as wide
    as both encoders together (`encoders.text_injection.encode_prompt_with_words`). local: per concept
    `(tokens [B, P, D], keep [B, P] or None)` or None (no local branch for it); scale: lambda, one
    for all concepts or one per concept (a float or a `[B]` tensor). `repeat`: the local tokens are
    repeated this many times along the batch (`num_images_per_prompt`, the pipeline repeats the
    text itself). `local_value_l1`: a list the processors append mean |V_local| to (stage 2's
    regulariser). Gradients flow into the words and the local tokens.
    """
    pids = list(placeholder_ids)
    count = len(pids[0]) if pids and not isinstance(pids[0], int) else len(pids)  # [encoder][concept] or [concept]
    if len(words) != count:
        raise ValueError(f"{count} placeholders but {len(words)} word tensors: give one per concept")
    text = encode_prompt_with_words(text_encoder, input_ids, pids, list(words))
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(words)
    if len(scales) != len(words):
        raise ValueError(f"{len(scales)} scales for {len(words)} concepts: give one, or one per concept")
    branches = []
    for k, entry in enumerate(local or []):
        if entry is None:
            continue
        tokens, keep = entry
        positions = text.word_positions[:, k]
        if repeat > 1:
            tokens = tokens.repeat_interleave(repeat, dim=0)
            keep = None if keep is None else keep.repeat_interleave(repeat, dim=0)
            positions = positions.repeat_interleave(repeat, dim=0)
            if isinstance(scales[k], torch.Tensor) and scales[k].ndim:
                scales[k] = scales[k].repeat_interleave(repeat, dim=0)
        branches.append(LocalTokens(tokens=tokens, token_index=positions, keep=keep, scale=scales[k]))
    context = AttentionContext(local=branches, attention_store=attention_store, local_value_l1=local_value_l1)
    return EliteConditioning(text.prompt_embeds, text.word_positions, context, text.pooled_prompt_embeds)


def sdxl_added_conditioning(text_embeds: torch.Tensor, height: int, width: int | None = None) -> dict:
    """SDXL's `added_cond_kwargs` for a `height` x `width` px image (square when `width` is None): the pooled
    text embedding and the six size numbers (original size, crop corner (0, 0), target size), what
    `StableDiffusionXLPipeline` passes by default."""
    width = height if width is None else width
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=text_embeds.device, dtype=text_embeds.dtype)
    return {"text_embeds": text_embeds, "time_ids": time_ids.repeat(text_embeds.shape[0], 1)}
