"""A generic, resumable, deterministic WebDataset shard writer (img2dataset-style stage separation).

Give it an ordered list of work items and a picklable function `process(item) -> sample dict`
(or raise/return `Skip(reason)`), and it:

* splits the items into fixed shards (shard i = items[i*n:(i+1)*n]) so a shard's content depends
  only on its items and the settings, never on the number of workers or nodes;
* gives shard i to node `i % num_nodes` (`--node-rank/--num-nodes`, e.g. a SLURM array) and spreads a
  node's shards over `workers` processes;
* writes each shard to a hidden temp name and renames it when complete, after its stats file
  (`_shard_stats/NAME-000003.json`); a rerun keeps finished shards and writes the rest (resume), and
  refuses to mix shards written with other settings or inputs;
* writes tar members in a fixed order with a fixed mtime/owner, so the same input gives
  byte-identical shards, and the union of K nodes' shards equals one node's, byte for byte;
* never dies on a bad item: `Skip` and any exception become a count by reason (the first few are
  logged with the item), and a progress bar shows the rate;
* writes `manifest.json` atomically (samples, per-shard counts and checksums, skipped by reason,
  settings). With several nodes each writes `manifest.node-R-of-K.json` and `data_prep.manifests` (or
  `python -m data_prep merge DIR`) checks that every shard is there and combines them.

A sample is a dict `{"__key__": str, "<ext>": bytes, ...}`; the optional `"__notes__": [str]` is
counted into the manifest's `notes` (repairs such as a converted colour mode) and not written.
Keys must not contain "." or "/" (WebDataset splits member names at the first dot).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.common.files import (
    FolderLockedError,
    OutputPathError,
    atomic_write_text,
    check_writable_folder,
    folder_lock,
    sha256_file,
)
from encoders.common.files import atomic_write_json as _atomic_write_json
from encoders.common.shards import (  # noqa: F401  (the shard contract, re-exported for the data_prep stages)
    INDEX_FIELDS,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    STATS_DIR,
    ShardSpecError,
    expand_shard_spec,
    index_file_name,
    node_manifest_name,
    read_manifest,
    shard_file_name,
)
from encoders.common.version import package_version

logger = logging.getLogger("data_prep")
TAR_MTIME = 946684800  # 2000-01-01: fixed member mtime (reproducible, and GNU tar does not call it implausible)
TAR_OWNER = "zsp"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class WriterError(RuntimeError):
    """A problem with the output folder or the plan that must stop the job before it writes anything."""


class Skip(Exception):
    """This item gives no sample, for `reason` (a short snake_case name counted in the manifest)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across processes with both fields
        return (Skip, (self.reason, self.detail))


@dataclass
class ShardJob:
    """Where and how to write: output folder, shard naming and size, node and worker split."""

    out_dir: Path
    name: str
    shard_size: int = 1000
    workers: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    overwrite: bool = False
    progress: bool = True
    log_first: int = 5  # how many bad items to log with their file names (all are counted)
    unit: str = "items"

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not _KEY_OK.match(self.name):
            raise WriterError(f"shard name {self.name!r} may only hold letters, digits, '_' and '-'")
        if self.shard_size < 1:
            raise WriterError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.workers < 1:
            raise WriterError(f"workers must be >= 1, got {self.workers}")
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise WriterError(f"node rank {self.node_rank} is not in 0..{self.num_nodes - 1}")


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """Item ranges [start, end) of the shards: shard i holds items[i*n:(i+1)*n]."""
    return [(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def node_shards(num_shards: int, node_rank: int, num_nodes: int) -> list[int]:
    """The shard indices one node writes: every `num_nodes`-th, starting at its rank (no overlap, no gap)."""
    return list(range(node_rank, num_shards, num_nodes))


def default_item_key(item: Any) -> str:
    """An item's key: its `key` attribute, or `item["key"]` for a mapping."""
    if isinstance(item, Mapping):
        return str(item["key"])
    return str(item.key)


def describe_item(item: Any) -> str:
    """How a bad item is named in the log: its `describe()` when it has one (file names), else repr."""
    describe = getattr(item, "describe", None)
    text = describe() if callable(describe) else repr(item)
    return text if len(text) <= 300 else text[:297] + "..."


def atomic_write_json(path: Path, data: Any) -> None:
    """Manifests and stats: JSON with sorted keys, written under a temporary name and renamed."""
    _atomic_write_json(path, data, indent=1, sort_keys=True)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------
# one shard (runs in a worker process, or in the main process when workers == 1)

_progress_counter: Any = None  # multiprocessing.Value in pool workers; a callable in the main process


def _init_worker(counter: Any, parent: int | None = None) -> None:
    global _progress_counter
    _progress_counter = counter
    if parent is not None:  # a pool worker: leave when the main process is gone (killed), never idle on
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _tick() -> None:
    counter = _progress_counter
    if counter is None:
        return
    if callable(counter):
        counter(1)
    else:
        with counter.get_lock():
            counter.value += 1


def _members(sample: dict) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Tar members of a sample in a fixed order (sorted extensions) with fixed metadata.

    Plain `tarfile` (as webdataset's TarWriter does, without importing torch into every worker):
    USTAR format, mode 0444, owner zsp, mtime 2000-01-01, so equal samples give equal bytes.
    """
    key = sample["__key__"]
    members = []
    for ext in sorted(k for k in sample if not k.startswith("_")):
        data = sample[ext]
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {key!r} field {ext!r} is {type(data).__name__}, not bytes")
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o444
        info.uname = info.gname = TAR_OWNER
        members.append((info, bytes(data)))
    return members


@dataclass
class _ShardTask:
    index: int
    start: int
    end: int
    items: list
    process: Callable[[Any], Any]
    out_dir: Path
    name: str
    fingerprint: str
    log_first: int


def _index_line(key: str, sample: dict, members: dict[str, list[int]]) -> str:
    """One line of the shard index: the key, the `INDEX_FIELDS` of the sample's JSON, member offsets."""
    row: dict[str, Any] = {"key": key}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, TypeError):
            meta = {}
        if isinstance(meta, dict):
            row.update({k: meta[k] for k in INDEX_FIELDS if k in meta})
    row["members"] = members
    return json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n"


def _write_shard(task: _ShardTask) -> dict:
    """Write one shard: temp file, stats file, rename. Returns the shard's stats."""
    final = task.out_dir / shard_file_name(task.name, task.index)
    tmp = task.out_dir / f".{final.name}.tmp-{os.getpid()}"
    skipped: Counter = Counter()
    notes: Counter = Counter()
    errors: list[str] = []
    samples = 0
    seen: set[str] = set()

    def skip(reason: str, message: str) -> None:
        skipped[reason] += 1
        if len(errors) < task.log_first:
            errors.append(message)

    index_lines: list[str] = []
    try:
        with open(tmp, "wb") as stream, tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item in task.items:
                try:
                    result = task.process(item)
                    if isinstance(result, Skip):
                        raise result
                    key = result.get("__key__") if isinstance(result, dict) else None
                    if not isinstance(key, str) or not _KEY_OK.match(key):
                        raise Skip("invalid_key", f"sample key {key!r} (letters, digits, '_' and '-' only)")
                    if key in seen:
                        raise Skip("duplicate_key", key)
                    note_list = result.pop("__notes__", ())
                    members = _members(result)
                    where = {}
                    for info, data in members:
                        header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
                        where[info.name.split(".", 1)[1]] = [tar.offset + header, info.size]
                        tar.addfile(info, io.BytesIO(data))
                    index_lines.append(_index_line(key, result, where))
                except Skip as bad:
                    detail = f": {bad.detail}" if bad.detail else ""
                    skip(bad.reason, f"{bad.reason}: {describe_item(item)}{detail}")
                except Exception as err:  # a bad item must not kill the job: count it, name it
                    reason = f"error_{type(err).__name__}"
                    skip(reason, f"{reason}: {describe_item(item)}: {err}")
                else:
                    seen.add(key)
                    samples += 1
                    notes.update(note_list)
                finally:
                    _tick()
        stats = {
            "file": final.name,
            "index": task.index,
            "items": [task.start, task.end],
            "samples": samples,
            "skipped": dict(sorted(skipped.items())),
            "notes": dict(sorted(notes.items())),
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            "fingerprint": task.fingerprint,
        }
        atomic_write_text(index_file_name(final), "".join(index_lines))
        atomic_write_json(task.out_dir / STATS_DIR / final.with_suffix(".json").name, stats)
        os.replace(tmp, final)
        return {**stats, "errors": errors}
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------
# the job


def _check_output_folder(job: ShardJob, num_shards: int, fingerprints: list[str]) -> dict[int, dict]:
    """Finished shards of this node (index -> stats); errors out on shards from another run."""
    out = job.out_dir
    pattern = re.compile(rf"^{re.escape(job.name)}-(\d{{6}})\.tar$")
    existing = {int(m.group(1)): p for p in out.iterdir() if (m := pattern.match(p.name))}
    stray = sorted(i for i in existing if i >= num_shards)
    if stray:
        raise WriterError(
            f"{out} holds {shard_file_name(job.name, stray[0])} but this job plans only {num_shards} shards: "
            "it was written by a different run. Use --overwrite or another --out."
        )
    for other in ("manifest.json", *(p.name for p in out.glob("manifest.node-*.json"))):
        path = out / other
        if path.exists():
            try:
                name = json.loads(path.read_text()).get("name")
            except (json.JSONDecodeError, OSError):
                continue
            if name != job.name:
                raise WriterError(f"{path} belongs to shards named {name!r}, not {job.name!r}: use another --out")
    done: dict[int, dict] = {}
    for index in node_shards(num_shards, job.node_rank, job.num_nodes):
        tar = existing.get(index)
        stats_path = out / STATS_DIR / f"{job.name}-{index:06d}.json"
        if tar is None:
            continue
        if not stats_path.exists():
            logger.warning("%s has no stats file; writing it again", tar)
            continue
        if not index_file_name(tar).is_file():
            logger.warning("%s has no index (%s); writing it again", tar, index_file_name(tar).name)
            continue
        stats = json.loads(stats_path.read_text())
        if stats.get("fingerprint") != fingerprints[index]:
            raise WriterError(
                f"{tar} was written with other settings or inputs than this job: "
                "use --overwrite to replace it, or another --out."
            )
        if tar.stat().st_size != stats.get("bytes"):
            logger.warning(
                "%s is %d bytes, its stats say %s; writing it again", tar, tar.stat().st_size, stats.get("bytes")
            )
            continue
        done[index] = stats
    return done


def _remove_old_outputs(job: ShardJob, num_shards: int) -> None:
    """--overwrite: one node deletes everything of this name; with several nodes, each deletes only
    its own shards (of this plan) and its own node manifest, never another node's finished work."""
    out = job.out_dir
    if job.num_nodes == 1:
        pattern = re.compile(rf"^\.?{re.escape(job.name)}-\d{{6}}\.(tar|tar\.tmp-\d+|index\.jsonl(\.tmp-\w+)?)$")
        doomed = [
            p
            for p in out.iterdir()
            if pattern.match(p.name) or p.name == MANIFEST_NAME or p.name.startswith("manifest.node-")
        ]
        doomed += list((out / STATS_DIR).glob(f"{job.name}-*.json"))
    else:
        names = [shard_file_name(job.name, i) for i in node_shards(num_shards, job.node_rank, job.num_nodes)]
        doomed = [out / n for n in names] + [out / STATS_DIR / n.replace(".tar", ".json") for n in names]
        doomed += [index_file_name(out / n) for n in names]
        doomed += [out / MANIFEST_NAME, out / node_manifest_name(job.node_rank, job.num_nodes)]
    for p in doomed:
        p.unlink(missing_ok=True)


def _remove_stale_temp_files(job: ShardJob, shard_indices: Iterable[int]) -> None:
    """Temp files of this node's shards are leftovers of a killed run (other nodes' are theirs)."""
    mine = {shard_file_name(job.name, i) for i in shard_indices}
    mine |= {index_file_name(name).name for name in mine}
    for p in job.out_dir.glob(f".{job.name}-*.tmp-*"):
        if p.name[1:].split(".tmp-")[0] in mine:
            logger.info("removing %s, left by an interrupted run", p)
            p.unlink()


def _summarize(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def check_output_folder(out: Path) -> None:
    """Before any work: `out` can be written, and nothing the writer deletes or writes inside it is a
    symbolic link (an `--overwrite` must never delete or write files outside `--out`)."""
    try:
        check_writable_folder(out, "--out")
    except OutputPathError as err:
        raise WriterError(str(err)) from err
    stats = out / STATS_DIR
    if stats.is_symlink() or (stats.exists() and not stats.is_dir()):
        raise WriterError(
            f"{stats} is a symbolic link or a file: the writer keeps its stats there and deletes them on "
            "--overwrite, and never works through links; remove it or use another --out"
        )


@contextmanager
def output_lock(job: ShardJob) -> Iterator[None]:
    """One job at a time per shard name and node in `--out`: a second job stops at once with a clear message
    (it would delete the first one's files in progress). The lock goes with the process, also when killed;
    a lock name that is a link is refused, never written through."""
    lock = folder_lock(
        job.out_dir / f".lock-{job.name}-node{job.node_rank}",
        f"another data_prep job writing {job.name} shards into {job.out_dir}",
    )
    try:
        lock.__enter__()
    except (FolderLockedError, OutputPathError) as err:
        raise WriterError(str(err)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def write_shards(
    items: Sequence,
    process: Callable[[Any], Any],
    job: ShardJob,
    *,
    settings: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
    source_skipped: Mapping[str, int] | None = None,
    item_key: Callable[[Any], str] = default_item_key,
) -> dict:
    """Write this node's shards of `items` and its manifest; return the manifest dict.

    `process` must be picklable (a module-level function or a `functools.partial` of one) when
    `job.workers > 1`. `settings` (JSON-able) and the item keys make the fingerprint that guards
    resume; `source` (what was read) and `source_skipped` (records dropped before sharding, by
    reason) go into the manifest as they are. The output folder is checked (`check_output_folder`)
    and locked (`output_lock`) for the whole job.
    """
    check_output_folder(job.out_dir)
    with output_lock(job):
        return _write_node_shards(items, process, job, settings, source, source_skipped, item_key)


def _write_node_shards(items, process, job: ShardJob, settings, source, source_skipped, item_key) -> dict:
    out = job.out_dir
    (out / STATS_DIR).mkdir(exist_ok=True)
    keys = [item_key(item) for item in items]
    if len(set(keys)) != len(keys):
        dupes = [k for k, n in Counter(keys).items() if n > 1][:5]
        raise WriterError(f"work items must have unique keys; repeated: {dupes}")
    ranges = shard_ranges(len(items), job.shard_size)
    settings_id = _fingerprint(dict(settings), job.name, job.shard_size, len(items))
    fingerprints = [_fingerprint(settings_id, keys[s:e]) for s, e in ranges]
    run_fingerprint = _fingerprint(settings_id, fingerprints)
    mine = node_shards(len(ranges), job.node_rank, job.num_nodes)

    if job.overwrite:
        _remove_old_outputs(job, len(ranges))
    _remove_stale_temp_files(job, mine)
    done = _check_output_folder(job, len(ranges), fingerprints)
    todo = [i for i in mine if i not in done]
    if done:
        logger.info("resuming: %d of this node's %d shards are complete and kept", len(done), len(mine))

    results: dict[int, dict] = dict(done)
    logged = 0

    def finished(stats: dict) -> None:
        nonlocal logged
        for message in stats.pop("errors", []):
            if logged < job.log_first:
                logger.warning("%s: %s", stats["file"], message)
                logged += 1
        results[stats["index"]] = stats

    tasks = [
        _ShardTask(
            i,
            *ranges[i],
            list(items[ranges[i][0] : ranges[i][1]]),
            process,
            out,
            job.name,
            fingerprints[i],
            job.log_first,
        )
        for i in todo
    ]
    total = sum(t.end - t.start for t in tasks)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit=job.unit, desc=f"{job.name} shards", disable=not job.progress, dynamic_ncols=True)
    try:
        if job.workers == 1 or len(tasks) <= 1:
            _init_worker(bar.update)
            try:
                for task in tasks:
                    finished(_write_shard(task))
                    bar.set_postfix(shards=f"{len(results)}/{len(mine)}")
            finally:
                _init_worker(None)
        else:
            ctx = multiprocessing.get_context()
            counter = ctx.Value("q", 0)
            with ProcessPoolExecutor(
                job.workers, mp_context=ctx, initializer=_init_worker, initargs=(counter, os.getpid())
            ) as pool:
                pending: set[Future] = {pool.submit(_write_shard, task) for task in tasks}
                try:
                    while pending:
                        completed, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                        for future in completed:
                            finished(future.result())
                        bar.update(counter.value - bar.n)
                        bar.set_postfix(shards=f"{len(results)}/{len(mine)}")
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
    finally:
        bar.close()

    shards = [results[i] for i in mine]
    skipped_in_shards: Counter = Counter()
    notes: Counter = Counter()
    for s in shards:
        skipped_in_shards.update(s["skipped"])
        notes.update(s["notes"])
    source_skipped = Counter(dict(source_skipped or {}))
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "name": job.name,
        "complete": job.num_nodes == 1,
        "samples": sum(s["samples"] for s in shards),
        "items": len(items),
        "skipped": dict(sorted((source_skipped + skipped_in_shards).items())),
        "skipped_in_source": dict(sorted(source_skipped.items())),
        "skipped_in_shards": dict(sorted(skipped_in_shards.items())),
        "notes": dict(sorted(notes.items())),
        "num_shards": len(ranges),
        "shard_size": job.shard_size,
        "shards": [{k: v for k, v in s.items() if k != "fingerprint"} for s in shards],
        "nodes": {"num_nodes": job.num_nodes, "node_rank": job.node_rank},
        "fingerprint": run_fingerprint,
        "settings": dict(settings),
        "source": dict(source or {}),
        "package_version": package_version(),
    }
    target = out / (MANIFEST_NAME if job.num_nodes == 1 else node_manifest_name(job.node_rank, job.num_nodes))
    atomic_write_json(target, manifest)
    logger.info(
        "%s: %d samples in %d shards (%d written now, %d kept); skipped %d (%s); manifest %s",
        job.name,
        manifest["samples"],
        len(shards),
        len(todo),
        len(done),
        sum(manifest["skipped"].values()),
        _summarize(manifest["skipped"]),
        target,
    )
    if job.num_nodes > 1:
        logger.info("after all %d nodes finish: python -m data_prep merge %s", job.num_nodes, out)
    return manifest
