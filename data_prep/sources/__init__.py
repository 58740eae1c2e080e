"""Annotation readers: each turns a dataset's annotation files into `ObjectRecord`s (no pixels read).

A source validates its files before returning anything, so a file that is not what it claims
(not JSON, missing CSV columns) stops the job with `SourceError` before any shard is written;
single bad rows and annotations are dropped and counted in a `SourceReport` instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("data_prep")


def path_inside(path: str | Path, root: Path) -> bool:
    """Whether `path` (resolved, links followed) lies under the resolved `root`.

    Annotation files name the files they point at ("../x", "/etc/x", a link out of the tree); every
    source checks them with this before anything is read, so a shard can only hold the user's data.
    """
    try:
        Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


class SourceError(ValueError):
    """An annotation file that cannot be used at all; the message names the file and the problem."""


@dataclass
class SourceReport:
    """What a source read and what it dropped before sharding, by reason (first few logged)."""

    name: str
    files: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    log_first: int = 5
    _logged: int = 0

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if self._logged < self.log_first:
            logger.warning("%s: skipped (%s): %s", self.name, reason, where)
            self._logged += 1

    def to_dict(self) -> dict:
        return {"files": dict(self.files), "counts": dict(self.counts)}


def drop_duplicate_keys(records: list, report: SourceReport, where: str = "") -> list:
    """`records` (sorted) with each sample key kept once; later repeats are counted as `duplicate_annotation`.

    Two annotations can map to one key when their ids differ only in characters a key cannot hold."""
    unique: dict = {}
    for r in records:
        if r.key in unique:
            report.skip("duplicate_annotation", f"{where + ': ' if where else ''}key {r.key}")
        else:
            unique[r.key] = r
    return list(unique.values())
