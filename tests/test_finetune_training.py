"""Per-concept fine-tunes on the tiny model with real concept photos: a few steps each.

Each run checks that the loss is finite, that the output changes generation against the base
model, and the method's own contract: Textual Inversion's file loads through diffusers'
`load_textual_inversion`; BaTex's embedding lies in the span of its rank-rule basis; Infusion's
residuals are non-zero and only act where the class word is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encoders.common.config import ConfigError, load_config
from encoders.subspace import TextualSubspace, matrix_rank, vocabulary_order

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CONFIGS = Path(__file__).parent.parent / "configs" / "finetune"
RES = "32"  # 16 x 16 latents: the tiny UNet's smallest sensible size, fast on 2 cores


def common_args(sd_path, concept_dir, out_dir, steps=3):
    return [
        f"pretrained_model_name_or_path={sd_path}",
        f"concept_dir={concept_dir}",
        f"output_dir={out_dir}",
        f"data.resolution={RES}",
        f"max_steps={steps}",
        "train_batch_size=2",
        "gradient_accumulation_steps=1",
        "data.soft_masks=none",
        "checkpointing_steps=0",
        "validation_steps=0",
        "report_to=none",
        "logging_steps=1",
    ]


def run_recording(task):
    """Run `task` on the shared loop and return the reconstruction losses of its steps."""
    from training.loop import run_training

    losses = []
    step = task.training_step

    def recording(models, batch, generator):
        loss, logs = step(models, batch, generator)
        losses.append(float(logs["rec_loss"]))
        return loss, logs

    task.training_step = recording
    run_training(task)
    return losses


def tiny_pipe(sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cli_images(sd_path, out_dir, prompt, *finetunes):
    """`python -m inference generate` (in process) with --finetune folders: the images as arrays."""
    import numpy as np
    from PIL import Image

    from inference.cli import main

    args = [
        "generate",
        "--base",
        str(sd_path),
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--height",
        RES,
        "--num-images",
        "2",
        "--seed",
        "3",
        "--out",
        str(out_dir),
        "--quiet",
        "--no-safety-checker",
    ]
    for folder in finetunes:
        args += ["--finetune", str(folder)]
    assert main(args) == 0
    settings = json.loads((out_dir / "settings.json").read_text())
    assert len(settings["finetunes"]) == len(finetunes)
    return [np.asarray(Image.open(out_dir / name), dtype=np.float32) for name in settings["prompts"][0]["images"]]


def latents_of(pipe, guidance_scale=7.5, **kwargs):
    out = pipe(
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        height=int(RES),
        width=int(RES),
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return out.images


def test_textual_inversion_trains_and_loads_with_diffusers(tiny_sd_path, data_dir, tmp_path):
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "dog"
    out = tmp_path / "ti"
    args = common_args(tiny_sd_path, concept, out) + [
        "initializer_token=dog",
        "placeholder_token=S*",
        "class_word=dog",
        "learning_rate=0.05",
    ]
    losses = run_recording(
        TextualInversionTask(load_config(TextualInversionConfig, CONFIGS / "textual_inversion.yaml", args))
    )
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    saved = load_file(out / "learned_embeds.safetensors")
    assert list(saved) == ["S*"] and saved["S*"].shape == (1, 32)
    info = json.loads((out / "concept.json").read_text())
    assert info["method"] == "textual_inversion" and info["class_word"] == "dog"
    assert info["semantic_inversion"] is False and info["package_version"]
    card = (out / "README.md").read_text()
    assert "load_textual_inversion" in card and "textual_inversion" in card.split("---")[1]
    assert "encoders" not in card.split("\n# ")[1].split("\n")[0]  # its own card, not the encoders folder's

    pipe = tiny_pipe(tiny_sd_path)
    dog = pipe.tokenizer.convert_tokens_to_ids("dog</w>")
    dog_embedding = pipe.text_encoder.get_input_embeddings().weight[dog].detach().clone()
    assert not torch.allclose(saved["S*"][0], dog_embedding)  # it moved away from the initializer
    base = latents_of(pipe, prompt="a photo of a dog")

    pipe.load_textual_inversion(str(out), token="S*")  # diffusers' own loader, the file as written
    sid = pipe.tokenizer.convert_tokens_to_ids("S*")
    assert sid in pipe.tokenizer("a photo of a S*").input_ids
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[sid].detach(), saved["S*"][0])
    learned = latents_of(pipe, prompt="a photo of a S*")
    assert (learned - base).abs().max() > 1e-4  # the concept changes generation against the base model

    # our injection path (training, inference.evaluate) encodes exactly what diffusers' loader gives
    from encoders.text_injection import encode_text_with_words

    ids = pipe.tokenizer(["a photo of a S*"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = encode_text_with_words(pipe.text_encoder, ids, sid, saved["S*"][None]).hidden_states
        theirs = pipe.text_encoder(ids)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)

    # the inference command line applies the run: same seeds, another image than the base model's
    tuned = cli_images(tiny_sd_path, tmp_path / "gen_ti", "a photo of a S*", out)
    plain = cli_images(tiny_sd_path, tmp_path / "gen_base", "a photo of a S*")
    assert tuned[0].shape == (int(RES), int(RES), 3) and len(tuned) == 2
    assert abs(tuned[0] - plain[0]).max() > 0 and abs(tuned[0] - tuned[1]).max() > 0


def test_a_multi_vector_token_trains_as_diffusers_expands_it(tiny_sd_path, data_dir, tmp_path):
    """`num_vectors=3` (Compositional Inversion's script), with its anchor loss: the export is one [3, D] embedding;
    diffusers' loader adds S*, S*_1, S*_2 and expands "S*" in prompts, which encodes exactly what training put in at
    the placeholder (the training-side prompt states); the method's unload takes all three tokens out again."""
    from diffusers.loaders import TextualInversionLoaderMixin

    from encoders.common.finetune_folder import read_finetune
    from inference.methods import TextualInversion
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "dog"
    out = tmp_path / "ti3"
    args = common_args(tiny_sd_path, concept, out) + [
        "initializer_token=dog",
        "class_word=dog",
        "learning_rate=0.05",
        "num_vectors=3",
        "anchors.enabled=true",
    ]
    config = load_config(TextualInversionConfig, CONFIGS / "textual_inversion_compositional.yaml", args)
    task = TextualInversionTask(config)
    losses = run_recording(task)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    saved = load_file(out / "learned_embeds.safetensors")["S*"]
    assert saved.shape == (3, 32) and not torch.allclose(saved[0], saved[1])  # each vector learned its own way

    # the package loads it under the lower-case token (the CLIP tokenizer lowercases prompts before diffusers
    # looks for S*_1, S*_2), so prompts typed with "S*" get all three vectors
    pipe = tiny_pipe(tiny_sd_path)
    method = TextualInversion.load(pipe, read_finetune(out))
    assert method.token == "s*" and method.tokens() == ["s*", "s*_1", "s*_2"]
    prompt = "a photo of a S* dog"
    expanded = TextualInversionLoaderMixin.maybe_convert_prompt(pipe, method.prompt_for(prompt), pipe.tokenizer)
    assert expanded == "a photo of a s* s*_1 s*_2 dog"
    ids = pipe.tokenizer([expanded], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        ours, _ = task.encode_prompts({"learned_word": task.word}, [prompt])
    assert torch.allclose(ours.cpu(), theirs, atol=1e-5)
    method.unload()
    assert not {"s*", "s*_1", "s*_2"} & set(pipe.tokenizer.get_vocab())
    with pytest.raises(ConfigError, match="num_vectors"):
        load_config(
            TextualInversionConfig, CONFIGS / "batex.yaml", [*args[:2], "num_vectors=2", "initializer_token=dog"]
        )


def test_batex_with_anchors_stays_in_the_span_of_its_basis(tiny_sd_path, data_dir, tmp_path):
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "cat"
    out = tmp_path / "batex"
    args = common_args(tiny_sd_path, concept, out) + [
        "initializer_token=cat",
        "subspace.selection=rank",
        "subspace.dim=24",
        "subspace.distance=cosine",
        "learning_rate=0.05",
        "anchors.enabled=true",
        "anchors.max_active=3",
    ]
    task = TextualInversionTask(load_config(TextualInversionConfig, CONFIGS / "batex.yaml", args))
    losses = run_recording(task)
    assert all(math.isfinite(x) for x in losses)

    v = load_file(out / "learned_embeds.safetensors")["S*"][0].double()
    sub = TextualSubspace.from_pretrained(out / "subspace")
    basis = sub.basis.double()
    coef = torch.linalg.lstsq(basis.T, v[:, None]).solution
    assert (basis.T @ coef).squeeze(1).sub(v).norm() / v.norm() < 1e-6  # v in span(V_M)
    assert torch.allclose(sub().double(), v, atol=1e-6)

    # the basis is the top-M prefix of the cosine order with the smallest M reaching rank d1 = 24
    vocab = task.sd.text_encoder.get_input_embeddings().weight.detach().float()
    tok = task.sd.tokenizer
    cat = tok.convert_tokens_to_ids("cat</w>")
    order = vocabulary_order(vocab, cat, "cosine", exclude_ids=[tok.bos_token_id, tok.eos_token_id])
    assert torch.equal(sub.basis_ids, order[: len(sub.basis_ids)])
    assert matrix_rank(sub.basis) >= 24 > matrix_rank(sub.basis[:-1])
    assert sub.basis_ids[0].item() == cat
    assert not torch.allclose(v.float(), vocab[cat])  # trained away from the one-hot start
    info = json.loads((out / "concept.json").read_text())
    assert info["method"] == "batex" and info["semantic_inversion"] is True  # trained with anchors


def test_infusion_trains_and_changes_only_class_word_prompts(tiny_sd_path, tiny_clipseg_path, data_dir, tmp_path):
    from encoders.infusion import InfusionResiduals
    from inference.methods import generate_with_infusion
    from training.infusion import InfusionConfig, InfusionTask

    concept = data_dir / "concepts" / "dreambooth" / "cat"
    out = tmp_path / "infusion"
    args = common_args(tiny_sd_path, concept, out) + [
        "class_word=cat",
        "learning_rate=0.05",
        f"data.soft_masks={tiny_clipseg_path}",  # Infusion's CLIPSeg soft masks (a tiny CLIPSeg here)
    ]
    task = InfusionTask(load_config(InfusionConfig, CONFIGS / "infusion.yaml", args))
    assert task.config.data.mask_average == "image" and task.config.adam_weight_decay == 0.01
    losses = run_recording(task)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    masks = task.photos.masks
    assert bool(task.photos.has_mask.all()) and masks.shape[1:] == (1, int(RES), int(RES))
    assert 0 <= float(masks.min()) and float(masks.max()) <= 1 and bool(((masks > 0.01) & (masks < 0.99)).any())

    residuals = InfusionResiduals.from_pretrained(out, subfolder="infusion")
    assert residuals.config.class_word == "cat"
    assert residuals().abs().max() > 0  # started at zero, trained
    assert "generate_with_infusion" in (out / "README.md").read_text()
    size = sum(f.stat().st_size for f in (out / "infusion").glob("*.safetensors"))
    assert size < 16_000  # a few KB

    pipe = tiny_pipe(tiny_sd_path)
    kwargs = dict(num_inference_steps=2, guidance_scale=8.0, height=int(RES), width=int(RES), output_type="latent")
    with_cat = generate_with_infusion(
        pipe, ["a photo of a cat"], [residuals], generator=torch.Generator().manual_seed(0), **kwargs
    )
    base = latents_of(pipe, guidance_scale=8.0, prompt="a photo of a cat")
    assert torch.allclose(with_cat.base_images[0], base[0], atol=1e-4)  # the F stream is the base model
    assert (with_cat.images[0] - base[0]).abs().max() > 1e-3  # the concept changes generation
    no_cat = generate_with_infusion(
        pipe, ["a photo of a dog"], [residuals], generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert torch.allclose(no_cat.images[0], no_cat.base_images[0], atol=1e-6)  # no class word: nothing changes
    assert type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__ == "AttnProcessor2_0"

    # the inference command line applies it to prompts with the class word, and only to those
    tuned = cli_images(tiny_sd_path, tmp_path / "gen_cat", "a photo of a cat", out)
    plain = cli_images(tiny_sd_path, tmp_path / "gen_base", "a photo of a cat")
    assert abs(tuned[0] - plain[0]).max() > 0
    # without the class word the command takes the plain path (another kernel order than the dual-stream one:
    # equal up to the 8-bit rounding of a pixel here and there)
    assert all(
        np.abs(a - b).max() <= 1
        for a, b in zip(
            cli_images(tiny_sd_path, tmp_path / "gen_dog", "a photo of a dog", out),
            cli_images(tiny_sd_path, tmp_path / "gen_dog_base", "a photo of a dog"),
        )
    )


def test_finetune_configs_fail_clearly(tmp_path):
    from training.infusion import InfusionConfig
    from training.textual_inversion import TextualInversionConfig

    with pytest.raises(ConfigError, match="concept_dir is required"):
        load_config(TextualInversionConfig, None, ["initializer_token=dog"])
    with pytest.raises(ConfigError, match="initializer_token is required"):
        load_config(TextualInversionConfig, None, [f"concept_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="class_word is required"):
        load_config(InfusionConfig, None, [f"concept_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="subspace.dimm"):
        load_config(TextualInversionConfig, None, ["subspace.dimm=3"])


def test_help_lists_the_keys(capsys):
    from training.textual_inversion import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key in ("concept_dir", "placeholder_token", "initializer_token", "subspace.dim", "anchors.weight"):
        assert key in text


def test_resumed_textual_inversion_matches_an_uninterrupted_run(tiny_sd_path, data_dir, tmp_path):
    from training.textual_inversion import TextualInversionConfig, TextualInversionTask

    concept = data_dir / "concepts" / "dreambooth" / "teapot"

    def run(out, steps, *extra):
        args = common_args(tiny_sd_path, concept, out, steps) + [
            "initializer_token=teapot",
            "checkpointing_steps=1",
            "train_batch_size=1",
            *extra,
        ]
        return run_recording(TextualInversionTask(load_config(TextualInversionConfig, None, args)))

    full = run(tmp_path / "full", 3)
    first = run(tmp_path / "split", 1)
    second = run(tmp_path / "split", 3, "resume_from_checkpoint=latest")
    assert len(first) == 1 and len(second) == 2
    assert first + second == pytest.approx(full, rel=0, abs=1e-6)
    a = load_file(tmp_path / "full" / "learned_embeds.safetensors")["S*"]
    b = load_file(tmp_path / "split" / "learned_embeds.safetensors")["S*"]
    assert torch.allclose(a, b, atol=1e-6)


def test_infusion_released_variant_trains_its_key_residual(tiny_sd_path, data_dir, tmp_path):
    """variant=released: the key residuals train too, the customised rows keep their own maps (no dual stream), and
    the saved folder samples the same way."""
    from encoders.infusion import InfusionResiduals
    from inference.methods import generate_with_infusion
    from training.infusion import InfusionConfig, InfusionTask

    out = tmp_path / "released"
    args = common_args(tiny_sd_path, data_dir / "concepts" / "dreambooth" / "cat", out) + [
        "class_word=cat",
        "learning_rate=0.05",
        "variant=released",
    ]
    task = InfusionTask(load_config(InfusionConfig, CONFIGS / "infusion.yaml", args))
    assert task.config.replace_maps is False
    losses = run_recording(task)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    residuals = InfusionResiduals.from_pretrained(out, subfolder="infusion")
    assert residuals.config.variant == "released" and not residuals.replaces_maps
    assert all(float(k.abs().max()) > 0 for k in residuals.key_residuals)  # trained from zero
    pipe = task.pipeline()
    result = generate_with_infusion(
        pipe, ["a photo of a cat"], [residuals], num_inference_steps=2, height=int(RES), width=int(RES)
    )
    assert len(result.images) == 1 and not result.base_images  # its own maps: no base stream beside it
