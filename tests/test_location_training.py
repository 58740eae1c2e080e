"""Location-MLP training: box loss, a synthetic layout rule learned to high IoU, the pair loader, and the
trainer on the shared loop (COCO + generated shards, checkpoints, exact resume, export)."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds

from encoders.anchors import coco_class_names, embed_words
from encoders.location_mlp import LocationMLP
from training.location_mlp import LocationMLPConfig, LocationMLPTask, box_iou_giou, box_loss
from training.loop import run_training
from training.pairs_data import PairBatches, PairExample, canonical_layout, read_pair_shards, split_pairs

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_iou_and_giou_values():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    far = torch.tensor([[0.75, 0.75, 1.0, 1.0]])
    iou, giou = box_iou_giou(a, b)
    assert iou.item() == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert giou.item() == pytest.approx(iou.item() - (0.5625 - 0.4375) / 0.5625)
    iou, giou = box_iou_giou(a, far)  # disjoint: IoU 0, GIoU negative
    assert iou.item() == 0 and giou.item() == pytest.approx(-(1 - (0.25 + 0.0625)) / 1.0)
    same_loss, logs = box_loss(a.expand(1, 2, 4), a.expand(1, 2, 4))
    assert same_loss.item() == pytest.approx(0.0, abs=1e-6) and logs["iou"].item() == pytest.approx(1.0)


def _rule(index_a: int, index_b: int) -> list[list[float]]:
    """A synthetic layout: each word has its own size and height; the lower-index word goes left."""

    def box(i, left):
        size = 0.2 + 0.05 * (i % 6)
        top = 0.1 + 0.08 * (i % 5)
        x0 = 0.05 if left else 0.95 - size
        return [x0, top, x0 + size, top + size]

    return [box(index_a, index_a < index_b), box(index_b, index_b < index_a)]


def test_mlp_fits_a_synthetic_layout_rule(tiny_sd_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    words = coco_class_names()[:12]
    emb = embed_words(
        words,
        CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer"),
        CLIPTextModel.from_pretrained(tiny_sd_path / "text_encoder"),
    )
    pairs = [(i, j) for i in range(12) for j in range(12) if i != j]
    held_out = set(pairs[::9])
    train = [p for p in pairs if p not in held_out]
    model = LocationMLP(embedding_dim=emb.shape[1], hidden_dim=128, num_layers=2, min_box_size=0.02)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(ps):
        a = torch.tensor([p[0] for p in ps])
        b = torch.tensor([p[1] for p in ps])
        return emb[a], emb[b], torch.tensor([_rule(*p) for p in ps])

    ea, eb, target = batch(train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
    try:
        for _ in range(300):
            loss, logs = box_loss(model(ea, eb), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        train_iou = box_iou_giou(model(ea, eb), target)[0].mean().item()
        va, vb, vt = batch(sorted(held_out))
        val_iou = box_iou_giou(model(va, vb), vt)[0].mean().item()
    assert train_iou > 0.9, train_iou
    assert val_iou > 0.75, val_iou  # unseen combinations of seen words


def _write_pairs(path, samples):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, meta, extra in samples:
            sink.write({"__key__": key, "json": json.dumps(meta).encode(), **extra})


@pytest.fixture
def pair_shards(tmp_path):
    words = ["cat", "dog", "car", "bus", "person", "bench"]
    coco, gen = [], []
    for i, a in enumerate(words):
        for j, b in enumerate(words):
            if i < j:
                boxes = _rule(i, j)
                coco.append((f"coco_{i}_{j}", {"words": [a, b], "boxes": boxes, "source": "coco"}, {}))
                gen.append(
                    (
                        f"gen_{i}_{j}",
                        {"words": [b, a], "boxes": boxes[::-1], "source": "generated"},
                        {"jpg": b"\xff\xd8not-a-real-jpeg"},
                    )
                )  # never decoded by the pair loader
    coco.append(("coco_bad", {"words": ["cat"], "boxes": [[0, 0, 1, 1]], "source": "coco"}, {}))
    coco.append(("coco_flat", {"words": ["cat", "dog"], "boxes": [[0.5, 0, 0.5, 1], [0, 0, 1, 1]]}, {}))
    _write_pairs(tmp_path / "coco" / "pairs-coco-000000.tar", coco)
    _write_pairs(tmp_path / "gen" / "pairs-gen-000000.tar", gen)
    return f"{tmp_path / 'coco'}::{tmp_path / 'gen' / 'pairs-gen-{000000..000000}.tar'}"


def test_pair_reader_mixes_sources_and_skips_bad_samples(pair_shards):
    examples, bad = read_pair_shards(pair_shards)
    assert len(examples) == 30 and bad == {"invalid_pair": 2}
    assert {e.source for e in examples} == {"coco", "generated"}
    train, val = split_pairs(examples, 0.2)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 30 and val
    assert split_pairs(examples, 0.2) == (train, val)  # by key hash: stable


def test_pair_batches_are_deterministic_and_canonical():
    examples = [PairExample(f"k{i}", ("a", "b"), ((0.6, 0, 0.9, 0.5), (0.1, 0.2, 0.3, 0.4)), "coco") for i in range(5)]
    index = {"a": 0, "b": 1}
    first = [b["boxes"] for _, b in zip(range(4), PairBatches(examples, index, 3, seed=1))]
    second = [b["boxes"] for _, b in zip(range(4), PairBatches(examples, index, 3, seed=1))]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # canonical: the first word's box is mirrored to the left, sizes kept
    assert first[0][0].flatten().tolist() == pytest.approx([0.1, 0, 0.4, 0.5, 0.7, 0.2, 0.9, 0.4])
    assert canonical_layout(first[0]).tolist() == first[0].tolist()
    with pytest.raises(ValueError, match="layout_flip"):
        PairBatches(examples, index, 3, layout_flip="sideways")


def _config(tmp_path, shards, tiny_sd_path, name, **kw):
    base = dict(
        pretrained_model_name_or_path=str(tiny_sd_path),
        train_shards=shards,
        output_dir=str(tmp_path / name),
        max_steps=12,
        train_batch_size=8,
        learning_rate=3e-3,
        checkpointing_steps=6,
        report_to="none",
        logging_steps=4,
        hidden_dim=64,
        num_layers=2,
        val_fraction=0.2,
        validation_steps=12,
    )
    base.update(kw)
    return LocationMLPConfig(**base)


def test_trainer_exports_resumes_exactly_and_records_the_base_model(tmp_path, pair_shards, tiny_sd_path):
    full = run_training(LocationMLPTask(_config(tmp_path, pair_shards, tiny_sd_path, "full")))
    mlp = LocationMLP.from_pretrained(full, subfolder="location_mlp")
    assert mlp.vocabulary == sorted(["cat", "dog", "car", "bus", "person", "bench"])
    assert mlp.config.pretrained_model_name_or_path == str(tiny_sd_path)
    assert mlp.vocabulary_embeddings.abs().sum() > 0
    assert "location_mlp" in (full / "README.md").read_text()
    metrics = json.loads((tmp_path / "full" / "location_mlp_metrics.json").read_text())
    assert 0 <= metrics["val_iou"] <= 1 and metrics["val_pairs"] > 0
    assert (tmp_path / "full" / "validation" / "step-000012.png").is_file()

    # interrupted at step 6, resumed to 12: the same weights as the uninterrupted run
    run_training(LocationMLPTask(_config(tmp_path, pair_shards, tiny_sd_path, "resumed", max_steps=6)))
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    resumed = run_training(
        LocationMLPTask(_config(tmp_path, pair_shards, tiny_sd_path, "resumed", resume_from_checkpoint="latest"))
    )
    again = LocationMLP.from_pretrained(resumed, subfolder="location_mlp")
    for (name, p), q in zip(mlp.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_trainer_config_errors(tmp_path, tiny_sd_path):
    from encoders.common.config import ConfigError

    with pytest.raises(ConfigError, match="train_shards is required"):
        LocationMLPConfig(output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="layout_flip"):
        LocationMLPConfig(train_shards="x", layout_flip="sideways")
