"""The output folder of a per-concept fine-tune: written by `training`, read by `inference`.

A finished `training.textual_inversion` (Textual Inversion or BaTex) or `training.infusion` run
leaves in its folder `concept.json`, which says what was learned and where the result is:

    {"method": "textual_inversion" | "batex" | "infusion", "placeholder_token": "S*",
     "initializer_token": "dog", "class_word": "dog", "concept_dir": "/abs/photos", "base_model": "...",
     "max_steps": 5000, "files": {"embeddings": "learned_embeds.safetensors"}}   # or {"residuals": "infusion"}

Embeddings are a safetensors file `{token: [1, D]}` (what diffusers' `load_textual_inversion`
reads); Infusion residuals a `save_pretrained` folder; a method added later names its result in
`files.result`. `read_finetune` checks a folder against this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import atomic_write_json
from .hub import HubFetchError, local_or_hub
from .version import package_version

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

    @property
    def semantic_inversion(self) -> bool:
        """Trained with the anchor-attractor loss (compositional inversion's semantic half)."""
        return bool(self.info.get("semantic_inversion", False))

    def result_path(self) -> Path:
        """The embeddings file (TI / BaTex), the residuals folder (Infusion), or what `files.result` names (any
        other method)."""
        files = self.info.get("files", {})
        if self.method in EMBEDDING_METHODS:
            return self.folder / files.get("embeddings", EMBEDDINGS_FILE)
        if self.method == "infusion":
            return self.folder / files.get("residuals", RESIDUALS_FOLDER)
        if not files.get("result"):
            raise FinetuneFolderError(f"{self.folder}: {CONCEPT_FILE} names no result (files.result)")
        return self.folder / files["result"]


def write_concept_info(folder: str | os.PathLike, info: Mapping[str, Any]) -> str:
    """Write `folder/concept.json` (atomically); returns its file name."""
    if not _is_method_name(info.get("method")):
        raise ValueError(
            f"concept.json needs a method name (e.g. {', '.join(FINETUNE_METHODS)}), got {info.get('method')!r}"
        )
    atomic_write_json(Path(folder) / CONCEPT_FILE, {**info, "package_version": package_version()})
    return CONCEPT_FILE


def fetch_finetune(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local fine-tune folder as it is, or a Hub repo id (`user/name`) downloaded (`hub.local_or_hub`)."""
    try:
        return local_or_hub(source, revision)
    except HubFetchError as err:
        raise FinetuneFolderError(
            f"{source} is neither a local fine-tune folder nor a Hub repo that can be downloaded: {err}"
        ) from err


def _concepts_library_embedding(folder: Path) -> Path | None:
    for name in (EMBEDDINGS_FILE, "learned_embeds.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _concepts_library_run(folder: Path) -> FinetuneRun:
    """A Textual Inversion repo in the sd-concepts-library layout (`learned_embeds.bin` or `.safetensors`,
    `token_identifier.txt`, `type_of_concept.txt`; no concept.json): usable for generation, not for
    evaluation (it names no concept photos)."""
    embedding = _concepts_library_embedding(folder)
    token_file = folder / "token_identifier.txt"
    info: dict[str, Any] = {
        "method": "textual_inversion",
        "files": {"embeddings": embedding.name},
        "layout": "sd-concepts-library",
    }
    if token_file.is_file():
        info["placeholder_token"] = token_file.read_text(encoding="utf-8").strip()
    return FinetuneRun("textual_inversion", folder, info)


def _is_method_name(method: Any) -> bool:
    return isinstance(method, str) and method.isidentifier()


def read_finetune(folder: str | os.PathLike, methods: Collection[str] = FINETUNE_METHODS) -> FinetuneRun:
    """Read `folder/concept.json` (a local folder or a Hub repo id); errors name the folder and what is wrong.

    `methods`: the method names to accept (`inference.finetuned.read_finetune` passes every registered one)."""
    folder = fetch_finetune(folder)
    info_file = folder / CONCEPT_FILE
    if not folder.is_dir():
        raise FinetuneFolderError(f"fine-tune folder {folder} does not exist")
    if not info_file.is_file() and _concepts_library_embedding(folder) is not None:
        return _concepts_library_run(folder)
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
    if method not in methods:
        raise FinetuneFolderError(f"{info_file}: unknown method {method!r} (expected one of {', '.join(methods)})")
    run = FinetuneRun(method, folder, info)
    if not run.result_path().exists():
        raise FinetuneFolderError(f"{folder}: {run.result_path().name} named in {CONCEPT_FILE} is missing")
    if method == "infusion" and not run.class_word:
        raise FinetuneFolderError(f"{info_file}: an Infusion run needs its class_word")
    return run
