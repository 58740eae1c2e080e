"""The installed version of this project, recorded in every output (settings, manifests, concept.json)."""

from __future__ import annotations

from functools import lru_cache

DISTRIBUTION = "zero-step-personalization"


@lru_cache(maxsize=1)
def package_version() -> str:
    """`importlib.metadata`'s version of the distribution, or "unknown" when run from an uninstalled checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
