"""Other bases. SD 2.x-style (`encoders.tiny --kind sd2`: a text encoder wider than the image encoder,
48 vs 32, linear projections, v-prediction): every method trains a few steps through the shared loop
(the v-prediction target) and generates; concept prompts differ from the base model, prompts the
method promises not to touch do not; a mapping made for one base is refused on another. SDXL-style
(`--kind sdxl`): the bundle is a real `StableDiffusionXLPipeline`; ELITE's two stages, Infusion and
Textual Inversion train and generate on it (both text encoders, pooled and size conditioning; TI's file
in the layout diffusers' SDXL loader reads), spatial guidance refuses it with an error naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoders.common.config import load_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parent.parent
RES = 32


def _recording(task, key="rec_loss"):
    from training.loop import run_training

    losses, step = [], task.training_step

    def recording(models, batch, generator):
        loss, logs = step(models, batch, generator)
        losses.append(float(logs[key]) if key in logs else float(loss.detach()))
        return loss, logs

    task.training_step = recording
    run_training(task)
    return losses


def _finetune_keys(sd, concept, out, steps=3):
    return [
        f"pretrained_model_name_or_path={sd}",
        f"concept_dir={concept}",
        f"output_dir={out}",
        f"data.resolution={RES}",
        f"max_steps={steps}",
        "train_batch_size=2",
        "gradient_accumulation_steps=1",
        "data.soft_masks=none",
        "checkpointing_steps=0",
        "validation_steps=0",
        "report_to=none",
    ]


def _pipe(sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, prompt):
    return pipe(
        prompt,
        num_inference_steps=2,
        height=RES,
        width=RES,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_the_bundle_has_sd2_structure(tiny_sd2_path, tiny_image_encoder_path):
    from transformers import CLIPVisionConfig

    pipe = _pipe(tiny_sd2_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.unet.config.use_linear_projection
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 48
    assert CLIPVisionConfig.from_pretrained(tiny_image_encoder_path).hidden_size == 32  # != the text width


def test_textual_inversion_and_infusion_on_sd2(tiny_sd2_path, data_dir, tmp_path):
    from encoders.infusion import InfusionResiduals
    from inference.methods import generate_with_infusion
    from training.infusion import InfusionConfig, InfusionTask
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "dog"
    ti = tmp_path / "ti"
    keys = _finetune_keys(tiny_sd2_path, concept, ti) + [
        "initializer_token=dog",
        "class_word=dog",
        "learning_rate=0.05",
    ]
    losses = _recording(
        TextualInversionTask(
            load_config(TextualInversionConfig, REPO / "configs/finetune/textual_inversion.yaml", keys)
        )
    )
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and len(set(losses)) > 1
    assert load_file(ti / "learned_embeds.safetensors")["S*"].shape == (1, 48)  # the SD 2 text width

    pipe = _pipe(tiny_sd2_path)
    ids = pipe.tokenizer(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
    base = _latents(pipe, "a photo of a dog")
    pipe.load_textual_inversion(str(ti), token="S*")
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], before)  # prompts without S*: the same text, exactly
    assert (_latents(pipe, "a photo of a S*") - base).abs().max() > 1e-4

    # guided composition on SD 2.x: the TI token and a word, each steered into its box
    from inference.cli import main as inference_main

    out = tmp_path / "guided"
    assert (
        inference_main(
            [
                "generate",
                "--base",
                str(tiny_sd2_path),
                "--finetune",
                str(ti),
                "--prompt",
                "a photo of S* playing with a dog",
                "--box",
                "S*=0,0,0.5,1",
                "--box",
                "dog=0.5,0,1,1",
                "--steps",
                "2",
                "--height",
                str(RES),
                "--quiet",
                "--no-safety-checker",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "settings.json").read_text())["prompts"][0]
    assert [p["token"] for p in record["placed"]] == ["S*", "dog"] and record["location_loss_guided_steps"]
    assert (out / record["attention_maps"][0]).is_file()

    inf = tmp_path / "inf"
    keys = _finetune_keys(tiny_sd2_path, concept, inf) + ["class_word=dog", "learning_rate=0.05"]
    losses = _recording(InfusionTask(load_config(InfusionConfig, REPO / "configs/finetune/infusion.yaml", keys)))
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    residuals = InfusionResiduals.from_pretrained(inf, subfolder="infusion")
    residuals.check_fits(_pipe(tiny_sd2_path).unet)  # one residual per cross-attention layer, 48 wide
    pipe = _pipe(tiny_sd2_path)
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="latent")
    with_dog = generate_with_infusion(
        pipe, ["a photo of a dog"], [residuals], generator=torch.Generator().manual_seed(0), **kwargs
    )
    no_dog = generate_with_infusion(
        pipe, ["a photo of a cat"], [residuals], generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert (with_dog.images[0] - with_dog.base_images[0]).abs().max() > 1e-6  # the class word: the residuals act
    assert torch.allclose(no_dog.images[0], no_dog.base_images[0], atol=1e-6)  # no class word: the base model's image


@pytest.mark.slow
def test_elite_both_stages_and_generation_on_sd2(
    tiny_sd2_path, tiny_sd_path, tiny_image_encoder_path, crop_shards, data_dir, tmp_path
):
    from inference.loading import ModelLoadError
    from inference.pipeline import ElitePipeline
    from training.global_mapping import GlobalMappingConfig, GlobalMappingTask
    from training.local_mapping import LocalMappingConfig, LocalMappingTask

    encoders = tmp_path / "encoders"
    common = [
        f"pretrained_model_name_or_path={tiny_sd2_path}",
        f"image_encoder_name_or_path={tiny_image_encoder_path}",
        f"train_shards={crop_shards / 'coco' / '*.tar'}",
        "train_batch_size=2",
        "mixed_precision=no",
        "gradient_accumulation_steps=1",
        "mapping_hidden_dim=64",
        "checkpointing_steps=0",
        "validation_steps=0",
        "report_to=none",
        "dataloader_num_workers=0",
        "data.resolution=64",
        "max_steps=2",
        f"export_dir={encoders}",
    ]
    stage1 = _recording(
        GlobalMappingTask(
            load_config(
                GlobalMappingConfig,
                REPO / "configs/train/global_mapping.yaml",
                [*common, f"output_dir={tmp_path / 'global'}"],
            )
        ),
        "loss",
    )
    stage2 = _recording(
        LocalMappingTask(
            load_config(
                LocalMappingConfig,
                REPO / "configs/train/local_mapping.yaml",
                [*common, f"output_dir={tmp_path / 'local'}", f"global_mapping_path={encoders}"],
            )
        ),
        "loss",
    )
    assert all(map(math.isfinite, stage1 + stage2)) and len(stage1) == len(stage2) == 2

    elite = ElitePipeline.from_pretrained(
        str(tiny_sd2_path), encoders=str(encoders), device="cpu", dtype="float32", safety_checker=False
    )
    photo = data_dir / "concepts" / "dreambooth" / "teapot" / "04.jpg"
    concept = elite.encode_concept(photo, data_dir / "concepts" / "masks" / "teapot_04.png")
    assert concept.w0.shape == (48,)
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="latent", seed=0)
    tuned = elite("a photo of S*", concept, **kwargs).images
    plain = elite("a photo of a teapot", None, **kwargs).images
    assert tuned.shape == plain.shape and (tuned - plain).abs().max() > 1e-4
    with pytest.raises(ModelLoadError, match="48"):  # made for the 48-wide text encoder, refused on SD v1's 32
        ElitePipeline.from_pretrained(
            str(tiny_sd_path), encoders=str(encoders), device="cpu", dtype="float32", safety_checker=False
        )


def test_an_sdxl_bundle_loads_in_diffusers_and_is_refused_clearly(
    tiny_sdxl_path, tiny_encoders_path, data_dir, tmp_path, capsys
):
    from diffusers import StableDiffusionXLPipeline

    from inference.loading import ModelLoadError, load_base_pipeline
    from training.textual_inversion import main as ti_main

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    assert (
        pipe.unet.config.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.unet.config.addition_embed_type == "text_time"
    images = pipe("a photo of a dog", num_inference_steps=1, height=RES, width=RES, output_type="latent").images
    assert images.shape == (1, 4, RES // 2, RES // 2)

    with pytest.raises(ModelLoadError, match="StableDiffusionXLPipeline"):
        load_base_pipeline(tiny_sdxl_path, device="cpu", dtype="float32")
    from inference import load_elite

    with pytest.raises(ModelLoadError, match="size 32 .* 80"):
        load_elite(pipe, tiny_encoders_path)  # SD v1 encoders on a stock SDXL pipeline: the word widths differ
    with pytest.raises(SystemExit) as exited:  # a placeholder that is a word already: one line at set-up
        ti_main(
            _finetune_keys(tiny_sdxl_path, data_dir / "concepts" / "dreambooth" / "dog", tmp_path / "bx")
            + ["initializer_token=dog", "placeholder_token=cat"]
        )
    assert exited.value.code == 2 and "already a word of the tokenizer" in capsys.readouterr().err


def test_infusion_trains_generates_and_evaluates_on_sdxl(tiny_sdxl_path, tiny_eval_models, data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from encoders.infusion import InfusionResiduals
    from inference.methods import generate_with_infusion
    from training.infusion import InfusionConfig, InfusionTask

    out = tmp_path / "inf"
    keys = _finetune_keys(tiny_sdxl_path, data_dir / "concepts" / "dreambooth" / "dog", out) + [
        "class_word=dog",
        "learning_rate=0.05",
        "validation_steps=3",
        "validation_inference_steps=1",
    ]
    losses = _recording(InfusionTask(load_config(InfusionConfig, REPO / "configs/finetune/infusion.yaml", keys)))
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and len(set(losses)) > 1
    assert (out / "validation" / "step-000003.png").is_file()  # sampled through StableDiffusionXLPipeline
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    residuals = InfusionResiduals.from_pretrained(out, subfolder="infusion")
    residuals.check_fits(pipe.unet)  # one residual per cross-attention layer, 80 wide (32 + 48)
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="latent")
    with_dog = generate_with_infusion(
        pipe, ["a photo of a dog"], [residuals], generator=torch.Generator().manual_seed(0), **kwargs
    )
    no_dog = generate_with_infusion(
        pipe, ["a photo of a cat"], [residuals], generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert (with_dog.images[0] - with_dog.base_images[0]).abs().max() > 1e-6
    assert torch.allclose(no_dog.images[0], no_dog.base_images[0], atol=1e-6)
    base = pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.allclose(with_dog.base_images[0], base[0], atol=1e-4)  # the F stream is the plain SDXL pipeline

    # Infusion's evaluation on the SDXL base: the UNet's Fisher / W2 calls carry the pooled and size conditioning
    from inference import evaluate

    result = evaluate.main(
        [
            f"base={tiny_sdxl_path}",
            f"runs={out}",
            f"out={tmp_path / 'eval'}",
            "protocol=infusion",
            "num_prompts=1",
            "seeds=0",
            "num_inference_steps=2",
            f"resolution={RES}",
            "fisher_timesteps=500",
            f"clip_model={tiny_eval_models / 'eval_clip'}",
            f"dino_model={tiny_eval_models / 'dino'}",
            f"detector_model={tiny_eval_models / 'detector'}",
        ]
    )
    rows = {row["method"]: row for row in result["protocols"]["infusion"]["summary"]}
    infusion = next(row for name, row in rows.items() if name.startswith("infusion"))
    assert infusion["fisher_generic"] == 0.0 < infusion["fisher_class"]  # only prompts with its class word change


def test_textual_inversion_on_sdxl_loads_with_diffusers(tiny_sdxl_path, data_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "dog"
    out = tmp_path / "ti"
    keys = _finetune_keys(tiny_sdxl_path, concept, out) + [
        "initializer_token=dog",
        "class_word=dog",
        "learning_rate=0.05",
        "validation_steps=3",
        "validation_inference_steps=1",
    ]
    losses = _recording(
        TextualInversionTask(
            load_config(TextualInversionConfig, REPO / "configs/finetune/textual_inversion.yaml", keys)
        )
    )
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and len(set(losses)) > 1
    saved = load_file(out / "learned_embeds.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    assert "text_encoder_2" in (out / "README.md").read_text() and (out / "validation" / "step-000003.png").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="latent")
    before = pipe.encode_prompt("a photo of a dog", device="cpu", do_classifier_free_guidance=False)[0]
    base = pipe("a photo of a S*", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_textual_inversion(saved["clip_l"], token="S*", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        saved["clip_g"], token="S*", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    assert torch.equal(
        pipe.encode_prompt("a photo of a dog", device="cpu", do_classifier_free_guidance=False)[0], before
    )
    learned = pipe("a photo of a S*", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (learned - base).abs().max() > 1e-4  # diffusers' own loader, both encoders: the concept is used


def test_batex_and_anchors_on_sdxl_one_subspace_per_text_encoder(tiny_sdxl_path, data_dir, tmp_path):
    """BaTex on SDXL: each text encoder's vector is a weighted sum of its own vocabulary rows (rank rule per
    table; d1 of the second by the same fraction of its width), exported in diffusers' SDXL layout with both
    subspaces; semantic anchors pull both vectors at once (anchors = the words' rows of both tables)."""
    from encoders.common.config import ConfigError
    from encoders.subspace import TextualSubspace
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "dog"
    out = tmp_path / "batex"
    keys = _finetune_keys(tiny_sdxl_path, concept, out) + [
        "initializer_token=dog",
        "class_word=dog",
        "learning_rate=0.05",
        "subspace.enabled=true",
        "subspace.selection=rank",
        "subspace.dim=24",
        "anchors.enabled=true",
    ]
    task = TextualInversionTask(
        load_config(TextualInversionConfig, REPO / "configs/finetune/textual_inversion.yaml", keys)
    )
    losses = _recording(task, "anchor_loss")
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and len(set(losses)) > 1
    assert (task.word.rank, task.word_2.rank) == (24, 36)  # 24 of 32 -> 36 of 48
    saved = load_file(out / "learned_embeds.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    for key, folder in (("clip_l", "subspace"), ("clip_g", "subspace_2")):
        subspace = TextualSubspace.from_pretrained(out / folder)
        torch.testing.assert_close(saved[key][0], subspace.weights @ subspace.basis, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="dim_2"):
        load_config(
            TextualInversionConfig, REPO / "configs/finetune/textual_inversion.yaml", keys + ["subspace.dim_2=-1"]
        )


def test_the_command_line_generates_with_sdxl_fine_tunes(tiny_sdxl_path, tiny_sd_path, data_dir, tmp_path, capsys):
    """`generate --base <SDXL> --finetune TI --finetune Infusion`: the embedding goes into both text encoders,
    Infusion runs its dual stream through StableDiffusionXLPipeline; an SDXL embedding on SD v1 is refused."""
    import numpy as np
    from PIL import Image

    from inference.cli import main as inference_main
    from training.infusion import InfusionConfig, InfusionTask
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "dog"
    ti, inf = tmp_path / "ti", tmp_path / "inf"
    _recording(
        TextualInversionTask(
            load_config(
                TextualInversionConfig,
                REPO / "configs/finetune/textual_inversion.yaml",
                _finetune_keys(tiny_sdxl_path, concept, ti, steps=2)
                + ["initializer_token=dog", "class_word=dog", "learning_rate=0.5"],
            )
        )
    )
    _recording(
        InfusionTask(
            load_config(
                InfusionConfig,
                REPO / "configs/finetune/infusion.yaml",
                _finetune_keys(tiny_sdxl_path, concept, inf, steps=2) + ["class_word=dog", "learning_rate=0.5"],
            )
        )
    )

    def images(name, prompt, *finetunes):
        out = tmp_path / name
        args = [
            "generate",
            "--base",
            str(tiny_sdxl_path),
            "--prompt",
            prompt,
            "--steps",
            "2",
            "--height",
            str(RES),
            "--quiet",
            "--out",
            str(out),
        ]
        for folder in finetunes:
            args += ["--finetune", str(folder)]
        assert inference_main(args) == 0
        record = json.loads((out / "settings.json").read_text())["prompts"][0]
        return np.asarray(Image.open(out / record["images"][0]), dtype=np.float32)

    assert np.abs(images("ti", "a photo of S*", ti) - images("base_s", "a photo of S*")).max() > 0
    assert np.abs(images("inf", "a photo of a dog", inf) - images("base_dog", "a photo of a dog")).max() > 0
    code = inference_main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--finetune",
            str(ti),
            "--prompt",
            "a photo of S*",
            "--steps",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "wrong"),
        ]
    )
    assert code == 2 and "an SDXL embedding" in capsys.readouterr().err


def test_words_injected_into_both_sdxl_encoders_match_typed_words(tiny_sdxl_path):
    """A word made of a real token's rows of both embedding tables, put at a placeholder, gives exactly the
    prompt and pooled embeddings `StableDiffusionXLPipeline.encode_prompt` computes for the typed token."""
    from diffusers import StableDiffusionXLPipeline

    from encoders.text_injection import add_placeholder_tokens, encode_prompt_with_words

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    word = torch.cat([e.get_input_embeddings().weight[dog] for e in encoders])[None, None]  # [1, 1, 32 + 48]
    ids = [add_placeholder_tokens(t, ["S*"]) for t in tokenizers]
    tokens = [
        t(
            "a photo of a S* on grass", padding="max_length", max_length=t.model_max_length, return_tensors="pt"
        ).input_ids
        for t in tokenizers
    ]
    with torch.no_grad():
        injected = encode_prompt_with_words(encoders, tokens, ids, [word])
        typed, _, pooled, _ = pipe.encode_prompt(
            "a photo of a dog on grass", device="cpu", do_classifier_free_guidance=False
        )
    torch.testing.assert_close(injected.prompt_embeds, typed, rtol=0, atol=1e-5)
    torch.testing.assert_close(injected.pooled_prompt_embeds, pooled, rtol=0, atol=1e-5)
    assert injected.word_positions.tolist() == [[5]]
    with pytest.raises(ValueError, match="32 \\+ 48"):  # a word for one encoder only
        encode_prompt_with_words(encoders, tokens, ids, [word[..., :32]])


@pytest.mark.slow
def test_elite_both_stages_and_generation_on_sdxl(
    tiny_sdxl_path, tiny_sd_path, tiny_image_encoder_path, crop_shards, data_dir, tmp_path, capsys
):
    """Both ELITE stages train on the SDXL bundle (words as wide as both text encoders, K/V over its 80-wide
    context, the pooled embedding of the injected prompt); the encoders generate through
    `StableDiffusionXLPipeline` (Python and the command line); SD v1 refuses them, and they refuse SD v1's."""
    from inference.cli import main as inference_main
    from inference.loading import ModelLoadError
    from inference.pipeline import ElitePipeline
    from training.global_mapping import GlobalMappingConfig, GlobalMappingTask
    from training.local_mapping import LocalMappingConfig, LocalMappingTask

    encoders = tmp_path / "encoders"
    common = [
        f"pretrained_model_name_or_path={tiny_sdxl_path}",
        f"image_encoder_name_or_path={tiny_image_encoder_path}",
        f"train_shards={crop_shards / 'coco' / '*.tar'}",
        "train_batch_size=2",
        "mixed_precision=no",
        "gradient_accumulation_steps=1",
        "mapping_hidden_dim=64",
        "checkpointing_steps=0",
        "validation_steps=0",
        "report_to=none",
        "dataloader_num_workers=0",
        "data.resolution=64",
        "max_steps=3",
        "learning_rate=1e-3",
        f"export_dir={encoders}",
    ]
    stage1 = _recording(
        GlobalMappingTask(
            load_config(
                GlobalMappingConfig,
                REPO / "configs/train/global_mapping.yaml",
                [*common, f"output_dir={tmp_path / 'global'}"],
            )
        ),
        "loss",
    )
    stage2 = _recording(
        LocalMappingTask(
            load_config(
                LocalMappingConfig,
                REPO / "configs/train/local_mapping.yaml",
                [*common, f"output_dir={tmp_path / 'local'}", f"global_mapping_path={encoders}"],
            )
        ),
        "loss",
    )
    assert all(map(math.isfinite, stage1 + stage2)) and len(stage1) == len(stage2) == 3
    assert len(set(stage1)) > 1 and len(set(stage2)) > 1
    config = json.loads((encoders / "global_mapping" / "config.json").read_text())
    assert config["output_dim"] == 80 and config["pretrained_model_name_or_path"] == str(tiny_sdxl_path)

    elite = ElitePipeline.from_pretrained(str(tiny_sdxl_path), encoders=str(encoders), device="cpu", dtype="float32")
    assert type(elite.pipe).__name__ == "StableDiffusionXLPipeline"  # by default, as for an SD 1.x / 2.x base
    photo = data_dir / "concepts" / "dreambooth" / "teapot" / "04.jpg"
    mask = data_dir / "concepts" / "masks" / "teapot_04.png"
    concept = elite.encode_concept(photo, mask)
    assert concept.w0.shape == (80,) and concept.local_tokens.shape[-1] == 80
    cond = elite.conditioning("a photo of S*", [concept], ["S*"])
    plain_embeds, plain_pooled = elite._plain_text("a photo of S*")
    assert cond.prompt_embeds.shape == plain_embeds.shape == (1, 77, 80)
    assert (cond.pooled_prompt_embeds - plain_pooled).abs().max() > 1e-4  # w0 reaches the pooled embedding too
    kwargs = dict(num_inference_steps=2, height=RES, width=RES, output_type="latent", seed=0)
    tuned = elite("a photo of S*", concept, **kwargs).images
    local_off = elite("a photo of S*", concept, elite_scale=0.0, **kwargs).images
    plain = elite("a photo of a teapot", None, **kwargs).images
    assert tuned.shape == plain.shape == (1, 4, RES // 2, RES // 2)
    assert (tuned - plain).abs().max() > 1e-4 and (tuned - local_off).abs().max() > 1e-6  # w0 and the local branch act
    two = elite("S1 next to S2", [concept, concept], **kwargs).images
    assert torch.isfinite(two).all()

    out = tmp_path / "cli"
    assert (
        inference_main(
            [
                "generate",
                "--base",
                str(tiny_sdxl_path),
                "--encoders",
                str(encoders),
                "--image",
                str(photo),
                "--mask",
                str(mask),
                "--prompt",
                "a photo of S* on the beach",
                "--steps",
                "2",
                "--height",
                str(RES),
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "settings.json").read_text())["prompts"][0]["images"]
    with pytest.raises(ModelLoadError, match="size 80"):  # made for SDXL's two encoders, refused on SD v1
        ElitePipeline.from_pretrained(
            str(tiny_sd_path), encoders=str(encoders), device="cpu", dtype="float32", safety_checker=False
        )

    # the SDXL pipeline families share the UNet, so its ELITE (img2img here), and unloading restores them
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from inference import load_elite, unload_elite

    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(elite.pipe)
    init = torch.rand(1, 3, RES, RES)
    family = dict(image=init, strength=0.7, num_inference_steps=3, output_type="latent")
    shared = load_elite(img2img, encoders)
    assert shared.encoders is elite.encoders
    edited = shared("a photo of S*", concept, seed=0, **family).images
    unload_elite(img2img)
    plain_img2img = img2img("a photo of a teapot", generator=torch.Generator().manual_seed(0), **family).images
    assert (edited - plain_img2img).abs().max() > 1e-4
    fresh = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_sdxl_path))
    fresh.set_progress_bar_config(disable=True)
    again = fresh("a photo of a teapot", generator=torch.Generator().manual_seed(0), **family).images
    assert torch.equal(again, plain_img2img)  # unloaded: the stock SDXL img2img pipeline's output

    # compositional inversion on SDXL: the location MLP reads words as wide as both tables (w0's width) ...
    from data_prep.cli import main as data_prep_main
    from inference.guidance import SpatialGuidanceConfig
    from training.location_mlp import LocationMLPConfig, LocationMLPTask
    from training.loop import run_training

    assert (
        data_prep_main(
            [
                "pairs",
                "coco",
                "--annotations",
                str(data_dir / "coco_sample" / "annotations.json"),
                "--out",
                str(tmp_path / "pairs"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    run_training(
        LocationMLPTask(
            load_config(
                LocationMLPConfig,
                REPO / "configs/train/location_mlp.yaml",
                [
                    f"pretrained_model_name_or_path={tiny_sdxl_path}",
                    f"train_shards={tmp_path / 'pairs'}",
                    "max_steps=3",
                    "train_batch_size=4",
                    "checkpointing_steps=0",
                    "validation_steps=0",
                    "report_to=none",
                    "mixed_precision=no",
                    f"output_dir={tmp_path / 'location'}",
                    f"export_dir={encoders}",
                ],
            )
        )
    )
    assert json.loads((encoders / "location_mlp" / "config.json").read_text())["embedding_dim"] == 80
    # ... and spatial guidance steers w0's and a word's maps in the SDXL UNet (pooled + size conditioning)
    elite = ElitePipeline.from_pretrained(
        str(tiny_sdxl_path), encoders=str(encoders), device="cpu", dtype="float32", allow_sdxl=True
    )
    steer = SpatialGuidanceConfig(guidance_steps=2, iterations=3, step_size=1e4, loss_threshold=0.0)
    guided = elite(
        "a photo of S* and a dog",
        concept,
        boxes=[(0, 0, 0.5, 1)],
        word_boxes={"dog": (0.5, 0, 1, 1)},
        guidance_config=steer,
        **kwargs,
    )
    off = elite(
        "a photo of S* and a dog",
        concept,
        boxes=[(0, 0, 0.5, 1)],
        word_boxes={"dog": (0.5, 0, 1, 1)},
        guidance_config=SpatialGuidanceConfig(guidance_steps=0),
        **kwargs,
    )
    first = guided.guidance_losses[0]
    assert min(first[1:]) < first[0] and (guided.images - off.images).abs().max() > 1e-3
    torch.testing.assert_close(
        off.images, elite("a photo of S* and a dog", concept, **kwargs).images, rtol=0, atol=1e-3
    )
    with pytest.warns(UserWarning, match="nearly the same place"):  # one concept twice: one noun's layout
        predicted = elite("S1 next to S2", [concept, concept], spatial_guidance=True, guidance_config=steer, **kwargs)
    assert len(predicted.boxes) == 2
    picture = tmp_path / "guide.png"
    assert (
        inference_main(
            [
                "guide",
                "--base",
                str(tiny_sdxl_path),
                "--location-mlp",
                str(encoders),
                "--prompt",
                "a photo of a person and a bus",
                "--words",
                "person",
                "bus",
                "--steps",
                "2",
                "--guidance-steps",
                "1",
                "--iterations",
                "1",
                "--out",
                str(picture),
            ]
        )
        == 0
    )
    assert picture.is_file()
