"""Local paths or Hugging Face Hub ids, resolved the same way wherever a folder or a file is accepted."""

from __future__ import annotations

import os
from pathlib import Path


class HubFetchError(OSError):
    """A Hub id that could not be downloaded (or found in the cache when offline)."""


def local_or_hub(source: str | os.PathLike, revision: str | None = None) -> Path:
    """`source` as a local path when it exists or cannot be a Hub id; otherwise from the Hub, cached:
    `user/name` -> the repo's snapshot folder (`snapshot_download`), `user/name/path/in/repo` -> that
    file (`hf_hub_download`). Offline mode reads the cache."""
    local = Path(source)
    parts = str(source).split("/")
    if local.exists() or len(parts) < 2 or not all(parts) or str(source).startswith((".", "~")) or "\\" in str(source):
        return local
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = "/".join(parts[:2])
    try:
        if len(parts) == 2:
            return Path(snapshot_download(repo, revision=revision))
        return Path(hf_hub_download(repo, "/".join(parts[2:]), revision=revision))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise HubFetchError(f"{source}: not a local path, and not found on the Hub ({err})") from err


# Pipelines whose UNet takes more than the text states (SDXL's pooled embedding and size numbers):
# every method here conditions a plain `encoder_hidden_states` UNet, so these bases are refused clearly.
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
UNSUPPORTED_PIPELINES = (*SDXL_PIPELINES, "StableDiffusion3Pipeline", "FluxPipeline", "KandinskyV22Pipeline")


class UnsupportedBaseError(ValueError):
    """A base model of a family the methods do not support (yet)."""


def pipeline_class_name(name_or_path: str | os.PathLike) -> str:
    """The `_class_name` of a base model's `model_index.json` (a folder or a Hub id); "" when there is
    none or it cannot be read (the loader then says what is wrong)."""
    import json

    local = Path(name_or_path)
    index = local / "model_index.json"
    try:
        if index.is_file():
            return str(json.loads(index.read_text()).get("_class_name", ""))
        if not local.exists():
            from huggingface_hub import hf_hub_download

            return str(
                json.loads(Path(hf_hub_download(str(name_or_path), "model_index.json")).read_text()).get(
                    "_class_name", ""
                )
            )
    except (OSError, ValueError):
        return ""  # unreadable: the loader says what is wrong
    return ""


def check_supported_base(name_or_path: str | os.PathLike, allow_sdxl: bool = False) -> bool:
    """Whether `name_or_path` is an SDXL base (allowed with `allow_sdxl`); raise UnsupportedBaseError when
    its `model_index.json` names a pipeline the method does not support (SDXL unless `allow_sdxl`, and
    later families). A base without one is left to the loader. Reads `model_index.json` once."""
    name = pipeline_class_name(name_or_path)
    if allow_sdxl and name in SDXL_PIPELINES:
        return True
    if name in UNSUPPORTED_PIPELINES:
        raise UnsupportedBaseError(
            f"base model {name_or_path} is a {name}: this loader takes Stable Diffusion 1.x / 2.x bases only "
            "(a StableDiffusionPipeline); SDXL loads where allow_sdxl=True is passed (ElitePipeline, the command "
            "line and the trainers do)"
        )
    return False
