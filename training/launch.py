"""`accelerate launch` for schedulers: a stop signal reaches the trainers, and exit status 75 reaches the scheduler.

    python -m training.launch [accelerate launch options] -m training.global_mapping --config ... [key=value ...]

Everything after `training.launch` is passed to `accelerate launch` unchanged. Why a wrapper: on
SIGTERM, `accelerate launch` exits with 143 at once (and any trainer that stops with an error status
becomes its exit 1), so a scheduler never sees the trainers' `EXIT_PREEMPTED` (75) that says "a
checkpoint was written; requeue me". This wrapper runs the launcher in a session of its own, turns
SIGTERM / SIGUSR1 / SIGINT into SIGUSR1 for every trainer process below it (each finishes its step,
writes a complete checkpoint and leaves), waits for all of them, and exits with 75 when the trainers
were preempted, else with the launcher's own status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .loop import EXIT_PREEMPTED

MARKER_ENV = "ZSP_PREEMPTED_MARKER"  # the loop writes this file too when it stops on a signal


def _trainers(launcher: psutil.Process) -> list[psutil.Process]:
    """Every process below the launcher (the trainers; with torchrun, the workers of its elastic agent)."""
    try:
        return launcher.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    marker = Path(tempfile.mkdtemp(prefix="zsp-launch-")) / "preempted"
    env = dict(os.environ, **{MARKER_ENV: str(marker)})
    child = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *argv],
        env=env,
        start_new_session=True,  # the scheduler's group-wide signal reaches us, not the launcher
        preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
    )
    launcher = psutil.Process(child.pid)
    received: list[str] = []

    def forward(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        for process in _trainers(launcher):
            with contextlib.suppress(psutil.NoSuchProcess):  # a trainer that has just left needs no signal
                process.send_signal(signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    known: dict[int, psutil.Process] = {}
    try:
        while True:
            known.update((p.pid, p) for p in _trainers(launcher))
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    deadline = time.time() + 120  # trainers still writing their checkpoint after the launcher left
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in known.values()):
        time.sleep(0.2)
    if marker.is_file():
        print(
            f"training.launch: the trainers stopped with a checkpoint ({', '.join(received) or 'signal'}); "
            f"exit status {EXIT_PREEMPTED} (resume_from_checkpoint=latest continues)",
            file=sys.stderr,
        )
        code = EXIT_PREEMPTED
    marker.unlink(missing_ok=True)
    marker.parent.rmdir()
    return code


def main() -> None:
    raise SystemExit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
