"""The shared training loop on a toy task: steps, checkpoints, exact resume, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from toy_trainer import ToyConfig, ToyRegressor, ToyTask

from encoders.common.config import ConfigError
from training.checkpoints import list_checkpoints
from training.loop import run_training

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _config(tmp_path, name, **kw):
    base = dict(
        output_dir=str(tmp_path / name),
        max_steps=6,
        train_batch_size=4,
        learning_rate=0.05,
        checkpointing_steps=3,
        report_to="none",
        logging_steps=1,
    )
    base.update(kw)
    return ToyConfig(**base)


def test_loop_trains_checkpoints_and_exports(tmp_path):
    task = ToyTask(_config(tmp_path, "run", report_to="tensorboard", max_steps=6))
    export = run_training(task)
    assert len(task.losses) == 6
    learned = task.model.linear.weight.detach().squeeze(0)
    moved = (learned - task.true_w).abs() < (task.initial_weight - task.true_w).abs()
    assert moved.all(), (task.initial_weight, learned)  # every weight moved towards the true one
    ckpts = list_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == ["checkpoint-3", "checkpoint-6"]
    assert (ckpts[-1] / "toy" / "config.json").is_file()
    assert list((ckpts[-1] / "toy").glob("*.safetensors"))
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["global_step"] == 6
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    reloaded = ToyRegressor.from_pretrained(export, subfolder="toy")
    assert torch.equal(reloaded.linear.weight, task.model.linear.weight)
    card = (export / "README.md").read_text()
    assert "`toy/`" in card and "ToyRegressor" in card


def test_resume_matches_uninterrupted_run(tmp_path):
    full = ToyTask(_config(tmp_path, "full"))
    run_training(full)

    first = ToyTask(_config(tmp_path, "split", max_steps=3))
    run_training(first)
    second = ToyTask(_config(tmp_path, "split", resume_from_checkpoint="latest"))
    run_training(second)

    assert first.losses + second.losses == pytest.approx(full.losses, rel=0, abs=0)
    assert torch.equal(second.model.linear.weight, full.model.linear.weight)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    task = ToyTask(_config(tmp_path, "acc", gradient_accumulation_steps=2, max_steps=3, checkpointing_steps=0))
    run_training(task)
    assert len(task.losses) == 6  # 3 optimizer steps x 2 micro-batches
    assert [c.name for c in list_checkpoints(tmp_path / "acc")] == ["checkpoint-3"]


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    task = ToyTask(_config(tmp_path, "fresh", max_steps=2, resume_from_checkpoint="latest"))
    run_training(task)
    assert len(task.losses) == 2


def test_checkpoint_limit_keeps_newest(tmp_path):
    task = ToyTask(_config(tmp_path, "limit", checkpointing_steps=1, checkpoints_total_limit=2))
    run_training(task)
    assert [c.name for c in list_checkpoints(tmp_path / "limit")] == ["checkpoint-5", "checkpoint-6"]
    assert not [p for p in (tmp_path / "limit").iterdir() if p.name.endswith(".tmp")]


def _launch(tmp_path, extra_launch, args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *extra_launch,
        str(Path(__file__).parent / "toy_trainer.py"),
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_process_deepspeed_zero2_resumes_exactly(tmp_path):
    deepspeed = [
        "--use_deepspeed",
        "--zero_stage",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--gradient_clipping",
        "1.0",
    ]
    common = ["checkpointing_steps=2", "report_to=none", "train_batch_size=4", "learning_rate=0.05"]
    _launch(tmp_path, deepspeed, [f"output_dir={tmp_path / 'full'}", "max_steps=4", *common])
    _launch(tmp_path, deepspeed, [f"output_dir={tmp_path / 'split'}", "max_steps=2", *common])
    first = {r: json.loads((tmp_path / "split" / f"losses-rank{r}.json").read_text()) for r in (0, 1)}
    _launch(
        tmp_path,
        deepspeed,
        [f"output_dir={tmp_path / 'split'}", "max_steps=4", "resume_from_checkpoint=latest", *common],
    )
    for rank in (0, 1):
        full = json.loads((tmp_path / "full" / f"losses-rank{rank}.json").read_text())
        second = json.loads((tmp_path / "split" / f"losses-rank{rank}.json").read_text())
        assert len(full) == 4 and all(map(math.isfinite, full))
        assert first[rank] + second == full
    assert (tmp_path / "split" / "checkpoint-4" / "pytorch_model").is_dir()  # DeepSpeed's own states
    a = ToyRegressor.from_pretrained(tmp_path / "full" / "encoders", subfolder="toy")
    b = ToyRegressor.from_pretrained(tmp_path / "split" / "checkpoint-4", subfolder="toy")
    assert torch.equal(a.linear.weight, b.linear.weight)


def test_model_card_keeps_each_trainers_notes(tmp_path):
    from training.export import write_model_card

    cfg = ToyConfig(output_dir=str(tmp_path))
    write_model_card(tmp_path, cfg, "## global\nglobal notes", section="global_mapping")
    write_model_card(tmp_path, cfg, "## location\nmlp notes", section="location_mlp")
    write_model_card(tmp_path, cfg, "## global\nnewer global notes", section="global_mapping")
    card = (tmp_path / "README.md").read_text()
    assert "mlp notes" in card and "newer global notes" in card
    assert card.count("global notes") == 1 and card.count("## global") == 1  # replaced, not appended


class _TrajectoryTask(ToyTask):
    """Records the weight each step starts from (the previous step's result)."""

    def training_step(self, models, batch, generator):
        self.__dict__.setdefault("seen", []).append(models["toy"].linear.weight.detach().clone().squeeze(0))
        return super().training_step(models, batch, generator)


def test_use_ema_exports_the_average_and_resumes_it(tmp_path):
    ema = dict(use_ema=True, ema_decay=0.9)
    full = _TrajectoryTask(_config(tmp_path, "full", **ema))
    export = run_training(full)
    last = full.model.linear.weight.detach().squeeze(0)  # the trained weights are back after the export
    averaged = ToyRegressor.from_pretrained(export, subfolder="toy").linear.weight.detach().squeeze(0)
    trajectory = torch.stack([*full.seen[1:], last])  # the weights after each of the 6 steps
    assert not torch.allclose(averaged, last)
    assert (averaged >= trajectory.min(0).values - 1e-6).all() and (averaged <= trajectory.max(0).values + 1e-6).all()
    assert (list_checkpoints(tmp_path / "full")[-1] / "ema" / "toy.safetensors").is_file()

    run_training(ToyTask(_config(tmp_path, "split", max_steps=3, **ema)))
    export_split = run_training(ToyTask(_config(tmp_path, "split", resume_from_checkpoint="latest", **ema)))
    resumed = ToyRegressor.from_pretrained(export_split, subfolder="toy").linear.weight.detach().squeeze(0)
    assert torch.allclose(resumed, averaged, rtol=0, atol=1e-6)


def test_use_ema_turned_on_when_resuming_starts_from_the_checkpoint(tmp_path):
    run_training(ToyTask(_config(tmp_path, "run", max_steps=3)))
    resumed = ToyTask(
        _config(tmp_path, "run", resume_from_checkpoint="latest", use_ema=True, resume_overrides=["use_ema"])
    )
    export = run_training(resumed)
    assert (export / "toy").is_dir() and len(resumed.losses) == 3


def test_ema_decay_must_be_a_fraction(tmp_path):
    with pytest.raises(ConfigError, match="ema_decay"):
        _config(tmp_path, "run", use_ema=True, ema_decay=1.0)


def test_resume_accepts_a_checkpoint_from_before_a_new_setting(tmp_path):
    """A key added to the trainer after a checkpoint was written counts as its default there: left at the
    default it resumes; set otherwise it is a changed setting like any other."""
    run_training(ToyTask(_config(tmp_path, "run", max_steps=3)))
    state_file = list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("use_ema", "ema_decay"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="use_ema"):
        run_training(ToyTask(_config(tmp_path, "run", resume_from_checkpoint="latest", use_ema=True)))
    resumed = ToyTask(_config(tmp_path, "run", resume_from_checkpoint="latest"))
    run_training(resumed)
    assert len(resumed.losses) == 3
