"""Each paper's recipe is one config whose resolved settings are the official code's (the paper's where the code
is silent), and each protocol's settings are its official evaluation's; docs/recipes.md is the readable table."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoders.common.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
V14, V15 = "CompVis/stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5"


def resolved_lr(cfg, processes: int = 1) -> float:
    """The learning rate the shared loop uses (`training.loop`: scale_lr multiplies by the whole batch)."""
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * processes if cfg.scale_lr else 1
    return cfg.learning_rate * scale


# recipe file: (base, steps, samples per update, resolved lr on `processes`, processes, extra checks)
TEXTUAL_INVERSION_RECIPES = {
    # "An Image is Worth One Word": 2 GPUs x 4, base lr 0.005 x 8 = 0.04, 5000 steps
    "textual_inversion.yaml": (V14, 5000, 8, 0.04, {}),
    # ELITE's baseline: one image, batch 1, lr 0.005, 5000 steps
    "textual_inversion_elite.yaml": (V14, 5000, 1, 0.005, {"data.num_photos": 1}),
    # Compositional Inversion's scripts/compositional_textual_inversion.sh: 4 x accumulation 2, 0.005 -> 0.04
    "textual_inversion_compositional.yaml": (
        V15,
        5000,
        8,
        0.04,
        {"append_class_word": True, "num_vectors": 3, "anchors.mode": "initializer", "anchors.weight": 0.95},
    ),
    # BaTex's regression.sh: top-720 by dot product, lr 5e-4 x batch 4, 500 steps
    "batex.yaml": (
        V15,
        500,
        4,
        2e-3,
        {"subspace.enabled": True, "subspace.selection": "topk", "subspace.num_basis": 720, "subspace.distance": "dot"},
    ),
    # BaTex's paper: the rank rule, d1 = 576
    "batex_paper.yaml": (V15, 500, 4, 2e-3, {"subspace.selection": "rank", "subspace.dim": 576}),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", sorted(TEXTUAL_INVERSION_RECIPES))
def test_textual_inversion_recipes_resolve_to_the_official_settings(name):
    from training.textual_inversion import TextualInversionConfig

    base, steps, per_update, lr, extra = TEXTUAL_INVERSION_RECIPES[name]
    keys = ["concept_dir=photos", "initializer_token=cat", "class_word=cat"]
    cfg = load_config(TextualInversionConfig, CONFIGS / "finetune" / name, keys)
    assert cfg.pretrained_model_name_or_path == base
    assert cfg.max_steps == steps
    assert cfg.train_batch_size * cfg.gradient_accumulation_steps == per_update
    assert resolved_lr(cfg) == pytest.approx(lr)
    # diffusers' textual_inversion.py and the official scripts: no clipping, AdamW decay 1e-2, squashed photos,
    # the embedding in fp32 (no mixed precision set by the recipe)
    assert cfg.max_grad_norm == 0 and cfg.adam_weight_decay == pytest.approx(1e-2)
    assert cfg.data.center_crop is False and cfg.mixed_precision is None
    for key, value in extra.items():
        assert _get(cfg, key) == value, key


@pytest.mark.parametrize(
    ("stage", "per_update", "lr"),
    [("global_mapping", 64, 6.4e-5), ("local_mapping", 32, 3.2e-4)],
)
def test_elite_stage_recipes_accumulate_as_the_official_scripts(stage, per_update, lr):
    """ELITE's scripts: 4 GPUs, 4 accumulated micro-steps; stage 1 4 per GPU (64 per update, lr 1e-6 x 64),
    stage 2 2 per GPU (32, lr 1e-5 x 32); fp32."""
    from training.global_mapping import GlobalMappingConfig
    from training.local_mapping import LocalMappingConfig

    cls = GlobalMappingConfig if stage == "global_mapping" else LocalMappingConfig
    cfg = load_config(cls, CONFIGS / "train" / f"{stage}.yaml", ["train_shards=x.tar"])
    assert cfg.pretrained_model_name_or_path == V14
    assert cfg.train_batch_size * cfg.gradient_accumulation_steps * 4 == per_update
    assert resolved_lr(cfg, processes=4) == pytest.approx(lr)
    assert cfg.mixed_precision == "no"
    d = cfg.data  # the official datasets' objects and crops
    if stage == "global_mapping":
        assert (d.min_box_area, d.max_box_area, d.min_box_side, d.max_box_aspect) == (0.02, 0.8, 0, 0)
        assert (d.crop_geometry, tuple(d.box_margin)) == ("box", (10, 10))
    else:
        assert (d.min_box_area, d.max_box_area, d.min_box_side, d.max_box_aspect) == (0, 1, 100, 2)
        assert (d.crop_geometry, tuple(d.box_margin)) == ("box", (10, 19))


def test_protocols_carry_the_official_evaluation_settings():
    from inference.evaluation.metrics import DEFAULT_DETECTION_THRESHOLD, DEFAULT_DETECTOR_MODEL
    from inference.evaluation.protocols import CONSTANT_LAYOUT, PROTOCOL_TABLE, protocols_for

    comp = PROTOCOL_TABLE["compositional"]
    assert (comp.sampling.scheduler, comp.sampling.steps, comp.sampling.guidance) == ("pndm", 50, 7.5)
    assert (comp.spatial_sampling.scheduler, comp.spatial_sampling.steps) == ("lms", 50)
    assert comp.seeds == 10 and comp.append_class_word and comp.noise_seed == 8888
    assert (comp.text_alignment.text, comp.text_alignment.scale, comp.text_alignment.floor) == ("class", 2.5, False)
    assert CONSTANT_LAYOUT == {"concept": (0.1, 0.2, 0.5, 0.8), "other": (0.6, 0.2, 0.95, 0.8)}
    assert (DEFAULT_DETECTOR_MODEL, DEFAULT_DETECTION_THRESHOLD) == ("facebook/detr-resnet-50", 0.8)

    ti = PROTOCOL_TABLE["textual_inversion"]
    assert ti.seeds == 64 and (ti.sampling.scheduler, ti.sampling.steps, ti.sampling.guidance) == ("ddim", 50, 10.0)
    assert ti.text_alignment.text == "omit" and ti.text_alignment.scale == 1

    batex = PROTOCOL_TABLE["batex"]
    assert batex.seeds == 64 and (batex.sampling.scheduler, batex.sampling.guidance) == ("pndm", 7.5)
    assert (batex.text_alignment.text, batex.text_alignment.scale, batex.text_alignment.floor) == (
        "placeholder",
        2.5,
        True,
    )

    bench = PROTOCOL_TABLE["dreambench"]
    assert bench.seeds == 4 and bench.prompts == "dreambooth"
    assert bench.reference_photos == "dreambench" and bench.dino_preprocessing == "dreambench"
    assert [p.name for p in protocols_for("all")] == ["elite", "compositional", "infusion"]


def test_protocol_prompt_sets(tmp_path):
    """Compositional: "S* cat and <class>" over all 80 classes, the concept's own included, "in front of" for a
    background concept; BaTex: 64 reconstructions for image alignment, 4 x 16 edits for text alignment."""
    from inference.evaluation.config import EvalConfig, protocol_config
    from inference.evaluation.plan import ConceptFolder
    from inference.evaluation.prompts import prompt_specs
    from inference.evaluation.protocols import PROTOCOL_TABLE

    base = EvalConfig(concepts=[str(tmp_path)])
    cat = ConceptFolder("cat", tmp_path, "cat")
    comp = prompt_specs(protocol_config(base, PROTOCOL_TABLE["compositional"]), cat)
    assert len(comp) == 80 and all(s.kind == "coi" for s in comp)
    assert comp[0].template == "{} and person" and comp[0].coi_target == "person"
    assert any(s.coi_target == "cat" for s in comp)  # the own class stays, as the official prompts
    barn = prompt_specs(protocol_config(base, PROTOCOL_TABLE["compositional"]), ConceptFolder("barn", tmp_path, "barn"))
    assert barn[1].template == "bicycle in front of {}"

    specs = prompt_specs(protocol_config(base, PROTOCOL_TABLE["batex"]), cat)
    assert [(s.num_images, s.image_alignment, s.text_alignment) for s in specs] == [(None, True, False)] + [
        (16, False, True)
    ] * 4
    ti = prompt_specs(protocol_config(base, PROTOCOL_TABLE["textual_inversion"]), cat)
    assert ti[0].template == "A photo of {}" and ti[0].image_alignment and ti[0].text_alignment


def test_infusion_recipe_and_its_masked_error():
    """Infusion's code: batch 4 x accumulation 4, AdamW weight decay 0.01, CLIPSeg soft masks, the masked error
    averaged over all pixels: (mse * mask).mean()."""
    import torch
    import torch.nn.functional as F

    from training.diffusion import denoising_loss
    from training.infusion import InfusionConfig

    cfg = load_config(InfusionConfig, CONFIGS / "finetune" / "infusion.yaml", ["concept_dir=photos", "class_word=cat"])
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate) == (4, 4, 0.01)
    assert cfg.adam_weight_decay == pytest.approx(0.01) and not cfg.scale_lr
    assert cfg.data.soft_masks == "CIDAS/clipseg-rd64-refined" and cfg.data.mask_average == "image"
    assert cfg.variant == "paper" and cfg.replace_maps is True  # Eq. 7 with the base model's maps
    released = load_config(
        InfusionConfig,
        CONFIGS / "finetune" / "infusion.yaml",
        ["concept_dir=photos", "class_word=cat", "variant=released"],
    )
    assert released.replace_maps is False  # the released code keeps the customised model's own maps
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    soft = torch.rand(2, 1, 8, 8, generator=g)
    official = (F.mse_loss(pred, target, reduction="none") * soft).mean()
    assert torch.allclose(denoising_loss(pred, target, soft, average="image"), official, atol=1e-6)
    by_area = ((pred - target) ** 2 * soft).sum((1, 2, 3)) / soft.expand(2, 4, 8, 8).sum((1, 2, 3))
    assert torch.allclose(denoising_loss(pred, target, soft), by_area.mean(), atol=1e-6)


def test_stream_noise_is_the_official_notebooks_draws(tiny_sd_path):
    """Compositional Inversion's notebook: one generator seeded 8888 per prompt, one pipeline call per image, so
    image k starts from the k-th draw of that stream, for every prompt and method."""
    import torch
    from diffusers import StableDiffusionPipeline

    from inference.finetuned import stream_noise

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    latents, generators = stream_noise(pipe, [0, 2], 8888, 32, 32)
    stream = torch.Generator().manual_seed(8888)
    draws = [
        torch.randn(
            (1, pipe.unet.config.in_channels, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor),
            generator=stream,
        )
        for _ in range(3)
    ]
    assert torch.equal(latents, torch.cat([draws[0], draws[2]]))
    assert torch.equal(generators[1].get_state(), stream.get_state())  # the stream after image 2's draw
