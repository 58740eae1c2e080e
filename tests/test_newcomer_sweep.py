"""The second newcomer sweep's cases, each by its number: the right result or a one-line error naming
the problem, nothing read or written outside the folders given, nothing lost. Data made here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.records import CropSettings
from data_prep.sources.openimages import read_openimages
from data_prep.writer import ShardJob, WriterError, write_shards
from encoders.common.files import FolderLockedError, OutputPathError, folder_lock
from inference.concept import Concept, ConceptFileError

SETTINGS = CropSettings(resolution=32, min_area_fraction=0.01, max_area_fraction=0.95, min_side=10)
CLASSES = "/m/01,Thing\n"
BOX_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
SEG_HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"


def _openimages_tree(tmp_path: Path, image_id: str, mask_path: str) -> dict:
    """An OpenImages-format tree with one image and one mask inside, and a 'secret' image and mask beside it."""
    images, masks, secret = tmp_path / "oi/images", tmp_path / "oi/masks", tmp_path / "secret"
    for folder in (images, masks, secret):
        folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(images / "inside.jpg")
    Image.new("L", (64, 48), 255).save(masks / "inside_m01.png")
    Image.new("RGB", (64, 48), "blue").save(secret / "outside.jpg")
    Image.new("L", (64, 48), 255).save(secret / "outside_m01.png")
    (tmp_path / "classes.csv").write_text(CLASSES)
    (tmp_path / "boxes.csv").write_text(BOX_HEADER + f"{image_id},x,/m/01,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n")
    (tmp_path / "seg.csv").write_text(SEG_HEADER + f"{mask_path},{image_id},/m/01,0,0.1,0.9,0.1,0.9,0.9,\n")
    return dict(boxes=[tmp_path / "boxes.csv"], segmentations=[tmp_path / "seg.csv"], masks_dir=masks,
                images_dir=images, classes=tmp_path / "classes.csv", settings=SETTINGS)


@pytest.mark.parametrize("image_id, reason", [
    ("../../secret/outside", "path_outside_images"),
    ("/{secret}/outside", "path_outside_images"),
])
def test_case1_openimages_image_ids_cannot_leave_the_images_folder(tmp_path, image_id, reason):
    """Case 1: an ImageID with ../ or an absolute path is skipped as path_outside_images, never read."""
    image_id = image_id.format(secret=str(tmp_path / "secret").lstrip("/"))
    records, report = read_openimages(**_openimages_tree(tmp_path, image_id, "inside_m01.png"))
    assert records == []
    assert report.skipped[reason] == 1


@pytest.mark.parametrize("mask_path", ["../../secret/outside_m01.png", "{secret}/outside_m01.png"])
def test_case1_openimages_mask_paths_cannot_leave_the_masks_folder(tmp_path, mask_path):
    """Case 1: a MaskPath leading out of --masks is skipped as path_outside_masks."""
    mask_path = mask_path.format(secret=tmp_path / "secret")
    records, report = read_openimages(**_openimages_tree(tmp_path, "inside", mask_path))
    assert records == []
    assert report.skipped["path_outside_masks"] == 1


def test_case1_openimages_a_linked_image_pointing_out_is_skipped(tmp_path):
    """Case 1: a link inside --images that points elsewhere counts as outside."""
    tree = _openimages_tree(tmp_path, "linked", "inside_m01.png")
    os.symlink(tmp_path / "secret/outside.jpg", tree["images_dir"] / "linked.jpg")
    records, report = read_openimages(**tree)
    assert records == [] and report.skipped["path_outside_images"] == 1
    records, _ = read_openimages(**_openimages_tree(tmp_path / "ok", "inside", "inside_m01.png"))
    assert [r.image_id for r in records] == ["inside"]  # the same tree with an inside id is read


def test_case2_the_data_prep_lock_is_never_written_through_a_link(tmp_path):
    """Case 2: OUT/.lock-NAME-node0 as a symlink to another file: refused, that file untouched."""
    out, victim = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    victim.write_text("keep me")
    (out / ".lock-items-node0").symlink_to(victim)
    job = ShardJob(out_dir=out, name="items", progress=False)
    with pytest.raises(WriterError, match="symbolic link"):
        write_shards([{"key": "a"}], _item, job, settings={})
    assert victim.read_text() == "keep me"


def _item(item: dict) -> dict:
    return {"__key__": item["key"], "txt": b"x"}


def test_case2_a_lock_that_is_a_folder_or_fifo_is_refused(tmp_path):
    """Case 2: a lock name that is not a plain file is refused with its name."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputPathError, match="fifo"):
        with folder_lock(tmp_path / "fifo", "x"):
            pass


def test_case3_a_second_trainer_on_the_same_output_dir_is_refused(tmp_path):
    """Case 3: while one run holds output_dir, a second stops at once naming the first's process."""
    from tests.toy_trainer import ToyConfig, ToyTask  # noqa: PLC0415
    from training.loop import RUN_LOCK_FILE, run_training  # noqa: PLC0415

    out = tmp_path / "run"
    out.mkdir()
    with folder_lock(out / RUN_LOCK_FILE, "the first run"):
        config = ToyConfig(output_dir=str(out), max_steps=2, report_to="none", mixed_precision="no")
        with pytest.raises(FolderLockedError, match=rf"another training run in {out} is already running \(pid {os.getpid()}"):
            run_training(ToyTask(config))
    assert not list(out.glob("checkpoint-*")) and not (out / "config.yaml").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["w0", "local_tokens"])
def test_case4_concept_files_with_nan_or_inf_are_refused_naming_the_file(tmp_path, bad, where):
    """Case 4: NaN/Inf in w0 or the local tokens: ConceptFileError naming the file, not black images."""
    w0, local = torch.randn(8), torch.randn(4, 8)
    (w0 if where == "w0" else local)[1] = bad
    path = tmp_path / "c.safetensors"
    # written the way a damaged or hostile file would be: straight with safetensors, no checks
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({"w0": w0, "local_tokens": local, "local_keep": torch.ones(4, dtype=torch.uint8)}, str(path),
              metadata={"format": "zsp-concept/1"})
    with pytest.raises(ConceptFileError, match=rf"{path}: {where} holds \d+ NaN/Inf"):
        Concept.load(path)


def test_case4_concept_w0_of_integers_is_refused(tmp_path):
    """Case 4: the tensors' kind is checked too."""
    with pytest.raises(ValueError, match="floating-point"):
        Concept(torch.arange(8))
    assert np.isfinite(Concept(torch.randn(8)).w0.numpy()).all()
