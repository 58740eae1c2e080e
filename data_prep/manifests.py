"""Manifests of multi-node shard jobs: `python -m data_prep merge DIR` combines the per-node ones.

Each of K nodes writes its own `manifest.node-R-of-K.json` (`data_prep.writer`); once all have
finished, `merge_manifests` checks that they ran the same job, that every node and every shard is
there (and, with `verify`, that each shard's bytes match its recorded sha256), and writes the folder's
`manifest.json`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from encoders.common.shards import MANIFEST_NAME

from .writer import WriterError, atomic_write_json, sha256_file

logger = logging.getLogger("data_prep")


def merge_manifests(out_dir: str | os.PathLike, verify: bool = False) -> dict:
    """Combine the per-node manifests in `out_dir` into `manifest.json`, after checking that every
    node finished, that the nodes ran the same job, and that every shard file is present (and, with
    `verify`, that its bytes match the recorded sha256)."""
    out = Path(out_dir)
    paths = sorted(out.glob("manifest.node-*-of-*.json"))
    if not paths:
        raise WriterError(f"no per-node manifests (manifest.node-R-of-K.json) in {out}")
    parts = []
    for p in paths:
        try:
            parts.append(json.loads(p.read_text()))
        except json.JSONDecodeError as err:
            raise WriterError(f"{p} is not valid JSON: {err}") from err
    first = parts[0]
    for p, m in zip(paths, parts):
        for field_name in ("name", "fingerprint", "num_shards"):
            if m.get(field_name) != first.get(field_name):
                raise WriterError(f"{p} comes from a different job ({field_name} differs from {paths[0].name})")
    num_nodes = first["nodes"]["num_nodes"]
    ranks = sorted(m["nodes"]["node_rank"] for m in parts)
    missing_ranks = sorted(set(range(num_nodes)) - set(ranks))
    if missing_ranks or len(ranks) != num_nodes or any(m["nodes"]["num_nodes"] != num_nodes for m in parts):
        raise WriterError(
            f"{out}: expected manifests of nodes 0..{num_nodes - 1}; missing node(s) {missing_ranks} "
            f"(found {[p.name for p in paths]}). Run those nodes (they resume) and merge again."
        )
    shards: dict[int, dict] = {}
    for m in parts:
        for s in m["shards"]:
            if s["index"] in shards:
                raise WriterError(f"shard {s['file']} is listed by two nodes")
            shards[s["index"]] = s
    gaps = sorted(set(range(first["num_shards"])) - set(shards))
    if gaps:
        raise WriterError(f"{out}: shards {gaps[:10]} are in no node manifest")
    for s in shards.values():
        path = out / s["file"]
        if not path.exists() or path.stat().st_size != s["bytes"]:
            raise WriterError(f"{path} is missing or not the size its node recorded ({s['bytes']} bytes)")
        if verify and sha256_file(path) != s["sha256"]:
            raise WriterError(f"{path} does not match its recorded sha256")
    ordered = [shards[i] for i in range(first["num_shards"])]
    skipped_in_shards: Counter = Counter()
    notes: Counter = Counter()
    for s in ordered:
        skipped_in_shards.update(s["skipped"])
        notes.update(s["notes"])
    source_skipped = Counter(first["skipped_in_source"])
    merged = {
        **first,
        "complete": True,
        "samples": sum(s["samples"] for s in ordered),
        "skipped": dict(sorted((source_skipped + skipped_in_shards).items())),
        "skipped_in_shards": dict(sorted(skipped_in_shards.items())),
        "notes": dict(sorted(notes.items())),
        "shards": ordered,
        "nodes": {"num_nodes": num_nodes, "merged_from": [p.name for p in paths]},
    }
    atomic_write_json(out / MANIFEST_NAME, merged)
    logger.info(
        "merged %d node manifests: %d samples in %d shards -> %s",
        num_nodes,
        merged["samples"],
        len(ordered),
        out / MANIFEST_NAME,
    )
    return merged
