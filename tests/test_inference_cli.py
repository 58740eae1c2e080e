"""`python -m inference generate|encode`: files written, settings recorded, bad inputs, lean imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
TRAINING_STACK = ("deepspeed", "webdataset", "pycocotools", "training", "data_prep")

# In a fresh interpreter: the top-level modules after importing diffusers' SD pipeline (the baseline),
# then after a whole `generate` run.
_PROBE = """
import json, sys
top = lambda: sorted({{m.split('.')[0] for m in sys.modules}})
import diffusers
from diffusers import StableDiffusionPipeline
baseline = top()
from inference.cli import main
assert main({args!r}) == 0
json.dump({{"baseline": baseline, "after": top()}}, open(sys.argv[1], "w"))
"""


def _modules_before_and_after(tmp_path: Path, args: list[str]) -> tuple[set[str], set[str]]:
    out = tmp_path / "modules.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(args=args), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    return set(data["baseline"]), set(data["after"])


@pytest.fixture(scope="module")
def concept_files(data_dir):
    root = data_dir / "concepts"
    return root / "dreambooth" / "teapot" / "04.jpg", root / "masks" / "teapot_04.png"


def test_generate_with_a_concept_writes_everything_and_imports_no_training_stack(
    tmp_path, tiny_sd_path, tiny_encoders_path, concept_files
):
    image, mask = concept_files
    out = tmp_path / "out"
    args = [
        "generate",
        "--base",
        str(tiny_sd_path),
        "--encoders",
        str(tiny_encoders_path),
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--prompt",
        "a photo of S* on the beach",
        "--prompt",
        "S* in the snow",
        "--num-images",
        "2",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "7",
        "--save-concepts",
        "--quiet",
        "--out",
        str(out),
    ]
    baseline, loaded = _modules_before_and_after(tmp_path, args)

    assert not loaded & set(TRAINING_STACK), f"generation imported {sorted(loaded & set(TRAINING_STACK))}"
    if "accelerate" not in baseline:  # accelerate only where diffusers itself pulls it in
        assert "accelerate" not in loaded
    assert {"inference", "encoders", "diffusers"} <= loaded

    settings = json.loads((out / "settings.json").read_text())
    assert settings["versions"]["zero-step-personalization"] not in ("", None)  # the package version is recorded
    written = sorted(p.name for p in out.iterdir())
    assert not [name for name in written if name.startswith(".") or name.endswith(".tmp")]
    assert sorted(settings["files"] + ["concept_0.safetensors", "settings.json"]) == written
    assert [p["prompt"] for p in settings["prompts"]] == ["a photo of S* on the beach", "S* in the snow"]
    assert all(p["seeds"] == [7, 8] and len(p["images"]) == 2 for p in settings["prompts"])
    assert (
        settings["elite_scale"] == 0.6
        and settings["steps"] == 1
        and (settings["height"], settings["width"]) == (32, 32)
    )
    assert settings["placeholders"] == ["S*"] and settings["scheduler"] == "PNDMScheduler"
    assert settings["concepts"][0]["mask_source"] == "teapot_04.png"
    assert settings["concepts"][0]["encoders"] == str(tiny_encoders_path)
    for name in settings["files"][:-1]:
        with Image.open(out / name) as picture:
            assert picture.size == (32, 32)
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 3 * 96 and grid.height > 2 * 96  # 2 rows: input | 2 outputs, drawn at >= 96 px

    # encode once, generate many: the saved concept gives exactly the same images as the photo
    again = tmp_path / "again"
    code = main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--encoders",
            str(tiny_encoders_path),
            "--concept",
            str(out / "concept_0.safetensors"),
            "--prompt",
            "S* in the snow",
            "--num-images",
            "2",
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "32",
            "--seed",
            "7",
            "--quiet",
            "--out",
            str(again),
        ]
    )
    assert code == 0
    with Image.open(again / "grid.png") as grid:
        assert grid.width > 3 * 96  # the concept file's preview | 2 outputs
    for name in json.loads((again / "settings.json").read_text())["prompts"][0]["images"]:
        original = name.replace("00-", "01-", 1)  # the same prompt was the second one above
        with Image.open(again / name) as a, Image.open(out / original) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plain_base_pipeline_uses_the_models_default_size(tmp_path, tiny_sd_path):
    out = tmp_path / "base"
    assert (
        main(
            [
                "generate",
                "--base",
                str(tiny_sd_path),
                "--prompt",
                "a photo of a dog",
                "--steps",
                "1",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["height"], settings["width"]) == (64, 64)  # UNet sample_size 32 x VAE factor 2, not 8
    assert settings["concepts"] == [] and settings["elite_scale"] is None
    with Image.open(out / settings["prompts"][0]["images"][0]) as picture:
        assert picture.size == (64, 64)


def test_encode_command_writes_a_concept_file(tmp_path, tiny_encoders_path, tiny_sd_path, concept_files, capsys):
    from inference import Concept

    image, mask = concept_files
    path = tmp_path / "teapot.safetensors"
    assert (
        main(
            [
                "encode",
                "--encoders",
                str(tiny_encoders_path),
                "--base",
                str(tiny_sd_path),
                "--image",
                str(image),
                "--mask",
                str(mask),
                "--out",
                str(path),
            ]
        )
        == 0
    )
    concept = Concept.load(path)
    assert concept.has_local and concept.metadata["source_image"] == "04.jpg"
    assert "teapot.safetensors" in capsys.readouterr().out
    # several photos of one concept: one file, w0 averaged, tokens side by side; a folder as a generate --image
    two = tmp_path / "two.safetensors"
    assert (
        main(
            [
                "encode",
                "--encoders",
                str(tiny_encoders_path),
                "--image",
                str(image),
                "--mask",
                str(mask),
                "--image",
                str(image),
                "--mask",
                "-",
                "--out",
                str(two),
            ]
        )
        == 0
    )
    combined = Concept.load(two)
    assert combined.metadata["photos"] == "2" and combined.local_tokens.shape[0] == 2 * concept.local_tokens.shape[0]
    folder = tmp_path / "concept"
    (folder / "masks").mkdir(parents=True)
    folder.joinpath("04.jpg").write_bytes(image.read_bytes())
    folder.joinpath("masks", "04.png").write_bytes(mask.read_bytes())
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--base",
                str(tiny_sd_path),
                "--encoders",
                str(tiny_encoders_path),
                "--image",
                str(folder),
                "--prompt",
                "a photo of S*",
                "--steps",
                "1",
                "--height",
                "16",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "settings.json").read_text())["concepts"][0]["mask_source"] == "04.png"


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("no placeholder", ["--prompt", "a photo of a teapot"], "does not contain the placeholder 'S*'"),
        ("unreadable image", ["--image-file", "broken.jpg"], "broken.jpg: cannot be read as an image"),
        ("empty mask", ["--mask-file", "empty.png"], "empty.png: the mask is empty"),
        ("missing concept file", ["--concept-file", "missing.safetensors"], "missing.safetensors: no such file"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(
    case, extra, message, tmp_path, tiny_sd_path, tiny_encoders_path, concept_files, capsys
):
    image, mask = concept_files
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    Image.new("L", (10, 10), 0).save(tmp_path / "empty.png")
    prompt = ["--prompt", "a photo of S*"]
    source = ["--image", str(image), "--mask", str(mask)]
    if extra[0] == "--prompt":
        prompt = extra
    elif extra[0] == "--image-file":
        source = ["--image", str(tmp_path / extra[1])]
    elif extra[0] == "--mask-file":
        source = ["--image", str(image), "--mask", str(tmp_path / extra[1])]
    else:
        source = ["--concept", str(tmp_path / extra[1])]
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--encoders",
            str(tiny_encoders_path),
            *source,
            *prompt,
            "--steps",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 2, case
    assert message in capsys.readouterr().err
    assert not (out / "settings.json").exists()  # nothing that looks like a finished run


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "a.jpg", "--image", "b.jpg", "--mask", "m.png"], "1 --mask for 2 --image"),
        (["--image", "a.jpg"], "--image needs --encoders"),
        (
            ["--encoders", "E", "--image", "a.jpg", "--placeholder", "S1", "--placeholder", "S2"],
            "2 --placeholder for 1",
        ),
        (["--encoders", "E", "--image", "a.jpg", "--box", "0.5,0,0.2,1"], "0 <= x0 < x1 <= 1"),
    ],
)
def test_inconsistent_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--base", "B", "--prompt", "S*", "--out", "o", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_option():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"generate", "encode", "guide"}
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
            assert action.option_strings[0] in text
    assert (
        "--elite-scale" in subparsers["generate"].format_help()
        and "--lam" in subparsers["generate"].format_help()
        and "0.6" in subparsers["generate"].format_help()
    )


def test_demo_report_lists_parts_and_fails_on_a_missing_stage(tmp_path, capsys):
    from inference.evaluation.demo_report import main as report

    demo = tmp_path / "demo"
    (demo / "models" / "sd").mkdir(parents=True)
    (demo / "models" / "sd" / "model_index.json").write_text("{}")
    run = demo / "images" / "teapot"
    run.mkdir(parents=True)
    (run / "settings.json").write_text(
        json.dumps({"prompts": [{"prompt": "S* in the snow", "images": ["a.png", "b.png"]}]})
    )
    assert report(["--demo", str(demo)]) == 0
    text = capsys.readouterr().out
    assert "models/sd" in text and "(1 files" in text and "encoders               missing" in text
    assert "2 images for: S* in the snow" in text and str(run / "grid.png") in text
    assert report(["--demo", str(demo), "--stage", "teapot"]) == 0
    assert report(["--demo", str(demo), "--stage", "base"]) == 1
    assert "images/base" in capsys.readouterr().out
