"""Spatial guidance: masks, L_loc, token positions, and on the tiny pipeline: L_loc measurably lower
with guidance than without (same seed), the loop equals the pipeline when guidance is off, any scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inference.guidance import (
    AttentionMapStore,
    BoxedTokens,
    SpatialGuidanceConfig,
    box_mask,
    concepts_from_words,
    default_guidance_layers,
    find_token_indices,
    generate_with_spatial_guidance,
    location_loss,
    map_shape,
)
from inference.pictures import render_comparison


def test_box_mask_cells_and_never_empty():
    m = box_mask((0.0, 0.0, 0.5, 0.25), 4, 8)
    expected = np.zeros((4, 8))
    expected[0, :4] = 1  # cell centres (x+0.5)/8 <= 0.5 -> x in 0..3; (y+0.5)/4 <= 0.25 -> y = 0
    assert np.array_equal(m.numpy(), expected)
    tiny = box_mask((0.51, 0.51, 0.52, 0.52), 4, 4)
    assert tiny.sum() == 1 and tiny[2, 2] == 1
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        box_mask((0.5, 0.0, 0.4, 1.0), 4, 4)


def test_map_shape_handles_non_square_latents():
    assert map_shape(64 * 64, 64, 64) == (64, 64)
    assert map_shape(8 * 12, 32, 48) == (8, 12)
    with pytest.raises(ValueError):
        map_shape(7, 32, 32)


def _store_with(maps_per_layer: dict[str, torch.Tensor]) -> AttentionMapStore:
    store = AttentionMapStore()
    for name, probs in maps_per_layer.items():
        store.record(name, probs, is_cross=True)
    return store


def test_location_loss_matches_the_formula():
    # one layer, 4x4 map, batch 1, 2 heads, 5 tokens; token 1 all inside its box, token 3 uniform
    probs = torch.full((1, 2, 16, 5), 0.2)
    a1 = torch.zeros(4, 4)
    a1[:2, :2] = 1.0 / 4
    probs[0, :, :, 1] = a1.flatten()
    store = _store_with({"mid_block.attn2.processor": probs})
    concepts = [BoxedTokens([1], (0, 0, 0.5, 0.5), "a"), BoxedTokens([3], (0, 0, 1, 0.5), "b")]
    loss = location_loss(store, concepts, (16, 16), "paper")
    # token 1: all its mass is in the box -> 0; token 3: uniform, box covers half -> 0.5
    assert loss.item() == pytest.approx((0.0 + 0.5) / 2, abs=1e-6)
    # self-attention and unwanted layers are ignored
    store.record("down.attn1.processor", torch.rand(1, 2, 16, 16), is_cross=False)
    store.layers = ["mid_block"]
    store.record("up_blocks.1.attn2.processor", torch.rand(1, 2, 16, 5), is_cross=True)
    assert list(store.maps) == ["mid_block.attn2.processor"]


def test_location_loss_multi_token_concept_and_cfg_rows():
    probs = torch.rand(2, 1, 4, 3)  # rows: [uncond, cond]
    store = AttentionMapStore()
    store.reset(rows=slice(1, 2))
    store.record("x.attn2", probs, is_cross=True)
    concept = BoxedTokens([1, 2], (0, 0, 1, 0.5))
    a = probs[1, 0, :, 1:3].mean(-1).reshape(2, 2)
    expected = 1 - a[0].sum() / a.sum()
    assert location_loss(store, [concept], (8, 8), "paper").item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_official_location_loss_is_per_head_squared_on_the_second_half_of_the_heads():
    """layout_control.compute_ca_loss: per layer, object and token, mean over heads of (1 - share)^2 with the
    [int(y0 H), int(y1 H)) x [int(x0 W), int(x1 W)) mask; heads from chunk(2)[1]; / (objects x layers)."""
    g = torch.Generator().manual_seed(0)
    layers = {
        "mid_block.attn2.processor": torch.rand(1, 4, 16, 6, generator=g).softmax(-1),
        "up_blocks.1.attn2.processor": torch.rand(1, 4, 64, 6, generator=g).softmax(-1),
    }
    store = _store_with(layers)
    concepts = [BoxedTokens([1, 2], (0.1, 0.3, 0.6, 0.9), "a"), BoxedTokens([4], (0.5, 0.0, 1.0, 0.55), "b")]
    loss = location_loss(store, concepts, (8, 8))
    total = 0.0
    for probs in layers.values():
        heads = probs[0, 2:]  # chunk(2)[1] of the 4 heads of a conditional-only pass
        side = int(math.sqrt(probs.shape[2]))
        for c in concepts:
            x0, y0, x1, y1 = c.box
            mask = torch.zeros(side, side)
            mask[int(y0 * side) : int(y1 * side), int(x0 * side) : int(x1 * side)] = 1
            obj = 0.0
            for t in c.token_indices:
                maps = heads[:, :, t].reshape(-1, side, side)
                share = (maps * mask).sum(dim=(1, 2)) / maps.sum(dim=(1, 2))
                obj += float(((1 - share) ** 2).mean())
            total += obj / len(c.token_indices)
    assert loss.item() == pytest.approx(total / (len(concepts) * len(layers)), rel=1e-5)
    assert SpatialGuidanceConfig().loss_threshold == 0.2
    assert SpatialGuidanceConfig(loss="paper").loss_threshold == pytest.approx(math.sqrt(0.2))


def test_token_indices_from_the_tokenizer(tiny_sd_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    prompt = "a traffic light next to a dog"
    ids = tok(prompt)["input_ids"]
    positions = find_token_indices(tok, prompt, "traffic light")
    assert (
        len(positions) == 2
        and [ids[p] for p in positions] == tok("traffic light", add_special_tokens=False)["input_ids"]
    )
    assert ids[find_token_indices(tok, prompt, "dog")[0]] == tok("dog", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ValueError, match="not in the prompt"):
        find_token_indices(tok, prompt, "cat")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT = "a photo of a cat and a dog"
BOXES = [(0.0, 0.1, 0.45, 0.9), (0.55, 0.1, 1.0, 0.9)]


def test_default_layers_are_the_low_resolution_cross_attention(tiny_pipe):
    layers = default_guidance_layers(tiny_pipe.unet)
    assert layers and all("attn2" in n for n in layers)
    assert any(n.startswith("mid_block") for n in layers) and any(n.startswith("up_blocks.1") for n in layers)
    assert not any(n.startswith("down_blocks") for n in layers)


def test_guidance_lowers_location_loss_against_the_same_seed(tiny_pipe):
    concepts = concepts_from_words(tiny_pipe.tokenizer, PROMPT, ["cat", "dog"], BOXES)
    before = {n: type(p) for n, p in tiny_pipe.unet.attn_processors.items()}
    runs = {}
    for label, steps in (("off", 0), ("on", 2)):
        runs[label] = generate_with_spatial_guidance(
            tiny_pipe,
            concepts,
            PROMPT,
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            config=SpatialGuidanceConfig(guidance_steps=steps, iterations=2, step_size=1e5, loss_threshold=0.0),
        )
    off, on = runs["off"], runs["on"]
    assert len(on.guidance_losses) == 2 and all(len(losses) == 3 for losses in on.guidance_losses)
    # within a guided step, each gradient iteration lowers L_loc
    for losses in on.guidance_losses:
        assert losses[-1] < losses[0]
    # the denoising passes of the guided steps see lower L_loc than the unguided run with the same seed
    assert on.location_losses[0] < off.location_losses[0] - 1e-3
    assert np.mean(on.location_losses[:2]) < np.mean(off.location_losses[:2]) - 1e-3
    assert on.images.shape == off.images.shape == (1, 64, 64, 3)
    assert not np.allclose(on.images, off.images)
    assert len(on.attention_maps) == 2 and on.attention_maps[0].shape == (1, 32, 32)
    # the UNet's own processors are back
    assert {n: type(p) for n, p in tiny_pipe.unet.attn_processors.items()} == before
    sheet = render_comparison([("guidance off", off), ("guidance on", on)], concepts, PROMPT, tile=64)
    assert sheet.size[1] > 2 * 64


def test_guidance_off_equals_the_pipeline(tiny_pipe):
    concepts = concepts_from_words(tiny_pipe.tokenizer, PROMPT, ["cat", "dog"], BOXES)
    ours = generate_with_spatial_guidance(
        tiny_pipe,
        concepts,
        PROMPT,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
        config=SpatialGuidanceConfig(guidance_steps=0),
    ).images
    theirs = tiny_pipe(
        PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(1), output_type="np"
    ).images
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


@pytest.mark.parametrize("scheduler_name", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_any_scheduler(tiny_pipe, scheduler_name):
    import diffusers

    pipe = type(tiny_pipe)(**tiny_pipe.components)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(tiny_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    concepts = concepts_from_words(pipe.tokenizer, PROMPT, ["cat", "dog"], BOXES)
    out = generate_with_spatial_guidance(
        pipe,
        concepts,
        PROMPT,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        config=SpatialGuidanceConfig(guidance_steps=1, iterations=1, step_size=1e5, loss_threshold=0.0),
    )
    assert np.isfinite(out.images).all()
    assert out.guidance_losses[0][1] < out.guidance_losses[0][0]


def test_elite_context_and_processors_are_kept(tiny_pipe):
    from encoders.attention import AttentionContext, AttentionRecorder, ContextAttnProcessor, set_context_processors

    pipe = type(tiny_pipe)(**tiny_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    installed = set_context_processors(pipe.unet)
    recorder = AttentionRecorder(keep_grad=False)
    concepts = [BoxedTokens([5], BOXES[0], "cat")]  # a token position, as ELITE's S* gives it
    try:
        out = generate_with_spatial_guidance(
            pipe,
            concepts,
            PROMPT,
            num_inference_steps=2,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            attention_context=AttentionContext(attention_store=recorder),
            config=SpatialGuidanceConfig(guidance_steps=1, iterations=1, step_size=1e5, loss_threshold=0.0),
        )
        assert all(pipe.unet.attn_processors[n] is p for n, p in installed.items())  # not swapped out
        assert all(isinstance(p, ContextAttnProcessor) for p in pipe.unet.attn_processors.values())
        # the caller's store saw the two denoising passes of every cross-attention layer (not the guidance passes)
        cross = [n for n in pipe.unet.attn_processors if "attn2" in n]
        passes = len(pipe.scheduler.timesteps)  # PNDM runs one step more than asked
        assert set(recorder.maps) == set(cross) and all(len(v) == passes for v in recorder.maps.values())
        assert out.images.shape == (1, 4, 32, 32) and len(out.location_losses) == passes
    finally:
        from encoders.attention import restore_default_processors

        restore_default_processors(pipe.unet)
    with pytest.raises(TypeError, match="AttentionContext"):
        generate_with_spatial_guidance(pipe, concepts, PROMPT, num_inference_steps=1, attention_context={"x": 1})
    with pytest.raises(ValueError, match="beyond the 77 text tokens"):
        generate_with_spatial_guidance(pipe, [BoxedTokens([80], BOXES[0])], PROMPT, num_inference_steps=1)
