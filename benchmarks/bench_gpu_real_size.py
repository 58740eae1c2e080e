"""Real-size check on a GPU: SD v1-4 (or SDXL base 1.0) + CLIP ViT-L/14 shapes, bf16, 512 px (SDXL 1024 px).

No Hub access is assumed: the models are built from their published configs with random weights
(seed 0) and saved in the Hub's on-disk formats, so every path below (`from_pretrained(folder)`,
the trainers' tasks, `inference.ElitePipeline`) is the code a user runs with the real weights.
Random weights make the pictures noise; shapes, memory and time are what this measures.

    python benchmarks/bench_gpu_real_size.py --work /tmp/real --shards 'SHARDS/*.tar' --out results.json
    python benchmarks/bench_gpu_real_size.py --preset sdxl --batches 1,2 --work /tmp/real --shards ... \
        --out benchmarks/results/bench_gpu_real_size_sdxl.json

Per ELITE stage and batch size: the median step time of the loop's step (frozen encoders under
no_grad, mapping, text encoder, UNet forward+backward, AdamW) and the peak CUDA memory; then the
inference numbers: concept encoding latency and per-image generation time at 50 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench_memory_plan import BASES, CLIP_L_TEXT, OPENCLIP_G_TEXT, SD_VAE, VIT_L14  # this folder's own modules
from results_io import write_results  # (the script's folder is on sys.path)

# The published configs, shared with the memory plan (which counts their parameters).
SD14_UNET = BASES["sd14"]["unet"]
SD14_VAE = dict(SD_VAE, sample_size=512)
SD14_TEXT = CLIP_L_TEXT


def build_models(root: Path, preset: str = "sd14") -> Path:
    """Write `sd/` and `image_encoder/` with the real shapes (skipped when present); `tiny` / `sdxl-tiny`
    check the script on the tiny bundles."""
    if preset in ("tiny", "sdxl-tiny"):
        from encoders.tiny import build_tiny_models

        build_tiny_models(root, ["sd", "image_encoder"], kind="sdxl" if preset == "sdxl-tiny" else "sd1")
        return root
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from encoders.tiny import SCHEDULER_KWARGS, write_atomically
    from encoders.tokenizer import build_clip_tokenizer, save_clip_tokenizer

    def write_sd(target: Path) -> Path:
        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(
            unet=UNet2DConditionModel(**SD14_UNET),
            vae=AutoencoderKL(**SD14_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD14_TEXT)),
            tokenizer=build_clip_tokenizer(),
            scheduler=PNDMScheduler(**SCHEDULER_KWARGS),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(target, safe_serialization=True)
        save_clip_tokenizer(target / "tokenizer")
        return target

    def write_sdxl(target: Path) -> Path:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        torch.manual_seed(0)
        scheduler = {k: v for k, v in SCHEDULER_KWARGS.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
        pipe = StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**BASES["sdxl"]["unet"]),
            vae=AutoencoderKL(**dict(SD_VAE, sample_size=1024), scaling_factor=0.13025, force_upcast=True),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD14_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_G_TEXT)),
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(),
            scheduler=EulerDiscreteScheduler(**scheduler),
            force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(target, safe_serialization=True)
        save_clip_tokenizer(target / "tokenizer")
        save_clip_tokenizer(target / "tokenizer_2")
        return target

    def write_vision(target: Path) -> Path:
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**VIT_L14)).save_pretrained(target, safe_serialization=True)
        CLIPImageProcessor().save_pretrained(target)
        return target

    write_atomically(write_sdxl if preset == "sdxl" else write_sd, root / "sd")
    write_atomically(write_vision, root / "image_encoder")
    return root


def _cuda_ms(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, 1e3 * (time.perf_counter() - t0)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else float("nan")


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def bench_stage(
    stage: str,
    models: Path,
    shards: str,
    work: Path,
    batch: int,
    steps: int,
    warmup: int,
    gradient_checkpointing: bool,
    global_path: Path | None,
    resolution: int,
) -> dict:
    import torch
    from accelerate import Accelerator

    from encoders.common.config import load_config
    from training.crop_data import STORED_CROP_KEYS

    keys = [
        f"pretrained_model_name_or_path={models / 'sd'}",
        f"image_encoder_name_or_path={models / 'image_encoder'}",
        f"train_shards={shards}",
        f"output_dir={work / ('run_' + stage)}",
        f"train_batch_size={batch}",
        "mixed_precision=bf16",
        "report_to=none",
        "dataloader_num_workers=2",
        f"data.resolution={resolution}",
        "scale_lr=false",
        "gradient_accumulation_steps=1",  # one micro-step per optimizer step: the step the table times
        *STORED_CROP_KEYS,
        f"gradient_checkpointing={str(gradient_checkpointing).lower()}",
    ]
    if stage == "global_mapping":
        from training.global_mapping import GlobalMappingConfig as Config
        from training.global_mapping import GlobalMappingTask as Task
    else:
        from training.local_mapping import LocalMappingConfig as Config
        from training.local_mapping import LocalMappingTask as Task

        keys.append(f"global_mapping_path={global_path}")
    task = Task(load_config(Config, REPO / f"configs/train/{stage}.yaml", keys))
    accelerator = Accelerator(mixed_precision="bf16")
    _reset_peak()
    task.setup(accelerator, torch.bfloat16)
    trainable = task.trainable_models()
    params = [p for m in trainable.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    stream = iter(task.train_dataloader())
    generator = torch.Generator(device=accelerator.device).manual_seed(0)
    sync = _sync
    step_ms, losses = [], []
    for i in range(warmup + steps):
        sample = {k: (v.to(accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in next(stream).items()}

        def step():
            with accelerator.autocast():
                loss, _ = task.training_step(trainable, sample, generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        loss, ms = _cuda_ms(step, sync)
        if i >= warmup:
            step_ms.append(ms)
            losses.append(float(loss.detach()))
    export = None
    if stage == "global_mapping":
        export = work / "encoders"
        export.mkdir(parents=True, exist_ok=True)
        task.export(trainable, export)
    result = dict(
        stage=stage,
        batch=batch,
        gradient_checkpointing=gradient_checkpointing,
        trainable_params=sum(p.numel() for p in params),
        step_ms_median=statistics.median(step_ms),
        step_ms_all=[round(x, 1) for x in step_ms],
        peak_cuda_gb=_peak_gb(),
        losses=losses,
    )
    task = trainable = optimizer = None  # free the GPU memory before the next stage
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, export


def bench_inference(models: Path, encoders: Path, concept_image: Path, concept_mask: Path, steps: int) -> dict:
    import torch

    from inference import ElitePipeline

    cuda = torch.cuda.is_available()
    elite = ElitePipeline.from_pretrained(
        models / "sd",
        encoders=encoders,
        image_encoder=models / "image_encoder",
        device="cuda" if cuda else "cpu",
        dtype=torch.float16 if cuda else torch.float32,
        safety_checker=False,
        allow_sdxl=True,
    )
    sync = _sync
    for _ in range(3):
        concept = elite.encode_concept(concept_image, mask=concept_mask)
    encode_ms = [_cuda_ms(lambda: elite.encode_concept(concept_image, mask=concept_mask), sync)[1] for _ in range(10)]
    out = {"encode_ms_median": statistics.median(encode_ms)}
    for n in (1, 4):
        elite("a photo of S* on the beach", concept, num_inference_steps=3, num_images_per_prompt=n, seed=0)
        _reset_peak()
        _, ms = _cuda_ms(
            lambda: elite(
                "a photo of S* on the beach", concept, num_inference_steps=steps, num_images_per_prompt=n, seed=0
            ),
            sync,
        )
        out[f"generate_{n}x{steps}steps_ms"] = ms
        out[f"generate_ms_per_image_batch{n}"] = ms / n
        out[f"generate_peak_cuda_gb_batch{n}"] = _peak_gb()
    elite.unload_encoders()
    _, ms = _cuda_ms(
        lambda: elite.pipe(
            "a photo of a teapot on the beach",
            num_inference_steps=steps,
            generator=torch.Generator(elite.device).manual_seed(0),
        ),
        sync,
    )
    out["base_pipeline_1x_ms"] = ms
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder for the models and runs")
    parser.add_argument("--shards", required=True, help="512 px crop shards (path/glob)")
    parser.add_argument("--batches", default="1,4,8", help="per-GPU batch sizes to measure")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument(
        "--preset",
        choices=("sd14", "sdxl", "tiny", "sdxl-tiny"),
        default="sd14",
        help="sdxl: SDXL base 1.0 shapes at 1024 px; tiny / sdxl-tiny: check the script on CPU",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_gpu_real_size.json"))
    args = parser.parse_args(argv)

    import torch

    work = Path(args.work)
    t0 = time.perf_counter()
    models = build_models(work / f"models_{args.preset}", args.preset)
    resolution = {"sd14": 512, "sdxl": 1024}.get(args.preset, 64)
    build_s = time.perf_counter() - t0
    rows, export = [], None
    for stage in ("global_mapping", "local_mapping"):
        for batch in [int(b) for b in args.batches.split(",")]:
            for ckpt in (False, True):
                try:
                    row, exp = bench_stage(
                        stage, models, args.shards, work, batch, args.steps, args.warmup, ckpt, export, resolution
                    )
                except torch.OutOfMemoryError as err:
                    row, exp = (
                        dict(stage=stage, batch=batch, gradient_checkpointing=ckpt, error=f"OOM: {err}"[:200]),
                        None,
                    )
                    torch.cuda.empty_cache()
                export = export or exp
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "step_ms_all")}), flush=True)
    concept = REPO / "tests/data/concepts/dreambooth/teapot/04.jpg"
    mask = next((REPO / "tests/data/concepts/masks").glob("teapot*04*.png"))
    infer = bench_inference(models, export, concept, mask, args.inference_steps)
    result = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        preset=args.preset,
        torch=torch.__version__,
        build_models_s=build_s,
        training=rows,
        inference=infer,
    )
    write_results(result, args.out)
    print(f"\n{'stage':<16}{'batch':>6}{'ckpt':>6}{'step ms':>10}{'peak GB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['stage']:<16}{r['batch']:>6}{str(r['gradient_checkpointing']):>6}{'OOM':>10}")
        else:
            print(
                f"{r['stage']:<16}{r['batch']:>6}{str(r['gradient_checkpointing']):>6}"
                f"{r['step_ms_median']:>10.1f}{r['peak_cuda_gb']:>10.2f}"
            )
    print(json.dumps(infer, indent=1))


if __name__ == "__main__":
    main()
