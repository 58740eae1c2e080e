"""The output folder of a per-concept fine-tune: written by `training`, read by `inference`.

A finished `training.textual_inversion` (Textual Inversion or BaTex) or `training.infusion` run
leaves in its folder `concept.json`, which says what was learned and where the result is:

    {"method": "textual_inversion" | "batex" | "infusion", "placeholder_token": "S*",
     "initializer_token": "dog", "class_word": "dog", "concept_dir": "/abs/photos", "base_model": "...",
     "max_steps": 5000, "files": {"embeddings": "learned_embeds.safetensors"}}   # or {"residuals": "infusion"}

Embeddings are a safetensors file `{token: [1, D]}` (what diffusers' `load_textual_inversion`
reads); Infusion residuals a `save_pretrained` folder. `read_finetune` checks a folder against this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .files import atomic_write_json

CONCEPT_FILE = "concept.json"
EMBEDDINGS_FILE = "learned_embeds.safetensors"
RESIDUALS_FOLDER = "infusion"
SUBSPACE_FOLDER = "subspace"
EMBEDDING_METHODS = ("textual_inversion", "batex")
FINETUNE_METHODS = EMBEDDING_METHODS + ("infusion",)


class FinetuneFolderError(ValueError):
    """A fine-tune folder is missing, unfinished, or not what its concept.json claims."""


@dataclass
class FinetuneRun:
    """A finished fine-tune: its folder, method and what its concept.json records."""

    method: str
    folder: Path
    info: dict

    @property
    def label(self) -> str:
        return self.folder.name

    @property
    def placeholder_token(self) -> str:
        return self.info.get("placeholder_token") or "S*"

    @property
    def class_word(self) -> str:
        return self.info.get("class_word") or ""

    def result_path(self) -> Path:
        """The embeddings file (TI / BaTex) or the residuals folder (Infusion)."""
        files = self.info.get("files", {})
        if self.method in EMBEDDING_METHODS:
            return self.folder / files.get("embeddings", EMBEDDINGS_FILE)
        return self.folder / files.get("residuals", RESIDUALS_FOLDER)


def write_concept_info(folder: str | os.PathLike, info: Mapping[str, Any]) -> str:
    """Write `folder/concept.json` (atomically); returns its file name."""
    if info.get("method") not in FINETUNE_METHODS:
        raise ValueError(f"concept.json needs a method among {', '.join(FINETUNE_METHODS)}, got {info.get('method')!r}")
    atomic_write_json(Path(folder) / CONCEPT_FILE, dict(info))
    return CONCEPT_FILE


def read_finetune(folder: str | os.PathLike) -> FinetuneRun:
    """Read `folder/concept.json`; errors name the folder and what is wrong with it."""
    folder = Path(folder)
    info_file = folder / CONCEPT_FILE
    if not folder.is_dir():
        raise FinetuneFolderError(f"fine-tune folder {folder} does not exist")
    if not info_file.is_file():
        raise FinetuneFolderError(
            f"{folder} has no {CONCEPT_FILE}: is it the output_dir of a finished "
            "training.textual_inversion / training.infusion run?"
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FinetuneFolderError(f"{info_file} is not valid JSON: {err}") from err
    method = info.get("method") if isinstance(info, dict) else None
    if method not in FINETUNE_METHODS:
        raise FinetuneFolderError(f"{info_file}: unknown method {method!r} (expected one of {', '.join(FINETUNE_METHODS)})")
    run = FinetuneRun(method, folder, info)
    if not run.result_path().exists():
        raise FinetuneFolderError(f"{folder}: {run.result_path().name} named in {CONCEPT_FILE} is missing")
    if method == "infusion" and not run.class_word:
        raise FinetuneFolderError(f"{info_file}: an Infusion run needs its class_word")
    return run
