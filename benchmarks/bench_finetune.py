"""Per-concept fine-tunes: time-to-concept at each method's default steps, and TI vs BaTex convergence.

    python benchmarks/bench_finetune.py                       # tiny models, CPU (minutes; longer on busy cores)
    python benchmarks/bench_finetune.py --full                # really run every default step (hours on CPU)
    python benchmarks/bench_finetune.py --preset sd14 --device cuda --resolution 512   # SD v1-4 shapes, random init

1. Time-to-concept. Each method runs through its real command path (`run_training` with the
   method's config file: model loading, photo latents, steps, checkpoint, export) for `--probe-steps`
   steps, timed from the inside (setup until the first step, the median step, the tail after the last)
   and extrapolated to the default steps of its config (Textual Inversion 5000, BaTex 500, Infusion
   500). `--full` runs the default steps instead.
2. Convergence, Textual Inversion vs BaTex on the same concept, same optimizer settings and
   data stream: a fixed evaluation loss (every photo x fixed timesteps x fixed noise, so it depends
   only on the learned word) every `--eval-every` steps; the threshold is the initial loss minus half
   of the best improvement either method reaches within `--convergence-steps`, and the table gives the
   first step at which each method gets below it.

Random tiny weights make the loss landscape a toy: the numbers compare the methods' mechanics
(cost per step, how fast the subspace parameterisation moves the loss), not image quality.
Writes `benchmarks/results/bench_finetune.json` and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

CONFIGS = REPO / "configs" / "finetune"
METHODS = {
    # name: (trainer module, config file, extra keys)
    "textual_inversion": ("training.textual_inversion", "textual_inversion.yaml", ["initializer_token={init}"]),
    "batex": (
        "training.textual_inversion",
        "batex.yaml",
        ["initializer_token={init}", "subspace.selection=rank", "subspace.dim={dim}"],
    ),
    "infusion": ("training.infusion", "infusion.yaml", ["class_word={init}", "data.soft_masks=none"]),
}


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _task(method: str, args: list[str]):
    import importlib

    from encoders.common.config import load_config

    module_name, config_file, _ = METHODS[method]
    module = importlib.import_module(module_name)
    if module_name.endswith("textual_inversion"):
        return module.TextualInversionTask(load_config(module.TextualInversionConfig, CONFIGS / config_file, args))
    return module.InfusionTask(load_config(module.InfusionConfig, CONFIGS / config_file, args))


def _method_args(method: str, opts, out_dir: Path, steps: int) -> list[str]:
    extra = [k.format(init=opts.initializer, dim=opts.subspace_dim) for k in METHODS[method][2]]
    return [
        f"pretrained_model_name_or_path={opts.models / 'sd'}",
        f"concept_dir={opts.concept}",
        f"output_dir={out_dir}",
        f"resolution={opts.resolution}",
        f"max_steps={steps}",
        "checkpointing_steps=0",
        "validation_steps=0",
        "report_to=none",
        f"mixed_precision={opts.mixed_precision}",
        *extra,
    ]


def time_to_concept(method: str, opts) -> dict:
    """One run of the real command path, timed from the inside: setup (start -> first step), the median
    step (interval between consecutive steps: forward, backward, optimizer, logging), and the tail
    (last step -> end: checkpoint, export); extrapolated to the config's default steps."""
    from training.loop import run_training

    default_steps = _default_steps(METHODS[method][1])
    steps = default_steps if opts.full else opts.probe_steps
    task = _task(method, _method_args(method, opts, opts.work / f"{method}-{steps}", steps))
    starts: list[float] = []
    inner = task.training_step

    def timed(models, batch, generator):
        _sync(opts)
        starts.append(time.perf_counter())
        return inner(models, batch, generator)

    task.training_step = timed
    _reset_accelerate()
    t0 = time.perf_counter()
    run_training(task)
    _sync(opts)
    end = time.perf_counter()
    _reset_accelerate()
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    step_s = statistics.median(intervals[1:] or intervals)  # the first interval includes warm-up
    setup_s, tail_s = starts[0] - t0, end - starts[-1] - step_s
    total = end - t0 if opts.full else setup_s + default_steps * step_s + max(tail_s, 0.0)
    return {
        "method": method,
        "default_steps": default_steps,
        "steps_run": steps,
        "setup_s": round(setup_s, 3),
        "step_s": round(step_s, 4),
        "tail_s": round(max(tail_s, 0.0), 3),
        "time_to_concept_s": round(total, 1),
        "measured": bool(opts.full),
        "trainable_parameters": sum(
            p.numel() for p in task.trainable_models()[next(iter(task.trainable_models()))].parameters()
        ),
    }


def _sync(opts) -> None:
    import torch

    if opts.device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def _default_steps(config_file: str) -> int:
    import yaml

    return int(yaml.safe_load((CONFIGS / config_file).read_text())["max_steps"])


def convergence(opts) -> dict:
    """TI vs BaTex: the fixed evaluation loss along training, same data stream and optimizer settings."""
    import torch
    from accelerate import Accelerator

    from training.diffusion import denoising_loss

    curves = {}
    for method in ("textual_inversion", "batex"):
        _reset_accelerate()
        accelerator = Accelerator(cpu=opts.device == "cpu", mixed_precision=opts.mixed_precision)
        task = _task(method, _method_args(method, opts, opts.work / f"conv-{method}", opts.convergence_steps))
        cfg = task.config
        torch.manual_seed(cfg.seed)
        task.setup(
            accelerator, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.mixed_precision, torch.float32)
        )
        models = task.trainable_models()
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        lr = cfg.learning_rate * (cfg.train_batch_size * cfg.gradient_accumulation_steps if cfg.scale_lr else 1)
        optimizer = torch.optim.AdamW(
            params,
            lr=lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )

        # fixed evaluation set: every photo (unflipped) x fixed timesteps x fixed noise, fixed caption
        n = len(task.photos)
        timesteps = torch.linspace(50, 950, opts.eval_timesteps).long()
        gen = torch.Generator(device="cpu").manual_seed(1234)
        mean = task.latent_mean[:, 0]
        z0 = (mean * task.sd.vae.config.scaling_factor).repeat_interleave(len(timesteps), 0)
        t = timesteps.repeat(n).to(task.device)
        noise = torch.randn(z0.shape, generator=gen).to(task.device)
        noisy = task.sd.noise_scheduler.add_noise(z0, noise, t).to(task.weight_dtype)
        prompts = [f"a photo of a {task.concept_phrase()}"] * len(z0)

        @torch.no_grad()
        def eval_loss() -> float:
            return denoising_loss(task.predict_noise(models, noisy, t, prompts), noise).item()

        stream = iter(task.train_dataloader())
        generator = torch.Generator(device=task.device).manual_seed(cfg.seed)
        curve = [(0, eval_loss())]
        step_times = []
        for step in range(1, opts.convergence_steps + 1):
            t0 = time.perf_counter()
            with accelerator.autocast():
                loss, _ = task.training_step(models, next(stream), generator)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            if step % opts.eval_every == 0:
                curve.append((step, eval_loss()))
        extra = {}
        if method == "batex":
            extra = {"basis_words": int(task.word.config.num_basis), "rank": task.word.rank}
        curves[method] = {"curve": curve, "lr": lr, "median_step_s": statistics.median(step_times), **extra}
    _reset_accelerate()

    start = min(c["curve"][0][1] for c in curves.values())
    best = min(loss for c in curves.values() for _, loss in c["curve"])
    threshold = opts.threshold if opts.threshold is not None else start - 0.5 * (start - best)
    for c in curves.values():
        c["steps_to_threshold"] = next((s for s, loss in c["curve"] if loss <= threshold), None)
        c["initial_loss"], c["final_loss"] = c["curve"][0][1], c["curve"][-1][1]
        c["best_loss"] = min(loss for _, loss in c["curve"])
    return {
        "threshold": threshold,
        "rule": "given" if opts.threshold is not None else "initial - 0.5 x best improvement",
        "methods": curves,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_finetune"), help="scratch folder (models, runs)")
    parser.add_argument("--models", type=Path, default=None, help="folder with sd/ (default: build into --work)")
    parser.add_argument(
        "--preset", choices=["tiny", "sd14"], default="tiny", help="model shapes to build when --models is not given"
    )
    parser.add_argument("--concept", type=Path, default=REPO / "tests" / "data" / "concepts" / "dreambooth" / "dog")
    parser.add_argument("--initializer", default="dog")
    parser.add_argument(
        "--subspace-dim", type=int, default=None, help="BaTex d1 (default: 3/4 of the embedding width, as 576/768)"
    )
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the loop picks the accelerator's device)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--probe-steps", type=int, default=8, help="steps of the timed run per method (then extrapolated)"
    )
    parser.add_argument("--full", action="store_true", help="run each method's default steps instead of extrapolating")
    parser.add_argument("--convergence-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-timesteps", type=int, default=8)
    parser.add_argument(
        "--threshold", type=float, default=None, help="absolute evaluation-loss threshold (default: relative rule)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["time", "convergence"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_finetune.json")
    opts = parser.parse_args(argv)

    opts.work.mkdir(parents=True, exist_ok=True)
    if opts.models is None:
        opts.models = opts.work / f"models-{opts.preset}"
        if opts.preset == "tiny":
            from encoders.tiny import build_tiny_models

            build_tiny_models(opts.models, ["sd"])
        else:
            from bench_gpu_real_size import build_models  # SD v1-4 shapes, random init, Hub layout

            build_models(opts.models, "sd14")
    if opts.subspace_dim is None:
        from transformers import CLIPTextConfig

        width = CLIPTextConfig.from_pretrained(opts.models / "sd" / "text_encoder").hidden_size
        opts.subspace_dim = width * 3 // 4

    import torch

    result = {
        "preset": opts.preset,
        "device": opts.device,
        "resolution": opts.resolution,
        "mixed_precision": opts.mixed_precision,
        "concept": str(opts.concept.relative_to(REPO) if opts.concept.is_relative_to(REPO) else opts.concept),
        "subspace_dim": opts.subspace_dim,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if "time" not in opts.skip:
        result["time_to_concept"] = [time_to_concept(m, opts) for m in METHODS]
    if "convergence" not in opts.skip:
        result["convergence"] = convergence(opts)

    print_table(result)
    write_results(result, opts.out)
    print(f"wrote {opts.out}")
    return result


def print_table(result: dict) -> None:
    print(
        f"\nfine-tunes on {result['preset']} ({result['device']}, {result['resolution']} px, "
        f"{result['mixed_precision']})"
    )
    if "time_to_concept" in result:
        print("\n| method | trainable params | default steps | setup s | s / step | time-to-concept | |")
        print("|---|---|---|---|---|---|---|")
        for r in result["time_to_concept"]:
            how = "measured" if r["measured"] else f"extrapolated from {r['steps_run']} steps"
            print(
                f"| {r['method']} | {r['trainable_parameters']:,} | {r['default_steps']} | {r['setup_s']} | "
                f"{r['step_s']} | "
                f"{r['time_to_concept_s'] / 60:.1f} min | {how} |"
            )
    if "convergence" in result:
        conv = result["convergence"]
        print(f"\nTI vs BaTex, fixed evaluation loss; threshold {conv['threshold']:.5f} ({conv['rule']})")
        print("\n| method | lr | initial loss | best loss | final loss | steps to threshold | s / step |")
        print("|---|---|---|---|---|---|---|")
        for name, c in conv["methods"].items():
            label = name if name != "batex" else f"batex ({c['basis_words']} words, rank {c['rank']})"
            print(
                f"| {label} | {c['lr']:g} | {c['initial_loss']:.5f} | {c['best_loss']:.5f} | {c['final_loss']:.5f} | "
                f"{c['steps_to_threshold'] if c['steps_to_threshold'] is not None else 'not reached'} | "
                f"{c['median_step_s']:.3f} |"
            )


if __name__ == "__main__":
    main()
