"""One training loop for every trainer in the project (ELITE stages, location MLP, fine-tunes).

A trainer describes only what varies — its models, data, loss, validation pictures and export — as
a `TrainingTask`; `run_training(task)` does the rest the same way for all of them:

- `Accelerator` set-up from `accelerate launch` (1 process, DDP, DeepSpeed ZeRO-2, multi-node);
  the gloo backend when there is no GPU; bf16/fp16 autocast; gradient accumulation and clipping;
  AdamW + a diffusers LR schedule (optionally scaled by batch x accumulation x processes).
- Frozen models stay outside `accelerator.prepare` (no DDP wrapping, no ZeRO partitioning): the
  task loads them in `setup`. The trainable models are gathered in one `TrainableBundle` whose
  `forward` runs the task's `training_step`, so DDP/DeepSpeed see exactly one forward per backward.
- `checkpoint-N/` every `checkpointing_steps` (written under a temporary name, renamed when
  complete): one `save_pretrained` folder per trainable model, the optimizer/scheduler/RNG states
  and each rank's noise generator, `trainer_state.json`. `resume_from_checkpoint=latest|PATH` restores
  all of it and fast-forwards the data stream, so a resumed run continues with the same batches,
  noise and next loss as an uninterrupted one.
- TensorBoard logging through accelerate's trackers, a tqdm progress bar, optional validation
  images every `validation_steps`, the resolved config saved as `<output_dir>/config.yaml`.
- At the end: `task.export(...)` into the encoders folder (atomically, per subfolder), a model
  card listing what the folder holds, and an optional `push_to_hub`.

A trainer module then reads like::

    class MyTask(TrainingTask):
        name = "location_mlp"
        def setup(self, accelerator, weight_dtype): ...            # frozen models, trainable models
        def trainable_models(self): return {"location_mlp": self.mlp}
        def train_dataloader(self): return make_loader(self.config)   # an iterable of dict batches
        def training_step(self, models, batch, generator): return loss, {"iou": iou}
        def export(self, models, export_dir): models["location_mlp"].save_pretrained(export_dir / "location_mlp")

    def main(argv=None):
        run_training(MyTask(parse_config_cli(MyConfig, argv, prog="training.location_mlp")))

Rules for tasks: draw all training randomness (noise, timesteps, dropout-like choices) from the
`generator` passed to `training_step`, never from torch's global RNG, so resume is exact; give the
data stream its own seeded RNGs. A trainable module may also be referenced from a frozen model
(e.g. K/V projections inside attention processors of the frozen UNet): install such references
after freezing and casting the frozen model, so they stay trainable and in fp32.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from encoders.run_config import config_to_dict, save_config

from .common_config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


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
        """An iterable of dict batches for this process (already split by node/worker). Restarted when exhausted."""

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


def _generator_file(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder) / f"noise_generator_rank{rank}.safetensors"


def save_generator_state(generator: torch.Generator, folder: str | os.PathLike, rank: int) -> None:
    """Each rank keeps its own noise generator state (safetensors, no pickle)."""
    from safetensors.torch import save_file

    save_file({"rng_state": generator.get_state()}, str(_generator_file(folder, rank)))


def load_generator_state(generator: torch.Generator, folder: str | os.PathLike, rank: int) -> None:
    from safetensors.torch import load_file

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


def resolve_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None. `latest` with no checkpoint yet starts fresh."""
    choice = config.resume_from_checkpoint
    if not choice:
        return None
    if choice == "latest":
        found = list_checkpoints(config.output_dir)
        return found[-1] if found else None
    path = Path(choice)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={choice}: no {TRAINER_STATE} there; is it a checkpoint-N folder?")
    return path


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    handlers = []
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if distributed and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # NCCL needs GPUs
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        kwargs_handlers=handlers,
    )


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


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _flat_for_tracker(cfg: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(cfg))
    return flat


def _forever(task: TrainingTask) -> Iterator[Mapping[str, Any]]:
    epoch = 0
    while True:
        produced = False
        for batch in task.train_dataloader():
            produced = True
            yield batch
        if not produced:
            raise RuntimeError(
                f"{task.name}: the training data produced no batch (train_shards={task.config.train_shards!r}); "
                "check the path/pattern and that the shards hold samples"
            )
        epoch += 1
        logger.info("data stream restarted (epoch %d)", epoch)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _grid(images: list, columns: int | None = None):
    from PIL import Image

    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (w * columns, h * rows), "white")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return sheet


_NOTES_BLOCK = re.compile(r"<!-- notes:(?P<name>[\w.-]+) -->\n(?P<body>.*?)\n<!-- /notes:(?P=name) -->", re.S)


def write_model_card(export_dir: Path, config: TrainConfig, notes: str = "", section: str = "train") -> Path:
    """(Re)write `README.md` of an encoders folder from the subfolders it holds and their configs.

    Several trainers export into one folder (global, local, location MLP): each one's `notes` are kept
    as their own section, so a later export replaces its own section and leaves the others in place.
    """
    export_dir = Path(export_dir)
    sections: dict[str, str] = {}
    old = export_dir / "README.md"
    if old.is_file():
        sections = {m["name"]: m["body"] for m in _NOTES_BLOCK.finditer(old.read_text())}
    sections[section] = notes.strip()
    notes_md = "\n\n".join(
        f"<!-- notes:{name} -->\n{body}\n<!-- /notes:{name} -->" for name, body in sorted(sections.items()) if body
    )
    parts = []
    for sub in sorted(p for p in export_dir.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        cfg = json.loads((sub / "config.json").read_text())
        size = sum(f.stat().st_size for f in sub.glob("*.safetensors"))
        parts.append(f"| `{sub.name}/` | {cfg.get('_class_name', '?')} | {size / 1e6:.2f} MB |")
    card = f"""---
library_name: diffusers
tags:
- zero-step-personalization
- elite
- stable-diffusion
base_model: {config.pretrained_model_name_or_path}
---

# Zero-step personalization encoders

Encoders that turn one photo of an object (and its mask) into a word and local features for
Stable Diffusion, with no per-concept optimization (ELITE; compositional inversion's location MLP).

- Base model: `{config.pretrained_model_name_or_path}`
- Image encoder: `{config.image_encoder_name_or_path}`

| subfolder | class | size |
|---|---|---|
{chr(10).join(parts)}

Each subfolder loads with `from_pretrained(path_or_repo, subfolder=...)`.

```bash
python -m inference generate --base {config.pretrained_model_name_or_path} --encoders PATH_OR_REPO \\
    --image dog.jpg --mask dog_mask.png --prompt "a photo of S* on the beach" --out out/
```

{notes_md}
"""
    path = export_dir / "README.md"
    tmp = export_dir / ".README.md.tmp"
    tmp.write_text(card)
    os.replace(tmp, path)
    return path


def push_folder_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the Hub repo if needed and upload `folder` (uses the user's saved token)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload encoders")
    return repo_id


def run_training(task: TrainingTask) -> Path:
    """Train `task` to `config.max_steps` (resuming if asked) and export it. Returns the export folder."""
    from accelerate.utils import DistributedType, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    config = task.config
    accelerator = _make_accelerator(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    set_seed(config.seed)  # same trainable init on every rank

    weight_dtype = _weight_dtype(config.mixed_precision)
    task.setup(accelerator, weight_dtype)
    models = task.trainable_models()
    for name, module in models.items():
        if not hasattr(module, "save_pretrained"):
            raise TypeError(f"{task.name}: trainable model {name!r} needs save_pretrained (use diffusers ModelMixin)")
    bundle = TrainableBundle(models, task)
    params = [p for p in bundle.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{task.name}: no trainable parameters")

    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    # the fused kernel: ~9x faster than the per-tensor loop on CPU for ELITE's 11-48M trainable parameters
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=fused or None,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    _fill_deepspeed_auto(accelerator, config)
    bundle, optimizer, lr_scheduler = accelerator.prepare(bundle, optimizer, lr_scheduler)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def unwrapped() -> dict[str, nn.Module]:
        return dict(accelerator.unwrap_model(bundle).models.items())

    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + accelerator.process_index)

    def save_models_hook(hook_models, weights, out_dir):
        if accelerator.is_main_process:
            for name, module in unwrapped().items():
                module.save_pretrained(os.path.join(out_dir, name), safe_serialization=True)
        if not is_deepspeed:
            weights.clear()  # the save_pretrained folders replace accelerate's model.safetensors

    def load_models_hook(hook_models, in_dir):
        if is_deepspeed:
            return  # DeepSpeed restores its own model states
        from safetensors.torch import load_file

        for name, module in unwrapped().items():
            folder = Path(in_dir) / name
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"checkpoint {in_dir} has no {name}/*.safetensors")
            state = {}
            for f in files:
                state.update(load_file(f))
            module.load_state_dict(state)
        hook_models.clear()

    accelerator.register_save_state_pre_hook(save_models_hook)
    accelerator.register_load_state_pre_hook(load_models_hook)

    global_step = 0
    resume_path = resolve_checkpoint(config)
    if config.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"resume_from_checkpoint={config.resume_from_checkpoint}: no checkpoint yet, starting fresh")
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        load_generator_state(generator, resume_path, accelerator.process_index)
        global_step = int(json.loads((resume_path / TRAINER_STATE).read_text())["global_step"])

    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name or task.name, config=_flat_for_tracker(config))

    total_batch = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    accelerator.print(
        f"[{task.name}] {accelerator.num_processes} process(es) on {accelerator.device} "
        f"({accelerator.distributed_type.value}), batch {config.train_batch_size} x accumulation "
        f"{config.gradient_accumulation_steps} x processes = {total_batch}, lr {lr:g}, "
        f"{sum(p.numel() for p in params):,} trainable parameters, steps {global_step}->{config.max_steps}"
    )

    def save_checkpoint(step: int) -> None:
        final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        save_generator_state(generator, tmp, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"global_step": step, "task": task.name, "config": config_to_dict(config)}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if config.checkpoints_total_limit:
                for old in list_checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    stream = _forever(task)
    skip = global_step * config.gradient_accumulation_steps
    if skip:
        for _ in tqdm(range(skip), desc="fast-forwarding data", disable=not accelerator.is_local_main_process):
            next(stream)

    progress = tqdm(
        total=config.max_steps,
        initial=global_step,
        desc=task.name,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    sums: dict[str, float] = {}
    count = 0
    step_start = time.perf_counter()
    last_saved = global_step if resume_path is not None else -1
    while global_step < config.max_steps:
        batch = _to_device(next(stream), accelerator.device)
        with accelerator.accumulate(bundle):
            with accelerator.autocast():
                loss, logs = bundle(batch, generator)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"{task.name}: loss became {loss.item()} at step {global_step + 1}")
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0 and not is_deepspeed:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in {"loss": loss, **logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().float().item() if isinstance(v, torch.Tensor) else v)
        count += 1
        if not accelerator.sync_gradients:
            continue

        global_step += 1
        progress.update(1)
        now = time.perf_counter()
        means = {k: v / count for k, v in sums.items()}
        means["lr"] = lr_scheduler.get_last_lr()[0]
        means["step_time_s"] = now - step_start
        step_start = now
        progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr']:.2e}")
        if global_step % config.logging_steps == 0 or global_step == config.max_steps:
            reduced = accelerator.reduce(
                torch.tensor([means[k] for k in sorted(means)], device=accelerator.device), reduction="mean"
            )
            if config.report_to != "none":
                accelerator.log(dict(zip(sorted(means), reduced.tolist())), step=global_step)
        sums, count = {}, 0

        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
            save_checkpoint(global_step)
            last_saved = global_step
        if config.validation_steps and global_step % config.validation_steps == 0:
            _validate(task, accelerator, unwrapped(), global_step, output_dir)
    progress.close()

    if last_saved != global_step:
        save_checkpoint(global_step)
    export_dir = Path(config.resolved_export_dir)
    if accelerator.is_main_process:
        export_dir.mkdir(parents=True, exist_ok=True)
        written = task.export(unwrapped(), export_dir)
        save_config(config, export_dir / f"training_config_{task.name}.yaml")
        card = task.model_card()
        if card is None:
            write_model_card(export_dir, config, task.model_card_notes(), section=task.name)
        else:
            (export_dir / ".README.md.tmp").write_text(card)
            os.replace(export_dir / ".README.md.tmp", export_dir / "README.md")
        accelerator.print(f"[{task.name}] exported {', '.join(written)} to {export_dir}")
        if config.push_to_hub:
            push_folder_to_hub(export_dir, config.hub_model_id, private=config.hub_private)
            accelerator.print(f"[{task.name}] pushed {export_dir} to https://huggingface.co/{config.hub_model_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir


def _validate(task: TrainingTask, accelerator, models: Mapping[str, nn.Module], step: int, output_dir: Path) -> None:
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    was_training = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    with torch.no_grad():
        images = task.validation_images(models, step)
    for n, m in models.items():
        m.train(was_training[n])
    if images:
        sheet = _grid(images)
        folder = output_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        sheet.save(folder / f"step-{step:06d}.png")
        try:
            import numpy as np

            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("validation", np.asarray(sheet), step, dataformats="HWC")
        except (ValueError, AttributeError, ImportError):
            logger.debug("no tensorboard tracker for validation images")
    accelerator.wait_for_everyone()


def export_model(module: nn.Module, export_dir: Path, subfolder: str) -> str:
    """`save_pretrained` into `export_dir/subfolder` atomically (temp folder, then rename)."""
    target = Path(export_dir) / subfolder
    tmp = Path(export_dir) / f".{subfolder}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    module.save_pretrained(tmp, safe_serialization=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return subfolder
