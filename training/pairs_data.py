"""Location-pair data for `training.location_mlp`: pair shards (COCO and/or generated) -> box batches.

A pair sample is tiny (two words, two boxes), so the shards are read once into memory (the JSON
members only; generated pairs' images are skipped, never decoded) and batches are drawn from
there. That keeps the reader short and makes every batch a pure function of (seed, epoch, rank):

    shard spec (path / glob / brace / `a::b` list; COCO and generated shards mix freely)
      -> tar reading by the shards' index (`training.shard_reader`; a broken shard or member is logged and skipped)
      -> JSON check against the pair contract (a bad sample is counted and skipped)
      -> hold-out split by key hash (`val_fraction`), stable across runs and shard orders
      -> epochs of seeded permutations for this rank (endless) -> layout flip -> batches

Each rank draws from all pairs with its own seed (the shards are small; no node split needed).

Layout flip (`layout_flip`): a scene and its mirror image are equally likely, so a regression on raw
layouts averages "a left of b" with "a right of b" and puts both boxes in the middle. "canonical"
(default) mirrors every pair so that the first word's box centre is left of the second's: the MLP
learns one consistent arrangement, sizes and vertical placement untouched. "random" mirrors half
of the pairs at random (augmentation); "none" keeps the data as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from encoders.common.shards import check_pair_sample

from .shard_reader import ShardSet, mix_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairExample:
    key: str
    words: tuple[str, str]
    boxes: tuple[tuple[float, float, float, float], tuple[float, float, float, float]]
    source: str


def read_pair_shards(spec: str | Sequence[str]) -> tuple[list[PairExample], Counter]:
    """Every valid pair sample of the shards (sorted by key, duplicates dropped) and the bad ones by reason."""
    shards = ShardSet.open(spec)
    bad: Counter = Counter()
    found: dict[str, PairExample] = {}
    for shard in range(len(shards.urls)):
        for index in range(shards.count(shard)):
            try:
                sample = shards.read(shard, index, exts=["json"])
            except OSError as err:
                bad["unreadable"] += 1
                logger.warning("skipping a pair sample of %s: %s", shards.urls[shard], err)
                continue
            _add_pair(sample, found, bad)
    return [found[k] for k in sorted(found)], bad


def _add_pair(sample: dict, found: dict[str, PairExample], bad: Counter) -> None:
    """Check one raw pair sample against the contract; keep it in `found` or count why it is bad."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}:{key}"
    raw = sample.get("json")
    if raw is None:
        bad["no_json"] += 1
        return
    try:
        meta = json.loads(raw)
        check_pair_sample(meta, where)
    except (ValueError, TypeError) as err:
        bad["invalid_pair"] += 1
        if bad["invalid_pair"] <= 5:
            logger.warning("skipping %s", err)
        return
    if key in found:
        bad["duplicate_key"] += 1
        return
    boxes = tuple(tuple(float(v) for v in b) for b in meta["boxes"])
    found[key] = PairExample(key, (meta["words"][0], meta["words"][1]), boxes, str(meta.get("source", "?")))


def is_holdout(key: str, val_fraction: float) -> bool:
    """Deterministic hold-out membership from the key alone."""
    if val_fraction <= 0:
        return False
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < val_fraction


def split_pairs(examples: Sequence[PairExample], val_fraction: float) -> tuple[list[PairExample], list[PairExample]]:
    """(train, validation); with too few pairs for a hold-out, validation reuses the training pairs (logged)."""
    val = [e for e in examples if is_holdout(e.key, val_fraction)]
    train = [e for e in examples if not is_holdout(e.key, val_fraction)]
    if not train:
        train, val = list(examples), list(examples)
    if not val and val_fraction > 0:
        logger.warning(
            "only %d pairs: none fell into the hold-out; validation IoU is measured on the training pairs", len(train)
        )
        val = list(train)
    return train, val


def flip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Mirror xyxy boxes `[..., 4]` in 0..1 left-right."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([1 - x1, y0, 1 - x0, y1], dim=-1)


LAYOUT_FLIPS = ("canonical", "random", "none")


def canonical_layout(boxes: torch.Tensor) -> torch.Tensor:
    """Mirror pairs `[N, 2, 4]` whose first box centre lies right of the second's (see the module docstring)."""
    centre = (boxes[..., 0] + boxes[..., 2]) / 2
    mirror = centre[:, 0] > centre[:, 1]
    out = boxes.clone()
    out[mirror] = flip_boxes(boxes[mirror])
    return out


class PairBatches:
    """Endless iterable of batches `{"index_a", "index_b": [B] long, "boxes": [B, 2, 4]}` over `examples`.

    `word_index` maps each word to its row in the trainer's embedding table. Sample position p of the
    stream is pair `perm_e[p % N]` of epoch e = p // N, each epoch's permutation seeded by (seed, rank,
    e), and the random layout flips of batch b are seeded by (seed, rank, b): the stream is a function of
    (seed, rank) and the batch number, so `load_state_dict` restarts it at any batch without replaying.
    """

    def __init__(
        self,
        examples: Sequence[PairExample],
        word_index: dict[str, int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        layout_flip: str = "canonical",
    ):
        if not examples:
            raise ValueError("no pairs to train on")
        if layout_flip not in LAYOUT_FLIPS:
            raise ValueError(f"layout_flip must be one of {', '.join(LAYOUT_FLIPS)}, got {layout_flip!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.index_a = torch.tensor([word_index[e.words[0]] for e in examples])
        self.index_b = torch.tensor([word_index[e.words[1]] for e in examples])
        boxes = torch.tensor([e.boxes for e in examples], dtype=torch.float32)
        self.boxes = canonical_layout(boxes) if layout_flip == "canonical" else boxes
        self.batch_size, self.seed, self.rank, self.layout_flip = batch_size, seed, rank, layout_flip
        self.batches = 0  # batches handed out so far: the stream's position
        self._perm: tuple[int, torch.Tensor] | None = None

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, self.rank, *parts))

    def _indices(self, start: int, count: int) -> torch.Tensor:
        n = len(self.boxes)
        out = []
        for p in range(start, start + count):
            epoch = p // n
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, torch.randperm(n, generator=self._generator(epoch, 0x5045)))
            out.append(int(self._perm[1][p % n]))
        return torch.tensor(out, dtype=torch.long)

    def __iter__(self) -> Iterator[dict]:
        while True:
            b = self.batches
            idx = self._indices(b * self.batch_size, self.batch_size)
            boxes = self.boxes[idx].clone()
            if self.layout_flip == "random":
                flip = torch.rand(len(idx), generator=self._generator(b, 0x464C)) < 0.5
                boxes[flip] = flip_boxes(boxes[flip])
            self.batches = b + 1
            yield {"index_a": self.index_a[idx], "index_b": self.index_b[idx], "boxes": boxes}
