"""ELITE training-step benchmark: step time and peak memory per stage, the share of each step spent in
the frozen encoders, and whether caching VAE latents in the shards would pay. Prints a table,
writes benchmarks/results/bench_train.json.

    .venv/bin/python benchmarks/bench_train.py                    # tiny + small, ~2-4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train.py --configs tiny --steps 6

Configs (random-init models in the real on-disk formats, trained through the real task code):
- tiny: `encoders.tiny` (UNet with cross-attention dim 32, 24-layer CLIP vision width 32), 64 px,
  mapping MLPs at the paper's 1024 width: the shapes the official ELITE code was timed at on this
  machine (~590 ms per global step, ~745 ms per local step, peak 1.2 / 1.7 GB, batch 2, 2 threads;
  target: at most half).
- small: a 3-level UNet (64/128/256 channels, cross-attention dim 128, 4-level VAE down to 1/4),
  a 4-layer width-128 text encoder, a 24-layer width-128 CLIP vision tower, 128 px.

Each (config, stage) runs in a fresh process (so peak RSS is that stage's own), with
`torch.set_num_threads(--threads)`, fp32 (this CPU has no native bf16), batch `--batch`. A step is
exactly what the training loop does: `task.training_step` (frozen encoders under no_grad, mapping,
text encoder, UNet, loss) + backward + AdamW step + zero_grad; batches are read from the shards
beforehand and timed separately (data). "frozen" times the same frozen work alone on the same
batches: VAE encode + CLIP (+ in the local stage w0 and the text encoder, which need no gradients
there). VAE caching: the same steps are run again from cached posterior moments
(`data.cached_latents=true`, shards from `python -m data_prep latents`), and reading a cached
latent back (npy bytes -> tensor) is measured as its cost.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

RESULTS = REPO / "benchmarks/results/bench_train.json"
REFERENCE_MS = {"global_mapping": 590.0, "local_mapping": 745.0}
REFERENCE_PEAK_GB = {"global_mapping": 1.2, "local_mapping": 1.7}

SMALL = dict(
    resolution=128,
    unet=dict(
        sample_size=32,
        layers_per_block=1,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
    ),
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    vision=dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=24,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
    ),
)

# Stable Diffusion v1-4 + CLIP ViT-L/14 shapes (random init): the GPU memory plan (--configs sd14, needs CUDA)
SD14 = dict(
    resolution=512,
    unet=dict(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    ),
    text=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
    ),
    vision=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    ),
)
SHAPES = {"small": SMALL, "sd14": SD14}
RESOLUTION = {"tiny": 64, "small": SMALL["resolution"], "sd14": SD14["resolution"]}


def build_models(config: str, root: Path) -> Path:
    """Write `sd/` and `image_encoder/` for a config under root/config (random init, seed 0)."""
    import torch

    from encoders.tiny import SCHEDULER_KWARGS, TEXT_KWARGS, build_tiny_models, write_atomically

    out = root / config
    if config == "tiny":
        build_tiny_models(out, ["sd", "image_encoder"])
        return out

    shapes = SHAPES[config]

    def write_sd(target: Path) -> Path:
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from encoders.tokenizer import build_clip_tokenizer, save_clip_tokenizer

        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**shapes["unet"]),
            vae=AutoencoderKL(**shapes["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**{**TEXT_KWARGS, **shapes["text"]})),
            tokenizer=build_clip_tokenizer(),
            scheduler=PNDMScheduler(**SCHEDULER_KWARGS),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(target, safe_serialization=True)
        save_clip_tokenizer(target / "tokenizer")
        return target

    def write_vision(target: Path) -> Path:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**shapes["vision"])).save_pretrained(target, safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(target)
        return target

    write_atomically(write_sd, out / "sd")
    write_atomically(write_vision, out / "image_encoder")
    return out


def build_shards(root: Path, resolution: int) -> str:
    out = root / f"shards_{resolution}"
    if not (out / "manifest.json").is_file():
        from data_prep.crop_commands import build_coco_shards
        from data_prep.records import CropSettings
        from encoders.common.config import load_config

        settings = load_config(CropSettings, REPO / "configs/data/demo.yaml", [f"resolution={resolution}"])
        data = REPO / "tests/data/coco_sample"
        build_coco_shards(
            data / "annotations.json", data / "images", out, settings, shard_size=4, workers=1, progress=False
        )
    return str(out / "*.tar")


# ------------------------------------------------------------------ worker: one stage in this process


def _task(
    stage: str,
    models: Path,
    shards: str,
    resolution: int,
    batch: int,
    global_path: Path | None,
    out: Path,
    precision: str = "no",
    gradient_checkpointing: bool = False,
):
    from encoders.common.config import load_config
    from training.crop_data import STORED_CROP_KEYS

    keys = [
        f"pretrained_model_name_or_path={models / 'sd'}",
        f"image_encoder_name_or_path={models / 'image_encoder'}",
        f"train_shards={shards}",
        f"output_dir={out}",
        f"train_batch_size={batch}",
        f"mixed_precision={precision}",
        f"gradient_checkpointing={gradient_checkpointing}",
        "report_to=none",
        "dataloader_num_workers=0",
        f"data.resolution={resolution}",
        "scale_lr=false",
        "gradient_accumulation_steps=1",  # one micro-step per optimizer step: the step the table times
        *STORED_CROP_KEYS,
    ]
    if stage == "global_mapping":
        from training.global_mapping import GlobalMappingConfig as Config
        from training.global_mapping import GlobalMappingTask as Task
    else:
        from training.local_mapping import LocalMappingConfig as Config
        from training.local_mapping import LocalMappingTask as Task

        keys.append(f"global_mapping_path={global_path}")
    return Task(load_config(Config, REPO / f"configs/train/{stage}.yaml", keys))


def run_worker(args) -> dict:
    import numpy as np
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    cuda = args.config == "sd14"
    precision = "bf16" if cuda else "no"
    models, out = Path(args.models), Path(args.work) / f"run_{args.config}_{args.stage}"
    task = _task(
        args.stage,
        models,
        args.shards,
        args.resolution,
        args.batch,
        args.global_path and Path(args.global_path),
        out,
        precision,
        args.gradient_checkpointing,
    )
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision)
    task.setup(accelerator, torch.bfloat16 if cuda else torch.float32)
    trainable = task.trainable_models()
    ((name, model),) = trainable.items()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)  # as training/loop.py builds it

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    n = args.warmup + args.steps
    stream = iter(task.train_dataloader())
    data_ms, batches = [], []
    for _ in range(n):
        t0 = now()
        batch = next(stream)
        batches.append({k: (v.to(accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        data_ms.append(1e3 * (now() - t0))
    generator = torch.Generator(device=accelerator.device).manual_seed(0)
    if cuda:
        static_gb = torch.cuda.memory_allocated() / 1024**3
        torch.cuda.reset_peak_memory_stats()

    # posterior moments of every batch, for the same step with cached latents (data.cached_latents:
    # shards from `python -m data_prep latents`), timed right after each plain step so drift hits both
    with torch.no_grad():
        moments = [
            task.sd.vae.encode(b["pixel_values"].to(task.sd.vae.dtype)).latent_dist.parameters.to(torch.float16)
            for b in batches
        ]
    step_ms, frozen_ms, vae_ms, losses, optimizer_ms, mapping_ms, cached_ms = [], [], [], [], [], [], []
    for i, batch in enumerate(batches):
        t0 = now()
        with accelerator.autocast():
            loss, _ = task.training_step(trainable, batch, generator)
        loss.backward()
        t_opt = now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = now()
        # the frozen work of this step, alone
        with torch.no_grad(), accelerator.autocast():
            t2 = now()
            task.sd.encode_images(batch["pixel_values"], generator=generator)
            t3 = now()
            key = "clip_pixel_values" if args.stage == "global_mapping" else "clip_object_pixel_values"
            feats = dict(zip(task.clip.layers, task.clip(batch[key].to(task.clip.dtype))))
            if args.stage == "local_mapping":
                task.conditioning(batch, task._w0(feats))
            t4 = now()
        # the trainable mapping alone (forward + backward) on this step's features
        t5 = now()
        if args.stage == "global_mapping":
            out = model([feats[layer] for layer in task.config.feature_layers]).float().sum()
        else:
            out = (
                model([feats[layer] for layer in task.config.feature_layers], batch["object_mask_clip"])
                .tokens.float()
                .sum()
            )
        out.backward()
        t6 = now()
        optimizer.zero_grad(set_to_none=True)
        t7 = now()
        with accelerator.autocast():
            cached_loss, _ = task.training_step(trainable, {**batch, "latent_moments": moments[i]}, generator)
        cached_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t8 = now()
        if i >= args.warmup:
            optimizer_ms.append(1e3 * (t1 - t_opt))
            mapping_ms.append(1e3 * (t6 - t5))
            cached_ms.append(1e3 * (t8 - t7))
            step_ms.append(1e3 * (t1 - t0))
            frozen_ms.append(1e3 * (t4 - t2))
            vae_ms.append(1e3 * (t3 - t2))
            losses.append(float(loss))

    with torch.no_grad():
        latents = task.sd.encode_images(batches[0]["pixel_values"], generator=generator).float().cpu()
    blobs = []
    for lat in latents:
        buf = io.BytesIO()
        np.save(buf, lat.to(torch.float16).numpy())
        blobs.append(buf.getvalue())
    t0 = time.perf_counter()
    for _ in range(20):
        torch.stack([torch.from_numpy(np.load(io.BytesIO(b))).float() for b in blobs]).to(accelerator.device)
    read_ms = 1e3 * (time.perf_counter() - t0) / 20

    med = statistics.median
    row = dict(
        config=args.config,
        stage=args.stage,
        batch=args.batch,
        threads=args.threads,
        resolution=args.resolution,
        device=str(accelerator.device),
        precision=precision,
        gradient_checkpointing=args.gradient_checkpointing,
        trainable_params=sum(p.numel() for p in params),
        step_ms_median=med(step_ms),
        step_ms_min=min(step_ms),
        step_ms_all=[round(x, 1) for x in step_ms],
        frozen_ms_median=med(frozen_ms),
        frozen_share=med(frozen_ms) / med(step_ms),
        vae_encode_ms_median=med(vae_ms),
        vae_share=med(vae_ms) / med(step_ms),
        optimizer_ms_median=med(optimizer_ms),
        mapping_fwd_bwd_ms_median=med(mapping_ms),
        cached_latent_read_ms=read_ms,
        cached_latent_bytes_per_sample=len(blobs[0]),
        cached_latents_step_ms_median=med(cached_ms),
        cached_latents_saving=1 - med(cached_ms) / med(step_ms),
        data_ms_median=med(data_ms[args.warmup :]),
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        losses=losses,
    )
    if cuda:
        row.update(
            gpu=torch.cuda.get_device_name(),
            gpu_static_gb=static_gb,
            gpu_peak_gb=torch.cuda.max_memory_allocated() / 1024**3,
            frozen_params={
                k: sum(p.numel() for p in m.parameters())
                for k, m in dict(
                    unet=task.sd.unet, vae=task.sd.vae, text_encoder=task.sd.text_encoder, image_encoder=task.clip
                ).items()
            },
        )
    return row


# ------------------------------------------------------------------ parent: build, run each stage, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small, sd14 (needs CUDA)")
    parser.add_argument("--stages", default="global_mapping,local_mapping")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for models/shards (default: a temp folder)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other rows of an existing --out file (re-measure one config/stage at a quiet moment)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--global-path", dest="global_path", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--sd14-batches",
        default="global_mapping:1,global_mapping:4,local_mapping:1,local_mapping:2",
        help="sd14 only: stage:batch pairs to measure, each with and without gradient checkpointing",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        resolution = RESOLUTION[config]
        models = build_models(config, work / "models")
        shards = build_shards(work, resolution)
        global_path = work / f"global_{config}"
        if "local_mapping" in args.stages and not (global_path / "global_mapping" / "config.json").is_file():
            import torch
            from diffusers import UNet2DConditionModel
            from transformers import CLIPVisionConfig

            from encoders.global_mapping import GlobalMapping

            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_pretrained(models / "sd", subfolder="unet")
            width = CLIPVisionConfig.from_pretrained(models / "image_encoder").hidden_size
            GlobalMapping.from_unet(unet, input_dim=width).save_pretrained(global_path / "global_mapping")
            del unet
        if config == "sd14":
            variants = [
                (stage, int(b), gc)
                for stage, b in (x.split(":") for x in args.sd14_batches.split(","))
                for gc in (False, True)
            ]
        else:
            variants = [(stage, args.batch, False) for stage in args.stages.split(",") if stage]
        for stage, batch, gc in variants:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--config",
                config,
                "--stage",
                stage,
                "--models",
                str(models),
                "--shards",
                shards,
                "--resolution",
                str(resolution),
                "--global-path",
                str(global_path),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(batch),
                "--threads",
                str(args.threads),
                "--work",
                str(work),
            ] + (["--gradient-checkpointing"] if gc else [])
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{config}/{stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            row = json.loads(lines[-1][len("RESULT ") :])
            if config == "tiny":
                row["reference_ms"] = REFERENCE_MS[stage]
                row["reference_peak_gb"] = REFERENCE_PEAK_GB[stage]
                row["speedup_vs_reference"] = REFERENCE_MS[stage] / row["step_ms_median"]
            rows.append(row)
            print(
                f"  measured {config}/{stage} batch {batch}{' +gc' if gc else ''}: {row['step_ms_median']:.0f} ms/step",
                file=sys.stderr,
                flush=True,
            )

    header = (
        f"{'config':<6} {'stage':<15} {'batch':>5} {'gc':>3} {'step ms':>8} {'min':>7} {'ref ms':>7} {'x ref':>6} "
        f"{'peak GB':>8} {'frozen':>7} {'map ms':>7} {'opt ms':>7} {'VAE ms':>7} {'VAE %':>6} {'cache rd ms':>11} "
        f"{'cached ms':>9} {'data ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = f"{r['reference_ms']:.0f}" if "reference_ms" in r else "-"
        speed = f"{r['speedup_vs_reference']:.2f}" if "speedup_vs_reference" in r else "-"
        peak = r.get("gpu_peak_gb", r["peak_rss_gb"])
        print(
            f"{r['config']:<6} {r['stage']:<15} {r['batch']:>5} {'y' if r['gradient_checkpointing'] else 'n':>3} "
            f"{r['step_ms_median']:>8.1f} {r['step_ms_min']:>7.1f} {ref:>7} {speed:>6} {peak:>8.2f} "
            f"{100 * r['frozen_share']:>6.0f}% {r['mapping_fwd_bwd_ms_median']:>7.1f} {r['optimizer_ms_median']:>7.1f} "
            f"{r['vae_encode_ms_median']:>7.1f} {100 * r['vae_share']:>5.1f}% "
            f"{r['cached_latent_read_ms']:>11.2f} {r.get('cached_latents_step_ms_median', float('nan')):>9.1f} "
            f"{r['data_ms_median']:>8.1f}"
        )
    print(
        "peak GB: process peak RSS on CPU, torch.cuda.max_memory_allocated on GPU; frozen: share of the step in "
        "VAE + CLIP (+ w0 + text encoder in the local stage); map ms: the trainable mapping's forward + backward "
        "alone; opt ms: AdamW step; cached ms: the step with data.cached_latents (no VAE encode); "
        "x ref: reference ms / ours (target >= 2)"
    )
    result = dict(
        benchmark="bench_train",
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpus=os.cpu_count(),
            load_average_1min=os.getloadavg()[0],
        ),
        settings=dict(steps=args.steps, warmup=args.warmup, batch=args.batch, threads=args.threads, precision="fp32"),
        rows=rows,
    )
    out = Path(args.out)
    if args.merge and out.is_file():

        def ident(r):
            return (r["config"], r["stage"], r["batch"], r["gradient_checkpointing"])

        fresh = {ident(r) for r in rows}
        kept = [r for r in json.loads(out.read_text()).get("rows", []) if ident(r) not in fresh]
        result["rows"] = kept + rows
    write_results(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
