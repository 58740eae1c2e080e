"""Checkpoints of a training run: `checkpoint-N/` folders that a resumed run continues from exactly.

A checkpoint holds, besides accelerate's own states (optimizer, LR scheduler, RNG, DeepSpeed's
partitions), one `save_pretrained` folder per trainable model, each rank's noise generator
(`noise_generator_rank{r}.safetensors`), each rank's data position (`data_state_rank{r}.json`: where
its loader stands, so resuming costs the same at step 10 and at step 150,000) and
`trainer_state.json` (the step, the task, the resolved config). It is written under a temporary
name and renamed once every rank has written its part, so a folder named `checkpoint-N` is always
complete; `checkpoints_total_limit` keeps the newest ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from encoders.common.config import config_to_dict
from encoders.common.files import atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


def _generator_file(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"noise_generator_rank{rank}.safetensors"


def _data_state_file(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"data_state_rank{rank}.json"


def save_generator_state(generator: torch.Generator, folder: str | os.PathLike, rank: int) -> None:
    """Each rank keeps its own noise generator state (safetensors, no pickle)."""

    save_file({"rng_state": generator.get_state()}, str(_generator_file(folder, rank)))


def load_generator_state(generator: torch.Generator, folder: str | os.PathLike, rank: int) -> None:

    path = _generator_file(folder, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: was the checkpoint written by a run with as many processes?")
    generator.set_state(load_file(str(path))["rng_state"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete `checkpoint-N` folders of a run, oldest first (temporary ones are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(choice: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, or None. `latest` with no checkpoint yet starts fresh."""
    if not choice:
        return None
    if choice == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(choice)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={choice}: no {TRAINER_STATE} there; is it a checkpoint-N folder?"
        )
    return path


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


@dataclass
class Resumed:
    """What a checkpoint restores beyond accelerate's states: the step and this rank's data position."""

    path: Path
    step: int
    data_state: dict | None
    config: dict


class Checkpointer:
    """Writes and reads `checkpoint-N/` for one run (every rank calls `save` and `resume`)."""

    def __init__(
        self,
        accelerator,
        output_dir: str | os.PathLike,
        task_name: str,
        config: Any,
        generator: torch.Generator,
        total_limit: int | None = None,
    ):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.task_name = task_name
        self.config = config
        self.generator = generator
        self.total_limit = total_limit

    def save(self, step: int, data_state: dict | None = None) -> Path:
        """Write `checkpoint-{step}/` (all ranks take part); returns its path."""
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        save_generator_state(self.generator, tmp, acc.process_index)
        if data_state is not None:
            atomic_write_json(_data_state_file(tmp, acc.process_index), data_state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": step,
                "task": self.task_name,
                "num_processes": acc.num_processes,
                "config": config_to_dict(self.config),
            }
            atomic_write_json(tmp / TRAINER_STATE, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.total_limit:
                for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, path: Path) -> Resumed:
        """Load accelerate's states, this rank's noise generator and data position from `path`."""
        acc = self.accelerator
        state = read_trainer_state(path)
        recorded = state.get("num_processes")
        if recorded is not None and int(recorded) != acc.num_processes:
            raise ValueError(
                f"{path} was written by a run of {recorded} processes, this one has {acc.num_processes}: "
                "resume with as many processes (each rank's noise and data position are its own)"
            )
        acc.load_state(str(path))
        load_generator_state(self.generator, path, acc.process_index)
        data_file = _data_state_file(path, acc.process_index)
        data_state = json.loads(data_file.read_text()) if data_file.is_file() else None
        return Resumed(
            path=Path(path), step=int(state["global_step"]), data_state=data_state, config=state.get("config", {})
        )
