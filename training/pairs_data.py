"""Location-pair data for `training.location_mlp`: pair shards (COCO and/or generated) -> box batches.

A pair sample is tiny (two words, two boxes), so the shards are read once into memory (the JSON
members only; generated pairs' images are skipped, never decoded) and batches are drawn from
there. That keeps the reader short and makes every batch a pure function of (seed, epoch, rank):

    shard spec (path / glob / brace / `a::b` list; COCO and generated shards mix freely)
      -> WebDataset tar reading (a broken shard or member is logged and skipped)
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
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from encoders.common.shards import check_pair_sample, expand_shard_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairExample:
    key: str
    words: tuple[str, str]
    boxes: tuple[tuple[float, float, float, float], tuple[float, float, float, float]]
    source: str


def _log_and_continue(exn: Exception) -> bool:
    logger.warning("skipping bad pair shard data: %r", exn)
    return True


def read_pair_shards(spec: str | Sequence[str]) -> tuple[list[PairExample], Counter]:
    """Every valid pair sample of the shards (sorted by key, duplicates dropped) and the bad ones by reason."""
    import webdataset as wds

    urls = expand_shard_spec(spec)
    bad: Counter = Counter()
    found: dict[str, PairExample] = {}
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=_log_and_continue))
    for sample in pipeline:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        raw = sample.get("json")
        if raw is None:
            bad["no_json"] += 1
            continue
        try:
            meta = json.loads(raw)
            check_pair_sample(meta, where)
        except (ValueError, TypeError) as err:
            bad["invalid_pair"] += 1
            if bad["invalid_pair"] <= 5:
                logger.warning("skipping %s", err)
            continue
        if key in found:
            bad["duplicate_key"] += 1
            continue
        boxes = tuple(tuple(float(v) for v in b) for b in meta["boxes"])
        found[key] = PairExample(key, (meta["words"][0], meta["words"][1]), boxes, str(meta.get("source", "?")))
    return [found[k] for k in sorted(found)], bad


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
        logger.warning("only %d pairs: none fell into the hold-out; validation IoU is measured on the training pairs", len(train))
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

    `word_index` maps each word to its row in the trainer's embedding table. Epochs of seeded
    permutations follow each other (a set smaller than a batch is repeated within the batch); the
    whole stream is a function of (seed, rank), so a resumed run that skips N batches continues
    exactly. `epoch_batches()` gives one pass in order (validation).
    """

    def __init__(self, examples: Sequence[PairExample], word_index: dict[str, int], batch_size: int,
                 seed: int = 0, rank: int = 0, layout_flip: str = "canonical"):
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

    def __iter__(self) -> Iterator[dict]:
        g = torch.Generator().manual_seed(random.Random(f"{self.seed}:{self.rank}").getrandbits(63))
        n = len(self.boxes)
        pending = torch.empty(0, dtype=torch.long)
        while True:
            while len(pending) < self.batch_size:
                pending = torch.cat([pending, torch.randperm(n, generator=g)])
            idx, pending = pending[: self.batch_size], pending[self.batch_size :]
            boxes = self.boxes[idx].clone()
            if self.layout_flip == "random":
                flip = torch.rand(len(idx), generator=g) < 0.5
                boxes[flip] = flip_boxes(boxes[flip])
            yield {"index_a": self.index_a[idx], "index_b": self.index_b[idx], "boxes": boxes}
