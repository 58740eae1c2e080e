"""One command grammar (issue 27): `zsp <stage> [<command>] [--key value | key=value ...]` over every stage."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from encoders.common.config import ConfigError, keyed_options
from inference.cli import build_parser as inference_parser
from inference.zsp import STAGES, TRAINERS, UsageError, resolve

REPO = Path(__file__).resolve().parents[1]


def test_each_stage_resolves_to_its_python_m_alias():
    assert resolve(["data", "coco", "--out", "x"]) == ["-m", "data_prep", "coco", "--out", "x"]
    assert resolve(["train", "global_mapping", "max_steps=3"]) == ["-m", "training.global_mapping", "max_steps=3"]
    assert resolve(["generate", "--prompt", "S*"]) == ["-m", "inference", "generate", "--prompt", "S*"]
    assert resolve(["evaluate", "protocol=all"]) == ["-m", "inference.evaluate", "protocol=all"]
    assert resolve(["models", "world", "--out", "m"]) == ["-m", "encoders.world", "--out", "m"]
    assert resolve(["convert", "--out", "e"]) == ["-m", "encoders.convert_reference", "--out", "e"]
    for bad in (["bogus"], ["train"], ["train", "nope"], []):
        with pytest.raises(UsageError):
            resolve(bad)
    assert set(STAGES) >= {"data", "train", "encode", "generate", "guide", "evaluate", "app", "convert"}


def test_the_trainer_list_is_every_trainer_module():
    """`TRAINERS` is written out (inference may not import training); it must name exactly the training modules
    that run a task through the shared loop from their `main`."""
    found = set()
    for path in (REPO / "training").glob("*.py"):
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        if mains and "run_from_command_line" in ast.unparse(mains[0]):
            found.add(path.stem)
    assert found == set(TRAINERS)


def test_key_value_means_the_option_in_flag_commands():
    parser = inference_parser()
    line = ["generate", "base=b", "--prompt", "steps=7 is a prompt", "num_images=2", "spatial_guidance=true"]
    assert keyed_options(parser, line) == [
        "generate", "--base", "b", "--prompt", "steps=7 is a prompt", "--num-images", "2", "--spatial-guidance"
    ]  # fmt: skip
    args = parser.parse_args(keyed_options(parser, [*line, "out=o", "no_auto_mask=false"]))
    assert (args.num_images, args.spatial_guidance, args.out, args.no_auto_mask) == (2, True, "o", False)
    with pytest.raises(ConfigError, match="switch"):
        keyed_options(parser, ["generate", "spatial_guidance=maybe"])


def test_zsp_runs_a_stage_with_both_option_forms(tmp_path):
    """A real line through the installed dispatcher: data_prep's world command with `key=value` options."""
    out = tmp_path / "world"
    done = subprocess.run(
        [sys.executable, "-m", "inference.zsp", "data", "world", f"out={out}", "images=3", "--seed", "1",
         "no_progress=true"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads((out / "instances.json").read_text())["images"]) == 3
    bad = subprocess.run([sys.executable, "-m", "inference.zsp", "train", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "global_mapping" in bad.stderr
