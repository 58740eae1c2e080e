"""Experiment trackers: any accelerate tracker by name through `report_to`, validation sheets logged
as images to every tracker that takes them (TensorBoard read back from its event file)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from encoders.common.config import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from toy_trainer import ToyConfig, ToyTask  # noqa: E402


class _SheetTask(ToyTask):
    def validation_images(self, models, step):
        return [Image.new("RGB", (8, 8), (step * 40 % 255, 0, 0)), Image.new("RGB", (8, 8), (0, 255, 0))]


def test_report_to_names_are_checked():
    assert ToyConfig(report_to="tensorboard, wandb").report_to == "tensorboard,wandb"
    with pytest.raises(ConfigError, match="unknown tracker tensorbord"):
        ToyConfig(report_to="tensorbord")
    with pytest.raises(ConfigError, match="none with others"):
        ToyConfig(report_to="none,wandb")


def test_validation_sheets_reach_tensorboard(tmp_path, fresh_accelerate_state):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.loop import run_training

    run_training(
        _SheetTask(
            ToyConfig(
                output_dir=str(tmp_path),
                max_steps=2,
                validation_steps=1,
                train_batch_size=4,
                report_to="tensorboard",
                logging_steps=1,
            )
        )
    )
    steps = {}
    for f in tmp_path.glob("logs/**/events.out.tfevents*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        if "validation" in acc.Tags()["images"]:
            steps.update({e.step: (e.width, e.height) for e in acc.Images("validation")})
    assert sorted(steps) == [1, 2]
    assert sorted((tmp_path / "validation").glob("*.png"))  # the same sheets on disk


def test_a_tracker_without_images_is_skipped_and_a_failing_one_does_not_stop_training(caplog):
    from training.loop import log_validation_sheet

    class Scalars:
        name = "mlflow_like"

    class Images:
        name = "wandb_like"

        def __init__(self):
            self.got = None

        def log_images(self, values, step=None):
            self.got = (list(values), step)

    class Broken(Images):
        name = "broken"

        def log_images(self, values, step=None):
            raise RuntimeError("server down")

    ok = Images()
    sent = log_validation_sheet([Scalars(), ok, Broken()], Image.new("RGB", (4, 4)), 7)
    assert sent == ["wandb_like"] and ok.got == (["validation"], 7)
    assert "server down" in caplog.text
