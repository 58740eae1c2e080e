"""Infusion's processor: residuals touch only the class token's values; maps come from the base rows."""

from __future__ import annotations

import pytest
import torch

from encoders.attention import CONTEXT_KWARG, AttentionContext, AttentionRecorder, attention_modules
from encoders.infusion import (
    EXTRAS_KEY,
    InfusionCall,
    InfusionResiduals,
    class_token_mask,
    infusion_call,
    set_infusion_processors,
    word_token_ids,
)


@pytest.fixture(scope="module")
def parts(tiny_sd_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    return unet, text_encoder, tokenizer


def random_residuals(unet, word, seed):
    concept = InfusionResiduals.for_unet(unet, word)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in concept.residuals:
            p.copy_(torch.randn(p.shape, generator=g))
    return concept


def encode(text_encoder, tokenizer, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, text_encoder(ids)[0]


def test_class_token_mask_finds_every_token_of_every_occurrence(parts):
    _, _, tokenizer = parts
    ids = tokenizer(
        ["a cat and a cat", "a dog", "a stuffed animal toy"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    cat = class_token_mask(ids, word_token_ids(tokenizer, "cat"))
    assert cat[0].sum() == 2 and cat[1].sum() == 0
    assert ids[0][cat[0]].tolist() == [tokenizer.convert_tokens_to_ids("cat</w>")] * 2
    phrase = word_token_ids(tokenizer, "stuffed animal")
    assert len(phrase) == 2
    mask = class_token_mask(ids, phrase)
    assert mask[2].sum() == 2 and ids[2][mask[2]].tolist() == phrase


def test_residual_changes_only_the_class_tokens_values(parts):
    unet, text_encoder, tokenizer = parts
    cat, dog = random_residuals(unet, "cat", 0), random_residuals(unet, "dog", 1)
    processors = set_infusion_processors(unet, [cat, dog])
    prompts = ["a photo of a cat and a dog", "a photo of a cat", "a red car"]
    ids, text = encode(text_encoder, tokenizer, prompts)
    call = infusion_call(tokenizer, prompts, [cat, dog])
    ctx = AttentionContext(extras={EXTRAS_KEY: call})
    cat_mask, dog_mask = call.token_masks
    checked = 0
    for name, attn in attention_modules(unet).items():
        if not attn.is_cross_attention:
            continue
        proc = processors[name]
        with torch.no_grad():
            k0, v0 = proc.key_value(attn, text, True, None)
            k1, v1 = proc.key_value(attn, text, True, ctx)
        assert torch.equal(k0, k1)  # keys (so the maps) untouched
        diff = v1 - v0
        assert torch.allclose(diff[cat_mask], cat.residual(name).expand(int(cat_mask.sum()), -1), atol=1e-6)
        assert torch.allclose(diff[dog_mask], dog.residual(name).expand(int(dog_mask.sum()), -1), atol=1e-6)
        assert diff[~(cat_mask | dog_mask)].abs().max() == 0  # every other token's value is unchanged
        assert diff[2].abs().max() == 0  # a prompt without the class words is untouched
        checked += 1
    assert checked == len(cat.residuals) == 4


def test_guidance_half_batch_masks_touch_the_conditional_half_only(parts):
    unet, text_encoder, tokenizer = parts
    cat = random_residuals(unet, "cat", 2)
    processors = set_infusion_processors(unet, [cat])
    _, text = encode(text_encoder, tokenizer, ["", "a cat"])
    call = infusion_call(tokenizer, ["a cat"], [cat])  # one row per conditional sample
    name, attn = next((n, a) for n, a in attention_modules(unet).items() if a.is_cross_attention)
    with torch.no_grad():
        _, v0 = processors[name].key_value(attn, torch.cat([text[1:], text[1:]]), True, None)
        _, v1 = processors[name].key_value(
            attn, torch.cat([text[1:], text[1:]]), True, AttentionContext(extras={EXTRAS_KEY: call})
        )
    assert torch.equal(v0[0], v1[0])  # unconditional half
    assert not torch.equal(v0[1], v1[1])


def test_dual_stream_replaces_maps_and_keeps_base_rows_exact(parts):
    unet, text_encoder, tokenizer = parts
    cat = random_residuals(unet, "cat", 3)
    _, text = encode(text_encoder, tokenizer, ["a photo of a cat"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([500])

    from encoders.attention import set_context_processors

    set_context_processors(unet)
    base_store = AttentionRecorder(keep_grad=False)
    with torch.no_grad():
        base = unet(
            latents, t, text, cross_attention_kwargs={CONTEXT_KWARG: AttentionContext(attention_store=base_store)}
        ).sample

    set_infusion_processors(unet, [cat])

    def run(map_source):
        call = infusion_call(tokenizer, ["a photo of a cat"] * 2, [cat], map_source=map_source)
        call.token_masks = [torch.cat([torch.zeros_like(call.token_masks[0][:1]), call.token_masks[0][1:]])]
        store = AttentionRecorder(keep_grad=False)
        ctx = AttentionContext(attention_store=store, extras={EXTRAS_KEY: call})
        with torch.no_grad():
            out = unet(
                torch.cat([latents] * 2),
                t.repeat(2),
                torch.cat([text] * 2),
                cross_attention_kwargs={CONTEXT_KWARG: ctx},
            ).sample
        return out, store

    out, store = run(torch.tensor([0, 0]))
    assert torch.allclose(out[0], base[0], atol=1e-5)  # the F row is the base model
    assert (out[1] - out[0]).abs().max() > 1e-4  # the C row carries the concept
    for name, maps in store.maps.items():
        assert torch.equal(maps[0][1], maps[0][0])  # C uses F's maps in every cross-attention layer
        assert torch.allclose(maps[0][0], base_store.maps[name][0][0], atol=1e-5)

    _, own = run(None)  # without replacement the C row's deeper maps drift from the base model's
    drift = [(m[0][1] - m[0][0]).abs().max().item() for m in own.maps.values()]
    assert drift[0] == 0.0 and max(drift) > 0


def test_residuals_check_their_unet(parts, tmp_path):
    unet, _, tokenizer = parts
    concept = InfusionResiduals.for_unet(unet, "cat", base_model="tiny")
    concept.save_pretrained(tmp_path / "c")
    again = InfusionResiduals.from_pretrained(tmp_path / "c")
    assert again.config.layer_names == concept.config.layer_names and again.config.base_model == "tiny"
    wrong = InfusionResiduals(
        layer_names=concept.config.layer_names, layer_dims=[8] * 4, class_word="cat", base_model="other"
    )
    with pytest.raises(ValueError, match="width"):
        set_infusion_processors(unet, [wrong])
    with pytest.raises(ValueError, match="same class word|class word"):
        infusion_call(tokenizer, ["a cat"], [concept, again])
    with pytest.raises(ValueError, match="missing from prompts"):
        infusion_call(tokenizer, ["a dog"], [concept], require_all=True)
    with pytest.raises(TypeError, match="InfusionCall"):
        set_infusion_processors(unet, [concept])
        attn_name, attn = next((n, a) for n, a in attention_modules(unet).items() if a.is_cross_attention)
        unet.attn_processors[attn_name].key_value(
            attn, torch.zeros(1, 77, 32), True, AttentionContext(extras={EXTRAS_KEY: "x"})
        )
    assert isinstance(InfusionCall(token_masks=[None]).token_masks, list)


def test_released_variant_adds_a_key_residual_on_the_class_tokens(parts, tmp_path):
    """`variant="released"` (the official code's xformers path): a key residual joins the class token's key as the
    value residual joins its value; other tokens and prompts without the word are untouched; it is saved with the
    residuals and is sampled with its own maps."""
    unet, text_encoder, tokenizer = parts
    concept = InfusionResiduals.for_unet(unet, "cat", variant="released")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in [*concept.residuals, *concept.key_residuals]:
            p.copy_(torch.randn(p.shape, generator=g))
    processors = set_infusion_processors(unet, [concept])
    prompts = ["a photo of a cat", "a red car"]
    _, text = encode(text_encoder, tokenizer, prompts)
    call = infusion_call(tokenizer, prompts, [concept])
    (mask,) = call.token_masks
    name, attn = next((n, a) for n, a in attention_modules(unet).items() if a.is_cross_attention)
    with torch.no_grad():
        k0, v0 = processors[name].key_value(attn, text, True, None)
        k1, v1 = processors[name].key_value(attn, text, True, AttentionContext(extras={EXTRAS_KEY: call}))
    key_diff, value_diff = k1 - k0, v1 - v0
    assert torch.allclose(key_diff[mask], concept.key_residual(name).expand(int(mask.sum()), -1), atol=1e-6)
    assert torch.allclose(value_diff[mask], concept.residual(name).expand(int(mask.sum()), -1), atol=1e-6)
    assert key_diff[~mask].abs().max() == 0 and value_diff[~mask].abs().max() == 0
    assert not concept.replaces_maps and InfusionResiduals.for_unet(unet, "cat").replaces_maps

    concept.save_pretrained(tmp_path / "released")
    again = InfusionResiduals.from_pretrained(tmp_path / "released")
    assert again.config.variant == "released" and torch.equal(again.key_residual(name), concept.key_residual(name))
    assert InfusionResiduals.for_unet(unet, "cat").key_residual(name) is None
    with pytest.raises(ValueError, match="variant"):
        InfusionResiduals.for_unet(unet, "cat", variant="xformers")
