"""Inference benchmark: encode latency, per-image generation time, and time-to-concept versus Textual Inversion.

Prints a table and writes benchmarks/results/bench_inference.json.

    .venv/bin/python benchmarks/bench_inference.py                     # ~3-6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_inference.py --skip-ti --steps 10

What is measured, on the tiny bundle (`encoders.tiny`: SD-shaped UNet with cross-attention width 32,
24-layer CLIP vision tower of width 32, 64 px images) with random-init encoders at the paper's mapping
width (1024), loaded through the real `from_pretrained` code:
- encode: photo file + mask file -> `Concept` (read, crop, CLIP features, global + local mapping);
  also reading/cropping alone and the models alone (on an already cropped photo).
- generation per image: `ElitePipeline(prompt, concept)` at the default 64 px, `--steps` steps,
  guidance 5, PNDM; batch 1 and batch `--batch` (per image); the same for a plain base pipeline
  (stock processors) so the cost of ELITE's processors and local branch shows.
- Runs of the things compared are interleaved and each is reported as best-of-N and median: on a
  shared machine other load only adds time, so "best" is the number to compare.
- time-to-concept: encoding one photo versus fitting a Textual Inversion embedding with
  `accelerate launch -m training.textual_inversion` (a subprocess, as users run it) on the same tiny
  base at 64 px. TI is run twice (`--ti-steps`, e.g. 5 and 25 steps) so its fixed start-up cost and its
  per-step cost separate; the time for the configured recipe (configs/finetune/textual_inversion.yaml:
  5000 steps) is extrapolated from those and labelled as such. The ratio is TI's time over encoding's.
Numbers depend on the machine and on other load; the JSON records threads, CPU count and torch version.
On a shared machine use `--threads 1`: with 2 threads and other processes on 2 cores, torch's parallel
regions stall and single runs take up to 10x longer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

RESULTS = REPO / "benchmarks/results/bench_inference.json"
DATA = REPO / "tests/data/concepts"
PHOTO = DATA / "dreambooth/teapot/04.jpg"
MASK = DATA / "masks/teapot_04.png"
TI_CONFIG = REPO / "configs/finetune/textual_inversion.yaml"


def build_bundle(work: Path) -> tuple[Path, Path, Path]:
    """Tiny models + an encoders folder (random init, seed 0, mapping width 1024) under `work`."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from encoders.global_mapping import GlobalMapping
    from encoders.local_mapping import LocalMapping
    from encoders.tiny import build_tiny_models

    models = build_tiny_models(work / "models", ["sd", "image_encoder"])
    sd, image_encoder = models["sd"], models["image_encoder"]
    encoders = work / "encoders"
    if not (encoders / "local_mapping" / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
        width = CLIPVisionConfig.from_pretrained(image_encoder).hidden_size
        for seed, (cls, sub) in enumerate(((GlobalMapping, "global_mapping"), (LocalMapping, "local_mapping"))):
            torch.manual_seed(seed)
            cls.from_unet(
                unet,
                input_dim=width,
                pretrained_model_name_or_path=str(sd),
                image_encoder_name_or_path=str(image_encoder),
            ).save_pretrained(encoders / sub)
    return sd, image_encoder, encoders


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync()
        tick = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - tick)
    return out


def _stats(samples: list[float], per: int = 1) -> dict:
    """Best and median of timed runs, divided by `per` (images per run). Best-of-N is the headline
    number: on a shared machine the other load only ever adds time."""
    return {"best": min(samples) / per, "median": statistics.median(samples) / per, "runs": len(samples)}


def bench_encode(elite, repeats: int) -> dict:
    from inference.inputs import load_concept_image, prepare_concept_image

    prepared = prepare_concept_image(load_concept_image(PHOTO, MASK))
    runs = {"encode": [], "read_and_crop": [], "models_only": []}
    elite.encode_concept(PHOTO, MASK)  # warm-up
    for _ in range(repeats):  # interleaved, so drifting machine load hits all three alike
        runs["encode"] += timed(lambda: elite.encode_concept(PHOTO, MASK), 1, warmup=0)
        runs["read_and_crop"] += timed(lambda: prepare_concept_image(load_concept_image(PHOTO, MASK)), 1, warmup=0)
        runs["models_only"] += timed(lambda: elite.encode_concept(prepared), 1, warmup=0)
    return {name: _stats(samples) for name, samples in runs.items()}


def bench_generate(elite, base, concept, steps: int, batch: int, repeats: int) -> dict:
    """Seconds per image for ELITE (processors + local branch) and the plain base pipeline, interleaved."""
    import torch

    def elite_run(n: int):
        return elite(
            "a photo of S* on the beach",
            concept,
            num_inference_steps=steps,
            guidance_scale=5.0,
            num_images_per_prompt=n,
            seed=0,
        )

    def base_run(n: int):
        return base(
            "a photo of a teapot on the beach",
            num_inference_steps=steps,
            guidance_scale=5.0,
            num_images_per_prompt=n,
            generator=torch.Generator().manual_seed(0),
        )

    runs: dict[str, list[float]] = {}
    for n in sorted({1, batch}):
        elite_run(n), base_run(n)  # warm-up
    for _ in range(repeats):
        for n in sorted({1, batch}):
            runs.setdefault(f"elite_batch{n}", []).extend(timed(lambda: elite_run(n), 1, warmup=0))
            runs.setdefault(f"base_batch{n}", []).extend(timed(lambda: base_run(n), 1, warmup=0))
    rows = {name: _stats(samples, per=int(name.split("batch")[1])) for name, samples in runs.items()}
    rows["elite_overhead_batch1"] = rows["elite_batch1"]["best"] / rows["base_batch1"]["best"] - 1.0
    rows["elite_s_per_step_batch1"] = rows["elite_batch1"]["best"] / steps
    return rows


def run_textual_inversion(sd: Path, work: Path, steps: int, threads: int) -> float:
    """Wall time of `accelerate launch -m training.textual_inversion` for `steps` steps (a fresh process)."""
    out = work / f"ti_{steps}"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "training.textual_inversion",
        "--config",
        str(TI_CONFIG),
        f"pretrained_model_name_or_path={sd}",
        f"concept_dir={DATA / 'dreambooth/teapot'}",
        f"output_dir={out}",
        "resolution=64",
        f"max_steps={steps}",
        "checkpointing_steps=0",
        "validation_steps=0",
        "report_to=none",
        "placeholder_token=S*",
        "initializer_token=teapot",
        "class_word=teapot",
    ]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)
    )
    tick = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if done.returncode != 0 or not (out / "learned_embeds.safetensors").is_file():
        raise RuntimeError(f"textual inversion ({steps} steps) failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall


def configured_ti_recipe() -> dict:
    """Steps and batch of the Textual Inversion recipe the benchmark runs (configs/finetune/textual_inversion.yaml)."""
    import yaml

    recipe = yaml.safe_load(TI_CONFIG.read_text())
    return {"steps": int(recipe["max_steps"]), "batch": int(recipe["train_batch_size"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--batch", type=int, default=4, help="images per call for the batched per-image time")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement (best and median kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    parser.add_argument("--ti-steps", default="5,25", help="two Textual Inversion step counts to time")
    parser.add_argument("--skip-ti", action="store_true", help="do not run Textual Inversion")
    parser.add_argument("--work", default=None, help="folder for models (default: a temp folder)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    torch.set_num_threads(args.threads)
    from inference import ElitePipeline

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_inference_"))
    sd, image_encoder, encoders = build_bundle(work)

    tick = time.perf_counter()
    elite = ElitePipeline.from_pretrained(sd, encoders=encoders, device=args.device, dtype="auto")
    load_s = time.perf_counter() - tick
    elite.pipe.set_progress_bar_config(disable=True)
    from inference.loading import load_base_pipeline

    base = load_base_pipeline(sd, device=elite.device, dtype=elite.dtype)  # stock processors, for comparison
    base.set_progress_bar_config(disable=True)

    encode = bench_encode(elite, args.repeats)
    concept = elite.encode_concept(PHOTO, MASK)
    generate = bench_generate(elite, base, concept, args.steps, args.batch, args.repeats)

    ti: dict = {"ran": False}
    ti_module = REPO / "training/textual_inversion.py"
    if args.skip_ti:
        ti["why_not"] = "--skip-ti"
    elif not ti_module.is_file():
        ti["why_not"] = "training/textual_inversion.py does not exist in this checkout"
    else:
        small, large = (int(v) for v in args.ti_steps.split(","))
        wall_small = run_textual_inversion(sd, work, small, args.threads)
        wall_large = run_textual_inversion(sd, work, large, args.threads)
        per_step = max(wall_large - wall_small, 0.0) / (large - small)
        startup = max(wall_small - small * per_step, 0.0)
        recipe = configured_ti_recipe()
        ti = {
            "ran": True,
            "steps_timed": [small, large],
            "wall_s": [wall_small, wall_large],
            "s_per_step": per_step,
            "startup_s": startup,
            "recipe_steps": recipe["steps"],
            "batch": recipe["batch"],
            "resolution": 64,
            "recipe_wall_s_extrapolated": startup + recipe["steps"] * per_step,
        }
        ti["ratio_measured_small_run_vs_encode"] = wall_small / encode["encode"]["best"]
        ti["ratio_recipe_vs_encode"] = ti["recipe_wall_s_extrapolated"] / encode["encode"]["best"]

    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "device": str(elite.device),
            "dtype": str(elite.dtype).replace("torch.", ""),
        },
        "bundle": "encoders.tiny (64 px), random-init encoders, mapping width 1024",
        "settings": {
            "steps": args.steps,
            "batch": args.batch,
            "guidance": 5.0,
            "scheduler": type(elite.scheduler).__name__,
        },
        "load_s": load_s,
        "encode": encode,
        "generate": generate,
        "textual_inversion": ti,
    }

    def both(stats: dict, scale: float = 1.0, unit: str = "s") -> str:
        fmt = "{:.0f}" if unit == "ms" else "{:.2f}"
        return f"{fmt.format(stats['best'] * scale)} {unit} (median {fmt.format(stats['median'] * scale)})"

    rows = [
        ("load base + encoders", f"{load_s:.2f} s"),
        ("encode (photo+mask -> concept)", both(encode["encode"], 1000, "ms")),
        ("  read + crop alone", both(encode["read_and_crop"], 1000, "ms")),
        ("  CLIP + mappings alone", both(encode["models_only"], 1000, "ms")),
        (f"generate, ELITE, batch 1 ({args.steps} steps)", both(generate["elite_batch1"], unit="s/image")),
        (f"generate, ELITE, batch {args.batch}", both(generate[f"elite_batch{args.batch}"], unit="s/image")),
        ("generate, plain base, batch 1", both(generate["base_batch1"], unit="s/image")),
        (f"generate, plain base, batch {args.batch}", both(generate[f"base_batch{args.batch}"], unit="s/image")),
        ("ELITE overhead vs plain base (batch 1, best)", f"{generate['elite_overhead_batch1'] * 100:+.0f} %"),
    ]
    if ti["ran"]:
        rows += [
            (
                f"Textual Inversion, batch {ti['batch']}, {ti['steps_timed'][0]} steps (measured)",
                f"{ti['wall_s'][0]:.1f} s",
            ),
            (f"Textual Inversion, {ti['steps_timed'][1]} steps (measured)", f"{ti['wall_s'][1]:.1f} s"),
            ("  per step / start-up", f"{ti['s_per_step'] * 1000:.0f} ms / {ti['startup_s']:.1f} s"),
            (
                f"Textual Inversion, {ti['recipe_steps']} steps (extrapolated)",
                f"{ti['recipe_wall_s_extrapolated']:.0f} s",
            ),
            ("time-to-concept ratio, TI small run / encode", f"{ti['ratio_measured_small_run_vs_encode']:.0f} x"),
            ("time-to-concept ratio, TI recipe / encode", f"{ti['ratio_recipe_vs_encode']:.0f} x"),
        ]
    else:
        rows.append(("Textual Inversion", f"not run: {ti['why_not']}"))
    width = max(len(name) for name, _ in rows)
    print(
        f"\nbench_inference ({elite.device}, {args.threads} threads, {platform.machine()}, torch {torch.__version__})"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")

    out = Path(args.out)
    write_results(result, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
