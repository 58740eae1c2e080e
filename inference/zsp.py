"""`zsp <stage> [<command>] [--key value | key=value ...]`: one entry point over every stage.

Each stage is the module a `python -m` command runs, which stays its alias; `zsp` only picks the module and
hands it the rest of the line. Every command takes options both ways: `--num-images 4` and `num_images=4`,
`--resolution 512` and `resolution=512`.

    zsp data coco --annotations instances.json --images train2017/ --out shards/coco resolution=512
    zsp train global_mapping --config configs/train/global_mapping.yaml train_shards='shards/coco/*.tar'
    zsp generate --base CompVis/stable-diffusion-v1-4 --encoders ENC --image dog.jpg --prompt "S* on the beach"
    zsp evaluate protocol=all runs=out/dog_ti encoders=ENC

`zsp train NAME` runs the trainer in one process; for several processes or machines use
`accelerate launch -m training.NAME` (or `python -m training.launch`, which forwards preemption signals).
The stage runs in place of this process (exec), so signals and the exit status are the stage's own; this
module imports none of the stages, so `inference` stays free of `training` and `data_prep`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

# the trainers `zsp train NAME` knows: each is `training/NAME.py` with a `main` (a test keeps this list honest)
TRAINERS = ("global_mapping", "local_mapping", "location_mlp", "textual_inversion", "infusion", "ip_adapter", "world")
MODEL_WRITERS = {"world": "encoders.world", "tiny": "encoders.tiny"}


@dataclass(frozen=True)
class Stage:
    help: str
    module: str  # what `python -m` runs; for `train` and `models` the command word picks it


STAGES = {
    "data": Stage("object crops, location pairs, latents, the world's scenes: data_prep's commands", "data_prep"),
    "train": Stage("a trainer (" + ", ".join(TRAINERS) + ") in one process", "training"),
    "encode": Stage("one photo (+ mask) -> a concept file", "inference"),
    "generate": Stage("prompts with S* (or a fine-tune's token) -> images", "inference"),
    "guide": Stage("spatial guidance off / on for two words, with boxes and attention maps", "inference"),
    "evaluate": Stage(
        "each paper's evaluation protocol (protocol=elite, compositional, infusion, textual_inversion, ...)",
        "inference.evaluate",
    ),
    "app": Stage("the web demo (gradio)", "inference.app"),
    "convert": Stage("official ELITE .pt checkpoints -> an encoders folder", "encoders.convert_reference"),
    "models": Stage("write the shipped world models or the random tiny bundle (world | tiny)", "encoders"),
}


class UsageError(ValueError):
    """A `zsp` line that names no stage, or a stage without the command it needs (`asked`: it was `--help`)."""

    def __init__(self, message: str, asked: bool = False):
        super().__init__(message)
        self.asked = asked


def resolve(argv: list[str]) -> list[str]:
    """The `python -m ...` argument list that a `zsp` line stands for (without the interpreter)."""
    if not argv or argv[0] in ("-h", "--help"):
        raise UsageError(usage(), asked=bool(argv))
    stage_name, rest = argv[0], argv[1:]
    stage = STAGES.get(stage_name)
    if stage is None:
        raise UsageError(f"unknown stage {stage_name!r}; the stages are: {', '.join(STAGES)}\n\n{usage()}")
    if stage_name in ("train", "models"):
        choices = TRAINERS if stage_name == "train" else tuple(MODEL_WRITERS)
        if not rest or rest[0] not in choices:
            asked = bool(rest) and rest[0] in ("-h", "--help")
            got = "" if not rest or asked else f" (got {rest[0]!r})"
            raise UsageError(f"usage: zsp {stage_name} {{{','.join(choices)}}} ...{got}\n{stage.help}", asked=asked)
        module = f"training.{rest[0]}" if stage_name == "train" else MODEL_WRITERS[rest[0]]
        return ["-m", module, *rest[1:]]
    if stage.module == "inference":  # encode / generate / guide are inference's subcommands
        return ["-m", "inference", stage_name, *rest]
    return ["-m", stage.module, *rest]


def usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = ["usage: zsp <stage> [<command>] [--key value | key=value ...]", "", "stages:"]
    lines += [f"  {name:<{width}}  {stage.help}" for name, stage in STAGES.items()]
    lines += ["", "`zsp <stage> --help` lists a stage's options; each stage is also `python -m <module>`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = resolve(list(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        print(err, file=sys.stdout if err.asked else sys.stderr)
        return 0 if err.asked else 2
    command = [sys.executable, *args]
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)  # the stage replaces this process: its signals, its exit status
    return subprocess.run(command).returncode


if __name__ == "__main__":
    raise SystemExit(main())
