"""ELITE trainers on the tiny bundle and tiny crop shards: DeepSpeed ZeRO-2 over 2 processes, exact resume, export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoders.common.config import ConfigError, load_config
from encoders.global_mapping import GlobalMapping
from encoders.local_mapping import LocalMapping

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(crop_shards) -> str:
    return str(crop_shards / "coco" / "*.tar")


def _keys(tiny_sd_path, tiny_image_encoder_path, shards, out, **extra) -> list[str]:
    keys = dict(
        pretrained_model_name_or_path=tiny_sd_path,
        image_encoder_name_or_path=tiny_image_encoder_path,
        train_shards=shards,
        output_dir=out,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        mixed_precision="no",
        mapping_hidden_dim=64,
        checkpointing_steps=2,
        validation_steps=0,
        logging_steps=1,
        report_to="tensorboard",
        dataloader_num_workers=0,
        **{"data.resolution": 64},
    )
    keys.update(extra)
    return [f"{k}={v}" for k, v in keys.items()]


def _scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for f in sorted(run_dir.glob("logs/**/events.out.tfevents*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return [values[s] for s in sorted(values)]


def _launch(module: str, keys: list[str], config: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
        "-m",
        module,
        "--config",
        str(REPO / config),
        *keys,
    ]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]


def _assert_finite_and_changing(losses: list[float], steps: int) -> None:
    assert len(losses) == steps and all(map(math.isfinite, losses)), losses
    assert len(set(losses)) > 1, losses


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_two_process_deepspeed_zero2_trains_both_stages(tmp_path, tiny_sd_path, tiny_image_encoder_path, shards):
    common = (tiny_sd_path, tiny_image_encoder_path, shards)
    stage1, stage2 = tmp_path / "global", tmp_path / "local"
    _launch("training.global_mapping", _keys(*common, stage1, max_steps=3), "configs/train/global_mapping.yaml")
    _assert_finite_and_changing(_scalars(stage1, "loss"), 3)
    assert (stage1 / "checkpoint-3" / "pytorch_model").is_dir()  # DeepSpeed's sharded optimizer states
    from_ckpt = GlobalMapping.from_pretrained(stage1 / "checkpoint-3", subfolder="global_mapping")
    exported = GlobalMapping.from_pretrained(stage1 / "encoders", subfolder="global_mapping")
    assert _weights_equal(from_ckpt, exported)
    assert exported.config.pretrained_model_name_or_path == str(tiny_sd_path)

    # stage 2 in bf16: DeepSpeed holds bf16 copies, the export must still be the fp32 master weights
    _launch(
        "training.local_mapping",
        _keys(*common, stage2, max_steps=3, mixed_precision="bf16", global_mapping_path=stage1 / "encoders"),
        "configs/train/local_mapping.yaml",
    )
    _assert_finite_and_changing(_scalars(stage2, "loss"), 3)
    assert all(v > 0 for v in _scalars(stage2, "local_value_l1"))
    folder = stage2 / "encoders"
    local = LocalMapping.from_pretrained(folder, subfolder="local_mapping")
    assert {p.dtype for p in local.parameters()} == {torch.float32}
    from safetensors.torch import load_file

    (ckpt_file,) = (stage2 / "checkpoint-3" / "local_mapping").glob("*.safetensors")
    ckpt = load_file(ckpt_file)  # the 16-bit copy DeepSpeed trained with
    assert {v.dtype for v in ckpt.values()} == {torch.bfloat16}
    exported = local.state_dict()
    assert ckpt.keys() == exported.keys()
    assert all(torch.equal(exported[k].to(torch.bfloat16), ckpt[k]) for k in ckpt)
    assert _weights_equal(GlobalMapping.from_pretrained(folder, subfolder="global_mapping"), from_ckpt)
    card = (folder / "README.md").read_text()
    assert "`local_mapping/`" in card and "`global_mapping/`" in card


class _Recorder:
    """Mixin recording every micro-step's loss."""

    def training_step(self, models, batch, generator):
        loss, logs = super().training_step(models, batch, generator)
        self.losses.append(loss.item())
        return loss, logs


def _global_task(keys):
    from training.global_mapping import GlobalMappingConfig, GlobalMappingTask

    class Recording(_Recorder, GlobalMappingTask):
        losses: list

    task = Recording(load_config(GlobalMappingConfig, REPO / "configs/train/global_mapping.yaml", keys))
    task.losses = []
    return task


def _optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)["state"]


def test_resume_continues_like_an_uninterrupted_run(tmp_path, tiny_sd_path, tiny_image_encoder_path, shards):
    from training.loop import run_training

    common = (tiny_sd_path, tiny_image_encoder_path, shards)
    full = _global_task(_keys(*common, tmp_path / "full", max_steps=4, report_to="none"))
    run_training(full)
    first = _global_task(_keys(*common, tmp_path / "split", max_steps=2, report_to="none"))
    run_training(first)
    second = _global_task(
        _keys(*common, tmp_path / "split", max_steps=4, report_to="none", resume_from_checkpoint="latest")
    )
    run_training(second)

    assert len(first.losses) == 2 and len(second.losses) == 2  # resumed at step 2, ran steps 3 and 4
    assert first.losses + second.losses == full.losses
    # the data position is part of the checkpoint: the resumed loader started there, reading nothing before it
    data_state = json.loads((tmp_path / "split" / "checkpoint-2" / "data_state_rank0.json").read_text())
    assert data_state["epoch"] == 0 and data_state["positions"][0] >= 2 * 2
    assert len(set(full.losses)) > 1
    # the optimizer state the resumed run started from, and the one it ended with, equal the uninterrupted run's
    for step in (2, 4):
        a, b = (
            _optimizer_state(tmp_path / "full" / f"checkpoint-{step}"),
            _optimizer_state(tmp_path / "split" / f"checkpoint-{step}"),
        )
        assert a.keys() == b.keys() and len(a) > 0
        for i in a:
            assert all(torch.equal(a[i][k], b[i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert _weights_equal(second.global_mapping, full.global_mapping)


def test_global_mapping_with_semantic_anchors_pulls_w0_towards_them(
    tmp_path, tiny_sd_path, tiny_image_encoder_path, shards
):
    from accelerate import Accelerator

    keys = _keys(
        tiny_sd_path,
        tiny_image_encoder_path,
        shards,
        tmp_path / "anchors",
        max_steps=1,
        report_to="none",
        **{"anchors.enabled": "true", "anchors.max_active": 2, "anchors.weight": 1.0},
    )
    task = _global_task(keys)
    task.setup(Accelerator(cpu=True), torch.float32)
    models = task.trainable_models()
    batch = next(iter(task.train_dataloader()))
    loss, logs = task.training_step(models, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(logs["anchor_loss"]) and logs["anchor_loss"] > 0
    assert all(0 < len(code) <= 2 for code in task.anchors.last_code())  # at most c active anchors per sample

    # the anchor term alone: a gradient step on the mapping lowers it (w0 moves towards its anchors)
    mapping = models["global_mapping"]
    feats = task.encode_frozen(batch, "clip_pixel_values", None)[1]
    layers = [feats[layer] for layer in task.config.feature_layers]
    optimizer = torch.optim.SGD(mapping.parameters(), lr=1e-3)
    before = task.anchors(mapping(layers)[:, 0].float())
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = task.anchors(mapping(layers)[:, 0].float())
    assert after < before


def test_local_stage_single_process_with_validation_and_fresh_load(
    tmp_path, tiny_sd_path, tiny_image_encoder_path, shards
):
    from training.local_mapping import LocalMappingConfig, LocalMappingTask
    from training.loop import run_training

    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    stage1 = GlobalMapping.from_unet(
        unet,
        input_dim=32,
        hidden_dim=64,
        pretrained_model_name_or_path=str(tiny_sd_path),
        image_encoder_name_or_path=str(tiny_image_encoder_path),
    )
    stage1.save_pretrained(tmp_path / "stage1" / "global_mapping")
    keys = _keys(
        tiny_sd_path,
        tiny_image_encoder_path,
        shards,
        tmp_path / "local",
        max_steps=2,
        report_to="none",
        global_mapping_path=tmp_path / "stage1",
        validation_steps=2,
        num_validation_samples=1,
        validation_prompts="[a S* on the beach]",
        validation_inference_steps=2,
        export_dir=tmp_path / "encoders",
    )
    task = LocalMappingTask(load_config(LocalMappingConfig, REPO / "configs/train/local_mapping.yaml", keys))
    run_training(task)
    sheet = tmp_path / "local" / "validation" / "step-000002.png"
    from PIL import Image

    prompts = task.config.validation_prompts
    assert Image.open(sheet).size == (64 * (1 + len(prompts)), 64)  # the crop + one image per validation prompt

    # the exported folder loads in a fresh process and drives the UNet through the processors
    script = f"""
import torch
from diffusers import UNet2DConditionModel
from encoders.attention import AttentionContext, LocalTokens, set_elite_processors
from encoders.global_mapping import GlobalMapping
from encoders.local_mapping import LocalMapping
gm = GlobalMapping.from_pretrained({str(tmp_path / "encoders")!r}, subfolder="global_mapping")
lm = LocalMapping.from_pretrained({str(tmp_path / "encoders")!r}, subfolder="local_mapping")
unet = UNet2DConditionModel.from_pretrained(gm.config.pretrained_model_name_or_path, subfolder="unet")
set_elite_processors(unet, gm, lm)
feats = [torch.randn(1, 257, 32) for _ in range(5)]
local = lm(feats, torch.ones(1, 1, 8, 8))
ctx = AttentionContext(local=[LocalTokens(local.tokens, 4, local.keep, 0.8)])
out = unet(torch.randn(1, 4, 32, 32), 10, torch.randn(1, 77, 32), cross_attention_kwargs=ctx.as_kwargs()).sample
assert torch.isfinite(out).all() and gm(feats).shape == (1, 5, 32)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert _weights_equal(GlobalMapping.from_pretrained(tmp_path / "encoders", subfolder="global_mapping"), stage1)


def test_config_errors_name_the_key(tmp_path):
    from training.global_mapping import GlobalMappingConfig
    from training.local_mapping import LocalMappingConfig

    with pytest.raises(ConfigError, match="global_mapping_path is required"):
        load_config(LocalMappingConfig, REPO / "configs/train/local_mapping.yaml", ["global_mapping_path="])
    with pytest.raises(ConfigError, match="learning_rat"):
        load_config(GlobalMappingConfig, REPO / "configs/train/global_mapping.yaml", ["learning_rat=1"])
    with pytest.raises(ConfigError, match="lacks the placeholder"):
        load_config(GlobalMappingConfig, None, ["validation_prompts=a photo of a dog"])
    cfg = load_config(
        GlobalMappingConfig, REPO / "configs/train/global_mapping.yaml", ["scale_lr=false", "data.resolution=64"]
    )
    assert cfg.learning_rate == 1e-6 and cfg.word_l1_weight == 0.01 and cfg.data.resolution == 64 and not cfg.scale_lr
    local = load_config(LocalMappingConfig, REPO / "configs/train/local_mapping.yaml")
    assert local.learning_rate == 1e-5 and local.local_l1_weight == 1e-4 and local.weight_loss_by_valid_region
