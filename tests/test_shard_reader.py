"""Random access into shards (training.shard_reader) and the loaders built on it: the index matches the
tar, a reader restarted at position p yields exactly what the uninterrupted reader yields from p, loaders
restored from `state_dict()` continue with the same batches (with and without workers) without reading
the skipped samples, and bad shard specs fail at start-up naming the file."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from encoders.common.shards import ShardSpecError, index_file_name
from training.crop_data import CropDataConfig, build_crop_dataloader
from training.shard_reader import ReaderPlan, ShardSet, _read_index, _scan_tar, reader_positions


def _tars(folder):
    return sorted(str(p) for p in folder.rglob("*.tar"))


def test_the_index_beside_each_shard_matches_its_tar(crop_shards):
    for url in _tars(crop_shards):
        assert index_file_name(url).is_file()
        assert _read_index(url) == _scan_tar(url)
    shards = ShardSet.open(_tars(crop_shards))
    sample = shards.read(0, 1)
    assert set(sample) >= {"__key__", "__url__", "jpg", "mask.png", "json"} and sample["jpg"][:2] == b"\xff\xd8"


def test_a_shard_without_index_is_read_by_its_headers(crop_shards, tmp_path):
    url = _tars(crop_shards)[0]
    copy = tmp_path / "plain.tar"
    shutil.copy(url, copy)  # no index beside it
    assert ShardSet.open(str(copy)).samples[0] == _scan_tar(url)


@pytest.mark.parametrize("resampled", [True, False])
def test_a_reader_restarted_at_p_continues_exactly(crop_shards, resampled):
    shards = ShardSet.open(_tars(crop_shards))
    plan = ReaderPlan(seed=3, rank=0, world_size=1, reader=0, num_readers=1, shards_per_round=2, resampled=resampled)
    whole = list(itertools.islice(reader_positions(shards, plan, epoch=1), 60))
    for start in (0, 1, 7, 25):
        assert list(itertools.islice(reader_positions(shards, plan, epoch=1, start=start), 60 - start)) == whole[start:]
    if not resampled:  # one pass: every sample exactly once
        total = sum(shards.count(s) for s in range(len(shards.urls)))
        assert sorted((s, i) for _, s, i in whole) == sorted(
            (s, i) for s in range(len(shards.urls)) for i in range(shards.count(s))
        )
        assert len(whole) == total
        other = [(s, i) for _, s, i in reader_positions(shards, plan, epoch=2)]
        assert other != [(s, i) for _, s, i in whole]  # the next epoch reshuffles


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_loader_continues_with_the_same_batches(crop_shards, workers):
    cfg = CropDataConfig(resolution=32, clip_size=32, shuffle_shards=2, scale_augment="shrink", scale_prob=0.5)

    def make():
        return build_crop_dataloader(crop_shards, cfg, batch_size=2, vae_scale_factor=2, num_workers=workers, seed=5)

    loader = make()
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = [next(it) for _ in range(4)]

    again = make()
    again.load_state_dict(state)
    resumed = list(itertools.islice(iter(again), 4))
    for a, b in zip(rest, resumed):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        for name in ("pixel_values", "clip_pixel_values", "valid_mask"):
            assert torch.equal(a[name], b[name])
    assert [b["key"] for b in first] != [b["key"] for b in rest]


def test_restoring_reads_none_of_the_skipped_samples(crop_shards, monkeypatch):
    cfg = CropDataConfig(resolution=32, clip_size=32)
    loader = build_crop_dataloader(crop_shards, cfg, batch_size=2, vae_scale_factor=2, seed=0)
    state = {"epoch": 0, "positions": [100_000], "next_reader": 0, "num_workers": 0, "skipped": 0}
    reads = []
    original = ShardSet.read
    monkeypatch.setattr(ShardSet, "read", lambda self, *a, **k: reads.append(a) or original(self, *a, **k))
    loader.load_state_dict(state)
    next(iter(loader))
    assert len(reads) == 2  # one batch of 2, read at position 100,000: nothing before it was touched
    assert loader.state_dict()["positions"] == [100_002]


def test_a_loader_saved_with_other_workers_is_refused(crop_shards):
    loader = build_crop_dataloader(
        crop_shards, CropDataConfig(resolution=32, clip_size=32), batch_size=1, vae_scale_factor=2, num_workers=2
    )
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        loader.load_state_dict({"epoch": 0, "positions": [4], "next_reader": 0, "num_workers": 0})


def test_bad_shard_specs_fail_at_start_up_naming_the_file(crop_shards, tmp_path):
    with pytest.raises(ShardSpecError, match="does-not-exist-000000.tar does not exist"):
        ShardSet.open(str(tmp_path / "does-not-exist-{000000..000003}.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardSpecError, match="no shards found"):
        ShardSet.open(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b-{i:06d}.tar").write_bytes(b"\x00" * 700)
    with pytest.raises(ShardSpecError, match=r"none of the 3 shard\(s\) can be read \(first: .*b-000000.tar"):
        ShardSet.open(str(broken))
    with pytest.raises(ShardSpecError, match="not a local file"):
        ShardSet.open("https://example.org/shards-000000.tar")


def test_shards_whose_samples_all_fail_stop_training_with_an_error(tmp_path, crop_shards):
    """Tars that read but hold no crop sample (e.g. pair shards given by mistake): a bounded number of
    failures, then an error naming the shard; never an endless loop of warnings."""
    import io
    import tarfile

    bad = tmp_path / "notcrops-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for i in range(10):
            data = b'{"words": ["a", "b"]}'
            info = tarfile.TarInfo(f"k{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = CropDataConfig(resolution=32, clip_size=32, max_consecutive_failures=8)
    loader = build_crop_dataloader(str(bad), cfg, batch_size=2, vae_scale_factor=2)
    with pytest.raises(
        ShardSpecError, match=r"8 crop samples in a row could not be read \(last: .*notcrops-000000.tar"
    ):
        next(iter(loader))
