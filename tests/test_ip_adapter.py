"""IP-Adapter (issue 29): the equations of its projections and decoupled attention, the official single-file
export read by diffusers' own `load_ip_adapter`, the trainer on crop shards (export, exact resume), and ELITE
working beside a diffusers IP-Adapter in either loading order."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection

from encoders.ip_adapter import EXPORT_FILE, IPAdapter, resampler_to_official
from inference import load_elite, unload_elite

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TEAPOT = "concepts/dreambooth/teapot/04.jpg"
PROMPT_IMAGE = Image.new("RGB", (40, 40), (30, 160, 220))


def _adapter(unet, encoder, variant: str, seed: int = 0) -> IPAdapter:
    """An IP-Adapter for the tiny UNet with non-trivial weights (a fresh one copies to_k / to_v)."""
    torch.manual_seed(seed)
    plus = variant == "plus"
    dim = encoder.config.hidden_size if plus else encoder.config.projection_dim
    extra = dict(num_tokens=16, plus_heads=1) if plus else {}
    adapter = IPAdapter.from_unet(unet, dim, variant=variant, **extra)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return adapter


def _export(adapter: IPAdapter, encoder_path: Path, out: Path) -> Path:
    """The layout `pipe.load_ip_adapter(out, subfolder="ip_adapter", weight_name=EXPORT_FILE)` reads."""
    folder = out / "ip_adapter"
    folder.mkdir(parents=True)
    save_file(adapter.official_state_dict(), folder / EXPORT_FILE)
    shutil.copytree(encoder_path, folder / "image_encoder")
    return out


@pytest.fixture(scope="module")
def ip_folder(tiny_sd_path, tiny_ip_image_encoder_path, tmp_path_factory) -> Path:
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_ip_image_encoder_path)
    return _export(_adapter(unet, encoder, "base"), tiny_ip_image_encoder_path, tmp_path_factory.mktemp("ip"))


def _load(ip_folder, pipe):
    pipe.load_ip_adapter(str(ip_folder), subfolder="ip_adapter", weight_name=EXPORT_FILE)


def _pixels(output) -> np.ndarray:
    return np.asarray(output.images[0], dtype=np.float32)


# ---- equations -----------------------------------------------------------------------------------


def test_decoupled_cross_attention_and_base_projection_follow_the_paper(tiny_sd_path, tiny_ip_image_encoder_path):
    """Z = softmax(QK^T/sqrt(d))V + scale * softmax(QK_ip^T/sqrt(d))V_ip, then to_out; the base image tokens are
    LayerNorm(reshape(W c + b)) of the pooled image embedding c; K_ip / V_ip start as copies of to_k / to_v."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_ip_image_encoder_path)
    fresh = IPAdapter.from_unet(unet, encoder.config.projection_dim)
    name = fresh.config.layer_names[0]
    attn = unet.get_submodule(name)
    assert torch.equal(fresh.to_k_ip[0].weight, attn.to_k.weight) and torch.equal(
        fresh.to_v_ip[0].weight, attn.to_v.weight
    )

    adapter = _adapter(unet, encoder, "base")
    adapter.install(unet, scale=0.7)
    torch.manual_seed(1)
    c = torch.randn(2, encoder.config.projection_dim)
    proj = adapter.image_proj
    tokens = F.layer_norm(
        (c @ proj.image_embeds.weight.T + proj.image_embeds.bias).reshape(2, 4, -1),
        (unet.config.cross_attention_dim,),
        proj.norm.weight,
        proj.norm.bias,
    )
    assert torch.allclose(adapter.image_proj(c[:, None].flatten(0, 1)), tokens, atol=1e-5)

    x = torch.randn(2, 16, attn.to_q.in_features)
    text = torch.randn(2, 7, unet.config.cross_attention_dim)
    h, d = attn.heads, attn.to_q.out_features // attn.heads

    def heads(t):
        return t.view(2, -1, h, d).transpose(1, 2)

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v

    q = heads(attn.to_q(x))
    z = attend(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    z = z + 0.7 * attend(q, heads(adapter.to_k_ip[0](tokens)), heads(adapter.to_v_ip[0](tokens)))
    expected = attn.to_out[0](z.transpose(1, 2).reshape(2, 16, h * d))
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=(text, [tokens]))
    assert torch.allclose(got, expected, atol=1e-5)


def _official_resampler(state: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The official `Resampler.forward` written out over its own state-dict layout (4 layers of perceiver
    attention with q/k scaled by dim_head^-1/4 each, and a bias-free GELU feed-forward)."""

    def ln(t, key):
        return F.layer_norm(t, t.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"])

    latents = state["latents"].repeat(x.shape[0], 1, 1)
    x = x @ state["proj_in.weight"].T + state["proj_in.bias"]
    for i in range(4):
        p = f"layers.{i}"
        xs, lat = ln(x, f"{p}.0.norm1"), ln(latents, f"{p}.0.norm2")
        b, n, _ = lat.shape
        q = lat @ state[f"{p}.0.to_q.weight"].T
        k, v = (torch.cat([xs, lat], dim=1) @ state[f"{p}.0.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        out = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1) @ v
        latents = out.permute(0, 2, 1, 3).reshape(b, n, -1) @ state[f"{p}.0.to_out.weight"].T + latents
        ff = F.gelu(ln(latents, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T) @ state[f"{p}.1.3.weight"].T
        latents = ff + latents
    latents = latents @ state["proj_out.weight"].T + state["proj_out.bias"]
    return ln(latents, "norm_out")


def test_plus_resampler_exports_the_official_layout_and_computes_its_formula(tiny_sd_path, tiny_ip_image_encoder_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_ip_image_encoder_path)
    adapter = _adapter(unet, encoder, "plus")
    official = resampler_to_official(adapter.image_proj.state_dict())
    assert {"latents", "layers.3.0.to_kv.weight", "layers.0.1.3.weight"} <= set(official)
    patches = torch.randn(2, 17, encoder.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(adapter.image_proj(patches), _official_resampler(official, patches, 1), atol=1e-5)
    # diffusers' own conversion of the official layout gives back exactly these weights
    converted = unet._convert_ip_adapter_image_proj_to_diffusers(official, low_cpu_mem_usage=False)
    ours = adapter.image_proj.state_dict()
    assert converted.state_dict().keys() == ours.keys()
    assert all(torch.equal(converted.state_dict()[k], ours[k]) for k in ours)


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_export_loads_with_diffusers_load_ip_adapter(variant, tiny_sd_path, tiny_ip_image_encoder_path, tmp_path):
    """The single file read by a stock pipeline's `load_ip_adapter` computes what the trained modules compute."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_ip_image_encoder_path)
    adapter = _adapter(pipe.unet, encoder, variant)
    _load(_export(adapter, tiny_ip_image_encoder_path, tmp_path), pipe)
    trained = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    adapter.install(trained)
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    text = torch.randn(2, 77, trained.config.cross_attention_dim)
    embeds = torch.randn(2, 1, 17, 32) if variant == "plus" else torch.randn(2, 1, 16)
    with torch.no_grad():
        a = trained(x, t, text, added_cond_kwargs={"image_embeds": [embeds]}).sample
        b = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": [embeds]}).sample
    assert torch.allclose(a, b, atol=1e-5)


# ---- ELITE beside a diffusers IP-Adapter -------------------------------------------------------------------


def _elite_images(elite, concept, **kwargs) -> np.ndarray:
    return _pixels(elite("a photo of S*", concept, num_inference_steps=2, seed=0, **kwargs))


@pytest.mark.parametrize("ip_first", [True, False], ids=["ip-adapter-then-elite", "elite-then-ip-adapter"])
def test_elite_and_a_diffusers_ip_adapter_together(ip_first, tiny_sd_path, tiny_encoders_path, ip_folder, data_dir):
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    plain.set_progress_bar_config(disable=True)
    elite_only = load_elite(plain, tiny_encoders_path)
    concept = elite_only.encode_concept(data_dir / TEAPOT)
    without_ip = _elite_images(elite_only, concept)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    ip_only = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ip_only.set_progress_bar_config(disable=True)
    _load(ip_folder, ip_only)
    ip_reference = _pixels(
        ip_only(
            "a photo", ip_adapter_image=PROMPT_IMAGE, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )
    )
    if ip_first:
        _load(ip_folder, pipe)
        elite = load_elite(pipe, tiny_encoders_path)
    else:
        elite = load_elite(pipe, tiny_encoders_path)
        _load(ip_folder, pipe)  # replaces every processor: ELITE re-installs itself on its next call
    both = _elite_images(elite, concept, ip_adapter_image=PROMPT_IMAGE)
    assert np.abs(both - without_ip).max() > 0  # the image prompt acts inside ELITE's processors
    pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(_elite_images(elite, concept, ip_adapter_image=PROMPT_IMAGE), without_ip)
    pipe.set_ip_adapter_scale(1.0)

    unload_elite(pipe)  # the IP-Adapter stays, exactly as it was loaded
    again = _pixels(
        pipe(
            "a photo", ip_adapter_image=PROMPT_IMAGE, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )
    )
    assert np.array_equal(again, ip_reference)


def test_unloading_the_ip_adapter_under_elite_leaves_elite(tiny_sd_path, tiny_encoders_path, ip_folder, data_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    original = _pixels(pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0)))
    elite = load_elite(pipe, tiny_encoders_path)
    concept = elite.encode_concept(data_dir / TEAPOT)
    without_ip = _elite_images(elite, concept)
    _load(ip_folder, pipe)
    assert np.abs(_elite_images(elite, concept, ip_adapter_image=PROMPT_IMAGE) - without_ip).max() > 0
    pipe.unload_ip_adapter()
    assert np.array_equal(_elite_images(elite, concept), without_ip)
    unload_elite(pipe)
    assert np.array_equal(
        _pixels(pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0))), original
    )


# ---- the trainer -----------------------------------------------------------------------------------------------


def _keys(tiny_sd_path, encoder, shards, out, **extra) -> list[str]:
    keys = dict(
        pretrained_model_name_or_path=tiny_sd_path,
        image_encoder_name_or_path=encoder,
        image_encoder_subfolder="",
        train_shards=shards,
        output_dir=out,
        train_batch_size=2,
        mixed_precision="no",
        checkpointing_steps=2,
        validation_steps=0,
        report_to="none",
        dataloader_num_workers=0,
        **{"data.resolution": 64, "data.clip_size": 32},
    )
    keys.update(extra)
    return [f"{k}={v}" for k, v in keys.items()]


def _task(keys):
    from encoders.common.config import load_config
    from training.ip_adapter import IPAdapterConfig, IPAdapterTask

    class Recording(IPAdapterTask):
        def training_step(self, models, batch, generator):
            loss, logs = super().training_step(models, batch, generator)
            self.losses.append(loss.item())
            return loss, logs

    task = Recording(load_config(IPAdapterConfig, Path(__file__).parent.parent / "configs/train/ip_adapter.yaml", keys))
    task.losses = []
    return task


def test_train_resume_export_and_generate_with_stock_diffusers(
    tiny_sd_path, tiny_ip_image_encoder_path, crop_shards, tmp_path
):
    from training.loop import run_training

    shards = str(crop_shards / "coco" / "*.tar")
    common = (tiny_sd_path, tiny_ip_image_encoder_path, shards)
    # the uninterrupted run also renders validation pictures at another image-prompt scale: training must not notice
    validation = dict(
        validation_steps=2, validation_ip_scale=0.3, num_validation_samples=1, validation_inference_steps=1
    )
    full = _task(_keys(*common, tmp_path / "full", max_steps=4, condition="object", **validation))
    run_training(full)
    first = _task(_keys(*common, tmp_path / "split", max_steps=2, condition="object"))
    run_training(first)
    second = _task(_keys(*common, tmp_path / "split", max_steps=4, condition="object", resume_from_checkpoint="latest"))
    run_training(second)
    assert len(full.losses) == 4 and len(set(full.losses)) > 1
    assert first.losses + second.losses == full.losses  # resumed exactly: same batches, drops and noise
    a, b = full.ip_adapter.state_dict(), second.ip_adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = IPAdapter.from_pretrained(tmp_path / "full" / "checkpoint-4" / "ip_adapter")
    assert not torch.equal(
        trained.to_k_ip[0].weight,
        UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
        .get_submodule(trained.config.layer_names[0])
        .to_k.weight,
    )

    export = tmp_path / "full" / "encoders"
    assert (export / "ip_adapter" / EXPORT_FILE).is_file() and "load_ip_adapter" in (export / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    original = _pixels(pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0)))
    _load(export, pipe)  # a stock pipeline; the image encoder comes from ip_adapter/image_encoder/
    with_image = _pixels(
        pipe(
            "a photo", ip_adapter_image=PROMPT_IMAGE, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )
    )
    assert np.abs(with_image - original).max() > 0
    pipe.unload_ip_adapter()
    assert np.array_equal(
        _pixels(pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0))), original
    )


def test_config_errors_name_the_key(tmp_path):
    from encoders.common.config import ConfigError, load_config
    from training.ip_adapter import IPAdapterConfig

    yaml = Path(__file__).parent.parent / "configs/train/ip_adapter.yaml"
    cfg = load_config(IPAdapterConfig, yaml, [])
    assert (cfg.learning_rate, cfg.adam_weight_decay, cfg.max_grad_norm, cfg.resolved_num_tokens) == (1e-4, 0.01, 0, 4)
    assert load_config(IPAdapterConfig, yaml, ["variant=plus"]).resolved_num_tokens == 16
    for bad, key in (
        (["variant=huge"], "variant"),
        (["condition=mask"], "condition"),
        (["variant=base", "num_tokens=8"], "variant=base"),
        (["image_drop_rate=0.9", "text_drop_rate=0.5"], "drop rates"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(IPAdapterConfig, yaml, bad)


# ---- evaluation ------------------------------------------------------------------------------------------------


def test_evaluate_has_an_ip_adapter_row(tiny_sd_path, tiny_eval_models, ip_folder, tmp_path):
    """`inference.evaluate ip_adapter=FOLDER`: a row beside the base model's, from the same noise; at scale 0 its
    images are the base model's exactly, at scale 1 they and its noise predictions differ."""
    from inference import evaluate

    common = [
        f"base={tiny_sd_path}",
        f"concepts={Path(__file__).parent / 'data' / 'concepts' / 'dreambooth' / 'dog'}",
        f"ip_adapter={ip_folder}",
        "methods=base,ip_adapter",
        "num_prompts=2",
        "seeds=0",
        "num_inference_steps=2",
        "resolution=32",
        "infusion_measures=true",
        "fisher_timesteps=200,800",
        f"clip_model={tiny_eval_models / 'eval_clip'}",
        f"dino_model={tiny_eval_models / 'dino'}",
        f"detector_model={tiny_eval_models / 'detector'}",
    ]
    on = {r["method"]: r for r in evaluate.main([*common, f"out={tmp_path / 'on'}"])["summary"]}
    off = {r["method"]: r for r in evaluate.main([*common, f"out={tmp_path / 'off'}", "ip_adapter_scale=0"])["summary"]}
    assert set(on) == set(off) == {"base", "ip_adapter"}
    assert off["ip_adapter"]["clip_t"] == pytest.approx(off["base"]["clip_t"], abs=1e-6)
    assert off["ip_adapter"]["fisher_class"] == pytest.approx(0.0, abs=1e-9)
    assert on["ip_adapter"]["fisher_class"] > 1e-6 and on["ip_adapter"]["w2_concept"] > 1e-4


@pytest.mark.slow
def test_two_process_deepspeed_bf16_plus_exports_fp32(tiny_sd_path, tiny_ip_image_encoder_path, crop_shards, tmp_path):
    """`accelerate launch` with DeepSpeed ZeRO-2 on 2 processes in bf16, the plus variant: it trains (the processors
    hold the modules DeepSpeed casts) and the export is the fp32 master weights, loadable by diffusers."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "ds"
    keys = _keys(
        tiny_sd_path,
        tiny_ip_image_encoder_path,
        str(crop_shards / "coco" / "*.tar"),
        out,
        max_steps=2,
        mixed_precision="bf16",
        variant="plus",
        plus_heads=1,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(repo / "configs/accelerate/deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
        "-m",
        "training.ip_adapter",
        "--config",
        str(repo / "configs/train/ip_adapter.yaml"),
        *keys,
    ]
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    exported = load_file(out / "encoders" / "ip_adapter" / EXPORT_FILE)
    assert {v.dtype for v in exported.values()} == {torch.float32} and "image_proj.latents" in exported
    (ckpt_file,) = (out / "checkpoint-2" / "ip_adapter").glob("*.safetensors")
    ckpt = load_file(ckpt_file)  # the bf16 copy DeepSpeed trained with
    assert {v.dtype for v in ckpt.values()} == {torch.bfloat16}
    key = next(k for k in ckpt if k.startswith("to_k_ip.0"))
    assert torch.equal(exported["ip_adapter.1.to_k_ip.weight"].to(torch.bfloat16), ckpt[key])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    _load(out / "encoders", pipe)


def test_generate_with_ip_adapter_and_elite_from_the_command_line(
    tiny_sd_path, tiny_encoders_path, ip_folder, data_dir, tmp_path, capsys
):
    """`generate --ip-adapter DIR --ip-adapter-image IMG` beside an ELITE concept (and in img2img): the image prompt
    changes the picture, settings.json records it; the option pair and guidance are checked before any model loads."""
    import json

    from inference.cli import main as cli_main

    PROMPT_IMAGE.save(tmp_path / "prompt.png")
    common = [
        "generate", "--base", str(tiny_sd_path), "--encoders", str(tiny_encoders_path), "--image",
        str(data_dir / TEAPOT), "--prompt", "a photo of S*", "--steps", "2", "--quiet",
    ]  # fmt: skip
    ip = ["--ip-adapter", str(ip_folder), "--ip-adapter-image", str(tmp_path / "prompt.png")]
    pictures = {}
    for name, extra in {
        "elite": [],
        "both": ip,
        "both_img2img": [*ip, "--init-image", str(tmp_path / "prompt.png")],
    }.items():
        assert cli_main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        settings = json.loads((tmp_path / name / "settings.json").read_text())
        pictures[name] = np.asarray(Image.open(tmp_path / name / settings["prompts"][0]["images"][0]), np.float32)
    assert settings["pipeline"] == "StableDiffusionImg2ImgPipeline" and settings["ip_adapter"]["scale"] == 1.0
    assert np.abs(pictures["both"] - pictures["elite"]).max() > 0
    for bad, message in ((ip[:2], "go together"), ([*ip, "--box", "0,0,1,1"], "spatial guidance")):
        with pytest.raises(SystemExit):
            cli_main([*common, *bad, "--out", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err
