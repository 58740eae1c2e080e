"""The miniature world: its renderer, its recipe, the shipped base models, and what is learned on them.

The learning tests train for seconds to minutes on the shipped models and assert directions that a
broken method would lose (the base follows a colour word; stage 1's own words beat another crop's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.world import (
    ATTRIBUTE_LABELS,
    HELD_OUT_TRIPLES,
    render_object,
    render_scene,
    scene_labels,
    write_concept_folder,
    write_world,
)

REPO = Path(__file__).resolve().parent.parent


def test_scenes_are_a_pure_function_of_seed_index_and_split():
    a, b = render_scene(3, 17, "train"), render_scene(3, 17, "train")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert not np.array_equal(np.asarray(a.image), np.asarray(render_scene(4, 17, "train").image))


def test_train_never_shows_a_held_out_triple_and_heldout_shows_only_those():
    held = set(HELD_OUT_TRIPLES)
    assert len(held) == 32
    for index in range(200):
        for obj in render_scene(0, index, "train").objects:
            assert (obj.shape, obj.colour, obj.pattern) not in held
        for obj in render_scene(0, index, "heldout").objects:
            assert (obj.shape, obj.colour, obj.pattern) in held


def test_captions_say_what_is_drawn_and_labels_match():
    scene = render_object("star", "red", "striped", "blue", seed=1)
    assert scene.caption == "a photo of a red striped star on a blue background"
    labels = scene_labels(scene)
    on = {ATTRIBUTE_LABELS[i] for i in np.flatnonzero(labels)}
    assert on == {"background:blue", "colour:red", "shape:star", "pattern:striped"}
    pixels = np.asarray(scene.image)[scene.objects[0].mask]
    assert pixels[:, 0].mean() > 2 * pixels[:, 2].mean()  # red, not blue
    assert render_object("circle", "green", "plain", "gray").caption == "a photo of a green circle on a gray background"


def test_the_world_folder_is_read_by_the_coco_source(tmp_path):
    from data_prep.records import CropSettings
    from data_prep.sources.coco import read_coco

    summary = write_world(tmp_path / "w", 24, seed=2, progress=False)
    records, report = read_coco(tmp_path / "w/instances.json", tmp_path / "w/images", CropSettings(min_side=4))
    assert summary["objects"] == len(records) + sum(report.skipped.values())
    assert {r.category for r in records} <= {
        "circle",
        "square",
        "triangle",
        "star",
        "heart",
        "cross",
        "diamond",
        "hexagon",
    }
    captions = json.loads((tmp_path / "w/captions.json").read_text())["annotations"]
    assert len(captions) == 24 and all(c["caption"].endswith("background") for c in captions)


def test_concept_folders_have_photos_and_masks(tmp_path):
    from inference.inputs import load_concept_image

    photos = write_concept_folder(tmp_path / "c", "heart", "purple", "striped", photos=3, seed=5)
    assert len(photos) == 3
    concept = load_concept_image(photos[0], tmp_path / "c/masks" / photos[0].name)
    assert 0.05 < concept.mask_fraction < 0.9


def test_world_command_line_refuses_an_unknown_object(tmp_path, capsys):
    from data_prep.cli import main

    assert main(["world", "--object", "red,striped,octopus", "--out", str(tmp_path / "c")]) == 2
    assert "unknown shape 'octopus'" in capsys.readouterr().err


# ---- the recipe -----------------------------------------------------------------------------------------------


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_the_recipe_trains_every_stage_and_exports_real_model_folders(tmp_path, fresh_accelerate_state):
    """Every stage of `python -m training.world` (the VAE decoder's fine-tune too) runs a few steps (shared loop)
    and the unet stage writes a `StableDiffusionPipeline` folder and a `CLIPVisionModel` folder that the real
    loaders read."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModel

    from encoders.common.config import parse_config_cli
    from training.loop import run_training
    from training.world import WorldConfig, WorldTask

    common = [
        f"export_dir={tmp_path / 'models'}",
        "pool_size=48",
        "max_steps=2",
        "train_batch_size=8",
        "report_to=none",
        "mixed_precision=no",
        "checkpointing_steps=2",
    ]
    for stage in ("clip", "vae", "vae_decoder", "classifier", "unet"):
        config = parse_config_cli(
            WorldConfig,
            [
                "stage=vae" if stage == "vae_decoder" else f"stage={stage}",
                f"output_dir={tmp_path / stage}",
                *common,
                *(["shape_groups=4"] if stage == "clip" else []),
                *(["vae_parts=decoder"] if stage == "vae_decoder" else []),
                *(
                    ["train_text_encoder=true", "noise_offset=0.1", "prediction_type=v_prediction"]
                    if stage == "unet"
                    else []
                ),
            ],
        )
        run_training(WorldTask(config))
        _reset_accelerate()  # each stage is its own run, as on the command line
    assert (tmp_path / "models/training_config_world_vae_decoder.yaml").is_file()  # beside the vae stage's own
    assert (tmp_path / "models/training_config_world_vae.yaml").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "models/sd", safety_checker=None)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # what the UNet was trained for, for every sampler
    image = pipe("a photo of a red star on a gray background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert CLIPVisionModel.from_pretrained(tmp_path / "models/image_encoder").config.image_size == 64
    # train_text_encoder: the pipeline's text encoder moved away from the clip stage's text tower
    from transformers import CLIPTextModel

    tower = CLIPTextModel.from_pretrained(tmp_path / "models/clip").get_input_embeddings().weight
    assert not torch.equal(tower, pipe.text_encoder.get_input_embeddings().weight)
    # shipping them: fp16 files whose hashes the card lists, and a card row for every stage that ran
    from encoders.world import check_assets, write_world_models
    from training.world_ship import ship

    shipped = ship(tmp_path / "models", None, tmp_path / "shipped", None)
    assert {"unet.safetensors", "text_encoder.safetensors"} <= set(check_assets(shipped))  # its own text encoder
    written = write_world_models(tmp_path / "written", shipped)
    rewritten = CLIPTextModel.from_pretrained(written["sd"] / "text_encoder").state_dict()
    trained = pipe.text_encoder.state_dict()
    assert all(torch.allclose(rewritten[k], trained[k].half().float()) for k in trained if "token_embedding" not in k)
    card = (shipped / "README.md").read_text()
    assert all(f"| {stage} | 2 |" in card for stage in ("clip", "vae", "vae_decoder", "unet", "classifier"))


# ---- the shipped base -----------------------------------------------------------------------------------------


def test_the_shipped_files_match_the_hashes_on_their_card():
    from encoders.world import ASSETS, PARTS, check_assets

    hashes = check_assets()
    assert {f"{part}.safetensors" for part in PARTS} <= set(hashes)
    total = sum((ASSETS / name).stat().st_size for name in hashes)
    assert total < 20e6  # small enough to ship in the repository


@pytest.fixture(scope="session")
def world_models(tmp_path_factory) -> Path:
    from encoders.world import write_world_models

    root = tmp_path_factory.mktemp("world_models")
    write_world_models(root)
    return root


def test_written_out_models_equal_the_shipped_weights(world_models):
    from diffusers import UNet2DConditionModel

    from encoders.world import load_part

    shipped = load_part("unet")
    written = UNet2DConditionModel.from_pretrained(world_models / "sd", subfolder="unet")
    for (name, a), (_, b) in zip(shipped.state_dict().items(), written.state_dict().items()):
        assert torch.equal(a, b), name


def test_written_out_models_follow_the_shipped_set(tmp_path):
    """The pipeline's scheduler is the shipped one (the prediction type the UNet was trained for), and folders
    written from another shipped set (a card that changed) are written again instead of being reused."""
    import json
    import shutil

    from diffusers import PNDMScheduler

    from encoders.world import ASSETS, write_world_models

    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    out = write_world_models(tmp_path / "models", assets)
    scheduler = PNDMScheduler.from_pretrained(out["sd"], subfolder="scheduler")
    shipped = json.loads((ASSETS / "scheduler.json").read_text())
    assert scheduler.config.prediction_type == shipped["prediction_type"]
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    unet = out["sd"] / "unet" / "config.json"
    unet.write_text(unet.read_text().replace('"sample_size": 16', '"sample_size": 15'))  # a stale folder
    write_world_models(tmp_path / "models", assets)
    assert '"sample_size": 15' in unet.read_text()  # the same set: reused as it is
    with (assets / "README.md").open("a") as card:
        card.write("\nA newer set.\n")
    write_world_models(tmp_path / "models", assets)
    assert '"sample_size": 16' in unet.read_text()  # another set: written again


# ---- what is learned on it ------------------------------------------------------------------------------------


def _classifier(world_models: Path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_world import WorldClassifier

    return WorldClassifier(world_models / "classifier")


def test_a_later_run_continues_the_shipped_models(world_models, tmp_path, fresh_accelerate_state):
    """`init_from=` a written-out world: the unet stage starts from the shipped UNet (with its text encoder and
    VAE), so its loss starts where the shipped model is, far under a from-scratch start, and at a learning rate
    too small to move a weight it exports the shipped UNet again; a folder without the stage's model is refused."""
    from diffusers import UNet2DConditionModel

    from encoders.common.config import ConfigError, parse_config_cli
    from training.loop import run_training
    from training.world import WorldConfig, WorldTask

    def run(name, *extra):
        config = parse_config_cli(
            WorldConfig,
            [
                "stage=unet",
                f"output_dir={tmp_path / name}",
                f"export_dir={tmp_path / name / 'models'}",
                "pool_size=64",
                "max_steps=2",
                "train_batch_size=16",
                "report_to=none",
                "mixed_precision=no",
                "checkpointing_steps=2",
                "learning_rate=1e-12",
                "lr_warmup_steps=0",
                f"clip_path={world_models / 'clip'}",
                f"vae_path={world_models / 'sd' / 'vae'}",
                *extra,
            ],
        )
        losses = []

        class Recording(WorldTask):
            def training_step(self, models, batch, generator):
                loss, logs = super().training_step(models, batch, generator)
                losses.append(loss.item())
                return loss, logs

        run_training(Recording(config))
        _reset_accelerate()
        return losses

    continued = run("continued", f"init_from={world_models}")
    scratch = run("scratch")
    assert sum(continued) < 0.5 * sum(scratch), (continued, scratch)
    # Min-SNR weighs each v-prediction error by min(SNR, 5) / (SNR + 1) < 1: the same draws give a smaller loss
    weighted = run("continued_snr", f"init_from={world_models}", "snr_gamma=5")
    assert all(0 < w < c for w, c in zip(weighted, continued, strict=True)), (weighted, continued)
    shipped = UNet2DConditionModel.from_pretrained(world_models / "sd", subfolder="unet").state_dict()
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "continued/models/sd", subfolder="unet").state_dict()
    assert all(torch.allclose(exported[k], shipped[k], atol=1e-6) for k in shipped)
    with pytest.raises(ConfigError, match="init_from"):
        parse_config_cli(WorldConfig, ["stage=classifier", f"init_from={tmp_path}"]).initial("classifier")
    # the continued UNet keeps what it predicts: by default its pipeline's prediction type, the other one refused
    shipped_type = parse_config_cli(WorldConfig, ["stage=unet", f"init_from={world_models}"]).resolved_prediction_type()
    other = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[shipped_type]
    with pytest.raises(ConfigError, match="trained for"):
        parse_config_cli(
            WorldConfig, ["stage=unet", f"init_from={world_models}", f"prediction_type={other}"]
        ).resolved_prediction_type()


def test_a_decoder_fine_tune_keeps_the_encoder_and_its_latents(world_models, tmp_path, fresh_accelerate_state):
    """`vae_parts=decoder`: the shipped VAE's encoder and latent scale come out unchanged (a UNet trained on its
    latents stays valid) while the decoder moves; a missing VAE is refused."""
    from diffusers import AutoencoderKL

    from encoders.common.config import ConfigError, parse_config_cli
    from training.loop import run_training
    from training.world import WorldConfig, WorldTask

    config = parse_config_cli(
        WorldConfig,
        [
            "stage=vae",
            "vae_parts=decoder",
            f"init_from={world_models}",
            f"output_dir={tmp_path / 'run'}",
            f"export_dir={tmp_path / 'models'}",
            "pool_size=16",
            "max_steps=2",
            "train_batch_size=8",
            "report_to=none",
            "mixed_precision=no",
            "checkpointing_steps=2",
            "learning_rate=1e-3",
            "lr_warmup_steps=0",
        ],
    )
    run_training(WorldTask(config))
    _reset_accelerate()
    shipped = AutoencoderKL.from_pretrained(world_models / "sd" / "vae")
    tuned = AutoencoderKL.from_pretrained(tmp_path / "models" / "vae")
    assert tuned.config.scaling_factor == shipped.config.scaling_factor
    before, after = shipped.state_dict(), tuned.state_dict()
    encoder_keys = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder_keys = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder_keys and all(torch.equal(before[k], after[k]) for k in encoder_keys)
    assert any(not torch.allclose(before[k], after[k]) for k in decoder_keys)
    missing = parse_config_cli(WorldConfig, ["stage=vae", "vae_parts=decoder", f"vae_path={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="no config.json"):
        WorldTask(missing).setup(None, torch.float32)


def test_the_base_follows_a_colour_word(world_models):
    """The shipped UNet draws the colour its caption names: the world classifier reads it back far above chance."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world_models / "sd", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    classifier = _classifier(world_models)
    hits = 0
    colours = ("red", "blue", "yellow", "green", "purple", "white")
    for colour in colours:
        images = pipe(
            [f"a photo of a {colour} square on a gray background"] * 4,
            num_inference_steps=20,
            guidance_scale=4.0,
            generator=[torch.Generator().manual_seed(k) for k in range(4)],
        ).images
        hits += sum(r["colour"] == colour for r in classifier.read(images))
    assert hits >= 10, f"{hits} of 24 images show the colour their caption asks for (chance: 3)"


def test_the_base_takes_the_background_from_its_caption(world_models):
    """At the last timestep, where sampling settles the picture's global colour, the shipped UNet's predicted clean
    latent follows the caption's background word (an epsilon UNet of the same recipe did not: its prediction was
    the same for any caption, so backgrounds followed the seed)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_world import caption_reliance, held_out_scenes

    reliance = caption_reliance(world_models / "sd", held_out_scenes(16), timesteps=(999,))["999"]
    assert reliance["own_caption"] < 0.25 * reliance["other_background"], reliance
    assert reliance["own_caption"] < reliance["empty_caption"], reliance


def test_the_world_classifier_is_a_presence_model_for_coi(world_models):
    """inference.evaluate's CoI on the world: the classifier (not DETR) says which shapes a picture holds; on real
    two-object scenes of held-out objects it finds the second object's shape far above chance (1 in 8)."""
    from data_prep.world import SHAPES, render_scene
    from inference.evaluation.metrics import PresenceClassifier, load_presence_model

    model = load_presence_model(str(world_models / "classifier"), "cpu", threshold=0.5)
    assert isinstance(model, PresenceClassifier) and set(SHAPES) <= set(model.label_names)
    scenes = [render_scene(3, i, "heldout", two_object_fraction=1.0) for i in range(48)]
    found = model.detect([s.image for s in scenes])
    second = sum(s.objects[1].shape in f for s, f in zip(scenes, found))
    assert second >= 12, f"the second object's shape found in {second} of 48 scenes (chance about 6)"


STAGE1_STEPS = 300


@pytest.mark.slow
def test_stage1_own_words_beat_another_objects_words_on_held_out_objects(world_models, tmp_path):
    """ELITE stage 1 trained briefly on the world's crops: on crops of held-out objects, the crop's own word w0
    denoises better than another crop's (paired draws; the bootstrap interval excludes zero)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_learning as bench

    from data_prep.crop_commands import build_coco_shards
    from data_prep.records import CropSettings
    from encoders.common.config import load_config
    from training.crop_data import STORED_CROP_KEYS

    settings = load_config(CropSettings, REPO / "configs/data/world.yaml")
    specs = {}
    for split, count, seed in (("train", 1500, 0), ("heldout", 40, 7)):
        write_world(tmp_path / split, count, seed=seed, split=split, progress=False)
        build_coco_shards(
            tmp_path / split / "instances.json",
            tmp_path / split / "images",
            tmp_path / f"shards_{split}",
            settings,
            shard_size=512,
            workers=1,
            progress=False,
        )
        specs[split] = str(tmp_path / f"shards_{split}")
    sd, image_encoder = world_models / "sd", world_models / "image_encoder"
    keys = [
        f"pretrained_model_name_or_path={sd}",
        f"image_encoder_name_or_path={image_encoder}",
        f"train_shards={specs['train']}",
        "data.resolution=64",
        "data.clip_size=64",
        "train_batch_size=8",
        "gradient_accumulation_steps=1",
        *STORED_CROP_KEYS,  # the stored crops of the world's 64 px scenes, as the documented measure
        "scale_lr=false",
        "mixed_precision=no",
        "report_to=none",
        "validation_steps=0",
        "mapping_hidden_dim=256",
        f"max_steps={STAGE1_STEPS}",
        "learning_rate=1e-3",
        "checkpointing_steps=1000",
    ]
    encoders = bench.train("global_mapping", tmp_path / "global", keys, tmp_path / "global.log")
    evaluator = bench.Evaluator(sd, image_encoder, specs["heldout"], draws=6, seed=0, resolution=64, clip_size=64)
    losses = bench.evaluate_global(evaluator, encoders)
    gain = bench.bootstrap(losses["shuffled"] - losses["own"])
    assert gain["n"] >= 256 and gain["ci95"][0] > 0, gain
