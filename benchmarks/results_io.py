"""Writing a benchmark's results: JSON under a temporary name, renamed when complete.

Shared by the `bench_*.py` scripts (run as `python benchmarks/bench_x.py`, so this folder is on
`sys.path`), so a half-written results file never looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write `results` as indented JSON to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
    return path
