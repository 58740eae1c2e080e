"""The end of a run: trained models into an encoders (or fine-tune) folder, its model card, the Hub.

`export_model` writes one `save_pretrained` folder atomically (a temporary folder renamed into place,
with the usual permissions); `export_fp32` rebuilds fp32 weights from DeepSpeed's master copy when
the run kept 16-bit ones; `write_model_card` (re)writes the encoders folder's `README.md` through
`huggingface_hub.ModelCard` (license, base model as a Hub id, never a local path; sample images
from the last validation), keeping each trainer's notes as their own section (global mapping, local
mapping and location MLP export into one folder); `push_folder_to_hub` uploads only what loads
(no checkpoints, optimizer or RNG states, logs).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from encoders.common.files import atomic_directory, atomic_write, atomic_write_text

from .checkpoints import list_checkpoints

logger = logging.getLogger(__name__)


def export_model(module: nn.Module, export_dir: str | Path, subfolder: str) -> str:
    """`save_pretrained` into `export_dir/subfolder` atomically (temp folder, then rename)."""
    with atomic_directory(Path(export_dir) / subfolder) as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
    return subfolder


def fp32_module(module: nn.Module, name: str, output_dir: str | Path) -> nn.Module:
    """`module` with fp32 weights: itself when it holds fp32 already; else a copy with the fp32 master weights.

    Under DeepSpeed with bf16/fp16 the module holds 16-bit copies of the weights; the fp32 master
    weights live (sharded) in the optimizer states, so they are rebuilt from the run's last
    checkpoint (which the loop writes right before the export) with DeepSpeed's zero_to_fp32.
    """
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    fp32 = copy.deepcopy(module).float()
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and (checkpoints[-1] / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # our own checkpoint, written by this run a moment ago
        full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints[-1]))
        prefix = f"models.{name}."
        state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        fp32.load_state_dict(state, strict=True)
    else:
        logger.warning(
            "%s: no DeepSpeed checkpoint with fp32 master weights; exporting the 16-bit weights as fp32", name
        )
    return fp32


def export_fp32(module: nn.Module, name: str, export_dir: Path, output_dir: str | Path) -> str:
    """Export `module` as `export_dir/name/` in fp32 (`fp32_module`)."""
    return export_model(fp32_module(module, name, output_dir), export_dir, name)


_NOTES_BLOCK = re.compile(r"<!-- notes:(?P<name>[\w.-]+) -->\n(?P<body>.*?)\n<!-- /notes:(?P=name) -->", re.S)


# What a Hub upload leaves out: training state, logs, temporary files (fine-tunes export into their run folder).
HUB_IGNORE = [
    "checkpoint-*",
    "checkpoint-*/**",
    "logs/**",
    "validation/**",
    "*.pkl",
    "optimizer*.bin",
    "scheduler*.bin",
    "random_states*",
    "data_state*",
    "trainer_state.json",
    "preempted.json",
    ".*",
    "*.tmp*",
]
SAMPLES_FILE = "samples.png"


def hub_name(name_or_path: str | None) -> tuple[str | None, bool]:
    """(what a card may record, whether it is a Hub id): a Hub id as it is; a local folder only by its
    last path component, flagged, so cards never carry someone's local paths."""
    if not name_or_path:
        return None, False
    path = Path(str(name_or_path))
    if path.exists() or str(name_or_path).startswith(("/", ".", "~")):
        return path.name, False
    return str(name_or_path), True


def copy_samples(output_dir: str | Path, export_dir: str | Path) -> str | None:
    """The last validation sheet of the run as `export_dir/samples.png` (for the card); None without one."""
    sheets = sorted((Path(output_dir) / "validation").glob("step-*.png"))
    if not sheets:
        return None
    atomic_write(Path(export_dir) / SAMPLES_FILE, lambda tmp: shutil.copyfile(sheets[-1], tmp))
    return SAMPLES_FILE


def card_header(config, tags: list[str]) -> str:
    """The card's YAML metadata (`huggingface_hub.ModelCardData`): license, tags and the base model when
    it is a Hub id."""
    from huggingface_hub import ModelCardData

    base, on_hub = hub_name(config.pretrained_model_name_or_path)
    data = ModelCardData(
        license=getattr(config, "license", None) or None, tags=tags, base_model=base if on_hub else None
    )
    return f"---\n{data.to_yaml()}\n---\n"


def describe_source(name_or_path: str | None) -> str:
    name, on_hub = hub_name(name_or_path)
    if name is None:
        return "not recorded"
    return f"`{name}`" if on_hub else f"`{name}` (a local folder when trained: give its Hub id when you load this)"


def write_model_card(export_dir: Path, config, notes: str = "", section: str = "train") -> Path:
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
    samples = copy_samples(config.output_dir, export_dir)
    base = hub_name(config.pretrained_model_name_or_path)[0] or "BASE_MODEL"
    card = (
        card_header(config, ["zero-step-personalization", "elite", "stable-diffusion"])
        + f"""
# Zero-step personalization encoders

Encoders that turn one photo of an object (and its mask) into a word and local features for
Stable Diffusion, with no per-concept optimization (ELITE; compositional inversion's location MLP).

- Base model: {describe_source(config.pretrained_model_name_or_path)}
- Image encoder: {describe_source(config.image_encoder_name_or_path)}

| subfolder | class | size |
|---|---|---|
{chr(10).join(parts)}

Each subfolder loads with `from_pretrained(path_or_repo, subfolder=...)`.

```bash
python -m inference generate --base {base} --encoders PATH_OR_REPO \\
    --image dog.jpg --mask dog_mask.png --prompt "a photo of S* on the beach" --out out/
```
{chr(10) + "![validation samples](" + samples + ")" + chr(10) if samples else ""}
{notes_md}
"""
    )
    return atomic_write_text(export_dir / "README.md", card)


def push_folder_to_hub(folder: Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Create the Hub repo if needed and upload what of `folder` loads (`HUB_IGNORE` left out; uses the
    user's saved token)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    subfolders = sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and (p / "config.json").is_file())
    message = commit_message or f"Upload {', '.join(subfolders) or Path(folder).name} (zero-step-personalization)"
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, ignore_patterns=HUB_IGNORE)
    return repo_id
