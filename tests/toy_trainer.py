"""A toy trainer on the shared loop, importable by tests and runnable with `accelerate launch`."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from encoders.common.config import parse_config_cli
from training.common_config import TrainConfig
from training.export import export_model
from training.loop import TrainingTask, run_training


class ToyRegressor(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int = 4):
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x):
        return self.linear(x)


@dataclass
class ToyConfig(TrainConfig):
    dim: int = 4
    step_sleep: float = 0.0  # seconds per step, so a test can signal a run in the middle


class ToyTask(TrainingTask):
    name = "toy"

    def setup(self, accelerator, weight_dtype):
        self.rank = accelerator.process_index
        self.weight_dtype = weight_dtype
        self.model = ToyRegressor(self.config.dim)
        self.initial_weight = self.model.linear.weight.detach().clone().squeeze(0)
        self.true_w = torch.arange(1, self.config.dim + 1, dtype=torch.float32)
        self.losses = []

    def trainable_models(self):
        return {"toy": self.model}

    def train_dataloader(self):
        rng = torch.Generator().manual_seed(1234)  # its own RNG: data order is independent of training noise
        for _ in range(7):  # a short epoch, so the loop must restart the stream
            x = torch.randn(self.config.train_batch_size, self.config.dim, generator=rng)
            yield {"x": x, "y": x @ self.true_w}

    def training_step(self, models, batch, generator):
        noise = 0.01 * torch.randn(batch["y"].shape, generator=generator)
        pred = models["toy"](batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"] - noise) ** 2).mean()
        self.losses.append(loss.item())
        if self.config.step_sleep:
            time.sleep(self.config.step_sleep)
            Path(self.config.output_dir, f"progress-rank{self.rank}.txt").write_text(str(len(self.losses)))
        return loss, {"abs_err": (pred - batch["y"]).abs().mean()}

    def export(self, models, export_dir):
        return [export_model(models["toy"], export_dir, "toy")]


def main(argv=None):
    task = ToyTask(parse_config_cli(ToyConfig, argv, prog="toy_trainer"))
    try:
        run_training(task)
    finally:  # also when a stop signal ends the run: the test compares the losses either way
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(task.config.output_dir, f"losses-rank{rank}.json"), "w") as f:
            json.dump(task.losses, f)
        with open(os.path.join(task.config.output_dir, f"dtype-rank{rank}.txt"), "w") as f:
            f.write(str(getattr(task, "weight_dtype", "")))


if __name__ == "__main__":
    main(sys.argv[1:])
