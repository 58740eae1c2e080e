"""The shard writer: byte-identical reruns, resume after a kill, node splits + merge, worker count
independence, and refusal to mix runs. Uses the real crop stage on the bundled COCO sample."""

from __future__ import annotations

import functools
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.crops import box_iou
from data_prep.images import mask_bbox
from data_prep.manifests import merge_manifests
from data_prep.objects import make_crop_sample
from data_prep.records import CropSettings
from data_prep.sources.coco import read_coco
from data_prep.writer import ShardJob, Skip, WriterError, node_shards, shard_ranges, write_shards

SETTINGS = CropSettings(resolution=48, min_area_fraction=0.002, min_side=10, max_aspect_ratio=4.0, jpeg_quality=90)


class SimulatedKill(BaseException):
    """Not an Exception: the writer must not swallow it (like SIGINT/SIGKILL ending the run)."""


def _dies_at(record, settings, key):
    if record.key == key:
        raise SimulatedKill(key)
    return make_crop_sample(record, settings)


@pytest.fixture(scope="module")
def coco_records(data_dir):
    records, report = read_coco(data_dir / "coco_sample/annotations.json", data_dir / "coco_sample/images", SETTINGS)
    assert len(records) >= 12  # enough for several shards
    return records, report


def _write(records, report, out, **job):
    spec = dict(name="coco", shard_size=4, workers=1, progress=False)
    spec.update(job)
    return write_shards(
        records,
        functools.partial(make_crop_sample, settings=SETTINGS),
        ShardJob(out_dir=out, **spec),
        settings=SETTINGS.to_dict(),
        source=report.to_dict(),
        source_skipped=report.skipped,
    )


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(coco_records, tmp_path_factory):
    """One uninterrupted single-node run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    manifest = _write(*coco_records, out)
    return out, manifest


def test_shard_plan():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 4) == []
    assert node_shards(7, 0, 3) == [0, 3, 6] and node_shards(7, 2, 3) == [2, 5]
    assert sorted(node_shards(7, 0, 3) + node_shards(7, 1, 3) + node_shards(7, 2, 3)) == list(range(7))


def test_manifest_tells_the_truth(reference, coco_records):
    out, manifest = reference
    records, report = coco_records
    tars = _tars(out)
    assert manifest["num_shards"] == len(tars) == -(-len(records) // 4)
    assert manifest["complete"] and manifest["items"] == len(records)
    assert manifest["skipped_in_source"] == dict(report.skipped) and report.skipped["crowd"] == 1
    counted = 0
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            names = tar.getnames()
            for member in tar.getmembers():
                assert (member.mtime, member.uname, member.mode) == (946684800, "zsp", 0o444)
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert shard["samples"] == len(keys) and len(names) == 3 * len(keys)
        assert shard["samples"] + sum(shard["skipped"].values()) == shard["items"][1] - shard["items"][0]
        counted += len(keys)
    assert manifest["samples"] == counted
    assert manifest["samples"] + sum(manifest["skipped_in_shards"].values()) == len(records)
    assert manifest["settings"]["resolution"] == 48


def test_mask_box_agrees_with_box_in_crop_in_every_sample(reference):
    out, _ = reference
    seen = 0
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in members:
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            meta = json.loads(members[name])
            image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            mask = Image.open(io.BytesIO(members[f"{key}.mask.png"]))
            assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (48, 48)
            values = np.asarray(mask)
            assert set(np.unique(values)) <= {0, 255}
            tight = mask_bbox(values > 0)
            box = [v * 48 for v in meta["box_in_crop"]]
            # COCO boxes are the polygons' tight boxes: edges agree to ~1 px at 48 px
            assert max(abs(a - b) for a, b in zip(tight, box)) <= 1.6, (key, tight, box)
            assert box_iou(tight, box) >= 0.8
            for field in (
                "schema",
                "source",
                "image_id",
                "annotation_id",
                "category",
                "image_size",
                "bbox_xyxy",
                "crop_xyxy",
                "box_in_crop",
            ):
                assert field in meta
            seen += 1
    assert seen >= 10


def test_rerun_is_byte_identical_and_keeps_finished_shards(reference, coco_records, tmp_path):
    out, manifest = reference
    again = _write(*coco_records, tmp_path)
    assert _tars(tmp_path) == _tars(out)
    assert (tmp_path / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    resumed = _write(*coco_records, tmp_path)  # everything is there: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == stamps
    assert resumed == again == manifest


def test_killed_run_resumes_to_the_same_bytes(reference, coco_records, tmp_path):
    out, _ = reference
    records, report = coco_records
    victim = records[9].key  # in shard 2 (items 8..11)
    dying = functools.partial(_dies_at, settings=SETTINGS, key=victim)
    with pytest.raises(SimulatedKill):
        write_shards(
            records,
            dying,
            ShardJob(tmp_path, "coco", shard_size=4, progress=False),
            settings=SETTINGS.to_dict(),
            source=report.to_dict(),
            source_skipped=report.skipped,
        )
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["coco-000000.tar", "coco-000001.tar"]
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "manifest.json").exists()
    # What a SIGKILL leaves behind: another shard's half-written temp file, and a stats file whose
    # tar was never renamed into place.
    (tmp_path / ".coco-000003.tar.tmp-424242").write_bytes(b"half a tar")
    (tmp_path / "_shard_stats" / "coco-000003.json").write_text(json.dumps({"fingerprint": "stale", "bytes": 1}))
    kept = (tmp_path / "coco-000000.tar").stat().st_mtime_ns
    _write(records, report, tmp_path)
    assert _tars(tmp_path) == _tars(out)
    assert (tmp_path / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert (tmp_path / "coco-000000.tar").stat().st_mtime_ns == kept
    assert not list(tmp_path.glob(".*tmp*"))


def test_two_nodes_union_equals_one_node_and_merge(reference, coco_records, tmp_path):
    out, manifest = reference
    n0 = _write(*coco_records, tmp_path, node_rank=0, num_nodes=2)
    assert not n0["complete"] and {s["index"] for s in n0["shards"]} == set(node_shards(manifest["num_shards"], 0, 2))
    with pytest.raises(WriterError, match=r"missing node\(s\) \[1\]"):
        merge_manifests(tmp_path)
    _write(*coco_records, tmp_path, node_rank=1, num_nodes=2)
    assert _tars(tmp_path) == _tars(out)
    merged = merge_manifests(tmp_path, verify=True)
    assert merged["complete"] and merged["nodes"]["num_nodes"] == 2
    for field in (
        "samples",
        "skipped",
        "skipped_in_source",
        "skipped_in_shards",
        "shards",
        "num_shards",
        "fingerprint",
        "settings",
    ):
        assert merged[field] == manifest[field], field


def test_two_workers_write_the_same_bytes(reference, coco_records, tmp_path):
    out, manifest = reference
    got = _write(*coco_records, tmp_path, workers=2)
    assert _tars(tmp_path) == _tars(out)
    assert got["shards"] == manifest["shards"]


def test_refuses_to_mix_runs(reference, coco_records, tmp_path):
    records, report = coco_records
    _write(records, report, tmp_path)
    before = _tars(tmp_path)
    other = CropSettings(**{**SETTINGS.to_dict(), "resolution": 32})
    with pytest.raises(WriterError, match="other settings or inputs"):
        write_shards(
            records,
            functools.partial(make_crop_sample, settings=other),
            ShardJob(tmp_path, "coco", shard_size=4, progress=False),
            settings=other.to_dict(),
        )
    with pytest.raises(WriterError, match="plans only"):
        _write(records[:4], report, tmp_path)
    assert _tars(tmp_path) == before  # nothing was touched
    _write(records[:4], report, tmp_path, overwrite=True)
    assert sorted(_tars(tmp_path)) == ["coco-000000.tar"]


def _flaky(item):
    if item["key"] == "b":
        raise Skip("too_blue", "b.jpg")
    if item["key"] == "c":
        raise RuntimeError("decoder exploded on c.jpg")
    if item["key"] == "d":
        return {"__key__": "bad.key", "txt": b"x"}
    return {"__key__": item["key"], "txt": item["key"].encode(), "__notes__": ["touched"]}


def test_generic_writer_counts_every_failure(tmp_path, caplog):
    items = [{"key": k} for k in "abcde"]
    manifest = write_shards(items, _flaky, ShardJob(tmp_path, "toy", shard_size=10, progress=False), settings={"v": 1})
    assert manifest["samples"] == 2
    assert manifest["skipped"] == {"error_RuntimeError": 1, "invalid_key": 1, "too_blue": 1}
    assert manifest["notes"] == {"touched": 2}
    assert "decoder exploded on c.jpg" in caplog.text and "b.jpg" in caplog.text
    with tarfile.open(tmp_path / "toy-000000.tar") as tar:
        assert tar.getnames() == ["a.txt", "e.txt"]
    with pytest.raises(WriterError, match="unique keys"):
        write_shards([{"key": "a"}, {"key": "a"}], _flaky, ShardJob(tmp_path / "x", "toy", progress=False), settings={})


def test_overwrite_on_one_node_spares_the_others(coco_records, tmp_path):
    for rank in (0, 1):
        _write(*coco_records, tmp_path, node_rank=rank, num_nodes=2)
    theirs = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar") if int(p.stem.split("-")[1]) % 2 == 1}
    mine = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar") if int(p.stem.split("-")[1]) % 2 == 0}
    _write(*coco_records, tmp_path, node_rank=0, num_nodes=2, overwrite=True)
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in theirs} == theirs  # node 1's work is untouched
    assert all((tmp_path / n).stat().st_mtime_ns != t for n, t in mine.items())  # node 0 rewrote its own
    assert merge_manifests(tmp_path)["complete"]
