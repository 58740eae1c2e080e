"""Random access into tar shards, and a sample order that is a pure function of its position.

WebDataset streams a tar from its first byte, so a stream can only be resumed by reading (and, with a
shuffle buffer, decoding) everything before the resume point: an hour per requeue at step 150k. Here
every shard is opened by its index (`NAME-000003.index.jsonl` beside it, written by `data_prep`; for
shards without one, the tar headers are scanned once at start-up) and a sample is read by seeking to
its members. The order of one reader (one per rank and data-loader worker) is defined in rounds:

- round r draws `shards_per_round` shards (with replacement: `resampled`, endless, every rank from
  all shards; or, for one pass per epoch, consecutive shards of this reader's share after a seeded
  shuffle and the node/worker split), and a seeded permutation of all their samples;
- position p of the reader is the p-th sample of that sequence: finding its round needs only the
  shards' sample counts, so restarting at step 150,000 costs what restarting at step 10 does;
- each sample's own randomness (augmentations) is seeded by (seed, epoch, rank, worker, p).

`ShardSet` holds the shards and their members and reads one sample; `reader_positions` yields the
(position, shard, sample index) of one reader from any position on. The loaders built on them count
and skip a sample that cannot be read, and stop with an error naming the shard after
`max_consecutive_failures` bad samples in a row (shards that are all broken never make a trainer spin).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from encoders.common.shards import ShardSpecError, expand_local_shards, index_file_name

logger = logging.getLogger(__name__)

Members = dict[str, tuple[int, int]]  # member extension -> (byte offset of its data, size)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (
            value * 6364136223846793005 + (int(part) & 0xFFFFFFFFFFFFFFFF) + 1442695040888963407
        ) & 0xFFFFFFFFFFFFFFFF
    return value >> 1


def _scan_tar(url: str) -> list[tuple[str, Members]]:
    """(key, members) of every sample of a tar, in order, from its headers (data is seeked over)."""
    samples: dict[str, Members] = {}
    with tarfile.open(url) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = Path(member.name).name.partition(".")
            samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    return list(samples.items())


def _read_index(url: str) -> list[tuple[str, Members]] | None:
    """The shard's index (key + member offsets per line), or None when it has none or it does not fit
    the tar (written before the shard was replaced, or for another file)."""
    path = index_file_name(url)
    if not path.is_file():
        return None
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            entries.append((row["key"], {ext: (int(o), int(n)) for ext, (o, n) in row["members"].items()}))
    end = max((o + n for _, members in entries for o, n in members.values()), default=0)
    if path.stat().st_mtime < os.stat(url).st_mtime - 1 or end > os.stat(url).st_size:
        logger.info("%s does not match %s; reading the tar's headers instead", path, url)
        return None
    return entries


@dataclass
class ShardSet:
    """Local shards and the members of each of their samples; shards that cannot be read are left out."""

    urls: list[str]
    samples: list[list[tuple[str, Members]]]

    @classmethod
    def open(cls, spec: str | Sequence[str], what: str = "train_shards") -> ShardSet:
        """Expand a shard spec and index every shard; errors name the spec and the first bad file."""
        urls = expand_local_shards(spec, what)
        kept, samples, bad, empty = [], [], [], []
        for url in urls:
            try:
                entries = _read_index(url)
                if entries is None:
                    entries = _scan_tar(url)
            except (OSError, tarfile.TarError, ValueError, KeyError) as err:
                bad.append((url, err))
                continue
            if not entries:
                empty.append(url)  # a shard all of whose items were skipped when it was written
                continue
            kept.append(url)
            samples.append(entries)
        for url, err in bad[:5]:
            logger.warning("skipping shard %s: %s", url, err)
        if empty:
            logger.info("%s: %d empty shard(s) left out (e.g. %s)", what, len(empty), empty[0])
        if not kept:
            url, err = bad[0] if bad else (empty[0], "it holds no samples")
            raise ShardSpecError(f"{what}={spec!r}: none of the {len(urls)} shard(s) can be read (first: {url}: {err})")
        if bad:
            logger.warning("%s: %d of %d shards could not be read and are left out", what, len(bad), len(urls))
        return cls(kept, samples)

    def count(self, shard: int) -> int:
        return len(self.samples[shard])

    def read(self, shard: int, index: int, exts: Sequence[str] | None = None) -> dict:
        """One sample as WebDataset gives it: {"__key__", "__url__", ext: bytes, ...}."""
        url = self.urls[shard]
        key, members = self.samples[shard][index]
        sample: dict = {"__key__": key, "__url__": url}
        with open(url, "rb") as f:
            for ext, (offset, size) in members.items():
                if exts is not None and ext not in exts:
                    continue
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise OSError(f"{url}: member {key}.{ext} is cut short ({len(data)} of {size} bytes)")
                sample[ext] = data
        return sample


@dataclass(frozen=True)
class ReaderPlan:
    """Which shards one reader draws from, and how (see the module docstring)."""

    seed: int
    rank: int
    world_size: int
    reader: int
    num_readers: int
    shards_per_round: int
    resampled: bool

    def shard_order(self, shards: ShardSet, epoch: int) -> list[int]:
        """Non-resampled: this reader's shards for `epoch` (a seeded shuffle, split by node then worker)."""
        order = list(range(len(shards.urls)))
        random.Random(mix_seed(self.seed, epoch, 0x5A4D)).shuffle(order)
        return order[self.rank :: self.world_size][self.reader :: self.num_readers]

    def round_shards(self, shards: ShardSet, epoch: int, r: int, order: list[int] | None) -> list[int]:
        """The shards of round r (empty once a non-resampled epoch is used up)."""
        k = max(1, self.shards_per_round)
        if self.resampled:
            rng = random.Random(mix_seed(self.seed, epoch, self.rank, self.reader, r, 0x524F))
            return [rng.randrange(len(shards.urls)) for _ in range(k)]
        return (order or [])[r * k : (r + 1) * k]

    def round_items(self, shards: ShardSet, epoch: int, r: int, picked: list[int]) -> list[tuple[int, int]]:
        """(shard, sample) pairs of round r, in their seeded order."""
        items = [(s, i) for s in picked for i in range(shards.count(s))]
        if self.shards_per_round > 0:
            random.Random(mix_seed(self.seed, epoch, self.rank, self.reader, r, 0x5045)).shuffle(items)
        return items

    def sample_seed(self, epoch: int, position: int) -> int:
        return mix_seed(self.seed, epoch, self.rank, self.reader, position, 0x5341)


def reader_positions(shards: ShardSet, plan: ReaderPlan, epoch: int, start: int = 0) -> Iterator[tuple[int, int, int]]:
    """(position, shard, sample index) from position `start` of `epoch`, until the epoch ends (never,
    when resampled). Skipping to `start` reads nothing: whole rounds are passed over by their counts."""
    order = None if plan.resampled else plan.shard_order(shards, epoch)
    r, first = 0, 0
    while True:
        picked = plan.round_shards(shards, epoch, r, order)
        if not picked:
            return
        size = sum(shards.count(s) for s in picked)
        if first + size <= start:
            r, first = r + 1, first + size
            continue
        items = plan.round_items(shards, epoch, r, picked)
        for j in range(max(0, start - first), size):
            shard, index = items[j]
            yield first + j, shard, index
        r, first = r + 1, first + size
