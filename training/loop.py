"""One training loop for every trainer in the project (ELITE stages, location MLP, fine-tunes).

A trainer describes only what varies — its models, data, loss, validation pictures and export — as
a `TrainingTask`; `run_training(task)` does the rest the same way for all of them:

- `Accelerator` set-up from `accelerate launch` (1 process, DDP, DeepSpeed ZeRO-2, multi-node);
  the gloo backend when there is no GPU; bf16/fp16 autocast (`mixed_precision` unset by default, so
  the launcher's `--mixed_precision` or accelerate config decides); gradient accumulation and
  clipping; AdamW + a diffusers LR schedule (optionally scaled by batch x accumulation x processes).
- Frozen models stay outside `accelerator.prepare` (no DDP wrapping, no ZeRO partitioning): the
  task loads them in `setup`. The trainable models are gathered in one `TrainableBundle` whose
  `forward` runs the task's `training_step`, so DDP/DeepSpeed see exactly one forward per backward.
- `checkpoint-N/` every `checkpointing_steps` (`training.checkpoints`): models, optimizer, scheduler,
  RNG, each rank's noise generator and data position. `resume_from_checkpoint=latest|PATH` restores
  all of it; a loader with `state_dict()`/`load_state_dict()` (all the project's loaders) restarts at
  its recorded position without reading what came before, so a resumed run continues with the same
  batches, noise and next loss as an uninterrupted one, at the same cost at step 10 and 150,000.
  Settings that change the training (learning rate, data, batch...) must match the checkpoint's,
  unless named in `resume_overrides`.
- Preemption: SIGUSR1 or SIGTERM (SLURM's warning before a time limit, a requeue, `kill`) makes every
  rank finish its current optimizer step, write a complete checkpoint and `preempted.json`, and exit
  with status 75 (`EXIT_PREEMPTED`); `resume_from_checkpoint=latest` continues there.
- TensorBoard logging through accelerate's trackers, a tqdm progress bar (main process), optional
  validation images every `validation_steps`, the resolved config saved as `<output_dir>/config.yaml`.
  Only the main process logs at INFO; the others log errors only (no N-times repeated lines).
- At the end: `task.export(...)` into the encoders folder, a model card, an optional `push_to_hub`
  (`training.export`).

A trainer module then reads like::

    class MyTask(TrainingTask):
        name = "location_mlp"
        def setup(self, accelerator, weight_dtype): ...            # frozen models, trainable models
        def trainable_models(self): return {"location_mlp": self.mlp}
        def train_dataloader(self): return make_loader(self.config)   # an iterable of dict batches
        def training_step(self, models, batch, generator): return loss, {"iou": iou}
        def export(self, models, export_dir): return [export_model(models["location_mlp"], export_dir, "location_mlp")]

    def main(argv=None):
        run_training(MyTask(parse_config_cli(MyConfig, argv, prog="training.location_mlp")))

Rules for tasks: draw all training randomness (noise, timesteps, dropout-like choices) from the
`generator` passed to `training_step`, never from torch's global RNG, so resume is exact; give the
data stream its own seeded RNGs. A trainable module may also be referenced from a frozen model
(e.g. K/V projections inside attention processors of the frozen UNet): install such references
after freezing and casting the frozen model, so they stay trainable and in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from encoders.common.config import ConfigError, config_defaults, config_to_dict, save_config
from encoders.common.device import mixed_precision_dtype
from encoders.common.files import (
    FolderLockedError,
    OutputPathError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_writable_folder,
    describe_write_error,
    folder_lock,
)
from encoders.common.shards import ShardSpecError

from .checkpoints import Checkpointer, read_trainer_state, resolve_checkpoint
from .common_config import TrainConfig
from .ema import ModelAverages
from .export import push_folder_to_hub, write_model_card

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on a signal, checkpoint written, run again to continue
PREEMPTED_FILE = "preempted.json"
RUN_LOCK_FILE = ".lock-training"  # held by the main process while a run uses output_dir
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
# Keys that may differ between a checkpoint and the run resuming it: they do not change what is trained.
RESUME_FREE_KEYS = {
    "max_steps",
    "resume_from_checkpoint",
    "resume_overrides",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "logging_steps",
    "report_to",
    "tracker_project_name",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "license",
    "export_dir",
    "output_dir",
}


class TrainingTask(ABC):
    """What a trainer varies. Subclass it and implement the abstract methods (see module docstring)."""

    name: str = "train"

    def __init__(self, config: TrainConfig):
        self.config = config

    @abstractmethod
    def setup(self, accelerator, weight_dtype: torch.dtype) -> None:
        """Load frozen models (on `accelerator.device`, in `weight_dtype`) and build trainable ones (fp32)."""

    @abstractmethod
    def trainable_models(self) -> dict[str, nn.Module]:
        """Name -> trainable module; each is saved with `save_pretrained` into `checkpoint-N/<name>/`."""

    @abstractmethod
    def train_dataloader(self) -> Iterable[Mapping[str, Any]]:
        """An iterable of dict batches for this process (already split by node/worker). Restarted when exhausted.

        When it has `state_dict()` / `load_state_dict(state)` (JSON-able), checkpoints record its
        position and a resumed run restarts it there directly; otherwise the loop replays batches.
        """

    @abstractmethod
    def training_step(
        self, models: Mapping[str, nn.Module], batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss for one micro-batch and extra scalars to log. Runs inside autocast."""

    def validation_images(self, models: Mapping[str, nn.Module], step: int) -> list | None:
        """Optional PIL images rendered every `validation_steps` on the main process."""
        return None

    @abstractmethod
    def export(self, models: Mapping[str, nn.Module], export_dir: Path) -> list[str]:
        """Write the final models into `export_dir` (e.g. `global_mapping/`); return the subfolders written."""

    def model_card_notes(self) -> str:
        """Extra markdown for the exported folder's model card (what was trained, how to use it)."""
        return ""

    def model_card(self) -> str | None:
        """The whole model card, for exports that are not an encoders folder (e.g. a fine-tune's
        embedding); None (default) writes the encoders card with `model_card_notes()`."""
        return None


class TrainableBundle(nn.Module):
    """All trainable modules of a task, so accelerate prepares a single model; forward = task step."""

    def __init__(self, models: Mapping[str, nn.Module], task: TrainingTask):
        super().__init__()
        self.models = nn.ModuleDict(dict(models))
        object.__setattr__(self, "_task", task)  # not a submodule: frozen models stay outside

    def forward(self, batch, generator):
        return self._task.training_step(self.models, batch, generator)


class TrainingPreempted(SystemExit):
    """Raised (as exit status 75) after a stop signal, once the checkpoint is written."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signal_name = step, signal_name


class StopSignals:
    """While active, SIGUSR1 / SIGTERM only set a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, accelerator) -> bool:
        """True on every rank as soon as one rank received a stop signal (one tiny all-reduce per step)."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _make_accelerator(config: TrainConfig):

    precision = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision == "fp16" and not torch.cuda.is_available():  # checked before any process state exists
        raise ConfigError("mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    handlers = []
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if distributed and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # NCCL needs GPUs
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,  # None: accelerate launch / its config file decides
        log_with=None if config.report_to == "none" else config.report_to.split(","),
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        kwargs_handlers=handlers,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # set by a config file
        raise ConfigError("mixed_precision=fp16 needs a GPU; on the CPU use bf16 or no")
    return accelerator


def _quiet_other_ranks(accelerator) -> None:
    """INFO logs from the main process only; the other ranks report errors (no N x repeated lines)."""
    level = logging.INFO if accelerator.is_local_main_process else logging.ERROR
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    if not accelerator.is_local_main_process:
        for name in ("transformers", "diffusers", "DeepSpeed", "deepspeed", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _fill_deepspeed_auto(accelerator, config: TrainConfig) -> None:
    """We prepare no dataloader (WebDataset splits by node itself), so give DeepSpeed the sizes it infers from one."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.train_batch_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = (
            config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        )
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.max_grad_norm
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    if zero_stage == 3:
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions parameters, but frozen models here are shared across ranks "
            "unpartitioned and trainable modules are read whole; use ZeRO stage 0-2 (configs/deepspeed/)."
        )


def _flat(prefix: str, value) -> dict:
    """A nested config dict as {dotted key: value}."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}{k}.", v))
        return out
    return {prefix[:-1]: value}


def log_validation_sheet(trackers, sheet, step: int) -> list[str]:
    """The validation sheet to every tracker that takes images (accelerate's `log_images`: tensorboard,
    wandb, aim, clearml, swanlab, ...); returns the names it went to. A tracker that fails is logged, not fatal."""
    sent = []
    for tracker in trackers:
        if not callable(getattr(tracker, "log_images", None)):
            continue
        if tracker.name == "tensorboard":  # SummaryWriter.add_images wants one array and its layout
            images, kwargs = np.asarray(sheet)[None], {"dataformats": "NHWC"}
        else:
            images, kwargs = [sheet], {}
        try:
            tracker.log_images({"validation": images}, step=step, **kwargs)
            sent.append(tracker.name)
        except Exception as err:  # noqa: BLE001 - a tracker's own failure must not end a training run
            logger.warning("could not log validation images to %s: %s", tracker.name, err)
    return sent


def _flat_for_tracker(cfg: TrainConfig) -> dict:
    """The config as trackers take it: dotted keys, scalar values (lists as their text)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flat("", config_to_dict(cfg)).items()
    }


def changed_settings(
    saved: Mapping, current: Mapping, free: Iterable[str] = (), defaults: Mapping | None = None
) -> dict[str, tuple]:
    """Keys (dotted) whose value differs between a checkpoint's config and this run's, except free ones. A key
    the checkpoint does not hold (added to the trainer after it was written) counts as its value in `defaults`."""
    a, b = _flat("", dict(saved)), _flat("", dict(current))
    known = _flat("", dict(defaults or {}))
    a = {**{k: v for k, v in known.items() if k not in a}, **a}
    free = set(RESUME_FREE_KEYS) | set(free)
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in free and not k.startswith(("validation_", "num_validation"))
    }


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _grid(images: list, columns: int | None = None):

    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return sheet


class _DataStream:
    """The task's batches, epoch after epoch, with the position of the last batch handed out."""

    def __init__(self, task: TrainingTask):
        self.task = task
        self.loader = task.train_dataloader()
        self.stateful = callable(getattr(self.loader, "state_dict", None)) and callable(
            getattr(self.loader, "load_state_dict", None)
        )
        self._iter: Iterator | None = None

    def restore(self, state: dict | None, batches_before: int) -> None:
        """Continue from a checkpoint's data position (stateful loaders) or by replaying batches."""
        if self.stateful and state is not None:
            self.loader.load_state_dict(state)
            return
        if batches_before:
            logger.warning(
                "%s: its loader keeps no position; replaying %d batches to resume", self.task.name, batches_before
            )
            for _ in range(batches_before):
                next(self)

    def state(self) -> dict | None:
        return self.loader.state_dict() if self.stateful else None

    def __next__(self):
        for attempt in range(2):
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.loader = self.task.train_dataloader()  # a new epoch (our loaders count their epochs)
                if attempt:
                    break
        raise RuntimeError(
            f"{self.task.name}: the training data produced no batch (train_shards={self.task.config.train_shards!r}); "
            "check the path/pattern and that the shards hold samples"
        )


class _Run:
    """One training run of a task: set-up, resume, the step loop, export (see the module docstring)."""

    def __init__(self, task: TrainingTask):
        self.task = task
        config = self.config = task.config
        self.accelerator = acc = _make_accelerator(config)
        _quiet_other_ranks(acc)
        self.output_dir = Path(config.output_dir)
        self._lock = None
        if acc.is_main_process:
            check_writable_folder(self.output_dir, "output_dir")
            # one run per output_dir: a second would mix its checkpoints, config and export with ours
            self._lock = folder_lock(self.output_dir / RUN_LOCK_FILE, f"another training run in {self.output_dir}")
            self._lock.__enter__()
            (self.output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        try:
            self._setup(task, config, acc)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the output_dir lock (also done by the OS when the process ends)."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _setup(self, task: TrainingTask, config: TrainConfig, acc) -> None:
        set_seed(config.seed)  # same trainable init on every rank

        self.weight_dtype = mixed_precision_dtype(acc.mixed_precision)
        task.setup(acc, self.weight_dtype)
        models = task.trainable_models()
        for name, module in models.items():
            if not hasattr(module, "save_pretrained"):
                raise TypeError(
                    f"{task.name}: trainable model {name!r} needs save_pretrained (use diffusers ModelMixin)"
                )
        bundle = TrainableBundle(models, task)
        self.params = [p for p in bundle.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{task.name}: no trainable parameters")

        self.lr = config.learning_rate
        if config.scale_lr:
            self.lr *= config.train_batch_size * config.gradient_accumulation_steps * acc.num_processes
        # the fused kernel: ~9x faster than the per-tensor loop on CPU for ELITE's 11-48M trainable parameters
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in self.params)
        optimizer = torch.optim.AdamW(
            self.params,
            lr=self.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
            fused=fused or None,
        )
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * acc.num_processes,
            num_training_steps=config.max_steps * acc.num_processes,
        )
        _fill_deepspeed_auto(acc, config)
        self.bundle, self.optimizer, self.lr_scheduler = acc.prepare(bundle, optimizer, lr_scheduler)
        self.is_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if config.use_ema and self.is_deepspeed:
            raise ConfigError(
                f"{task.name}: use_ema=true is not supported under DeepSpeed (its ZeRO stages partition the weights "
                "the average would copy); train without DeepSpeed or with use_ema=false"
            )
        self.averages = ModelAverages(self.models(), config.ema_decay) if config.use_ema else None
        self.generator = torch.Generator(device=acc.device).manual_seed(config.seed + acc.process_index)
        acc.register_save_state_pre_hook(self._save_models_hook)
        acc.register_load_state_pre_hook(self._load_models_hook)
        self.checkpoints = Checkpointer(
            acc, self.output_dir, task.name, config, self.generator, config.checkpoints_total_limit
        )
        if acc.is_main_process:
            save_config(config, self.output_dir / "config.yaml")

    # ---- models in checkpoints ---------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        return dict(self.accelerator.unwrap_model(self.bundle).models.items())

    def _save_models_hook(self, hook_models, weights, out_dir) -> None:
        if self.accelerator.is_main_process:
            for name, module in self.models().items():
                module.save_pretrained(os.path.join(out_dir, name), safe_serialization=True)
            if self.averages is not None:
                self.averages.save(out_dir, self.models())
        if not self.is_deepspeed:
            weights.clear()  # the save_pretrained folders replace accelerate's model.safetensors

    def _load_models_hook(self, hook_models, in_dir) -> None:
        if self.is_deepspeed:
            return  # DeepSpeed restores its own model states

        for name, module in self.models().items():
            files = sorted((Path(in_dir) / name).glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"checkpoint {in_dir} has no {name}/*.safetensors")
            state = {}
            for f in files:
                state.update(load_file(f))
            module.load_state_dict(state)
        if self.averages is not None and not self.averages.load(in_dir, self.models()):
            self.accelerator.print(f"{in_dir} holds no weight averages: use_ema starts them from its weights")
        hook_models.clear()

    # ---- resume --------------------------------------------------------------------------------
    def resume(self, stream: _DataStream) -> int:
        """Restore the checkpoint `resume_from_checkpoint` names; returns the step to continue from."""
        config, acc = self.config, self.accelerator
        path = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
        if path is None:
            if config.resume_from_checkpoint:
                acc.print(f"resume_from_checkpoint={config.resume_from_checkpoint}: no checkpoint yet, starting fresh")
            return 0
        saved = read_trainer_state(path).get("config", {})
        changed = changed_settings(
            saved, config_to_dict(config), free=config.resume_overrides, defaults=config_defaults(type(config))
        )
        if changed:
            lines = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changed.items())
            raise ConfigError(
                f"resuming {path} with other settings than it was trained with ({lines}). Resume with the same "
                f"settings, or name the keys to change: resume_overrides={','.join(changed)}"
            )
        acc.print(f"resuming from {path}")
        resumed = self.checkpoints.resume(path)
        if resumed.step > config.max_steps:  # exporting the checkpoint's model as if it were max_steps' would mislead
            raise ConfigError(
                f"{path} is at step {resumed.step}, past max_steps={config.max_steps}: nothing would be trained and "
                f"the step-{resumed.step} model exported as this run's. Set max_steps >= {resumed.step}, resume from "
                "an "
                "earlier checkpoint-N, or use another output_dir"
            )
        overridden = set(config.resume_overrides) & {
            "learning_rate",
            "scale_lr",
            "train_batch_size",
            "gradient_accumulation_steps",
        }
        if overridden:
            self._set_learning_rate(self.lr)
        stream.restore(resumed.data_state, resumed.step * config.gradient_accumulation_steps)
        return resumed.step

    def _set_learning_rate(self, lr: float) -> None:
        """A learning rate named in `resume_overrides` replaces the one the optimizer state brought back."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas] if hasattr(scheduler, "lr_lambdas") else None
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr * (factors[i] if factors else 1.0)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        task, config, acc = self.task, self.config, self.accelerator
        stream = _DataStream(task)
        global_step = self.resume(stream)
        if acc.is_main_process and config.report_to != "none":
            acc.init_trackers(config.tracker_project_name or task.name, config=_flat_for_tracker(config))
        total_batch = config.train_batch_size * config.gradient_accumulation_steps * acc.num_processes
        acc.print(
            f"[{task.name}] {acc.num_processes} process(es) on {acc.device} ({acc.distributed_type.value}, "
            f"{acc.mixed_precision} precision), batch {config.train_batch_size} x accumulation "
            f"{config.gradient_accumulation_steps} x processes = {total_batch}, lr {self.lr:g}, "
            f"{sum(p.numel() for p in self.params):,} trainable parameters, steps {global_step}->{config.max_steps}"
        )
        progress = tqdm(
            total=config.max_steps,
            initial=global_step,
            desc=task.name,
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        sums: dict[str, float] = {}
        count = 0
        step_start = time.perf_counter()
        last_saved = global_step
        first_step = global_step + 1
        with StopSignals() as stop:
            while global_step < config.max_steps:
                batch = _to_device(next(stream), acc.device)
                with acc.accumulate(self.bundle):
                    with acc.autocast():
                        loss, logs = self.bundle(batch, self.generator)
                    if not torch.isfinite(loss.detach()):
                        raise FloatingPointError(f"{task.name}: loss became {loss.item()} at step {global_step + 1}")
                    acc.backward(loss)
                    if acc.sync_gradients and config.max_grad_norm > 0 and not self.is_deepspeed:
                        acc.clip_grad_norm_(self.params, config.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for k, v in {"loss": loss, **logs}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float().item() if isinstance(v, torch.Tensor) else v)
                count += 1
                if not acc.sync_gradients:
                    continue

                global_step += 1
                if self.averages is not None:
                    self.averages.step(self.models())
                progress.update(1)
                if global_step == first_step:
                    started = psutil.Process(os.getpid()).create_time()
                    acc.print(
                        f"[{task.name}] {'resumed at' if first_step > 1 else 'started'} step {first_step - 1}: "
                        f"first step done {time.time() - started:.1f} s after the process started"
                    )
                now = time.perf_counter()
                means = {k: v / count for k, v in sums.items()}
                means["lr"] = self.lr_scheduler.get_last_lr()[0]
                means["step_time_s"] = now - step_start
                step_start = now
                progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
                if global_step % config.logging_steps == 0 or global_step == config.max_steps:
                    reduced = acc.reduce(
                        torch.tensor([means[k] for k in sorted(means)], device=acc.device), reduction="mean"
                    )
                    if config.report_to != "none":
                        acc.log(dict(zip(sorted(means), reduced.tolist())), step=global_step)
                sums, count = {}, 0

                if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                    self.checkpoints.save(global_step, stream.state())
                    last_saved = global_step
                if config.validation_steps and global_step % config.validation_steps == 0:
                    self._validate(global_step)
                if stop.agreed(acc) and global_step < config.max_steps:
                    progress.close()
                    self._stop(global_step, stream, last_saved, stop.received or "a signal on another rank")
        progress.close()
        if last_saved != global_step:
            self.checkpoints.save(global_step, stream.state())

    def _stop(self, step: int, stream: _DataStream, last_saved: int, signal_name: str) -> None:
        """Checkpoint (unless this step has one), mark the run preempted, exit with `EXIT_PREEMPTED`."""
        acc = self.accelerator
        if last_saved != step:
            self.checkpoints.save(step, stream.state())
        if acc.is_main_process:
            atomic_write_json(
                self.output_dir / PREEMPTED_FILE,
                {
                    "step": step,
                    "signal": signal_name,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "resume": "run the same command with resume_from_checkpoint=latest",
                },
            )
            acc.print(
                f"[{self.task.name}] {signal_name}: stopped after step {step} with a checkpoint; "
                f"exit status {EXIT_PREEMPTED} (resume_from_checkpoint=latest continues)"
            )
            marker = os.environ.get("ZSP_PREEMPTED_MARKER")  # set by `python -m training.launch`
            if marker:
                atomic_write_text(Path(marker), f"{step}\n")
        acc.wait_for_everyone()
        acc.end_training()
        raise TrainingPreempted(step, signal_name)

    def _validate(self, step: int) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            acc.wait_for_everyone()
            return
        models = self.models()
        was_training = {n: m.training for n, m in models.items()}
        for m in models.values():
            m.eval()
        with torch.no_grad(), self._averaged():
            images = self.task.validation_images(models, step)
        for n, m in models.items():
            m.train(was_training[n])
        if images:
            sheet = _grid(images)
            atomic_write(
                self.output_dir / "validation" / f"step-{step:06d}.png", lambda tmp: sheet.save(tmp, format="PNG")
            )
            log_validation_sheet(acc.trackers, sheet, step)
        acc.wait_for_everyone()

    def _averaged(self):
        """With use_ema, the models hold their averaged weights inside the block (validation, export)."""
        return self.averages.applied(self.models()) if self.averages is not None else contextlib.nullcontext()

    # ---- export ---------------------------------------------------------------------------------
    def export(self) -> Path:
        task, config, acc = self.task, self.config, self.accelerator
        export_dir = Path(config.resolved_export_dir)
        if acc.is_main_process:
            export_dir.mkdir(parents=True, exist_ok=True)
            with self._averaged():
                written = task.export(self.models(), export_dir)
            save_config(config, export_dir / f"training_config_{task.name}.yaml")
            card = task.model_card()
            if card is None:
                write_model_card(export_dir, config, task.model_card_notes(), section=task.name)
            else:
                atomic_write_text(export_dir / "README.md", card)
            acc.print(f"[{task.name}] exported {', '.join(written)} to {export_dir}")
            if config.push_to_hub:
                push_folder_to_hub(export_dir, config.hub_model_id, private=config.hub_private)
                acc.print(f"[{task.name}] pushed {export_dir} to https://huggingface.co/{config.hub_model_id}")
        acc.wait_for_everyone()
        acc.end_training()
        return export_dir


def run_from_command_line(task: TrainingTask) -> Path:
    """`run_training` for a trainer's `main`: a ConfigError found while setting up or resuming (a base
    model of an unsupported family, settings that differ from the checkpoint's) is one error line and
    exit status 2, as errors in the settings themselves are, not a traceback."""
    try:
        return run_training(task)
    except (ConfigError, OutputPathError, FolderLockedError, ShardSpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # a full disk while checkpointing or exporting: complete checkpoints are kept
        reason = describe_write_error(err)
        if reason is None:
            raise
        print(
            f"error: cannot write into {task.config.output_dir}: {reason} (complete checkpoints are kept; free "
            "space and resume with resume_from_checkpoint=latest)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def run_training(task: TrainingTask) -> Path:
    """Train `task` to `config.max_steps` (resuming if asked) and export it. Returns the export folder.

    On SIGUSR1 / SIGTERM it raises `TrainingPreempted` (a `SystemExit` with status 75) once the
    checkpoint is written.
    """
    run = _Run(task)
    try:
        run.train()
        return run.export()
    finally:
        run.release()
