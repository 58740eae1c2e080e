"""Train the location MLP (compositional inversion's spatial inversion) on location-pair shards.

    accelerate launch -m training.location_mlp --config configs/train/location_mlp.yaml [key=value ...]

`train_shards` takes pair shards from `python -m data_prep pairs coco` and/or `pairs generate`
(join several patterns with `::`). The two words of a pair become their input token embeddings in
the base model's text encoder (computed once; the text encoder is then dropped), the MLP predicts
both boxes, and the loss is DETR's box loss: `l1_weight` x L1 + `giou_weight` x (1 - GIoU).
A hold-out split (by key hash, `val_fraction`) gives the validation IoU, logged every
`validation_steps` with a picture of predicted (thick) vs true (thin) boxes, and written with the
final model. The shared loop (`training/loop.py`) does checkpoints, exact resume, logging and export;
the model lands in `<export_dir>/location_mlp/` with its training nouns and their embeddings (the
out-of-vocabulary fallback), and the base model it was trained for in its config.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from encoders.anchors import embed_words
from encoders.common.config import ConfigError, keyed_field, parse_config_cli
from encoders.common.hub import UnsupportedBaseError, check_supported_base
from encoders.location_mlp import LocationMLP

from .common_config import TrainConfig
from .export import export_model
from .loop import TrainingTask, run_from_command_line
from .pairs_data import PairBatches, read_pair_shards, split_pairs


@dataclass
class LocationMLPConfig(TrainConfig):
    """Keys of `training.location_mlp` (shared keys: training/common_config.py)."""

    output_dir: str = keyed_field("run folder: config.yaml, checkpoint-N/, logs/, validation/", "outputs/location_mlp")
    max_steps: int = keyed_field("optimizer steps to train for", 5000)
    train_batch_size: int = keyed_field("pairs per device per micro-step", 64)
    learning_rate: float = keyed_field("peak learning rate", 1e-3)
    checkpointing_steps: int = keyed_field("save checkpoint-N/ every N optimizer steps (0: only at the end)", 1000)
    hidden_dim: int = keyed_field("width of the MLP", 256)
    num_layers: int = keyed_field("hidden layers of the box head", 3)
    dropout: float = keyed_field("dropout in the box head", 0.0)
    min_box_size: float = keyed_field("smallest box side the model can predict (fraction of the image)", 0.02)
    l1_weight: float = keyed_field("weight of the L1 box loss (DETR: 5)", 5.0)
    giou_weight: float = keyed_field("weight of the 1 - GIoU box loss (DETR: 2)", 2.0)
    val_fraction: float = keyed_field("pairs held out for the validation IoU (by key hash)", 0.1)
    layout_flip: str = keyed_field(
        "canonical: mirror each pair so the first word is on the left (one consistent arrangement); "
        "random: mirror half at random; none: as the data is",
        "canonical",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train_shards:
            raise ConfigError("train_shards is required: pair shards from `python -m data_prep pairs coco|generate`")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.layout_flip not in ("canonical", "random", "none"):
            raise ConfigError(f"layout_flip must be canonical, random or none, got {self.layout_flip!r}")
        if self.l1_weight < 0 or self.giou_weight < 0 or self.l1_weight + self.giou_weight == 0:
            raise ConfigError("l1_weight and giou_weight must be >= 0, not both 0")


def box_iou_giou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise IoU and generalized IoU of xyxy boxes `[..., 4]` (valid boxes, x0 < x1, y0 < y1)."""
    top_left = torch.maximum(pred[..., :2], target[..., :2])
    bottom_right = torch.minimum(pred[..., 2:], target[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area_pred = (pred[..., 2:] - pred[..., :2]).prod(dim=-1)
    area_target = (target[..., 2:] - target[..., :2]).prod(dim=-1)
    union = area_pred + area_target - inter
    iou = inter / union.clamp_min(1e-9)
    hull = (torch.maximum(pred[..., 2:], target[..., 2:]) - torch.minimum(pred[..., :2], target[..., :2])).prod(dim=-1)
    return iou, iou - (hull - union) / hull.clamp_min(1e-9)


def box_loss(pred: torch.Tensor, target: torch.Tensor, l1_weight: float = 5.0, giou_weight: float = 2.0):
    """DETR's box loss on `[B, 2, 4]`: `l1_weight` * mean L1 + `giou_weight` * mean (1 - GIoU); also returns IoU."""
    iou, giou = box_iou_giou(pred.float(), target.float())
    l1 = (pred.float() - target.float()).abs().sum(dim=-1).mean()
    loss = l1_weight * l1 + giou_weight * (1 - giou).mean()
    return loss, {"l1": l1.detach(), "giou": giou.mean().detach(), "iou": iou.mean().detach()}


class LocationMLPTask(TrainingTask):
    name = "location_mlp"
    config: LocationMLPConfig

    def setup(self, accelerator, weight_dtype) -> None:
        cfg = self.config
        self.accelerator = accelerator
        examples, bad = read_pair_shards(cfg.train_shards)
        if not examples:
            raise ValueError(f"no valid pair samples in {cfg.train_shards!r} (bad: {dict(bad) or 'none'})")
        self.train_pairs, self.val_pairs = split_pairs(examples, cfg.val_fraction)
        sources = sorted({e.source for e in examples})
        accelerator.print(
            f"[location_mlp] {len(examples)} pairs from {', '.join(sources)} ({len(self.train_pairs)} train, "
            f"{len(self.val_pairs)} validation); skipped {dict(bad) or 'none'}"
        )
        words = sorted({w for e in examples for w in e.words})
        self.word_index = {w: i for i, w in enumerate(words)}
        try:  # SDXL: the words' rows of both embedding tables side by side (the width of its ELITE w0)
            sdxl = check_supported_base(cfg.pretrained_model_name_or_path, allow_sdxl=True)
        except UnsupportedBaseError as err:
            raise ConfigError(f"pretrained_model_name_or_path: {err}") from None
        parts = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if sdxl else [])
        tokenizers = [CLIPTokenizer.from_pretrained(cfg.pretrained_model_name_or_path, subfolder=t) for t, _ in parts]
        text_encoders = [
            (CLIPTextModelWithProjection if e == "text_encoder_2" else CLIPTextModel).from_pretrained(
                cfg.pretrained_model_name_or_path, subfolder=e
            )
            for _, e in parts
        ]
        embeddings = embed_words(words, tokenizers, text_encoders).float()
        del text_encoders
        self.mlp = LocationMLP(
            embedding_dim=embeddings.shape[1],
            hidden_dim=cfg.hidden_dim,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout,
            min_box_size=cfg.min_box_size,
            vocabulary=words,
            pretrained_model_name_or_path=cfg.pretrained_model_name_or_path,
        )
        self.mlp.set_vocabulary_embeddings(embeddings)
        self.mlp.to(accelerator.device).train()
        self.rank = accelerator.process_index
        self.val_metrics: dict = {}

    def trainable_models(self):
        return {"location_mlp": self.mlp}

    def train_dataloader(self):
        if not hasattr(self, "_batches"):
            self._batches = PairBatches(
                self.train_pairs,
                self.word_index,
                self.config.train_batch_size,
                seed=self.config.seed,
                rank=self.rank,
                layout_flip=self.config.layout_flip,
            )
        return self._batches

    def training_step(self, models, batch, generator):
        mlp = models["location_mlp"]
        table = mlp.vocabulary_embeddings
        pred = mlp(table[batch["index_a"]], table[batch["index_b"]], snap=False)
        return box_loss(pred, batch["boxes"], self.config.l1_weight, self.config.giou_weight)

    @torch.no_grad()
    def evaluate(self, mlp: LocationMLP) -> dict:
        """Mean IoU / GIoU of both boxes over the validation pairs (in the training's layout convention)."""
        flip = "canonical" if self.config.layout_flip == "canonical" else "none"
        batches = PairBatches(self.val_pairs, self.word_index, len(self.val_pairs), layout_flip=flip)
        table = mlp.vocabulary_embeddings
        a, b = batches.index_a.to(table.device), batches.index_b.to(table.device)
        was_training = mlp.training
        mlp.eval()
        pred = mlp(table[a], table[b], snap=False)
        mlp.train(was_training)
        iou, giou = box_iou_giou(pred.float(), batches.boxes.to(pred.device))
        return {"val_iou": float(iou.mean()), "val_giou": float(giou.mean()), "val_pairs": len(self.val_pairs)}

    def validation_images(self, models, step):
        mlp = models["location_mlp"]
        self.val_metrics = self.evaluate(mlp)
        self.accelerator.print(f"[location_mlp] step {step}: validation IoU {self.val_metrics['val_iou']:.3f}")
        if self.config.report_to != "none":
            self.accelerator.log({k: v for k, v in self.val_metrics.items() if k != "val_pairs"}, step=step)
        table = mlp.vocabulary_embeddings
        flip = "canonical" if self.config.layout_flip == "canonical" else "none"
        shown = PairBatches(self.val_pairs[:8], self.word_index, 1, layout_flip=flip)
        a, b = shown.index_a.to(table.device), shown.index_b.to(table.device)
        pred = mlp(table[a], table[b], snap=False).float().cpu().tolist()
        return [draw_pair(e.words, t, p) for e, t, p in zip(self.val_pairs[:8], shown.boxes.tolist(), pred)]

    def export(self, models, export_dir: Path):
        mlp = models["location_mlp"]
        self.val_metrics = self.evaluate(mlp)
        written = [export_model(mlp, export_dir, "location_mlp")]
        metrics = {**self.val_metrics, "train_pairs": len(self.train_pairs), "words": len(self.word_index)}
        (Path(self.config.output_dir) / "location_mlp_metrics.json").write_text(json.dumps(metrics, indent=1))
        self.accelerator.print(
            f"[location_mlp] final validation IoU {metrics['val_iou']:.3f} over {metrics['val_pairs']} pairs"
        )
        return written

    def model_card_notes(self) -> str:
        cfg = self.config
        m = self.val_metrics
        flip_note = (
            "Layouts were mirrored so that the first word is on the left (`layout_flip=canonical`)."
            if cfg.layout_flip == "canonical"
            else f"Layout flip: {cfg.layout_flip}."
        )
        return (
            "## location_mlp\n\n"
            "Compositional inversion's location MLP: two token embeddings -> one box per concept (xyxy, 0..1). "
            f"Trained {cfg.max_steps} steps on {len(self.train_pairs)} pairs over {len(self.word_index)} nouns "
            f"(`{cfg.train_shards}`), L1 x {cfg.l1_weight:g} + (1 - GIoU) x {cfg.giou_weight:g}. "
            f"Validation IoU {m.get('val_iou', float('nan')):.3f} on {m.get('val_pairs', 0)} held-out pairs. "
            "Words outside its vocabulary take the layout of the nearest vocabulary noun (cosine similarity of "
            f"input embeddings). {flip_note}\n\n"
            "```python\nfrom encoders.location_mlp import LocationMLP\n"
            'mlp = LocationMLP.from_pretrained(PATH_OR_REPO, subfolder="location_mlp")\n'
            'boxes = mlp.predict_for_words("dog", "frisbee", pipe.tokenizer, pipe.text_encoder)["boxes"]\n```\n'
        )


_COLOURS = [(220, 40, 40), (30, 110, 230)]


def draw_pair(words, true_boxes, pred_boxes, size: int = 160):
    """A tile with the true (thin) and predicted (thick) boxes of a pair, coloured per word."""

    tile = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(tile)
    for k in range(2):
        for box, width in ((true_boxes[k], 1), (pred_boxes[k], 3)):
            x0, y0, x1, y1 = (v * (size - 1) for v in box)
            draw.rectangle([x0, y0, x1, y1], outline=_COLOURS[k], width=width)
        draw.text((4, 4 + 12 * k), words[k], fill=_COLOURS[k])
    return tile


def main(argv: list[str] | None = None) -> None:
    config = parse_config_cli(
        LocationMLPConfig,
        argv,
        prog="accelerate launch -m training.location_mlp",
        description="Train the location MLP (two token embeddings -> two boxes) on location-pair shards.",
    )
    run_from_command_line(LocationMLPTask(config))


if __name__ == "__main__":
    main(sys.argv[1:])
