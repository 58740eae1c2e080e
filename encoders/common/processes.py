"""How many worker processes a job may start: the cores it is given, not the machine's."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPU cores this process may use: its affinity mask (what SLURM, taskset and cgroup cpusets
    give it), capped by `SLURM_CPUS_PER_TASK` when set; `os.cpu_count()` counts the whole machine."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return max(1, count)
