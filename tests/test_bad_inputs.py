"""The bad-input sweep: every input the commands accept is handled correctly or refused with a clear error,
before any model loads wherever the check needs none; nothing is written outside `--out`; nothing that looks
finished is left half-written. Complements test_data_prep_bad_input.py (counted skips of data_prep),
test_inference_inputs.py and test_inference_cli.py (photo and mask files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from data_prep.cli import main as data_prep_main
from data_prep.crop_commands import build_coco_shards, build_openimages_shards
from data_prep.records import CropSettings
from data_prep.sources import SourceError
from data_prep.writer import ShardJob, WriterError, output_lock, write_shards
from encoders.common.files import atomic_write_json
from encoders.common.images import mask_to_binary, to_rgb
from inference.cli import main as inference_main
from inference.concept import Concept, ConceptFileError
from inference.inputs import ConceptInputError, ConceptInputWarning, find_placeholders, load_concept_image

REPO = Path(__file__).resolve().parent.parent


def _photo(size=(96, 64)) -> Image.Image:
    image = Image.new("RGB", size, (20, 30, 160))
    image.paste((230, 40, 40), (40, 10, 80, 50))
    return image


def _generate(tmp_path, tiny_sd_path, *extra) -> list[str]:
    prompt = [] if "--prompt" in extra else ["--prompt", "a photo of a dog"]
    return [
        "generate",
        "--base",
        str(tiny_sd_path),
        *prompt,
        "--steps",
        "1",
        "--quiet",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


# ---- numbers on the command line: refused at parse time, before any model loads -----------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--elite-scale", "nan", "not a finite number"),
        ("--lam", "-1", "between 0 and 2"),
        ("--lam", "5", "between 0 and 2"),
        ("--guidance", "nan", "not a finite number"),
        ("--guidance", "-3", "at least 0"),
        ("--height", "65", "multiple of 8"),
        ("--width", "4", "between 8 and 8192"),
        ("--num-images", "0", "at least 1"),
        ("--steps", "0", "at least 1"),
        ("--seed", "1.5", "is not an integer"),
    ],
)
def test_bad_numbers_are_refused_before_any_model_loads(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference_main(
            [
                "generate",
                "--base",
                str(tmp_path / "no-such-model"),
                "--prompt",
                "x",
                "--out",
                str(tmp_path / "out"),
                option,
                value,
            ]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_settings_json_can_never_hold_a_bare_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "settings.json", {"elite_scale": float("nan")})
    assert not (tmp_path / "settings.json").exists()


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unwritable_out_is_refused_before_generating(kind, tmp_path, tiny_sd_path, capsys):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        out.chmod(0o500)
        if os.access(out, os.W_OK):  # root ignores permissions: nothing to test here
            pytest.skip("running as a user who can write anywhere")
    with pytest.raises(SystemExit) as exit_info:
        inference_main(["generate", "--base", str(tiny_sd_path), "--prompt", "a dog", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err and str(out) in capsys.readouterr().err + str(out)


# ---- photos and masks: read as data_prep reads them -----------------------------------------------------


def test_a_16_bit_grey_photo_is_scaled_not_white(tmp_path):
    values = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # uint16 -> a 16-bit grey PNG
    photo = load_concept_image(path, _full_mask(tmp_path)).image
    pixels = np.asarray(photo)
    assert photo.mode == "RGB" and pixels.min() < 10 and pixels.max() > 245 and 100 < pixels.mean() < 155
    from data_prep.images import to_rgb as data_prep_to_rgb  # the same conversion in both packages

    np.testing.assert_array_equal(pixels, np.asarray(data_prep_to_rgb(Image.open(path))[0]))


def _full_mask(tmp_path) -> Path:
    path = tmp_path / "full.png"
    Image.new("L", (64, 64), 255).save(path)
    return path


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "1"])
def test_photos_of_any_mode_become_rgb(mode):
    image = _photo().convert(mode)
    rgb, note = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size and note


def test_an_exif_rotated_photo_turns_its_mask_drawn_on_the_stored_pixels(tmp_path):
    stored = _photo((96, 64))  # the object at x 40..80, y 10..50 of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 64 x 96
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (40, 10, 80, 50))  # drawn on the stored pixels
    mask.save(tmp_path / "mask.png")
    with pytest.warns(ConceptInputWarning, match="size of .*phone.jpg as stored.*turning the mask with it"):
        concept = load_concept_image(tmp_path / "phone.jpg", tmp_path / "mask.png")
    assert concept.image.size == (64, 96) and concept.mask.size == (64, 96)
    red = np.asarray(concept.image)[..., 0] > 150
    on = np.asarray(concept.mask) > 0
    assert (red & on).sum() / on.sum() > 0.9  # the mask sits on the object in the upright photo


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 0, 255), (200, 200, 200)])
def test_a_mask_of_any_bright_colour_is_the_object(colour):
    mask = Image.new("RGB", (32, 32), (0, 0, 0))
    mask.paste(colour, (8, 8, 24, 24))
    binary = mask_to_binary(mask)
    assert binary.sum() == 16 * 16 and binary[8:24, 8:24].all()


def test_a_transparent_cut_out_mask_is_read_by_its_alpha():
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (4, 4, 12, 12))  # black, but opaque where the object is
    assert mask_to_binary(mask).sum() == 64


def test_tiny_objects_and_photos_are_refused(tmp_path):
    _photo().save(tmp_path / "photo.png")
    dot = Image.new("L", (96, 64), 0)
    dot.putpixel((50, 30), 255)
    dot.save(tmp_path / "dot.png")
    with pytest.raises(ConceptInputError, match="only 1x1 px in the mask"):
        load_concept_image(tmp_path / "photo.png", tmp_path / "dot.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "one.png")
    with pytest.raises(ConceptInputError, match="1x1 px: too small"):
        load_concept_image(tmp_path / "one.png")


def test_a_very_large_photo_is_read_up_to_the_pixel_limit(tmp_path):
    """A 30-megapixel photo is read; 8000 x 8000 (64 M, ~4 GB on the way to the encoder) is over the shared limit."""
    big = Image.new("RGB", (6000, 5000), (90, 90, 90))
    big.paste((250, 10, 10), (3000, 3000, 5000, 4000))
    mask = Image.new("L", (6000, 5000), 0)
    mask.paste(255, (3000, 3000, 5000, 4000))
    concept = load_concept_image(big, mask)
    assert concept.image.size == (6000, 5000) and np.asarray(concept.mask).any()
    with pytest.raises(ConceptInputError, match="8000x8000 = 64 million pixels"):
        load_concept_image(Image.new("RGB", (8000, 8000)))


def test_placeholders_are_whole_words():
    find_placeholders("a photo of S1 and S2", ["S1", "S2"])
    find_placeholders("S*'s hat, on S*.", ["S*"])
    with pytest.raises(ConceptInputError, match="'S1', 'S2' as a word of its own"):
        find_placeholders("a photo of S12", ["S1", "S2"])


def test_a_hand_edited_concept_file_names_the_problem(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "edited.safetensors"
    save_file(
        {"w0": torch.zeros(32), "local_tokens": torch.zeros(4, 16)}, str(path), metadata={"format": "zsp-concept/1"}
    )
    with pytest.raises(ConceptFileError, match="edited.safetensors: local_tokens must be"):
        Concept.load(path)
    cut = tmp_path / "cut.safetensors"
    Concept(w0=torch.ones(32)).save(cut)
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(ConceptFileError, match="cut.safetensors: not a readable safetensors file"):
        Concept.load(cut)


def test_a_truncated_encoders_file_is_a_clear_error(tmp_path, tiny_encoders_path, tiny_sd_path, capsys):
    import shutil

    broken = tmp_path / "encoders"
    shutil.copytree(tiny_encoders_path, broken)
    weights = next((broken / "global_mapping").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "p.png")
    code = inference_main(
        _generate(
            tmp_path, tiny_sd_path, "--encoders", str(broken), "--image", str(tmp_path / "p.png"), "--prompt", "a S*"
        )
    )
    assert code == 2 and "cannot load global_mapping/" in capsys.readouterr().err


def test_encoders_without_local_mapping_say_the_scale_does_nothing(tmp_path, tiny_encoders_path, tiny_sd_path):
    import shutil

    from inference import ElitePipeline

    only_global = tmp_path / "global_only"
    shutil.copytree(tiny_encoders_path / "global_mapping", only_global / "global_mapping")
    with pytest.warns(ConceptInputWarning, match="no local_mapping/.*has no effect"):
        ElitePipeline.from_pretrained(tiny_sd_path, encoders=only_global, device="cpu")


def test_a_concept_made_for_another_base_model_of_the_same_shape_is_named(tmp_path, tiny_encoders_path, tiny_sd_path):
    from inference import ElitePipeline

    elite = ElitePipeline.from_pretrained(tiny_sd_path, encoders=tiny_encoders_path, device="cpu")
    elite.pipe.set_progress_bar_config(disable=True)
    concept = Concept(
        w0=torch.zeros(32), metadata={"base_model": "someone/another-model", "encoders": str(tiny_encoders_path)}
    )
    with pytest.warns(ConceptInputWarning, match="made for the base model someone/another-model"):
        elite("a photo of S*", concept, num_inference_steps=1, height=16, width=16, output_type="latent")


# ---- data_prep: the output folder, paths, sizes, labels, models, workers ---------------------------------


def _one_image_coco(tmp_path, file_name="img.png", width=96, height=64) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    _photo().save(images / "img.png")
    ann = {
        "images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "category_id": 1,
                "bbox": [40, 10, 40, 40],
                "iscrowd": 0,
                "segmentation": [[40, 10, 80, 10, 80, 50, 40, 50]],
                "area": 1600,
            }
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return path, images


SMALL = CropSettings(resolution=32, min_area_fraction=0.01, max_area_fraction=0.95, min_side=10)


@pytest.mark.parametrize("file_name", ["../outside.png", "/etc/hostname"])
def test_annotation_paths_may_not_leave_the_images_folder(tmp_path, file_name):
    (tmp_path / "outside.png").write_bytes(b"")
    annotations, images = _one_image_coco(tmp_path, file_name=file_name)
    manifest = build_coco_shards(annotations, images, tmp_path / "out", SMALL, shard_size=4, workers=1, progress=False)
    assert manifest["samples"] == 0 and manifest["skipped"] == {"path_outside_images": 1}


def test_wrong_image_sizes_in_a_coco_json_are_skipped_unless_asked_to_rescale(tmp_path):
    annotations, images = _one_image_coco(tmp_path, width=192, height=128)  # twice the real size
    strict = build_coco_shards(annotations, images, tmp_path / "strict", SMALL, shard_size=4, workers=1, progress=False)
    assert strict["samples"] == 0 and strict["skipped"] == {"image_size_mismatch": 1}
    rescale = CropSettings(**{**SMALL.to_dict(), "rescale_annotations": True})
    scaled = build_coco_shards(
        annotations, images, tmp_path / "scaled", rescale, shard_size=4, workers=1, progress=False
    )
    assert scaled["samples"] == 1 and scaled["notes"] == {"annotation_rescaled": 1}


def test_overwrite_never_works_through_a_symlinked_stats_folder(tmp_path):
    annotations, images = _one_image_coco(tmp_path)
    out, victim = tmp_path / "out", tmp_path / "precious"
    victim.mkdir()
    (victim / "coco-000000.json").write_text("keep me")
    out.mkdir()
    (out / "_shard_stats").symlink_to(victim)
    with pytest.raises(WriterError, match="_shard_stats is a symbolic link"):
        build_coco_shards(annotations, images, out, SMALL, shard_size=4, workers=1, progress=False, overwrite=True)
    assert (victim / "coco-000000.json").read_text() == "keep me"


def test_a_second_job_on_the_same_out_stops_at_once(tmp_path):
    job = ShardJob(out_dir=tmp_path / "out", name="items", progress=False)
    job.out_dir.mkdir()
    with output_lock(job):
        start = time.perf_counter()
        with pytest.raises(WriterError, match=r"another data_prep job .* already running \(pid \d+"):
            write_shards([{"key": "a"}], _item, job, settings={})
        assert time.perf_counter() - start < 2
    manifest = write_shards([{"key": "a"}], _item, job, settings={})  # free again once the first one is done
    assert manifest["samples"] == 1


def _item(item: dict) -> dict:
    return {"__key__": item["key"], "txt": b"x"}


def test_a_classes_csv_that_names_no_label_is_an_error(tmp_path, data_dir):
    oi = data_dir / "openimages/from_coco_sample"
    classes = tmp_path / "classes.csv"
    classes.write_text("/m/none,Nothing\n/m/other,Other\n")
    with pytest.raises(SourceError, match="names none of the .* labels"):
        build_openimages_shards(
            oi / "annotations/validation-annotations-bbox.csv",
            oi / "annotations/validation-annotations-object-segmentation.csv",
            oi / "masks",
            oi / "images",
            classes,
            tmp_path / "out",
            SMALL,
            shard_size=4,
            workers=1,
            progress=False,
        )


def test_latents_with_a_missing_model_stop_before_any_shard(tmp_path, crop_shards, capsys):
    code = data_prep_main(
        [
            "latents",
            str(crop_shards / "coco"),
            "--base",
            str(tmp_path / "nonexistent"),
            "--resolution",
            "64",
            "--out",
            str(tmp_path / "latents"),
            "--no-progress",
        ]
    )
    assert code == 2 and "no VAE to load" in capsys.readouterr().err
    assert not list((tmp_path / "latents").glob("*.tar"))


_ORPHAN_SCRIPT = """
import sys, time
from data_prep.writer import ShardJob, write_shards

def slow(item):
    time.sleep(0.5)
    return {"__key__": item["key"], "txt": b"x"}

if __name__ == "__main__":
    items = [{"key": f"k{i}"} for i in range(400)]
    write_shards(items, slow, ShardJob(out_dir=sys.argv[1], name="slow", shard_size=4, workers=2, progress=False),
                 settings={})
"""


@pytest.mark.slow
def test_workers_leave_when_the_main_data_prep_process_is_killed(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(psutil.Process(proc.pid).children()) < 2:
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers still running after their parent died: {alive}"


# ---- training: settings on resume, precision, shard specs ----------------------------------------------


def test_resuming_with_a_changed_learning_rate_is_refused_unless_named(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_trainer import ToyConfig, ToyTask

    from encoders.common.config import ConfigError
    from training.loop import run_training

    base = dict(output_dir=str(tmp_path / "run"), train_batch_size=4, checkpointing_steps=2, report_to="none")
    run_training(ToyTask(ToyConfig(max_steps=2, learning_rate=0.05, **base)))
    with pytest.raises(
        ConfigError, match="learning_rate: 0.05 in the checkpoint, 0.01 now.*resume_overrides=learning_rate"
    ):
        run_training(ToyTask(ToyConfig(max_steps=4, learning_rate=0.01, resume_from_checkpoint="latest", **base)))
    task = ToyTask(
        ToyConfig(
            max_steps=4, learning_rate=0.01, resume_from_checkpoint="latest", resume_overrides=["learning_rate"], **base
        )
    )
    run_training(task)
    state = torch.load(tmp_path / "run" / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert state["param_groups"][0]["lr"] == pytest.approx(0.01)


def test_fp16_on_the_cpu_is_refused(tmp_path, fresh_accelerate_state):
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_trainer import ToyConfig, ToyTask

    from encoders.common.config import ConfigError
    from training.loop import run_training

    if torch.cuda.is_available():
        pytest.skip("fp16 is fine on a GPU")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        run_training(ToyTask(ToyConfig(output_dir=str(tmp_path), mixed_precision="fp16", report_to="none")))


def test_a_typo_in_train_shards_stops_before_any_model_loads(
    tmp_path, monkeypatch, tiny_sd_path, tiny_image_encoder_path
):
    from encoders.common.config import load_config
    from encoders.common.shards import ShardSpecError
    from training import diffusion
    from training.global_mapping import GlobalMappingConfig, GlobalMappingTask
    from training.loop import run_training

    monkeypatch.setattr(
        diffusion.FrozenStableDiffusion, "load", classmethod(lambda *a, **k: pytest.fail("a model loaded"))
    )
    config = load_config(
        GlobalMappingConfig,
        None,
        [
            f"pretrained_model_name_or_path={tiny_sd_path}",
            f"image_encoder_name_or_path={tiny_image_encoder_path}",
            f"train_shards={tmp_path}/shards/crops-{{000000..000009}}.tar",
            f"output_dir={tmp_path / 'run'}",
            "report_to=none",
        ],
    )
    start = time.perf_counter()
    with pytest.raises(ShardSpecError, match="crops-000000.tar does not exist"):
        run_training(GlobalMappingTask(config))
    assert time.perf_counter() - start < 30
