"""Ship the trained miniature world: fp16 safetensors + configs + a model card into `encoders/assets/world/`.

    python -m training.world_ship --models outputs/world/models --logs outputs/world/logs \
        --metrics benchmarks/results/bench_world.json --out encoders/assets/world

Reads the exports of `python -m training.world` (sd/, clip/, classifier/), writes one fp16 file and
one config per model (`encoders.world` writes them back out as real model folders), and a card with
how each was made (its resolved training config, steps, wall time), the quality bars measured by
`benchmarks/bench_world.py`, and every file's sha256. Rows of the text embedding table for tokens
that no world caption uses never received a gradient (only weight decay moved them); they are
stored as zeros, which keeps the shipped files small (git compresses them away).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
from pathlib import Path

import torch
import yaml

from encoders.common.files import atomic_directory, sha256_file
from encoders.world import OPTIONAL_PARTS, PARTS


def world_token_ids(tokenizer) -> set[int]:
    """Every token id a world caption can contain: the vocabulary's words, the caption words, BOS/EOS."""
    from data_prep.world import BACKGROUNDS, COLOURS, PATTERNS, SHAPES

    words = [*SHAPES, *COLOURS, *PATTERNS, *BACKGROUNDS, "a", "photo", "of", "on", "and", "background"]
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for word in words:
        ids.update(tokenizer(word, add_special_tokens=False).input_ids)
    return ids


def _fp16(state: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def _zero_unused_rows(state: dict, keep: torch.Tensor) -> dict:
    """The token embedding table's rows outside `keep` set to zero (whatever prefix the state's keys carry)."""
    table = next(k for k in state if k.endswith("embeddings.token_embedding.weight"))
    state[table] = state[table] * keep[:, None].to(state[table].dtype)
    return state


def collect(models: Path) -> dict[str, tuple[dict, dict]]:
    """part -> (config dict, fp16 state) from the exported folders; `text_encoder` too where the pipeline's text
    encoder is not the clip stage's text tower (the unet stage trained it: `train_text_encoder=true`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, ResNetForImageClassification

    unet = UNet2DConditionModel.from_pretrained(models / "sd", subfolder="unet")
    vae = AutoencoderKL.from_pretrained(models / "sd", subfolder="vae")
    clip = CLIPModel.from_pretrained(models / "clip")
    text_encoder = CLIPTextModel.from_pretrained(models / "sd", subfolder="text_encoder")
    classifier = ResNetForImageClassification.from_pretrained(models / "classifier")
    keep = torch.zeros(clip.config.text_config.vocab_size, dtype=torch.bool)
    keep[sorted(world_token_ids(CLIPTokenizer.from_pretrained(models / "clip")))] = True
    parts = {
        "unet": (dict(unet.config), _fp16(unet.state_dict())),
        "vae": (dict(vae.config), _fp16(vae.state_dict())),
        "clip": (clip.config.to_dict(), _fp16(_zero_unused_rows(clip.state_dict(), keep))),
        "classifier": (classifier.config.to_dict(), _fp16(classifier.state_dict())),
    }
    tower = clip.text_model.state_dict()
    own = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    if any(not torch.equal(own[k], tower[k]) for k in tower):
        own_state = _zero_unused_rows(text_encoder.state_dict(), keep)
        parts["text_encoder"] = (text_encoder.config.to_dict(), _fp16(own_state))
    return parts


def run_summary(models: Path, logs: Path | None, stage: str) -> dict:
    """A stage's resolved config as exported beside the models (steps, batch, lr...), and its wall time: the
    elapsed time of the finished progress bar in each `logs/<stage>*.log` (a resumed run adds its own)."""
    path = models / f"training_config_world_{stage}.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    seconds = 0
    for log in sorted(logs.glob(f"{stage}*.log")) if logs else []:
        found = re.findall(rf"world_{stage}: 100%[^\[]*\[(\d+):(\d+)(?::(\d+))?<", log.read_text(errors="replace"))
        if found:
            parts = [int(v) for v in found[-1] if v]
            seconds += parts[0] * 3600 + parts[1] * 60 + parts[2] if len(parts) == 3 else parts[0] * 60 + parts[1]
    return {"config": config, "wall_seconds": seconds or None}


def card(
    hashes: dict[str, str],
    runs: dict[str, dict],
    metrics: dict | None,
    commit: str,
    notes: str = "",
    prediction: str = "epsilon",
    own_text_encoder: bool = False,
) -> str:
    lines = [
        "---",
        "license: apache-2.0",
        "tags: [miniature-world, stable-diffusion, clip, from-scratch]",
        "---",
        "",
        "# The miniature world's base models",
        "",
        "Trained from scratch on this repository's procedural object world (`python -m data_prep world`: 8 shapes x 8 "
        "colours x 4 patterns on 6 backgrounds, 64 px; 32 shape x colour x pattern triples held out of training). "
        "`python -m encoders.world --out DIR` writes them as real model folders (`sd/` a `StableDiffusionPipeline`, "
        "`image_encoder/` a `CLIPVisionModel`, `clip/`, `classifier/`), in fp32.",
        "",
        "| part | what | architecture |",
        "|---|---|---|",
        "| `clip` | CLIP text + vision towers, contrastive; the text tower is "
        + ("where the pipeline's text encoder started" if own_text_encoder else "the pipeline's text encoder")
        + ", the vision tower ELITE's image encoder | `CLIPModel`: text 3 x 48, vision 24 x 48 on 8 px patches at "
        "64 px |",
        "| `vae` | KL autoencoder, factor 4 (64 px -> 16 x 16 x 4) | `AutoencoderKL` (16, 32, 64) |",
        f"| `unet` | text-conditioned, {prediction}, SD v1-4's noise schedule, 10 % empty captions | "
        "`UNet2DConditionModel` (32, 64, 128), cross-attention at 8 x 8 and 4 x 4 |",
        *(
            [
                "| `text_encoder` | the pipeline's text encoder: the clip stage's text tower, trained on with the UNet "
                "(`train_text_encoder=true`); `clip` keeps the contrastive one | `CLIPTextModel`: 3 x 48 |"
            ]
            if own_text_encoder
            else []
        ),
        "| `classifier` | attribute classifier for evaluation only (multi-label) | `ResNetForImageClassification` |",
        "",
        "## How they were made",
        "",
        f"Commit `{commit}`, on a 2-core CPU VM (one or two threads per stage, stages sharing the cores). Each "
        "stage: `python -m training.world --config "
        "configs/world/<stage>.yaml` (`make world` runs them in order).",
        "",
        "| stage | steps | batch | learning rate | world seed | pool | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, summary in runs.items():
        c = summary["config"]
        wall = summary["wall_seconds"]
        lines.append(
            f"| {stage} | {c.get('max_steps')} | {c.get('train_batch_size')} | {c.get('learning_rate')} "
            f"({c.get('lr_scheduler')}) | {c.get('world_seed')} | {c.get('pool_size')} | "
            f"{'?' if wall is None else f'{wall / 60:.0f} min'} |"
        )
    if notes:
        lines += ["", notes]
    if metrics:
        groups = ("background", "colour", "shape", "pattern")
        lines += [
            "",
            "## Quality (`benchmarks/bench_world.py`, held-out triples)",
            "",
            "| measure | background | colour | shape | pattern |",
            "|---|---|---|---|---|",
        ]
        for key, name in (
            ("chance", "chance"),
            ("clip_zero_shot", "CLIP zero-shot"),
            ("classifier_on_renders", "classifier on real renders"),
            ("generation", "generated images (classifier)"),
            ("generation_empty_prompt", "generated from the empty prompt"),
        ):
            if key in metrics:
                lines.append(f"| {name} | " + " | ".join(f"{100 * metrics[key][g]:.0f} %" for g in groups) + " |")
        vae = metrics.get("vae", {})
        if vae:
            lines += [
                "",
                f"VAE: {vae['psnr_db']:.1f} dB PSNR, object colour error {vae['object_colour_error_8bit']:.1f} / 255.",
            ]
    lines += [
        "",
        "Rows of the text embedding table for tokens no world caption uses are stored as zeros (they never "
        "received a gradient).",
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | `{digest}` |" for name, digest in sorted(hashes.items())]
    return "\n".join(lines) + "\n"


def ship(models: Path, logs: Path | None, out: Path, metrics_path: Path | None, notes: str = "") -> Path:
    from safetensors.torch import save_file

    parts = collect(models)
    commit = (
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    )
    metrics = json.loads(metrics_path.read_text()) if metrics_path and metrics_path.is_file() else None
    stages = ("clip", "vae", "vae_decoder", "unet", "classifier")
    summaries = {
        stage: run_summary(models, logs, stage)
        for stage in stages
        if stage != "vae_decoder" or (models / "training_config_world_vae_decoder.yaml").is_file()
    }
    with atomic_directory(out) as tmp:
        hashes = {}
        for part in (*PARTS, *(p for p in OPTIONAL_PARTS if p in parts)):
            config, state = parts[part]
            save_file(state, str(tmp / f"{part}.safetensors"), metadata={"format": "pt", "part": part})
            (tmp / f"{part}.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
            for name in (f"{part}.safetensors", f"{part}.json"):
                hashes[name] = sha256_file(tmp / name)
        # the pipeline's noise schedule and prediction type (epsilon or v), which the UNet was trained for
        scheduler = json.loads((models / "sd" / "scheduler" / "scheduler_config.json").read_text())
        (tmp / "scheduler.json").write_text(json.dumps(scheduler, indent=1) + "\n")
        hashes["scheduler.json"] = sha256_file(tmp / "scheduler.json")
        prediction = scheduler.get("prediction_type", "epsilon")
        (tmp / "README.md").write_text(
            card(hashes, summaries, metrics, commit, notes, prediction, own_text_encoder="text_encoder" in parts)
        )
        (tmp / "runs.json").write_text(
            json.dumps({"shipped": datetime.date.today().isoformat(), **summaries}, indent=1, default=str) + "\n"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.world_ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="outputs/world/models")
    parser.add_argument("--logs", default="outputs/world/logs", help="the stages' console logs (for their wall times)")
    parser.add_argument("--notes", default="", help="a paragraph for the card (e.g. how a stage was resumed)")
    parser.add_argument("--metrics", default="benchmarks/results/bench_world.json")
    parser.add_argument("--out", default="encoders/assets/world")
    args = parser.parse_args(argv)
    out = ship(Path(args.models), Path(args.logs), Path(args.out), Path(args.metrics), args.notes)
    print(f"shipped the world's models to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
