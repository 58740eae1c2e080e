"""Use the output folders of the per-concept fine-tunes (Textual Inversion, BaTex, Infusion) for generation.

A fine-tune's `output_dir` holds `concept.json` (written by `training.textual_inversion` and
`training.infusion`: method, placeholder token, class word, concept photos, and which file holds the
result). This module reads it and applies the result to a diffusers `StableDiffusionPipeline`:

    run = read_finetune("out/dog_ti")
    token = load_embedding(pipe, run)                 # diffusers' own pipe.load_textual_inversion
    pipe(f"a photo of {token} on the beach")

    run = read_finetune("out/dog_infusion")
    residuals = load_infusion(pipe, run)              # value residuals for the class word's tokens
    generate_with_infusion(pipe, ["a dog on the beach"], [residuals])

Used by `python -m inference generate --finetune DIR` and by `python -m inference.evaluate runs=...`.
Needs only torch, diffusers, safetensors and `encoders` (no training stack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONCEPT_FILE = "concept.json"  # same name as training.concept_data.CONCEPT_FILE (inference never imports training)
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
            return self.folder / files.get("embeddings", "learned_embeds.safetensors")
        return self.folder / files.get("residuals", "infusion")


def read_finetune(folder: str | Path) -> FinetuneRun:
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


def load_embedding(pipe, run: FinetuneRun, token: str | None = None) -> str:
    """Load a Textual Inversion / BaTex embedding with diffusers' `load_textual_inversion`; returns its token.

    `token` defaults to the run's placeholder token; give another one to load several runs that
    were all trained as S*.
    """
    if run.method not in EMBEDDING_METHODS:
        raise FinetuneFolderError(f"{run.folder} is a {run.method} run, not an embedding")
    token = token or run.placeholder_token
    if token in pipe.tokenizer.get_vocab():
        raise FinetuneFolderError(
            f"token {token!r} of {run.folder} is already in the tokenizer: give each run its own token (DIR=TOKEN)"
        )
    path = run.result_path()
    try:
        pipe.load_textual_inversion(str(path.parent), token=token, weight_name=path.name)
    except ValueError as err:  # e.g. an embedding of another width: trained for another base model
        raise FinetuneFolderError(f"{run.folder}: {err} (trained for {run.info.get('base_model', 'an unrecorded base model')})") from err
    return token


def load_infusion(pipe, run: FinetuneRun):
    """Infusion residuals of a run, on the pipeline's device, checked against its UNet."""
    from encoders.infusion import InfusionResiduals

    if run.method != "infusion":
        raise FinetuneFolderError(f"{run.folder} is a {run.method} run, not Infusion")
    path = run.result_path()
    residuals = InfusionResiduals.from_pretrained(str(path.parent), subfolder=path.name).to(pipe.device)
    try:
        residuals.check_fits(pipe.unet)
    except ValueError as err:
        raise FinetuneFolderError(f"{run.folder}: {err}") from err
    return residuals
