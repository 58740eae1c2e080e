"""Put mapped word embeddings into a prompt at placeholder tokens (S*), then run the text encoder.

A placeholder is a new token added to the tokenizer (`add_placeholder_tokens`); its position in a
prompt is read from the tokenizer's ids (never by splitting on spaces, which breaks as soon as a
word becomes several tokens). `encode_text_with_words` builds the token embeddings itself, puts the
given words where the placeholder ids are, and runs the unmodified text encoder on them: the
position embeddings are added after the replacement, exactly as for a typed word, so injecting a
real word's token embedding gives the same hidden states as typing that word.

    from encoders.text_injection import add_placeholder_tokens, encode_text_with_words
    (s_id,) = add_placeholder_tokens(tokenizer, ["S*"])
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = encode_text_with_words(text_encoder, ids, s_id, words)    # words [B, N, D]
    out.hidden_states   # [B, 77, D]: the UNet's encoder_hidden_states
    out.word_positions  # [B, K]: where each concept's w0 landed (for the local branch's re-weighting)

With N > 1 words (global-mapping training) the N words take N slots starting at the placeholder:
the tokens after it shift right by N - 1 and the sequence is cut back to its length. Several
concepts in one prompt: pass a list of placeholder ids and a list of word tensors, one each. A
placeholder that appears more than once gets the same words at each occurrence; `word_positions`
gives the first. Nothing is patched: the embedding module gets the finished embeddings through a
forward pre-hook that lives only for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_PLACEHOLDER = "S*"


@dataclass
class InjectedText:
    """Text-encoder output with words injected, and where each concept's first word sits."""

    hidden_states: torch.Tensor  # [B, L, D] last hidden state (after the final layer norm)
    word_positions: torch.Tensor  # [B, K] long: index of concept k's w0 in the sequence
    penultimate: torch.Tensor | None = None  # [B, L, D] the layer before the last (SDXL's prompt states)
    text_embeds: torch.Tensor | None = None  # [B, P] projected pooled embedding (encoders with a projection)


def add_placeholder_tokens(tokenizer, tokens: Sequence[str] = (DEFAULT_PLACEHOLDER,)) -> list[int]:
    """Add `tokens` to the tokenizer (once; repeated calls are no-ops) and return their ids.

    The text encoder's embedding table is not resized: placeholder ids never reach it.
    """
    if isinstance(tokens, str):
        tokens = [tokens]
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(list(missing))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    unk = getattr(tokenizer, "unk_token_id", None)
    for token, token_id in zip(tokens, ids):
        if token_id is None or (unk is not None and token_id == unk):
            raise ValueError(f"placeholder {token!r} could not be added to the tokenizer")
        check = tokenizer(token, add_special_tokens=False).input_ids
        if check != [token_id]:
            raise ValueError(f"placeholder {token!r} does not tokenize to its own id ({check} != [{token_id}])")
    return list(ids)


def placeholder_positions(input_ids: torch.Tensor, placeholder_token_id: int) -> torch.Tensor:
    """Index of the first `placeholder_token_id` in each row of `input_ids` `[B, L]` -> `[B]`.

    Raises a ValueError naming the rows without one (a truncated or mistyped prompt).
    """
    hits = input_ids == placeholder_token_id
    present = hits.any(dim=1)
    if not bool(present.all()):
        rows = torch.nonzero(~present).flatten().tolist()
        raise ValueError(
            f"placeholder token id {placeholder_token_id} missing from prompt rows {rows} "
            "(was it truncated away, or typed differently from the placeholder token?)"
        )
    return hits.int().argmax(dim=1)


def _text_parts(text_encoder: nn.Module) -> tuple[nn.Module, nn.Embedding, int]:
    """(embeddings module, token embedding table, vocabulary size) for CLIP text models of any layout."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    embeddings = getattr(inner, "embeddings", None)
    token_embedding = getattr(embeddings, "token_embedding", None)
    if embeddings is None or not isinstance(token_embedding, nn.Embedding):
        raise TypeError(f"{type(text_encoder).__name__} is not a CLIP text model (no embeddings.token_embedding)")
    return embeddings, token_embedding, token_embedding.num_embeddings


@contextmanager
def _embeddings_override(embeddings: nn.Module, inputs_embeds: torch.Tensor) -> Iterator[None]:
    """For one call, make the embeddings module use `inputs_embeds` instead of looking up input_ids."""

    def hook(module, args, kwargs):
        kwargs = dict(zip(("input_ids", "position_ids", "inputs_embeds"), args)) | dict(kwargs)
        kwargs["inputs_embeds"] = inputs_embeds
        kwargs["input_ids"] = None
        return (), kwargs

    handle = embeddings.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _normalise(placeholder_token_id, words) -> tuple[list[int], list[torch.Tensor]]:
    ids = (
        [int(placeholder_token_id)] if isinstance(placeholder_token_id, int) else [int(i) for i in placeholder_token_id]
    )
    word_list = [words] if isinstance(words, torch.Tensor) else list(words)
    if len(ids) != len(word_list):
        raise ValueError(f"{len(ids)} placeholder ids but {len(word_list)} word tensors: give one per placeholder")
    word_list = [w[:, None] if w.ndim == 2 else w for w in word_list]  # [B, D] -> [B, 1, D]
    return ids, word_list


def inject_words(
    token_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    placeholder_token_ids: Sequence[int],
    words: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings `[B, L, D]` with each placeholder replaced by its words `[B, N_k, D]`.

    Returns `(embeds [B, L, D], word_positions [B, K])`. With one word per placeholder the
    sequence keeps its layout; with N > 1 the tail shifts right by N - 1 and is cut at L.
    """
    batch, length, _ = token_embeds.shape
    for k, w in enumerate(words):
        if w.ndim != 3 or w.shape[0] != batch or w.shape[-1] != token_embeds.shape[-1]:
            raise ValueError(
                f"words for placeholder {placeholder_token_ids[k]} must be [B={batch}, N, D={token_embeds.shape[-1]}], "
                f"got {tuple(w.shape)}"
            )
    words = [w.to(token_embeds.dtype) for w in words]
    positions = torch.stack([placeholder_positions(input_ids, pid) for pid in placeholder_token_ids], dim=1)

    if all(w.shape[1] == 1 for w in words):  # same layout: a masked replacement, no loop
        out = token_embeds
        for pid, w in zip(placeholder_token_ids, words):
            hit = (input_ids == pid).unsqueeze(-1)
            out = torch.where(hit, w.expand(-1, length, -1), out)
        return out, positions

    # N > 1 words somewhere: rebuild each row as segments (batch sizes are small; rows differ in layout)
    by_id = {pid: k for k, pid in enumerate(placeholder_token_ids)}
    rows, new_positions = [], torch.zeros_like(positions)
    ids_cpu = input_ids.tolist()
    for b in range(batch):
        pieces, cursor, filled, first_seen = [], 0, 0, set()
        for j, tok in enumerate(ids_cpu[b]):
            if tok not in by_id:
                continue
            k = by_id[tok]
            if j > cursor:
                pieces.append(token_embeds[b, cursor:j])
                filled += j - cursor
            if k not in first_seen:
                new_positions[b, k] = min(filled, length - 1)
                first_seen.add(k)
            pieces.append(words[k][b])
            filled += words[k].shape[1]
            cursor = j + 1
        pieces.append(token_embeds[b, cursor:])
        rows.append(torch.cat(pieces, dim=0)[:length])
    return torch.stack(rows, dim=0), new_positions


def encode_text_with_words(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    placeholder_token_id: int | Sequence[int],
    words: torch.Tensor | Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    output_hidden_states: bool = False,
) -> InjectedText:
    """Run the text encoder on `input_ids` with placeholder embeddings replaced by `words`.

    `words`: `[B, N, D]` (or `[B, D]`) per placeholder id; a list when several placeholders are
    given. Gradients flow into `words` (the global stage trains through the frozen text encoder),
    so call it under `torch.no_grad()` only when the words are fixed. `output_hidden_states` also
    returns the penultimate layer's states (and a projection model's `text_embeds`), what SDXL uses.
    """
    ids, word_list = _normalise(placeholder_token_id, words)
    embeddings, token_embedding, vocab = _text_parts(text_encoder)
    input_ids = input_ids.to(token_embedding.weight.device)
    is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
    for pid in ids:
        is_placeholder |= input_ids == pid
    out_of_vocab = (input_ids >= vocab) & ~is_placeholder
    if bool(out_of_vocab.any()):
        bad = sorted(set(input_ids[out_of_vocab].tolist()))
        raise ValueError(
            f"token ids {bad} are outside the text encoder's vocabulary ({vocab}) and are not placeholders"
        )
    safe_ids = input_ids.masked_fill(is_placeholder, 0)
    token_embeds = token_embedding(safe_ids)
    embeds, positions = inject_words(token_embeds, input_ids, ids, [w.to(token_embeds.device) for w in word_list])
    with _embeddings_override(embeddings, embeds):
        out = text_encoder(input_ids=safe_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
    return InjectedText(
        hidden_states=out.last_hidden_state,
        word_positions=positions,
        penultimate=out.hidden_states[-2] if output_hidden_states else None,
        text_embeds=getattr(out, "text_embeds", None),
    )


@dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on for one prompt batch, with words injected.

    SD 1.x / 2.x (one text encoder): its last states, no pooled embedding. SDXL (two): both encoders'
    penultimate states side by side and the second one's projected pooled embedding, what
    `StableDiffusionXLPipeline.encode_prompt` computes for a typed prompt.
    """

    prompt_embeds: torch.Tensor  # [B, L, sum of the encoders' widths (SDXL) or the width]
    word_positions: torch.Tensor  # [B, K]: where each concept's w0 landed (first encoder's tokens)
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, P] SDXL only


def word_widths(text_encoders: Sequence[nn.Module]) -> list[int]:
    """Token-embedding width of each text encoder: a word for all of them is their concatenation."""
    return [int(_text_parts(encoder)[1].embedding_dim) for encoder in text_encoders]


def encode_prompt_with_words(
    text_encoders: nn.Module | Sequence[nn.Module],
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    placeholder_token_ids: Sequence[int] | Sequence[Sequence[int]],
    words: Sequence[torch.Tensor],
) -> PromptEmbeddings:
    """Prompt embeddings with each concept's words at its placeholder, for one or two text encoders.

    `input_ids`: one `[B, L]` tensor per encoder (each tokenised by its own tokenizer);
    `placeholder_token_ids`: one id per concept (the same in every tokenizer) or, per encoder, a list
    of them; `words`: per concept `[B, N, W]` (or `[B, W]`) with W the sum of `word_widths`: its
    first slice goes into the first encoder's embedding space, the next into the second's (SDXL:
    one word per text encoder, as SDXL's own Textual Inversion files hold `clip_l` and `clip_g`).
    """
    encoders = [text_encoders] if isinstance(text_encoders, nn.Module) else list(text_encoders)
    ids_list = [input_ids] if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if len(ids_list) != len(encoders):
        raise ValueError(f"{len(encoders)} text encoders but {len(ids_list)} input_ids tensors: give one per encoder")
    pids = list(placeholder_token_ids)
    per_encoder = [list(p) for p in pids] if pids and not isinstance(pids[0], int) else [pids] * len(encoders)
    widths = word_widths(encoders)
    word_list = [w[:, None] if w.ndim == 2 else w for w in words]
    for k, w in enumerate(word_list):
        if w.shape[-1] != sum(widths):
            raise ValueError(
                f"words of concept {k} are {w.shape[-1]} wide; these text encoders take {sum(widths)} "
                f"({' + '.join(map(str, widths))})"
            )
    if len(encoders) == 1:
        out = encode_text_with_words(encoders[0], ids_list[0], per_encoder[0], word_list)
        return PromptEmbeddings(out.hidden_states, out.word_positions)
    outs = [
        encode_text_with_words(
            encoder, ids, pid, [w[..., start : start + width] for w in word_list], output_hidden_states=True
        )
        for encoder, ids, pid, start, width in zip(encoders, ids_list, per_encoder, _starts(widths), widths)
    ]
    states = torch.cat([o.penultimate for o in outs], dim=-1)
    return PromptEmbeddings(states, outs[0].word_positions, outs[-1].text_embeds)


def _starts(widths: Sequence[int]) -> list[int]:
    return [sum(widths[:i]) for i in range(len(widths))]
