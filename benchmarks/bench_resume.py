"""Resume benchmark: seconds from process start to the end of the first resumed step, for a checkpoint
at step 10 and one at step 10,000 of the ELITE global stage. Prints a table, writes
benchmarks/results/bench_resume.json.

    .venv/bin/python benchmarks/bench_resume.py            # ~2 minutes on 2 cores

The step-10 checkpoint comes from a real run (tiny models, the demo's COCO + OpenImages crop shards,
64 px, batch 2). The step-10,000 checkpoint is the same one with the step and the data position a real
run has there: `trainer_state.json` says 10,000 and `data_state_rank0.json` puts the reader 20,000
samples in (10,000 steps x batch 2; the shards hold a few dozen crops, so the reader is hundreds of
rounds of resampled shards deep). Each resume runs `accelerate launch -m training.global_mapping
... resume_from_checkpoint=<ckpt> max_steps=<ckpt + 1>` in a fresh process, timed until the loop
prints its first step (the log line `resumed ... first step done`), then stopped; the best of
`--repeats` runs counts (other load on a shared machine only adds time). Target: the two within 1.5x.

For scale, the loader's cost per batch is also measured: what replaying the data up to step 10,000
(the previous resume, which decoded and augmented every skipped batch) would cost on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # sample_shards: the tests' crop-shard builder

from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

RESULTS = REPO / "benchmarks/results/bench_resume.json"
BATCH = 2


def build_inputs(work: Path) -> tuple[Path, Path, str]:
    """Tiny models and the tests' crop shards (64 px, `tests/sample_shards.py`) under `work`."""
    from sample_shards import build_sample_crop_shards

    from encoders.tiny import build_tiny_models

    models = build_tiny_models(work / "models", ["sd", "image_encoder"])
    build_sample_crop_shards(work / "shards")
    return models["sd"], models["image_encoder"], f"{work / 'shards/coco'}::{work / 'shards/openimages'}"


def _command(sd: Path, clip: Path, shards: str, out: Path, extra: list[str]) -> list[str]:
    from training.crop_data import STORED_CROP_KEYS

    return [
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
        "training.global_mapping",
        "--config",
        str(REPO / "configs/train/global_mapping.yaml"),
        f"pretrained_model_name_or_path={sd}",
        f"image_encoder_name_or_path={clip}",
        f"train_shards={shards}",
        f"output_dir={out}",
        f"train_batch_size={BATCH}",
        "data.resolution=64",
        "mapping_hidden_dim=64",
        "report_to=none",
        "validation_steps=0",
        "checkpointing_steps=10",
        "logging_steps=1",
        "scale_lr=false",
        "gradient_accumulation_steps=1",  # one micro-step per optimizer step
        *STORED_CROP_KEYS,
        "dataloader_num_workers=0",
        *extra,
    ]


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def make_checkpoint_at(source: Path, step: int, out_dir: Path) -> Path:
    """A copy of `source` as the checkpoint a real run has at `step` (step count and data position)."""
    target = out_dir / f"checkpoint-{step}"
    shutil.copytree(source, target)
    state = json.loads((target / "trainer_state.json").read_text())
    state["global_step"] = step
    (target / "trainer_state.json").write_text(json.dumps(state, indent=2))
    data = json.loads((target / "data_state_rank0.json").read_text())
    data["positions"] = [step * BATCH]  # no bad samples: the reader moved one batch per step
    (target / "data_state_rank0.json").write_text(json.dumps(data))
    return target


def time_first_resumed_step(cmd: list[str], env: dict) -> float:
    """Seconds from launching `cmd` to the loop's 'first step done' line; the process is then stopped."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if re.search(r"first step done", line):
                return time.perf_counter() - start
        raise RuntimeError(f"the resumed run ended without a first step (exit {proc.wait()})")
    finally:
        proc.kill()
        proc.wait()


def loader_seconds_per_batch(sd: Path, shards: str, batches: int = 20) -> float:
    """Decode + augment + batch time of the crop loader (what a replaying resume pays per skipped batch)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from training.crop_data import CropDataConfig, build_crop_dataloader

    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    loader = build_crop_dataloader(
        shards, CropDataConfig(resolution=64), batch_size=BATCH, vae_scale_factor=factor, tokenizer=tokenizer
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="resumes per checkpoint (best counts)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_resume-"))
    sd, clip, shards = build_inputs(work)
    env = _env(args.threads)
    run = work / "run"
    if not (run / "checkpoint-10").is_dir():
        done = subprocess.run(
            _command(sd, clip, shards, run, ["max_steps=10"]), env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
    checkpoints = {10: run / "checkpoint-10"}
    far = run / "checkpoint-10000"
    if not far.is_dir():
        make_checkpoint_at(checkpoints[10], 10_000, run)
    checkpoints[10_000] = far
    times: dict[int, list[float]] = {10: [], 10_000: []}
    for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits both
        for step, ckpt in checkpoints.items():
            out = work / f"resume_{step}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = _command(sd, clip, shards, out, [f"resume_from_checkpoint={ckpt}", f"max_steps={step + 1}"])
            times[step].append(time_first_resumed_step(cmd, env))
    per_batch = loader_seconds_per_batch(sd, shards)
    best = {step: min(v) for step, v in times.items()}
    ratio = best[10_000] / best[10]
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "batch": BATCH,
        "seconds_to_first_resumed_step": {str(k): [round(x, 2) for x in v] for k, v in times.items()},
        "best": {str(k): round(v, 2) for k, v in best.items()},
        "ratio_10000_vs_10": round(ratio, 3),
        "target_ratio_at_most": 1.5,
        "loader_seconds_per_batch": round(per_batch, 4),
        "replay_estimate_seconds_at_10000": round(per_batch * 10_000, 1),
    }
    write_results(results, args.out)
    print(f"{'checkpoint':>12} | {'first resumed step (best of ' + str(args.repeats) + ')':>36}")
    for step in (10, 10_000):
        print(f"{'step ' + str(step):>12} | {best[step]:>34.2f} s")
    print(
        f"ratio 10,000 / 10: {ratio:.2f} (target <= 1.5); replaying 10,000 batches instead would take "
        f"~{per_batch * 10_000:.0f} s on this machine ({per_batch * 1000:.1f} ms per batch)"
    )
    print(f"wrote {args.out}")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
