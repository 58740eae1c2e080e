"""Exponential moving averages of a run's trainable models (`use_ema=true`), as diffusers' training scripts keep.

The averaging is diffusers' `EMAModel` (decay warming up as min(ema_decay, (1 + n) / (10 + n)) after n updates).
Checkpoints hold each average as `ema/<model>.safetensors`, keyed by parameter name, with the update count in
the file's metadata, so a resumed run continues the same average; the export writes the averaged weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import safe_open, save_file
from torch import nn

EMA_FOLDER = "ema"


class ModelAverages:
    """One `EMAModel` per trainable model of a run."""

    def __init__(self, models: Mapping[str, nn.Module], decay: float):
        from diffusers.training_utils import EMAModel

        self.averages = {name: EMAModel(model.parameters(), decay=decay) for name, model in models.items()}

    def step(self, models: Mapping[str, nn.Module]) -> None:
        """Fold the models' current weights into their averages (after each optimizer step)."""
        for name, average in self.averages.items():
            average.step(models[name].parameters())

    def save(self, checkpoint_dir: Path | str, models: Mapping[str, nn.Module]) -> None:
        folder = Path(checkpoint_dir) / EMA_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for name, average in self.averages.items():
            names = [n for n, _ in models[name].named_parameters()]
            tensors = {n: t.detach().contiguous() for n, t in zip(names, average.shadow_params, strict=True)}
            save_file(
                tensors,
                folder / f"{name}.safetensors",
                metadata={"optimization_step": str(average.optimization_step), "decay": str(average.decay)},
            )

    def load(self, checkpoint_dir: Path | str, models: Mapping[str, nn.Module]) -> bool:
        """Restore the averages a checkpoint holds; False when it holds none (a run that turned `use_ema` on
        when resuming: the averages then start from the restored weights)."""
        folder = Path(checkpoint_dir) / EMA_FOLDER
        if not folder.is_dir():
            for name, average in self.averages.items():
                average.shadow_params = [p.detach().clone() for p in models[name].parameters()]
                average.optimization_step = 0
            return False
        for name, average in self.averages.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {checkpoint_dir} has an {EMA_FOLDER}/ folder without {path.name}")
            with safe_open(path, framework="pt") as f:
                saved = {key: f.get_tensor(key) for key in f.keys()}
                updates = int(f.metadata()["optimization_step"])
            params = dict(models[name].named_parameters())
            if saved.keys() != params.keys():
                missing, extra = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
                raise ValueError(
                    f"{path}: its parameters do not match the model {name!r} (missing {missing[:3]}, unexpected "
                    f"{extra[:3]})"
                )
            average.shadow_params = [saved[n].to(p.device, p.dtype) for n, p in params.items()]
            average.optimization_step = updates
        return True

    @contextmanager
    def applied(self, models: Mapping[str, nn.Module]) -> Iterator[None]:
        """The models hold their averaged weights inside the block, their trained ones again after it."""
        for name, average in self.averages.items():
            average.store(models[name].parameters())
            average.copy_to(models[name].parameters())
        try:
            yield
        finally:
            for name, average in self.averages.items():
                average.restore(models[name].parameters())
