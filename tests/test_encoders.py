"""ELITE encoders on the tiny bundle: features, mappings, word injection, attention processors, save/load."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from encoders.attention import (
    CONTEXT_KWARG,
    AttentionContext,
    AttentionRecorder,
    ContextAttnProcessor,
    EliteAttnProcessor,
    LocalTokens,
    cross_attention_layers,
    restore_default_processors,
    set_context_processors,
    set_elite_processors,
)
from encoders.clip_features import DEFAULT_LAYERS, CLIPFeatureExtractor, load_clip_normalization, mask_background
from encoders.global_mapping import GlobalMapping
from encoders.local_mapping import LocalMapping, mask_to_patch_grid
from encoders.text_injection import add_placeholder_tokens, encode_text_with_words, placeholder_positions

HIDDEN = 48  # narrow mapping MLPs keep the tests fast; the default (1024) is checked separately


@pytest.fixture(scope="module")
def parts(tiny_sd_path, tiny_image_encoder_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    clip = CLIPFeatureExtractor.from_pretrained(tiny_image_encoder_path)
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, clip=clip)


@pytest.fixture(scope="module")
def mappings(parts):
    torch.manual_seed(0)
    gm = GlobalMapping.from_unet(parts["unet"], input_dim=parts["clip"].hidden_size, hidden_dim=HIDDEN)
    lm = LocalMapping.from_unet(parts["unet"], input_dim=parts["clip"].hidden_size, hidden_dim=HIDDEN)
    return gm, lm


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _unet_out(unet, latents, text, ctx=None, t=500):
    kwargs = None if ctx is None else {CONTEXT_KWARG: ctx}
    return unet(latents, t, text, cross_attention_kwargs=kwargs).sample


# ---------------------------------------------------------------- features and mappings


def test_clip_features_taps_layers_in_order(parts):
    clip = parts["clip"]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = clip.encode(images)
        ref = clip.vision_model(pixel_values=clip.preprocess(images), output_hidden_states=True)
    assert clip.layers == DEFAULT_LAYERS and len(feats) == 5
    assert all(f.shape == (2, 257, 32) for f in feats)
    assert torch.equal(feats[0], ref.last_hidden_state)  # layer 24 is the last hidden state
    assert torch.equal(feats[1], ref.hidden_states[4]) and torch.equal(feats[4], ref.hidden_states[16])
    assert not any(p.requires_grad for p in clip.parameters())
    with pytest.raises(ValueError, match="outside 0..24"):
        CLIPFeatureExtractor(clip.vision_model, layers=(25,))


def test_clip_normalisation_read_from_preprocessor(tiny_image_encoder_path, tmp_path):
    mean, std = load_clip_normalization(tiny_image_encoder_path)
    assert mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and len(std) == 3
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}'
    )
    assert load_clip_normalization(tmp_path) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert load_clip_normalization(tmp_path / "missing") == load_clip_normalization(tiny_image_encoder_path)


def test_mask_background_resizes_mask():
    images = torch.ones(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    out = mask_background(images, mask)
    assert out[..., :4, :].eq(1).all() and out[..., 4:, :].eq(0).all()


def test_global_mapping_words(parts, mappings):
    gm, _ = mappings
    feats = [torch.randn(3, 257, 32) for _ in range(5)]
    words = gm(feats)
    assert words.shape == (3, 5, 32)
    # word i depends on tapped layer i only
    feats2 = [f.clone() for f in feats]
    feats2[2] += 1.0
    words2 = gm(feats2)
    assert torch.equal(words[:, [0, 1, 3, 4]], words2[:, [0, 1, 3, 4]]) and not torch.equal(words[:, 2], words2[:, 2])
    # K/V projections cover every cross-attention layer, initialised as copies of the frozen ones
    layers = cross_attention_layers(parts["unet"])
    assert set(gm.kv_layer_names) == set(layers) and len(layers) == 4
    for name in layers:
        to_k, to_v = gm.key_value(name + ".processor")
        attn = parts["unet"].get_submodule(name)
        assert torch.equal(to_k.weight, attn.to_k.weight) and torch.equal(to_v.weight, attn.to_v.weight)
        assert to_k.weight.data_ptr() != attn.to_k.weight.data_ptr()
    with pytest.raises(ValueError, match="expects 5 feature tensors"):
        gm(feats[:4])
    # word i = MLP_i(CLS) + mean over patches of MLP'_i(patch), as the paper/reference define it
    with torch.no_grad():
        expected = torch.cat(
            [
                c(f[:, :1]) + p(f[:, 1:]).mean(1, keepdim=True)
                for c, p, f in zip(gm.cls_mappings, gm.patch_mappings, feats)
            ],
            dim=1,
        )
    assert torch.allclose(words, expected, atol=1e-5)


def test_default_width_is_the_papers():
    gm = GlobalMapping(input_dim=8, output_dim=8)
    assert gm.config.hidden_dim == 1024 and gm.cls_mappings[0][3].weight.shape == (1024, 1024)
    assert list(gm.config.feature_layers) == [24, 4, 8, 12, 16]


def test_local_mapping_tokens_and_mask(mappings):
    _, lm = mappings
    feats = [torch.randn(2, 257, 32) for _ in range(5)]
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :32, :] = 1  # top half of sample 0; sample 1 empty
    out = lm(feats, mask)
    assert out.tokens.shape == (2, 256, 32) and out.keep.shape == (2, 256) and out.keep.dtype == torch.bool
    assert out.keep[0, :128].all() and not out.keep[0, 128:].any() and not out.keep[1].any()
    assert out.tokens[0, 128:].eq(0).all() and out.tokens[0, :128].abs().sum() > 0
    unmasked = lm(feats)
    assert unmasked.keep.all() and torch.equal(out.tokens[0, :128], unmasked.tokens[0, :128])
    # per-token: mean over layers of MLP(CLS) + MLP'(patch)
    expected = sum(c(f[:, :1]) + p(f[:, 1:]) for c, p, f in zip(lm.cls_mappings, lm.patch_mappings, feats)) / 5
    assert torch.allclose(unmasked.tokens, expected, atol=1e-6)
    assert mask_to_patch_grid(torch.ones(1, 7, 7), 256).shape == (1, 256)


# ---------------------------------------------------------------- text injection


def test_injecting_a_real_words_embedding_equals_typing_it(parts):
    tok, te = parts["tokenizer"], parts["text_encoder"]
    (sid,) = add_placeholder_tokens(tok, ["S*"])
    assert add_placeholder_tokens(tok, ["S*"]) == [sid]  # idempotent
    ids = _ids(tok, ["a photo of S* on the beach", "S* in the snow"])
    dog = tok("dog", add_special_tokens=False).input_ids
    cat = tok("cat", add_special_tokens=False).input_ids
    table = te.get_input_embeddings().weight
    words = torch.stack([table[dog[0]], table[cat[0]]])[:, None]  # [B, 1, D]
    with torch.no_grad():
        out = encode_text_with_words(te, ids, sid, words)
        typed = te(_ids(tok, ["a photo of dog on the beach", "cat in the snow"])).last_hidden_state
    assert torch.equal(out.hidden_states, typed)
    assert out.word_positions[:, 0].tolist() == [4, 1]


def test_n_words_expand_at_the_placeholder(parts):
    tok, te = parts["tokenizer"], parts["text_encoder"]
    (sid,) = add_placeholder_tokens(tok, ["S*"])
    ids = _ids(tok, ["a photo of S* on the beach"])
    table = te.get_input_embeddings().weight
    # a word the tokenizer splits into several tokens, typed vs injected as N words
    pieces = tok("a backpacking trip", add_special_tokens=False).input_ids
    words = table[pieces][None]  # [1, N, D]
    assert len(pieces) >= 3
    with torch.no_grad():
        out = encode_text_with_words(te, ids, sid, words)
        typed = te(_ids(tok, ["a photo of a backpacking trip on the beach"])).last_hidden_state
    assert torch.equal(out.hidden_states, typed) and out.word_positions.tolist() == [[4]]
    # the tail is cut back to 77 tokens
    long_ids = _ids(tok, ["S* " + "very " * 80])
    with torch.no_grad():
        cut = encode_text_with_words(te, long_ids, sid, words)
    assert cut.hidden_states.shape == (1, 77, 32)


def test_gradients_reach_injected_words(parts):
    tok, te = parts["tokenizer"], parts["text_encoder"]
    (sid,) = add_placeholder_tokens(tok, ["S*"])
    words = torch.randn(2, 5, 32, requires_grad=True)
    out = encode_text_with_words(te, _ids(tok, ["a photo of S*", "a S* toy"]), sid, words)
    out.hidden_states.sum().backward()
    assert words.grad is not None and words.grad.abs().sum() > 0


def test_two_placeholders_and_missing_placeholder(parts):
    tok, te = parts["tokenizer"], parts["text_encoder"]
    s1, s2 = add_placeholder_tokens(tok, ["S1*", "S2*"])
    ids = _ids(tok, ["S1* and S2* on a table"])
    table = te.get_input_embeddings().weight
    dog, cat = (tok(w, add_special_tokens=False).input_ids[0] for w in ("dog", "cat"))
    with torch.no_grad():
        out = encode_text_with_words(te, ids, [s1, s2], [table[dog][None], table[cat][None]])
        typed = te(_ids(tok, ["dog and cat on a table"])).last_hidden_state
    assert torch.equal(out.hidden_states, typed) and out.word_positions.tolist() == [[1, 3]]
    with pytest.raises(ValueError, match=r"missing from prompt rows \[0\]"):
        placeholder_positions(_ids(tok, ["no placeholder here"]), s1)
    with pytest.raises(ValueError, match="one per placeholder"):
        encode_text_with_words(te, ids, [s1, s2], [table[dog][None]])


# ---------------------------------------------------------------- attention processors


@pytest.fixture()
def unet(parts):
    unet = parts["unet"]
    yield unet
    restore_default_processors(unet)


def _scene(parts, mappings, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    _, lm = mappings
    latents = torch.randn(batch, 4, 32, 32, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    feats = [torch.randn(batch, 257, 32, generator=g) for _ in range(5)]
    mask = torch.zeros(batch, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    with torch.no_grad():
        local = lm(feats, mask)
    return latents, text, local


def test_lambda_zero_and_frozen_kv_equal_the_stock_processor(parts, mappings, unet):
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings)
    with torch.no_grad():
        stock = _unet_out(unet, latents, text)
        set_elite_processors(unet, gm, lm)  # global K/V are exact copies of the frozen ones
        no_local = _unet_out(unet, latents, text, AttentionContext())
        ctx = AttentionContext(local=[LocalTokens(local.tokens, token_index=3, keep=local.keep, scale=0.0)])
        lam0 = _unet_out(unet, latents, text, ctx)
        lam0_t = _unet_out(
            unet,
            latents,
            text,
            AttentionContext(local=[LocalTokens(local.tokens, 3, local.keep, scale=torch.zeros(2))]),
        )
        lam1 = _unet_out(unet, latents, text, AttentionContext(local=[LocalTokens(local.tokens, 3, local.keep, 1.0)]))
        plain = _unet_out(unet, latents, text)  # processors installed, no kwarg at all
    assert torch.equal(no_local, stock) and torch.equal(lam0, stock) and torch.equal(lam0_t, stock)
    assert torch.equal(plain, stock)
    assert not torch.allclose(lam1, stock, atol=1e-5)


def test_global_kv_are_used_for_all_text(parts, mappings, unet):
    gm, _ = mappings
    latents, text, _ = _scene(parts, mappings)
    trained = GlobalMapping.from_config(gm.config)
    trained.load_state_dict(gm.state_dict())
    with torch.no_grad():
        stock = _unet_out(unet, latents, text)
        for lin in trained.to_v.values():
            lin.weight.mul_(1.5)
        set_elite_processors(unet, trained)
        changed = _unet_out(unet, latents, text)
    assert not torch.allclose(changed, stock, atol=1e-5)


def test_masked_out_local_tokens_take_no_attention(parts, mappings, unet):
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings)
    set_elite_processors(unet, gm, lm)
    garbage = local.tokens.clone()
    garbage[~local.keep] = 1e4 * torch.randn_like(garbage[~local.keep])
    with torch.no_grad():
        a = _unet_out(unet, latents, text, AttentionContext(local=[LocalTokens(local.tokens, 5, local.keep)]))
        b = _unet_out(unet, latents, text, AttentionContext(local=[LocalTokens(garbage, 5, local.keep)]))
        # without the keep-mask the garbage tokens would be attended
        c = _unet_out(unet, latents, text, AttentionContext(local=[LocalTokens(garbage, 5, None)]))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_empty_mask_sample_gets_no_local_branch_and_no_nan(parts, mappings, unet):
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings)
    keep = local.keep.clone()
    keep[1] = False
    set_elite_processors(unet, gm, lm)
    with torch.no_grad():
        stock = _unet_out(unet, latents, text, AttentionContext())
        out = _unet_out(unet, latents, text, AttentionContext(local=[LocalTokens(local.tokens, 5, keep)]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], stock[1]) and not torch.allclose(out[0], stock[0], atol=1e-5)


def test_reweighting_is_per_sample(parts, mappings, unet):
    """A sample's output must not depend on the other samples of its batch (the reference's batch max did)."""
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings, batch=2)
    other_latents, other_text, other_local = _scene(parts, mappings, batch=2, seed=1)
    set_elite_processors(unet, gm, lm)
    idx = torch.tensor([5, 7])

    def run(lat, txt, toks, keep):
        ctx = AttentionContext(local=[LocalTokens(toks, idx, keep)])
        with torch.no_grad():
            return _unet_out(unet, lat, txt, ctx)

    first = run(latents, text, local.tokens, local.keep)
    mixed = run(
        torch.cat([latents[:1], 10 * other_latents[1:]]),
        torch.cat([text[:1], 10 * other_text[1:]]),
        torch.cat([local.tokens[:1], other_local.tokens[1:]]),
        local.keep,
    )
    assert torch.allclose(first[0], mixed[0], atol=1e-5)


def test_cfg_batch_local_branch_applies_to_conditional_half(parts, mappings, unet):
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings, batch=2)
    set_elite_processors(unet, gm, lm)
    lat2, txt2 = torch.cat([latents, latents]), torch.cat([text, text])
    with torch.no_grad():
        stock = _unet_out(unet, lat2, txt2, AttentionContext())
        cfg = _unet_out(unet, lat2, txt2, AttentionContext(local=[LocalTokens(local.tokens, 5, local.keep)]))
        direct = _unet_out(unet, latents, text, AttentionContext(local=[LocalTokens(local.tokens, 5, local.keep)]))
    assert torch.equal(cfg[:2], stock[:2])
    assert torch.allclose(cfg[2:], direct, atol=1e-5)
    with pytest.raises(ValueError, match="attention batch"):
        _unet_out(
            unet,
            torch.cat([lat2, latents[:1]]),
            torch.cat([txt2, text[:1]]),
            AttentionContext(local=[LocalTokens(local.tokens, 5, local.keep)]),
        )


def test_two_concepts_each_through_its_own_token(parts, mappings, unet):
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings)
    _, _, other = _scene(parts, mappings, seed=3)
    set_elite_processors(unet, gm, lm)
    first = LocalTokens(local.tokens, 4, local.keep, scale=1.0)
    with torch.no_grad():
        one = _unet_out(unet, latents, text, AttentionContext(local=[first]))
        second_off = _unet_out(
            unet, latents, text, AttentionContext(local=[first, LocalTokens(other.tokens, 9, other.keep, 0.0)])
        )
        both = _unet_out(
            unet, latents, text, AttentionContext(local=[first, LocalTokens(other.tokens, 9, other.keep, 1.0)])
        )
    assert torch.equal(one, second_off)
    assert not torch.allclose(both, one, atol=1e-5)


def test_attention_store_gets_differentiable_cross_maps(parts, mappings, unet):
    gm, lm = mappings
    latents, text, local = _scene(parts, mappings)
    latents.requires_grad_(True)
    set_elite_processors(unet, gm, lm)
    store = AttentionRecorder()
    with torch.no_grad():
        stock = _unet_out(unet, latents, text)
    out = _unet_out(unet, latents, text, AttentionContext(attention_store=store))
    assert torch.allclose(out, stock, atol=1e-5)  # explicit softmax path = SDPA path
    assert len(store.maps) == 4 and all(name.endswith("attn2.processor") for name in store.maps)
    probs = store.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"][0]
    assert probs.shape == (2, 8, 32 * 32, 77)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert probs.requires_grad
    (grad,) = torch.autograd.grad(probs[..., 5].sum(), latents)
    assert grad.abs().sum() > 0


def test_self_attention_layers_take_the_kwarg_without_warning(parts, mappings, unet):
    import diffusers.models.attention_processor as ap

    gm, lm = mappings
    latents, text, local = _scene(parts, mappings)
    ctx = AttentionContext(local=[LocalTokens(local.tokens, 5, local.keep)])
    with mock.patch.object(ap.logger, "warning") as warn, torch.no_grad():
        set_elite_processors(unet, gm, lm)
        _unet_out(unet, latents, text, ctx)
        procs = set_context_processors(unet)
        recorder = AttentionRecorder(record_self_attention=True, keep_grad=False)
        _unet_out(unet, latents, text, AttentionContext(attention_store=recorder))
    warn.assert_not_called()
    assert all(type(p) is ContextAttnProcessor for p in procs.values())
    assert any(name.endswith("attn1.processor") for name in recorder.maps)
    with pytest.raises(TypeError, match="AttentionContext"):
        with torch.no_grad():
            unet(latents, 1, text, cross_attention_kwargs={CONTEXT_KWARG: {"concepts": []}})


def test_installed_processors_are_keyed_by_name_and_not_modules(parts, mappings, unet):
    gm, lm = mappings
    procs = set_elite_processors(unet, gm, lm)
    assert set(procs) == set(unet.attn_processors)
    cross = {n: p for n, p in procs.items() if isinstance(p, EliteAttnProcessor)}
    assert len(cross) == 4 and all(n.endswith("attn2.processor") for n in cross)
    name = next(iter(cross))
    assert cross[name].global_kv[0] is gm.key_value(name)[0] and cross[name].local_kv[1] is lm.key_value(name)[1]
    # the mappings' projections never become UNet parameters
    assert not any("to_k" in n and "processor" in n for n, _ in unet.named_parameters())
    restore_default_processors(unet)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("cls_index", [0, 1])
def test_save_load_round_trip_keeps_weights_order_and_outputs(mappings, tmp_path, cls_index):
    model = mappings[cls_index]
    cls = type(model)
    model.register_to_config(pretrained_model_name_or_path="base/sd", image_encoder_name_or_path="base/clip")
    root = tmp_path / "encoders"
    sub = "global_mapping" if cls is GlobalMapping else "local_mapping"
    model.save_pretrained(root / sub)
    assert (root / sub / "config.json").is_file()
    assert list((root / sub).glob("*.safetensors")) and not list((root / sub).glob("*.bin"))
    loaded = cls.from_pretrained(root, subfolder=sub)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)  # stored bytes, read back
    # the same parameters in the same order (optimizer states and DeepSpeed partitions follow it)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    assert list(loaded.to_k.keys()) == sorted(loaded.to_k.keys()) == list(model.to_k.keys())
    assert loaded.config.kv_layers == model.config.kv_layers
    assert loaded.config.pretrained_model_name_or_path == "base/sd"
    assert list(loaded.config.feature_layers) == list(model.config.feature_layers)
    feats = [torch.randn(1, 257, 32) for _ in range(5)]
    with torch.no_grad():
        out_a, out_b = model(feats), loaded(feats)
    # two objects whose weights sit in differently allocated memory: BLAS kernels may round differently
    # (seen on AMD EPYC at ~2e-7), so equal up to float rounding, not bit for bit
    if cls is GlobalMapping:
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(out_a.tokens, out_b.tokens, rtol=1e-5, atol=1e-6)


def test_w0_only_matches_the_first_word(mappings):
    gm, _ = mappings
    feats = [torch.randn(2, 257, 32) for _ in range(5)]
    with torch.no_grad():
        assert torch.equal(gm(feats, num_words=1), gm(feats)[:, :1])
        assert torch.equal(gm(feats[:1], num_words=1), gm(feats)[:, :1])
    with pytest.raises(ValueError, match="num_words"):
        gm(feats, num_words=6)
