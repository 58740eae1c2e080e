"""ELITE in the other pipeline families (issue 29): img2img, inpainting, ControlNet, LoRAs, `from_pipe`; unloading
gives the original pipeline's images back bit for bit (same process, same kernels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from inference import load_elite, unload_elite
from inference.cli import main as cli_main

TEAPOT = "concepts/dreambooth/teapot/04.jpg"
INIT = Image.new("RGB", (64, 64), (200, 40, 40))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd_path, tmp_path_factory):
    """A LoRA on the tiny UNet's attention projections (random, non-zero B), in diffusers' layout, made with peft."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_sd_path, tmp_path_factory):
    """A ControlNet made from the tiny UNet (`from_unet`), its image embedding downsampling as the tiny VAE (2x)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():  # zero-initialised outputs would make the ControlNet a no-op: give them weights
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.1)
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("controlnet")
    controlnet.save_pretrained(out)
    return out


def _pixels(output) -> np.ndarray:
    return np.asarray(output.images[0], dtype=np.float32)


def _run(pipe, prompt="a photo of a teapot", **kwargs) -> np.ndarray:
    return _pixels(pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kwargs))


FAMILIES = {
    "img2img": (StableDiffusionImg2ImgPipeline, dict(image=INIT, strength=0.7)),
    "inpainting": (StableDiffusionInpaintPipeline, dict(image=INIT, mask_image=MASK, height=64, width=64)),
    "controlnet": (StableDiffusionControlNetPipeline, dict(image=INIT, height=64, width=64)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_elite_in_each_family_and_back(family, tiny_sd_path, tiny_encoders_path, tiny_controlnet, data_dir):
    cls, call = FAMILIES[family]
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    extra = {"controlnet": ControlNetModel.from_pretrained(tiny_controlnet)} if family == "controlnet" else {}
    pipe = cls.from_pipe(base, **extra)
    pipe.set_progress_bar_config(disable=True)
    original = _run(pipe, **call)

    elite = load_elite(pipe, tiny_encoders_path)
    concept = elite.encode_concept(data_dir / TEAPOT)
    with_concept = _pixels(elite("a photo of S*", concept, num_inference_steps=3, seed=0, **call))
    same = dict(num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    without = _pixels(elite("a photo of a teapot", **same, **call))
    assert with_concept.shape == original.shape
    assert np.abs(with_concept - without).max() > 0  # the concept reaches this family's UNet calls
    assert np.array_equal(without, _run(pipe, **call))  # no concept: exactly the pipeline's own call (ELITE's K/V)
    if family == "controlnet":  # the control image still steers
        other = {**call, "image": Image.new("RGB", (64, 64), (20, 220, 20))}
        assert (
            np.abs(
                _pixels(elite("a photo of S*", concept, num_inference_steps=3, seed=0, **other)) - with_concept
            ).max()
            > 0
        )

    unload_elite(pipe)
    assert np.array_equal(_run(pipe, **call), original)


def test_from_pipe_shares_elite_and_unloading_either_restores_the_unet(tiny_sd_path, tiny_encoders_path, data_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    elite = load_elite(pipe, tiny_encoders_path)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    shared = load_elite(img2img, tiny_encoders_path)
    assert shared.encoders is elite.encoders  # not loaded twice: the UNet carries one ELITE
    concept = elite.encode_concept(data_dir / TEAPOT)
    assert shared("a photo of S*", concept, image=INIT, strength=0.7, num_inference_steps=2, seed=0).images
    unload_elite(img2img)
    assert elite.encoders is None  # the same UNet, so ELITE is gone from both pipelines
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-elite", "elite-then-lora"])
def test_lora_beside_elite_and_both_unloaded(lora_first, tiny_sd_path, tiny_encoders_path, tiny_lora, data_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    original = _run(pipe)
    if lora_first:
        pipe.load_lora_weights(tiny_lora, adapter_name="style")
        elite = load_elite(pipe, tiny_encoders_path)
    else:
        elite = load_elite(pipe, tiny_encoders_path)
        no_lora = _run(pipe)
        pipe.load_lora_weights(tiny_lora, adapter_name="style")
        assert np.abs(_run(pipe) - no_lora).max() > 0  # the LoRA acts inside ELITE's processors
    concept = elite.encode_concept(data_dir / TEAPOT)
    with_lora = _pixels(elite("a photo of S*", concept, num_inference_steps=3, seed=0))
    pipe.fuse_lora()  # fused weights give the same images (to float rounding) and unfuse again
    fused = _pixels(elite("a photo of S*", concept, num_inference_steps=3, seed=0))
    assert np.abs(fused - with_lora).max() < 2.0  # 8-bit pixels
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    unload_elite(pipe)
    # unfuse restores W by subtracting BA (float rounding), so compare the unfused-free path bit for bit below
    again = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    again.set_progress_bar_config(disable=True)
    again.load_lora_weights(tiny_lora, adapter_name="style")
    load_elite(again, tiny_encoders_path)
    unload_elite(again)
    again.unload_lora_weights()
    assert np.array_equal(_run(again), original)


def test_cli_family_options(tiny_sd_path, tiny_encoders_path, tiny_controlnet, tiny_lora, data_dir, tmp_path, capsys):
    INIT.save(tmp_path / "init.png")
    MASK.save(tmp_path / "mask.png")
    common = [
        "generate", "--base", str(tiny_sd_path), "--encoders", str(tiny_encoders_path), "--image",
        str(data_dir / TEAPOT), "--prompt", "a photo of S*", "--steps", "2", "--quiet",
    ]  # fmt: skip
    runs = {
        "img2img": ["--init-image", str(tmp_path / "init.png"), "--strength", "0.6"],
        "inpainting": ["--init-image", str(tmp_path / "init.png"), "--inpaint-mask", str(tmp_path / "mask.png")],
        "controlnet": ["--control-image", str(tmp_path / "init.png"), "--controlnet", str(tiny_controlnet)],
        "lora": ["--lora", str(tiny_lora), "--lora-scale", "0.5"],
    }
    expected = {
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpainting": "StableDiffusionInpaintPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "lora": "StableDiffusionPipeline",
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert cli_main([*common, *extra, "--out", str(out)]) == 0
        settings = json.loads((out / "settings.json").read_text())
        assert settings["pipeline"] == expected[name]
        assert Image.open(out / settings["prompts"][0]["images"][0]).size == (64, 64)
    assert json.loads((tmp_path / "lora" / "settings.json").read_text())["loras"][0]["scale"] == 0.5
    for bad, message in (  # refused by the argument checks, naming the options
        (["--inpaint-mask", str(tmp_path / "mask.png")], "needs --init-image"),
        (["--control-image", str(tmp_path / "init.png")], "go together"),
        (["--init-image", str(tmp_path / "init.png"), "--box", "0,0,1,1"], "spatial guidance"),
    ):
        with pytest.raises(SystemExit):
            cli_main([*common, *bad, "--out", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err
