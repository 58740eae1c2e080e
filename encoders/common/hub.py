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
