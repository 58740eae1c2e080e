"""Compositional-inversion benchmark: generation-time overhead of spatial guidance (ratio to the same
loop without guidance, and to the stock diffusers pipeline call) and `data_prep pairs generate`
throughput (images/s) on the tiny models. Prints a table, writes benchmarks/results/bench_guidance.json.

    .venv/bin/python benchmarks/bench_guidance.py            # ~2-4 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_guidance.py --quick    # fewer steps and images

Guidance settings are the paper's (the first 10 of the reverse steps) with layout guidance's 5
gradient iterations per guided step, all of them run (loss_threshold 0: the worst case; a trained
model that reaches the default threshold 0.2 stops earlier; the random tiny UNet never does). Each
timing is the best of `--rounds` interleaved rounds (stock, off, on), so a busy machine slows all
alike. "one iteration" is the extra cost of one gradient iteration (conditional forward + backward)
in units of one classifier-free-guidance denoising step. The tiny UNet is random, so its L_loc stays
near 1 - box area; the reported L_loc values show that guidance lowers it, not how much a trained
model would.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import torch
from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

from data_prep.pairs_generate import GenerationSettings, write_generated_pairs
from data_prep.writer import ShardJob
from encoders.tiny import build_tiny_models
from inference.guidance import SpatialGuidanceConfig, concepts_from_words, generate_with_spatial_guidance

RESULTS = REPO / "benchmarks/results/bench_guidance.json"
PROMPT = "a photo of a cat and a dog"
BOXES = [(0.05, 0.2, 0.5, 0.9), (0.55, 0.1, 0.95, 0.7)]


def bench_guidance(sd: Path, steps: int, rounds: int, device: str) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    concepts = concepts_from_words(pipe.tokenizer, PROMPT, ["cat", "dog"], BOXES)
    guided, iterations = min(10, steps), 5

    def ours(config):
        return lambda: generate_with_spatial_guidance(
            pipe,
            concepts,
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator(device).manual_seed(0),
            config=config,
            output_type="np",
        )

    runs = {
        "stock": lambda: pipe(
            PROMPT, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0), output_type="np"
        ),
        "off": ours(SpatialGuidanceConfig(guidance_steps=0)),
        "on": ours(
            SpatialGuidanceConfig(guidance_steps=guided, iterations=iterations, step_size=1e5, loss_threshold=0.0)
        ),
    }
    best = {name: float("inf") for name in runs}
    outputs = {}
    for _ in range(rounds):  # interleaved, so a busy machine slows every variant alike; the best round counts
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    off, on = best["off"], best["on"]
    step_s = off / len(pipe.scheduler.timesteps)

    def mean(xs):
        return float(sum(xs) / len(xs))

    return {
        "steps": steps,
        "denoising_passes": len(pipe.scheduler.timesteps),
        "guided_steps": guided,
        "iterations": iterations,
        "rounds": rounds,
        "stock_pipeline_s": round(best["stock"], 3),
        "loop_no_guidance_s": round(off, 3),
        "guidance_s": round(on, 3),
        "ratio_guidance_vs_off": round(on / off, 2),
        "loop_vs_stock": round(off / best["stock"], 2),
        "one_iteration_in_denoising_steps": round((on - off) / (guided * iterations) / step_s, 2),
        "loc_loss_guided_steps": {
            "off": round(mean(outputs["off"].location_losses[:guided]), 4),
            "on": round(mean(outputs["on"].location_losses[:guided]), 4),
        },
    }


def bench_pairs_generate(
    sd: Path, detector: Path, images: int, batch_sizes: list[int], steps: int, rounds: int, work: Path
) -> list[dict]:
    vocab = ["cat", "dog", "car", "bus", "person", "bench", "bird", "horse"]  # 28 pairs
    per_pair = max(1, -(-images // 28))
    warm = GenerationSettings(
        pipeline=str(sd), detector=str(detector), threshold=0.0, num_inference_steps=steps, batch_size=1
    )
    write_generated_pairs(
        vocab[:2], warm, ShardJob(work / "warm", "pairs-gen", progress=False), images_per_pair=1
    )  # loads models
    best: dict[int, tuple[float, dict]] = {}
    for r in range(rounds):  # interleaved rounds; the best per batch size counts
        for batch_size in batch_sizes:
            settings = GenerationSettings(
                pipeline=str(sd),
                detector=str(detector),
                threshold=0.0,
                num_inference_steps=steps,
                batch_size=batch_size,
            )
            job = ShardJob(work / f"gen_b{batch_size}_r{r}", "pairs-gen", shard_size=64, progress=False)
            start = time.perf_counter()
            manifest = write_generated_pairs(
                vocab, settings, job, images_per_pair=per_pair, max_pairs=-(-images // per_pair)
            )
            elapsed = time.perf_counter() - start
            if batch_size not in best or elapsed < best[batch_size][0]:
                best[batch_size] = (elapsed, manifest)
    return [
        {
            "batch_size": b,
            "images": m["items"],
            "kept": m["samples"],
            "seconds": round(t, 2),
            "images_per_s": round(m["items"] / t, 2),
            "steps": steps,
            "rounds": rounds,
        }
        for b, (t, m) in sorted(best.items())
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="reverse steps per image (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; the best is kept (default 2)")
    parser.add_argument("--images", type=int, default=32, help="images generated for the throughput (default 32)")
    parser.add_argument("--gen-steps", type=int, default=10, help="denoising steps for pairs generate (default 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: per-core numbers, steadier on a busy machine)",
    )
    parser.add_argument("--quick", action="store_true", help="12 steps, 1 round, 16 images")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.images = 12, 1, 16
    torch.set_num_threads(args.threads)
    logging.getLogger("data_prep").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_guidance_") as tmp:
        work = Path(tmp)
        models = build_tiny_models(work / "models", ["sd", "detector"])
        guidance = bench_guidance(models["sd"], args.steps, args.rounds, args.device)
        generate = bench_pairs_generate(
            models["sd"], models["detector"], args.images, [1, 8], args.gen_steps, args.rounds, work
        )
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "device": args.device,
            "load_average_at_start": [round(v, 2) for v in load_before],
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "model": "tiny SD (encoders.tiny, 64 px, 32x32 latents) + tiny DETR",
        "guidance": guidance,
        "pairs_generate": generate,
    }
    g = guidance
    rows = [
        (f"stock pipeline, {g['steps']} steps", f"{g['stock_pipeline_s']:.2f} s", ""),
        (
            "our loop, guidance off",
            f"{g['loop_no_guidance_s']:.2f} s",
            f"{g['loop_vs_stock']:.2f}x stock (recording processors)",
        ),
        (
            f"guidance, {g['guided_steps']} steps x {g['iterations']} iterations",
            f"{g['guidance_s']:.2f} s",
            f"{g['ratio_guidance_vs_off']:.2f}x off; L_loc {g['loc_loss_guided_steps']['off']:.4f} -> "
            f"{g['loc_loss_guided_steps']['on']:.4f}",
        ),
        ("one guidance iteration", f"{g['one_iteration_in_denoising_steps']:.2f} steps", "cost in denoising steps"),
    ]
    for r in generate:
        rows.append(
            (
                f"pairs generate, batch {r['batch_size']} ({r['steps']} steps)",
                f"{r['images_per_s']:.2f} images/s",
                f"{r['images']} images, {r['kept']} kept",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'time / rate':>16}  notes")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")
    print(
        f"(device {args.device}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {load_before[0]:.2f} at start; tiny models, 64 px)"
    )
    out = Path(args.out)
    write_results(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
