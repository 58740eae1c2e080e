"""The data_prep command lines as a new user runs them on the bundled samples: shards that open
with plain `tar` and with webdataset, a multi-node run merged, and `inspect` with its contact sheet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from data_prep.cli import main

REPO = __import__("pathlib").Path(__file__).parent.parent


def test_help_lists_the_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    for name in ("coco", "openimages", "merge", "inspect"):
        assert name in out
    out = subprocess.run(
        [sys.executable, "-m", "data_prep", "coco", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    for text in (
        "--annotations",
        "--images",
        "--out",
        "--workers",
        "--node-rank",
        "--num-nodes",
        "min_side",
        "resolution",
    ):
        assert text in out


def _coco_args(data_dir, out, *extra):
    return [
        "coco",
        "--annotations",
        str(data_dir / "coco_sample/annotations.json"),
        "--images",
        str(data_dir / "coco_sample/images"),
        "--out",
        str(out),
        "--config",
        str(REPO / "configs/data/demo.yaml"),
        "--no-progress",
        "-q",
        *extra,
    ]


def test_coco_cli_shards_open_with_tar_and_webdataset(data_dir, tmp_path):
    assert main(_coco_args(data_dir, tmp_path, "--shard-size", "4", "--workers", "1", "resolution=64")) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["resolution"] == 64 and manifest["samples"] >= 5
    if shutil.which("tar"):
        listing = subprocess.run(
            ["tar", "tf", str(tmp_path / "coco-000000.tar")], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(listing) == 3 * manifest["shards"][0]["samples"] and listing[0].endswith(".jpg")
    import webdataset as wds

    urls = sorted(str(p) for p in tmp_path.glob("coco-*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    got = list(dataset)
    assert len(got) == manifest["samples"]
    for sample in got:
        assert sample["jpg"].size == (64, 64) and sample["json"]["source"] == "coco"
        assert sample["mask.png"].size == (64, 64)


def test_openimages_cli_two_nodes_and_merge(data_dir, tmp_path):
    oi = data_dir / "openimages/from_coco_sample"
    base = [
        "openimages",
        "--boxes",
        str(oi / "annotations/validation-annotations-bbox.csv"),
        "--segmentations",
        str(oi / "annotations/validation-annotations-object-segmentation.csv"),
        "--masks",
        str(oi / "masks"),
        "--images",
        str(oi / "images"),
        "--classes",
        str(data_dir / "openimages/class-descriptions-boxable.csv"),
        "--config",
        str(REPO / "configs/data/demo.yaml"),
        "--shard-size",
        "10",
        "--workers",
        "1",
        "--no-progress",
        "-q",
    ]
    single = tmp_path / "single"
    assert main([*base, "--out", str(single), "resolution=48"]) == 0
    nodes = tmp_path / "nodes"
    for rank in (0, 1):
        assert main([*base, "--out", str(nodes), "--node-rank", str(rank), "--num-nodes", "2", "resolution=48"]) == 0
    assert not (nodes / "manifest.json").exists()
    assert main(["merge", str(nodes), "--verify", "-q"]) == 0
    merged = json.loads((nodes / "manifest.json").read_text())
    reference = json.loads((single / "manifest.json").read_text())
    assert merged["samples"] == reference["samples"] and merged["skipped"] == reference["skipped"]
    assert {p.name: p.read_bytes() for p in nodes.glob("*.tar")} == {
        p.name: p.read_bytes() for p in single.glob("*.tar")
    }
    assert main(["merge", str(tmp_path / "empty")]) == 2  # a clear error, not a traceback


def test_inspect_prints_stats_and_draws_a_sheet(crop_shards, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    stats_file = tmp_path / "stats.json"
    assert (
        main(
            [
                "inspect",
                str(crop_shards),
                "--out",
                str(sheet),
                "--json",
                str(stats_file),
                "--verify",
                "--tile",
                "96",
                "-q",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "samples" in printed and "skipped (manifest)" in printed
    stats = json.loads(stats_file.read_text())
    manifests = [json.loads((crop_shards / s / "manifest.json").read_text()) for s in ("coco", "openimages")]
    assert stats["samples"] == sum(m["samples"] for m in manifests) and stats["problems"] == []
    assert set(stats["samples_per_source"]) == {"coco", "openimages"}
    assert stats["mask_box_iou"]["min"] >= 0.8
    image = Image.open(sheet)
    assert image.mode == "RGB" and image.width > 96 * 4


def test_inspect_reports_a_manifest_that_lies(crop_shards, tmp_path, capsys):
    folder = tmp_path / "coco"
    shutil.copytree(crop_shards / "coco", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(folder), "-q"]) == 1
    assert "the manifest says" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["inspect", "/nonexistent/dir/*.tar"], "no shards found")])
def test_cli_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_setting_after_a_list_of_files_is_not_taken_for_a_file(tmp_path, capsys):
    from data_prep.cli import _rescue_settings, build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "openimages",
            "--images",
            "i",
            "--classes",
            "c.csv",
            "--out",
            str(tmp_path),
            "--boxes",
            "a.csv",
            "b.csv",
            "resolution=48",
            "mask_from_box=true",
        ]
    )
    _rescue_settings(args, parser)
    assert args.boxes == ["a.csv", "b.csv"] and args.overrides == ["resolution=48", "mask_from_box=true"]
    with pytest.raises(SystemExit):
        args = parser.parse_args(
            ["openimages", "--images", "i", "--classes", "c", "--out", "o", "--boxes", "resolution=48"]
        )
        _rescue_settings(args, parser)
    assert "--boxes names no file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "columns_wide=3"])
    assert "takes no key=value settings" in capsys.readouterr().err
    # the one grammar: key=value that names one of the command's own options is that option
    from encoders.common.config import parse_keyed_args

    assert parse_keyed_args(build_parser(), ["inspect", str(tmp_path), "verify=true", "columns=4"]).verify is True
