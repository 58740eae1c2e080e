"""Preemption as SLURM does it: SIGUSR1 to every process of a running 1- and 2-process trainer (the launchers
ignore it, as `trap '' USR1` in configs/slurm/train_elite.sbatch makes them), a complete checkpoint and
preempted.json, exit status 75 from the trainer, and a resumed run whose losses continue the uninterrupted
run's exactly. Also: the launcher's --mixed_precision decides when the trainer config does not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from training.loop import EXIT_PREEMPTED, PREEMPTED_FILE

HERE = Path(__file__).parent
COMMON = ["report_to=none", "train_batch_size=4", "learning_rate=0.05", "checkpointing_steps=100", "max_steps=10"]


def _command(processes: int, args: list[str], mixed_precision: str | None = "no") -> tuple[list[str], dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
    ]
    if mixed_precision:
        launch += ["--mixed_precision", mixed_precision]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        launch += ["--multi_gpu"]
    else:
        launch += ["--cpu"]
    return launch + [str(HERE / "toy_trainer.py"), *args], env


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the launchers; the trainers install a handler


def _run(processes: int, args: list[str], mixed_precision: str | None = "no") -> subprocess.CompletedProcess:
    cmd, env = _command(processes, args, mixed_precision)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(folder: Path, rank: int) -> list[float]:
    return json.loads((folder / f"losses-rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_stop_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, processes):
    full = _run(processes, [f"output_dir={tmp_path / 'full'}", *COMMON])
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "split"
    args = [f"output_dir={run_dir}", "step_sleep=0.3", *COMMON]
    cmd, env = _command(processes, args)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_ignore_usr1,
        start_new_session=True,
    )
    deadline = time.time() + 300
    progress = [run_dir / f"progress-rank{r}.txt" for r in range(processes)]
    while time.time() < deadline and not all(p.is_file() and int(p.read_text() or 0) >= 2 for p in progress):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    # what SLURM does with --signal: every process of the job step gets it (launchers and trainers)
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            pass
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output[-3000:]
    assert f"exit status {EXIT_PREEMPTED}" in output, output[-3000:]
    marker = json.loads((run_dir / PREEMPTED_FILE).read_text())
    step = marker["step"]
    assert 2 <= step < 10 and marker["signal"] == "SIGUSR1"
    assert (run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    first = {r: _losses(run_dir, r) for r in range(processes)}
    assert all(len(first[r]) == step for r in range(processes))

    resumed = _run(processes, [*args[:1], "step_sleep=0.3", *COMMON, "resume_from_checkpoint=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / PREEMPTED_FILE).exists()
    for rank in range(processes):
        assert first[rank] + _losses(run_dir, rank) == _losses(tmp_path / "full", rank)


@pytest.mark.slow
def test_the_launchers_mixed_precision_decides(tmp_path):
    bf16 = _run(1, [f"output_dir={tmp_path / 'bf16'}", *COMMON[:-1], "max_steps=1"], mixed_precision="bf16")
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    assert (tmp_path / "bf16" / "dtype-rank0.txt").read_text() == "torch.bfloat16"
    plain = _run(1, [f"output_dir={tmp_path / 'plain'}", *COMMON[:-1], "max_steps=1"], mixed_precision=None)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (tmp_path / "plain" / "dtype-rank0.txt").read_text() == "torch.float32"
    # the trainer config wins over the launcher when it is set
    key = _run(
        1, [f"output_dir={tmp_path / 'key'}", *COMMON[:-1], "max_steps=1", "mixed_precision=no"], mixed_precision="bf16"
    )
    assert key.returncode == 0 and (tmp_path / "key" / "dtype-rank0.txt").read_text() == "torch.float32"


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_the_launch_wrapper_turns_sigterm_into_a_checkpoint_and_exit_75(tmp_path, processes):
    """Sweep case 8: `accelerate launch` itself exits 143 on SIGTERM; `python -m training.launch` (the same
    arguments) forwards the stop to the trainers and exits 75 once they have checkpointed."""
    run_dir = tmp_path / "run"
    cmd, env = _command(processes, [f"output_dir={run_dir}", "step_sleep=0.3", *COMMON])
    cmd = [sys.executable, "-m", "training.launch", *cmd[3:]]  # the same accelerate launch arguments
    env["PYTHONPATH"] = f"{HERE.parent}{os.pathsep}{HERE}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
    deadline = time.time() + 300
    progress = [run_dir / f"progress-rank{r}.txt" for r in range(processes)]
    while time.time() < deadline and not all(p.is_file() and int(p.read_text() or 0) >= 2 for p in progress):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what a scheduler's `kill` / time limit does to the job's command
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    step = json.loads((run_dir / PREEMPTED_FILE).read_text())["step"]
    assert (run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
