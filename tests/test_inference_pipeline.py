"""ElitePipeline on the tiny bundle with random-init encoders: encode once, generate, lambda, two concepts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.attention import ContextAttnProcessor, EliteAttnProcessor, EliteImagePromptProcessor
from inference import Concept, ElitePipeline, ModelLoadError
from inference.inputs import ConceptInputError
from inference.loading import check_encoders_fit, load_encoders
from inference.pipeline import default_placeholders

STEPS = 2


@pytest.fixture(scope="module")
def elite(tiny_sd_path, tiny_encoders_path):
    pipe = ElitePipeline.from_pretrained(tiny_sd_path, encoders=tiny_encoders_path, device="cpu", dtype="float32")
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def photos(data_dir):
    root = data_dir / "concepts"
    return {
        "teapot": (root / "dreambooth" / "teapot" / "04.jpg", root / "masks" / "teapot_04.png"),
        "dog": (root / "dreambooth" / "dog" / "00.jpg", None),
        "cat": (root / "dreambooth" / "cat" / "00.jpg", None),
    }


@pytest.fixture(scope="module")
def teapot(elite, photos):
    return elite.encode_concept(*photos["teapot"])


@pytest.fixture(scope="module")
def dog_and_cat(elite, photos):
    with pytest.warns(UserWarning, match="whole image"):
        dog = elite.encode_concept(photos["dog"][0])
    with pytest.warns(UserWarning, match="whole image"):
        cat = elite.encode_concept(photos["cat"][0])
    return dog, cat


def _run(elite, prompt, concepts, **kwargs):
    """Final latents of a small (16 px) seeded run: what the images are decoded from, without the VAE's cost."""
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 16)
    images = elite(prompt, concepts, num_inference_steps=STEPS, **kwargs).images
    return images if isinstance(images, np.ndarray) else images.float().cpu().numpy()


def test_encoding_gives_a_concept_with_its_origin(elite, teapot, photos, tiny_encoders_path, tiny_image_encoder_path):
    assert teapot.w0.shape == (32,) and teapot.local_tokens.shape == (256, 32)
    kept = int(teapot.local_keep.sum())
    assert 0 < kept < 256  # the mask removes background patches
    assert torch.all(teapot.local_tokens[~teapot.local_keep] == 0)
    assert teapot.metadata["encoders"] == str(tiny_encoders_path)
    assert teapot.metadata["image_encoder"] == str(tiny_image_encoder_path)
    assert teapot.metadata["source_image"] == "04.jpg" and teapot.metadata["mask_source"] == "teapot_04.png"
    assert teapot.metadata["w0_from"] == "image"  # the official default: w0 from the unmasked photo
    assert teapot.preview.shape == (96, 96, 3) and teapot.preview.dtype == torch.uint8  # what was encoded, for grids
    x0, y0, x1, y1 = (int(v) for v in teapot.metadata["crop_xyxy"].split(","))
    assert (x0, y0, x1, y1) == (0, 0, *Image.open(photos["teapot"][0]).size)  # the whole photo, as official
    assert teapot.metadata["concept_crop"] == "none"
    square = elite.encode_concept(*photos["teapot"], crop=True)
    sx0, sy0, sx1, sy1 = (int(v) for v in square.metadata["crop_xyxy"].split(","))
    assert sx1 - sx0 == sy1 - sy0 and 0 <= sx0 and sx1 <= x1 and (sx0, sy0, sx1, sy1) != (x0, y0, x1, y1)


def test_same_image_gives_the_same_concept(elite, photos, teapot):
    again = elite.encode_concept(*photos["teapot"])
    assert torch.equal(again.w0, teapot.w0)
    from_object = elite.encode_concept(*photos["teapot"], w0_from="object")  # no background: another w0
    assert not torch.equal(from_object.w0, teapot.w0) and torch.equal(from_object.local_tokens, teapot.local_tokens)
    assert not torch.equal(elite.encode_concept(*photos["teapot"], crop=True).w0, teapot.w0)
    assert torch.equal(again.local_tokens, teapot.local_tokens) and torch.equal(again.local_keep, teapot.local_keep)
    assert again.metadata == teapot.metadata


def test_seeded_runs_are_reproducible(elite, teapot):
    first = _run(elite, "a photo of S* on the beach", teapot, num_images_per_prompt=2)
    second = _run(elite, "a photo of S* on the beach", teapot, num_images_per_prompt=2)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first[0], first[1])  # image i uses seed + i
    # image 1 of seed 0 is image 0 of seed 1: each image is reproducible on its own (up to batch-size float noise)
    np.testing.assert_allclose(first[1], _run(elite, "a photo of S* on the beach", teapot, seed=1)[0], atol=1e-5)
    # the default size comes from the model: UNet sample size 32 x VAE factor 2
    images = elite("a photo of S* on the beach", teapot, num_inference_steps=1, output_type="np", seed=0).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_lambda_zero_equals_the_global_only_path(elite, teapot):
    global_only = Concept(w0=teapot.w0, metadata=teapot.metadata)  # no local tokens at all
    lam0 = _run(elite, "a photo of S* in the snow", teapot, elite_scale=0.0)
    np.testing.assert_array_equal(lam0, _run(elite, "a photo of S* in the snow", global_only))
    with_local = _run(elite, "a photo of S* in the snow", teapot, elite_scale=1.0)
    assert not np.array_equal(lam0, with_local)  # the local branch does change the picture


def test_set_elite_scale_is_the_default_lambda(elite, teapot):
    explicit = _run(elite, "S* on a table", teapot, elite_scale=1.0)
    elite.set_elite_scale(1.0)
    try:
        np.testing.assert_array_equal(_run(elite, "S* on a table", teapot), explicit)
    finally:
        elite.set_elite_scale(0.6)
    with pytest.raises(ValueError, match=">= 0"):
        elite.set_elite_scale(-1)


def test_different_concept_images_give_different_outputs(elite, teapot, dog_and_cat):
    dog, _ = dog_and_cat
    assert not torch.equal(dog.w0, teapot.w0)
    assert not np.array_equal(_run(elite, "a photo of S*", teapot), _run(elite, "a photo of S*", dog))


def test_saved_concept_generates_the_same_images(elite, teapot, tmp_path):
    loaded = Concept.load(teapot.save(tmp_path / "teapot.safetensors"))
    np.testing.assert_array_equal(_run(elite, "S* in the snow", teapot), _run(elite, "S* in the snow", loaded))


def test_w0_is_injected_at_the_placeholder(elite):
    """Injecting a real word's embedding at S* must equal typing that word."""
    tokenizer, text_encoder = elite.pipe.tokenizer, elite.pipe.text_encoder
    dog_id = tokenizer("dog", add_special_tokens=False).input_ids[0]
    dog_word = text_encoder.get_input_embeddings().weight[dog_id].detach().clone()
    cond = elite.conditioning("a photo of a S* on grass", [Concept(w0=dog_word)], ["S*"])
    typed = elite._plain_text("a photo of a dog on grass")[0]
    torch.testing.assert_close(cond.prompt_embeds, typed, rtol=0, atol=1e-5)
    assert cond.word_positions[0].tolist() == [5]  # <bos> a photo of a S*


def test_two_concepts_each_at_its_own_token(elite, dog_and_cat):
    tokenizer, text_encoder = elite.pipe.tokenizer, elite.pipe.text_encoder
    table = text_encoder.get_input_embeddings().weight
    words = {w: table[tokenizer(w, add_special_tokens=False).input_ids[0]].detach().clone() for w in ("dog", "cat")}
    prompt = "S1 playing with S2 in a garden"
    cond = elite.conditioning(prompt, [Concept(w0=words["dog"]), Concept(w0=words["cat"])], ["S1", "S2"])
    torch.testing.assert_close(
        cond.prompt_embeds, elite._plain_text("dog playing with cat in a garden")[0], rtol=0, atol=1e-5
    )
    elite_tokenizer, (s1, s2) = elite.placeholder_tokenizer(["S1", "S2"])  # ELITE's own copy holds the placeholders
    ids = elite_tokenizer(prompt).input_ids
    assert "S1" not in tokenizer.get_vocab()
    assert cond.word_positions[0].tolist() == [ids.index(s1), ids.index(s2)] == [1, 4]

    # each concept's local tokens are routed through its own token's attention map
    dog, cat = dog_and_cat
    context = elite.conditioning(prompt, [dog, cat], ["S1", "S2"], [0.6, 0.8], num_images=3).context
    (first, second) = context.local
    assert (first.token_index.tolist(), second.token_index.tolist()) == ([1] * 3, [4] * 3)
    assert (first.scale, second.scale) == (0.6, 0.8)
    assert first.tokens.shape == (3, 256, 32) and torch.equal(first.tokens[2], dog.local_tokens)
    assert torch.equal(second.tokens[0], cat.local_tokens) and torch.equal(second.keep[1], cat.local_keep)

    both = _run(elite, prompt, [dog, cat], num_images_per_prompt=2)
    swapped = _run(elite, prompt, [cat, dog], num_images_per_prompt=2)
    assert both.shape == (2, 4, 8, 8) and not np.array_equal(both, swapped)
    assert default_placeholders(1) == ["S*"] and default_placeholders(2) == ["S1", "S2"]


def test_bad_prompts_and_concepts_are_clear_errors(elite, teapot):
    with pytest.raises(ConceptInputError, match="does not contain the placeholder 'S\\*'"):
        elite("a photo of a teapot", teapot, num_inference_steps=1)
    with pytest.raises(ConceptInputError, match="2 concepts but 1 placeholders"):
        elite("S1 and S2", [teapot, teapot], placeholders=["S1"], num_inference_steps=1)
    with pytest.raises(ConceptInputError, match="w0 of size 16"):
        elite("S* on a table", Concept(w0=torch.zeros(16)), num_inference_steps=1)
    with pytest.raises(ValueError, match="1 elite_scale values for 2 concepts"):
        elite("S1 and S2", [teapot, teapot], elite_scale=[0.5], num_inference_steps=1)


def test_any_scheduler_users_swap_in(elite, teapot):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    original = elite.scheduler
    try:
        default = _run(elite, "S* on a table", teapot)
        elite.scheduler = DDIMScheduler.from_config(original.config)
        ddim = _run(elite, "S* on a table", teapot)
        np.testing.assert_array_equal(ddim, _run(elite, "S* on a table", teapot))
        elite.pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        euler = _run(elite, "S* on a table", teapot)
        assert np.isfinite(euler).all()
        assert not np.array_equal(default, ddim) and not np.array_equal(ddim, euler)
    finally:
        elite.scheduler = original


def test_unload_restores_the_base_pipeline(tiny_sd_path, tiny_encoders_path, teapot):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base.set_progress_bar_config(disable=True)
    reference = base(
        "a photo of a teapot",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="latent",
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
    ).images.numpy()

    elite = ElitePipeline(base)
    elite.load_encoders(tiny_encoders_path)
    processors = elite.pipe.unet.attn_processors
    assert any(isinstance(p, EliteAttnProcessor) for p in processors.values())
    assert all(isinstance(p, ContextAttnProcessor) for p in processors.values())
    assert elite.device == base.device and elite.dtype == base.unet.dtype
    _run(elite, "S* on a table", teapot)

    # ELITE's placeholders live in its own tokenizer copy: the plain pipe still takes "S*" as text, and a
    # Textual Inversion can be loaded as S*
    assert "S*" not in base.tokenizer.get_vocab()
    base("a photo of S*", num_inference_steps=1, guidance_scale=5.0, output_type="latent", height=16, width=16)
    elite.unload_encoders()
    assert not any(isinstance(p, ContextAttnProcessor) for p in elite.pipe.unet.attn_processors.values())
    base.load_textual_inversion({"S*": torch.zeros(32)}, token="S*")
    assert "S*" in base.tokenizer.get_vocab()
    again = _run(elite, "a photo of a teapot", None)
    np.testing.assert_allclose(again, reference, atol=1e-6)  # stock processors, the plain base model again
    with pytest.raises(RuntimeError, match="load_encoders"):
        elite.encode_concept(np.zeros((8, 8, 3)))


def test_encoders_for_another_base_model_are_refused(
    tiny_sd_path, tiny_encoders_path, tiny_image_encoder_path, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from encoders.global_mapping import GlobalMapping

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    # text embeddings of another width (e.g. SD 2's 1024 vs SD 1's 768)
    wide = tmp_path / "wide"
    shutil.copytree(tiny_encoders_path, wide)
    GlobalMapping(
        input_dim=32,
        output_dim=48,
        hidden_dim=8,
        kv_layers={},
        pretrained_model_name_or_path="other/base",
        image_encoder_name_or_path=str(tiny_image_encoder_path),
    ).save_pretrained(wide / "global_mapping")
    encoders = load_encoders(wide, device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match="size 48 but the text encoder uses 32: it was trained for other/base"):
        check_encoders_fit(encoders, pipe)

    # the same width but other cross-attention layers
    other = tmp_path / "layers"
    shutil.copytree(tiny_encoders_path, other)
    config = json.loads((other / "local_mapping" / "config.json").read_text())
    kv = {n.replace("down_blocks", "down_blockz"): dims for n, dims in config["kv_layers"].items()}
    from encoders.local_mapping import LocalMapping

    LocalMapping(input_dim=32, output_dim=32, hidden_dim=8, kv_layers=kv).save_pretrained(other / "local_mapping")
    with pytest.raises(ModelLoadError, match="local_mapping: LocalMapping has K/V projections for"):
        ElitePipeline(pipe).load_encoders(other)

    # not an encoders folder at all; an image encoder of another width than the mappings read
    with pytest.raises(ModelLoadError, match="no global_mapping/config.json"):
        load_encoders(tmp_path, device="cpu")
    GlobalMapping(
        input_dim=64,
        output_dim=32,
        hidden_dim=8,
        kv_layers=config["kv_layers"],
        image_encoder_name_or_path=str(tiny_image_encoder_path),
    ).save_pretrained(other / "global_mapping")
    with pytest.raises(ModelLoadError, match="features of width 64, but the image encoder .* gives 32"):
        load_encoders(other, device="cpu")


def test_encoders_without_local_mapping_still_generate(tiny_sd_path, tiny_encoders_path, tmp_path, photos):
    only_global = tmp_path / "global_only"
    shutil.copytree(tiny_encoders_path / "global_mapping", only_global / "global_mapping")
    elite = ElitePipeline.from_pretrained(tiny_sd_path, encoders=only_global, device="cpu")
    assert elite.encoders.local_mapping is None and elite.encoders.location_mlp is None
    concept = elite.encode_concept(*photos["teapot"])
    assert concept.local_tokens is None and concept.metadata["w0_from"] == "image"  # as the global stage
    assert _run(elite, "S* on a table", concept).shape == (1, 4, 8, 8)


@pytest.mark.filterwarnings("ignore:concept . was encoded with the encoders")  # a copy of the same encoders
def test_spatial_guidance_hook_with_boxes_and_with_the_location_mlp(
    tiny_sd_path, tiny_encoders_path, tmp_path, dog_and_cat
):
    from encoders.location_mlp import LocationMLP
    from inference.guidance import SpatialGuidanceConfig

    with_mlp = tmp_path / "with_location_mlp"
    shutil.copytree(tiny_encoders_path, with_mlp)
    torch.manual_seed(0)
    LocationMLP(embedding_dim=32, hidden_dim=16).save_pretrained(with_mlp / "location_mlp")
    elite = ElitePipeline.from_pretrained(tiny_sd_path, encoders=with_mlp, device="cpu")
    elite.pipe.set_progress_bar_config(disable=True)
    assert elite.encoders.location_mlp is not None

    dog, cat = dog_and_cat
    prompt = "S1 playing with S2"
    config = SpatialGuidanceConfig(guidance_steps=1, iterations=1, step_size=30.0, loss_threshold=0.0)
    with pytest.warns(UserWarning, match="concept 0 was encoded with the encoders .*tiny_encoders"):
        plain = _run(elite, prompt, [dog, cat])
    left_right = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    guided = elite(
        prompt,
        [dog, cat],
        boxes=left_right,
        guidance_config=config,
        num_inference_steps=STEPS,
        seed=0,
        height=16,
        width=16,
        output_type="latent",
    )
    assert len(guided.location_losses) == len(elite.scheduler.timesteps) and len(guided.attention_maps) == 2
    assert len(guided.guidance_losses) == 1  # one guided reverse step
    assert guided.images.shape == plain.shape and not np.array_equal(guided.images.numpy(), plain)

    # an untrained location MLP (zero last layer) puts both concepts in the same centred box: warned about
    with pytest.warns(UserWarning, match="put both concepts in nearly the same place"):
        found = elite.predict_boxes([dog, cat])
    boxes = found["boxes"]
    assert len(boxes) == 2 and all(0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in boxes)
    assert len(found["resolved"]) == 2
    with pytest.warns(UserWarning, match="same place"):
        predicted = elite(
            prompt,
            [dog, cat],
            spatial_guidance=True,
            guidance_config=config,
            num_inference_steps=STEPS,
            seed=0,
            height=16,
            width=16,
            output_type="latent",
        )
    assert predicted.boxes == [list(b) for b in boxes] and predicted.box_nouns == found["resolved"]
    explicit = elite(
        prompt,
        [dog, cat],
        boxes=boxes,
        guidance_config=config,
        num_inference_steps=STEPS,
        seed=0,
        height=16,
        width=16,
        output_type="latent",
    )
    torch.testing.assert_close(predicted.images, explicit.images)

    with pytest.raises(ConceptInputError, match="one box per concept"):
        elite(prompt, [dog, cat], boxes=left_right[:1], num_inference_steps=1)
    no_mlp = ElitePipeline.from_pretrained(tiny_sd_path, encoders=tiny_encoders_path, device="cpu")
    with pytest.raises(ModelLoadError, match="no location_mlp"):
        no_mlp(prompt, [dog, cat], spatial_guidance=True, num_inference_steps=1)


def test_load_elite_on_a_stock_pipeline_restores_its_own_processors(tiny_sd_path, tiny_encoders_path, teapot):
    """Custom self-attention processors stay while ELITE is loaded; every processor that was there (an
    IP-Adapter's on cross-attention, say) is back, the same object, after unload_elite."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor2_0

    from inference import load_elite, set_elite_scale, unload_elite

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)

    class Custom(AttnProcessor):
        pass

    names = list(pipe.unet.attn_processors)
    self_name = next(n for n in names if ".attn1." in n)
    cross_name = next(n for n in names if ".attn2." in n)
    attn = pipe.unet.get_submodule(cross_name[: -len(".processor")])
    mine = {
        self_name: Custom(),
        cross_name: IPAdapterAttnProcessor2_0(
            hidden_size=attn.to_q.out_features, cross_attention_dim=32, num_tokens=(4,)
        ),
    }
    pipe.unet.set_attn_processor({n: mine.get(n, p) for n, p in pipe.unet.attn_processors.items()})
    before = dict(pipe.unet.attn_processors)

    elite = load_elite(pipe, tiny_encoders_path)
    during = pipe.unet.attn_processors
    assert during[self_name] is mine[self_name]  # a custom self-attention processor is kept
    # cross-attention is ELITE's while loaded, inside a processor diffusers' IP-Adapter functions recognise
    assert isinstance(during[cross_name], EliteImagePromptProcessor)
    assert (
        isinstance(during[cross_name].elite, EliteAttnProcessor) and during[cross_name].scale is mine[cross_name].scale
    )
    set_elite_scale(pipe, 0.8)
    assert pipe.elite is elite and elite.elite_scale == 0.8
    out = elite(
        ["a photo of S*", "S* on a table"],
        teapot,
        num_inference_steps=1,
        height=16,
        width=16,
        output_type="latent",
        seed=0,
    )  # a list of prompts: one call each, joined
    assert out.images.shape[0] == 2 and len(out.per_prompt) == 2
    unload_elite(pipe)
    after = pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in names) and not hasattr(pipe, "elite")
    with pytest.raises(RuntimeError, match="load_elite"):
        unload_elite(pipe)


def test_load_elite_then_model_cpu_offload_gives_the_same_images(tiny_sd_path, tiny_encoders_path, teapot):
    """diffusers' enable_model_cpu_offload (accelerate hooks) after load_elite: the mappings follow the
    execution device and the images are those of the plain pipeline."""
    pytest.importorskip("accelerate")
    from diffusers import StableDiffusionPipeline

    from inference import load_elite

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    elite = load_elite(pipe, tiny_encoders_path)
    kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="latent", seed=0)
    plain = elite("a photo of S*", teapot, **kwargs).images
    pipe.enable_model_cpu_offload(device="cpu")
    offloaded = elite(["a photo of S*", "S* in the snow"], teapot, **kwargs)
    assert str(elite.device).startswith("cpu") and offloaded.images.shape[0] == 2
    assert torch.allclose(offloaded.images[:1], plain, atol=1e-5)  # the same computation, hooks around it


def test_several_photos_or_a_folder_make_one_concept(elite, photos, data_dir, tmp_path):
    """w0 is the photos' mean, the local tokens all photos' side by side; a folder is read with its masks/."""
    dog = data_dir / "concepts" / "dreambooth" / "dog"
    singles = [elite.encode_concept(p) for p in sorted(dog.glob("*.jpg"))[:2]]
    both = elite.encode_concept(sorted(dog.glob("*.jpg"))[:2])
    torch.testing.assert_close(both.w0, (singles[0].w0 + singles[1].w0) / 2)
    assert torch.equal(both.local_tokens, torch.cat([s.local_tokens for s in singles]))
    assert both.metadata["photos"] == "2" and both.local_keep.shape == (512,)
    both.save(tmp_path / "two.safetensors")
    from inference import Concept

    again = Concept.load(tmp_path / "two.safetensors")
    out = elite("a photo of S*", again, num_inference_steps=1, height=16, width=16, output_type="latent", seed=0)
    assert torch.isfinite(out.images).all()
    folder = tmp_path / "teapot"
    (folder / "masks").mkdir(parents=True)
    photo, mask = photos["teapot"]
    shutil.copy(photo, folder / "04.jpg")
    shutil.copy(mask, folder / "masks" / "04.png")
    from_folder = elite.encode_concept(folder)
    assert from_folder.metadata["mask_source"] == "04.png"  # found in masks/
    torch.testing.assert_close(from_folder.w0, elite.encode_concept(photo, mask).w0)
