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
BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
)
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
    return dict(
        boxes=[tmp_path / "boxes.csv"],
        segmentations=[tmp_path / "seg.csv"],
        masks_dir=masks,
        images_dir=images,
        classes=tmp_path / "classes.csv",
        settings=SETTINGS,
    )


@pytest.mark.parametrize(
    "image_id, reason",
    [
        ("../../secret/outside", "path_outside_images"),
        ("/{secret}/outside", "path_outside_images"),
    ],
)
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
        with pytest.raises(
            FolderLockedError, match=rf"another training run in {out} is already running \(pid {os.getpid()}"
        ):
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

    save_file(
        {"w0": w0, "local_tokens": local, "local_keep": torch.ones(4, dtype=torch.uint8)},
        str(path),
        metadata={"format": "zsp-concept/1"},
    )
    with pytest.raises(ConceptFileError, match=rf"{path}: {where} holds \d+ NaN/Inf"):
        Concept.load(path)


def test_case4_concept_w0_of_integers_is_refused(tmp_path):
    """Case 4: the tensors' kind is checked too."""
    with pytest.raises(ValueError, match="floating-point"):
        Concept(torch.arange(8))
    assert np.isfinite(Concept(torch.randn(8)).w0.numpy()).all()


def _cutout(path: Path, size=(48, 48)) -> None:
    """An RGBA cut-out: a red square on a transparent background."""
    rgba = np.zeros((*size[::-1], 4), dtype=np.uint8)
    rgba[12:36, 12:36] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(path)


def test_case5_fine_tunes_read_rgba_cutouts_with_their_alpha_as_the_mask(tmp_path):
    """Case 5: an RGBA cut-out trains with its alpha as the mask (as encode reads it), not on black without one."""
    from training.concept_data import load_concept_photos  # noqa: PLC0415

    _cutout(tmp_path / "a.png")
    photos = load_concept_photos(tmp_path, 16)
    assert bool(photos.has_mask[0]) and photos.masks is not None
    mask = photos.masks[0, 0]
    assert mask[8, 8] == 1 and mask[0, 0] == 0
    assert photos.pixels[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # transparent shown on white, as encode shows it


def test_case5_zero_one_masks_that_encode_accepts_train_too(tmp_path):
    """Case 5: a mask whose object pixels are 1 (not 255) is accepted by the fine-tunes, as by encode."""
    from inference.inputs import load_concept_image  # noqa: PLC0415
    from training.concept_data import load_concept_photos  # noqa: PLC0415

    Image.new("RGB", (40, 40), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "masks").mkdir()
    ones = np.zeros((40, 40), dtype=np.uint8)
    ones[10:30, 10:30] = 1
    Image.fromarray(ones, "L").save(tmp_path / "masks/a.png")
    photos = load_concept_photos(tmp_path, 20)
    assert bool(photos.has_mask[0]) and 0 < float(photos.masks.mean()) < 1
    assert load_concept_image(tmp_path / "a.jpg", tmp_path / "masks/a.png", mask_threshold=0).mask_fraction > 0


def test_case5_a_mask_of_another_size_is_resized_with_a_note(tmp_path):
    """Case 5: a mask of another aspect than its photo: resized, and said so."""
    from inference.inputs import ConceptInputWarning  # noqa: PLC0415
    from training.concept_data import load_concept_photos  # noqa: PLC0415

    Image.new("RGB", (40, 40), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "masks").mkdir()
    Image.new("L", (30, 60), 255).save(tmp_path / "masks/a.png")
    with pytest.warns(ConceptInputWarning, match="resizing the mask"):
        load_concept_photos(tmp_path, 20)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 512 KiB tmpfs filled to the last byte (needs root and mount; skipped otherwise)."""
    import subprocess  # noqa: PLC0415

    mount = tmp_path / "full"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        try:
            with open(mount / ".filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_case7_encode_on_a_full_disk_is_one_line_and_leaves_no_file(
    full_disk, tiny_encoders_path, tiny_sd_path, data_dir, capsys
):
    """Case 7: a full disk in `encode` is one error line (exit 2), not a traceback, and no half file."""
    from inference.cli import main as inference_main  # noqa: PLC0415

    out = full_disk / "teapot.safetensors"
    code = inference_main(
        [
            "encode",
            "--encoders",
            str(tiny_encoders_path),
            "--base",
            str(tiny_sd_path),
            "--image",
            str(data_dir / "concepts/dreambooth/teapot/04.jpg"),
            "--mask",
            str(data_dir / "concepts/masks/teapot_04.png"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in full_disk.iterdir() if p.name != ".filler"]


def test_case7_data_prep_on_a_full_disk_is_one_line(full_disk, data_dir, capsys):
    """Case 7: data_prep on a full disk: one line naming the problem, exit 2."""
    from data_prep.cli import main as data_prep_main  # noqa: PLC0415

    code = data_prep_main(
        [
            "coco",
            "--annotations",
            str(data_dir / "coco_sample/annotations.json"),
            "--images",
            str(data_dir / "coco_sample/images"),
            "--out",
            str(full_disk / "shards"),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err


def test_case7_a_trainer_on_a_full_disk_is_one_line(full_disk, capsys, fresh_accelerate_state):
    """Case 7: the shared loop (global_mapping, Textual Inversion...) on a full disk: one line, exit 2."""
    from tests.toy_trainer import ToyConfig, ToyTask  # noqa: PLC0415
    from training.loop import run_from_command_line  # noqa: PLC0415

    config = ToyConfig(output_dir=str(full_disk / "run"), max_steps=2, report_to="none", mixed_precision="no")
    with pytest.raises(SystemExit) as stop:
        run_from_command_line(ToyTask(config))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "No space left on device" in err, err


def test_case7_a_read_only_output_dir_is_one_line(tmp_path, capsys, fresh_accelerate_state):
    """Case 7: a trainer's output_dir that cannot be written: one line naming it, before any work."""
    from tests.toy_trainer import ToyConfig, ToyTask  # noqa: PLC0415
    from training.loop import run_from_command_line  # noqa: PLC0415

    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = ToyConfig(output_dir=str(blocker / "run"), max_steps=2, report_to="none", mixed_precision="no")
    with pytest.raises(SystemExit) as stop:
        run_from_command_line(ToyTask(config))
    assert stop.value.code == 2 and "output_dir" in capsys.readouterr().err


def test_case6_evaluate_refuses_zero_steps_instead_of_running_the_default():
    """Case 6: num_inference_steps=0 is an error, not a silent 50 (or the paper's 100)."""
    from encoders.common.config import ConfigError  # noqa: PLC0415
    from inference.evaluate import EvalConfig  # noqa: PLC0415

    with pytest.raises(ConfigError, match="num_inference_steps must be at least 1"):
        EvalConfig(num_inference_steps=0)


def test_case6_a_prompt_longer_than_77_tokens_is_said_and_recorded(tiny_sd_path, tmp_path, capsys):
    """Case 6: a truncated prompt is warned about, and settings.json records what the encoder read."""
    import json  # noqa: PLC0415

    from inference.cli import main as inference_main  # noqa: PLC0415

    prompt = "a photo of a dog " + "with a red hat " * 30
    code = inference_main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--prompt",
            prompt,
            "--steps",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert "the text encoder reads 77" in capsys.readouterr().err
    record = json.loads((tmp_path / "out/settings.json").read_text())["prompts"][0]
    assert record["truncated"]["tokens"] > 77 and record["truncated"]["kept"].startswith("a photo of a dog")


def test_case6_max_steps_below_the_checkpoint_is_refused(tmp_path, fresh_accelerate_state):
    """Case 6: max_steps under the latest checkpoint's step does not re-export the old model silently."""
    from encoders.common.config import ConfigError  # noqa: PLC0415
    from tests.toy_trainer import ToyConfig, ToyTask  # noqa: PLC0415
    from training.loop import run_training  # noqa: PLC0415

    keys = dict(output_dir=str(tmp_path / "run"), report_to="none", mixed_precision="no", checkpointing_steps=4)
    run_training(ToyTask(ToyConfig(max_steps=4, **keys)))
    with pytest.raises(ConfigError, match="is at step 4, past max_steps=2"):
        run_training(ToyTask(ToyConfig(max_steps=2, resume_from_checkpoint="latest", **keys)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--placeholder", ""], "must be one word"),
        (["--placeholder", "my dog"], "must be one word"),
        (["--seed", str(2**70)], "--seed"),
    ],
)
def test_case7_bad_generate_options_are_one_line(tiny_sd_path, tiny_encoders_path, tmp_path, capsys, argv, message):
    """Case 7: --placeholder '' / with spaces and a --seed beyond 64 bits: one error line, exit 2."""
    from inference.cli import main as inference_main  # noqa: PLC0415

    concept = Concept(torch.randn(32)).save(tmp_path / "c.safetensors")
    try:
        code = inference_main(
            [
                "generate",
                "--base",
                str(tiny_sd_path),
                "--encoders",
                str(tiny_encoders_path),
                "--concept",
                str(concept),
                "--prompt",
                "a photo of S*",
                "--steps",
                "1",
                "--quiet",
                "--out",
                str(tmp_path / "out"),
                *argv,
            ]
        )
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_case7_a_placeholder_that_is_a_known_word_is_refused(tiny_sd_path):
    """Case 7: --placeholder dog would replace every 'dog': refused naming it."""
    from transformers import CLIPTokenizer  # noqa: PLC0415

    from inference.inputs import ConceptInputError, check_placeholders  # noqa: PLC0415

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    with pytest.raises(ConceptInputError, match="'dog' is a word the text encoder already knows"):
        check_placeholders(["dog"], tokenizer)
    check_placeholders(["S*", "<my-dog>"], tokenizer)


def test_case7_guide_with_a_word_missing_from_the_prompt_is_one_line(tiny_sd_path, tmp_path, capsys):
    """Case 7: `guide --words cat dog` on a prompt without 'dog': one line naming the word."""
    from inference.cli import main as inference_main  # noqa: PLC0415

    code = inference_main(
        [
            "guide",
            "--base",
            str(tiny_sd_path),
            "--prompt",
            "a photo of a cat",
            "--words",
            "cat",
            "dog",
            "--boxes",
            "0,0,0.5,0.5",
            "0.5,0.5,1,1",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "'dog' is not in the prompt" in err


@pytest.mark.parametrize("key", ["learning_rate=nan", "max_grad_norm=inf", "seed=-1", f"seed={2**64}"])
def test_case7_non_finite_numbers_and_seeds_out_of_range_are_config_errors(key):
    """Case 7: learning_rate=nan and seeds beyond 64 bits stop at parsing, not in the optimizer."""
    from encoders.common.config import ConfigError, parse_config_cli  # noqa: PLC0415
    from tests.toy_trainer import ToyConfig  # noqa: PLC0415

    with pytest.raises((ConfigError, SystemExit)):
        parse_config_cli(ToyConfig, [key])


def test_case7_a_missing_concept_dir_is_one_line(tiny_sd_path, tmp_path, capsys, fresh_accelerate_state):
    """Case 7: Textual Inversion with a concept_dir that does not exist: one line, exit 2."""
    from training.textual_inversion import main as ti_main  # noqa: PLC0415

    with pytest.raises(SystemExit) as stop:
        ti_main(
            [
                f"pretrained_model_name_or_path={tiny_sd_path}",
                f"concept_dir={tmp_path / 'nope'}",
                "initializer_token=pot",
                f"output_dir={tmp_path / 'run'}",
                "report_to=none",
                "max_steps=1",
            ]
        )
    assert stop.value.code == 2 and "concept_dir" in capsys.readouterr().err


def test_case7_an_encoders_config_of_the_wrong_type_is_a_load_error(tiny_encoders_path, tmp_path):
    """Case 7: global_mapping/config.json with a value of the wrong kind: ModelLoadError naming the folder."""
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from inference.loading import ModelLoadError, load_encoders  # noqa: PLC0415

    broken = tmp_path / "enc"
    shutil.copytree(tiny_encoders_path, broken)
    config = json.loads((broken / "global_mapping/config.json").read_text())
    config["hidden_dim"] = "wide"
    (broken / "global_mapping/config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="global_mapping"):
        load_encoders(broken, device="cpu", dtype=torch.float32)


def test_case7_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    """Case 7 / 9: a photo over the pixel limit is refused from its header, naming its size."""
    from encoders.common.images import MAX_IMAGE_PIXELS  # noqa: PLC0415
    from inference.inputs import ConceptInputError, load_concept_image  # noqa: PLC0415

    side = int(MAX_IMAGE_PIXELS**0.5) + 16
    Image.new("1", (side, side), 0).save(tmp_path / "bomb.png")  # a few kB on disk
    with pytest.raises(ConceptInputError, match="million pixels; the limit is"):
        load_concept_image(tmp_path / "bomb.png")


def test_case10_a_truncated_shard_stops_training_naming_it(crop_shards, tmp_path):
    """Case 10: most samples of a shard unreadable: an error naming the shard past max_bad_fraction, not
    warnings and a quiet exit 0."""
    import shutil  # noqa: PLC0415

    from encoders.common.shards import ShardSpecError  # noqa: PLC0415
    from training.crop_data import CropDataConfig, build_crop_dataloader  # noqa: PLC0415

    folder = tmp_path / "coco"
    shutil.copytree(crop_shards / "coco", folder)
    first = sorted(folder.glob("*.tar"))[0]
    loader = build_crop_dataloader(str(first), CropDataConfig(resolution=64), batch_size=1, vae_scale_factor=2)
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 5])  # cut while training runs: only the first sample survives
    with pytest.raises(ShardSpecError, match=rf"could not be decoded .*{first.name}"):
        for _ in zip(range(300), loader):
            pass


def test_case12_fine_tunes_take_the_base_models_size_when_no_resolution_is_given(
    tiny_sd_path, data_dir, tmp_path, capsys, fresh_accelerate_state
):
    """Case 12: no data.resolution: the base's own size (64 px for the tiny base), said on the console."""
    from training.textual_inversion import main as ti_main  # noqa: PLC0415

    ti_main(
        [
            f"pretrained_model_name_or_path={tiny_sd_path}",
            f"concept_dir={data_dir / 'concepts/dreambooth/teapot'}",
            "initializer_token=pot",
            f"output_dir={tmp_path / 'run'}",
            "report_to=none",
            "max_steps=1",
            "mixed_precision=no",
            "validation_steps=0",
        ]
    )
    assert "data.resolution not given: 64 px" in capsys.readouterr().out


@pytest.mark.parametrize(
    "prompt, ok",
    [
        (
            "a photo of S* playing with a bus",
            True,
        ),  # not in the MLP's vocabulary, a COCO noun: its nearest noun's layout
        ("a photo of S* playing with a zorblat", False),  # no noun to place: the error says how to name one
    ],
)
def test_case11_spatial_guidance_finds_the_prompts_noun_or_says_how_to_name_one(
    encoders_with_location_mlp, tiny_sd_path, tmp_path, capsys, prompt, ok
):
    """Case 11: --spatial-guidance without --guide-word: a COCO noun of the prompt is placed by its nearest
    known noun; with none, one line saying which words were looked for and how to name one."""
    import json  # noqa: PLC0415

    from inference.cli import main as inference_main  # noqa: PLC0415

    concept = Concept(torch.randn(32)).save(tmp_path / "c.safetensors")
    code = inference_main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--encoders",
            str(encoders_with_location_mlp),
            "--concept",
            str(concept),
            "--prompt",
            prompt,
            "--spatial-guidance",
            "--steps",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    if ok:
        assert code == 0, err
        placed = json.loads((tmp_path / "out/settings.json").read_text())["prompts"][0]["placed"]
        assert [p["name"] if "name" in p else p["token"] for p in placed][-1] == "bus"
    else:
        assert code == 2 and "--guide-word" in err and "dog, cat, person" in err


def test_case7_an_embedding_of_another_width_names_both_widths(tmp_path, tiny_sd_path):
    """Case 7: an SD 2 (1024-wide) embedding on a 32-wide base: both widths in the message, not diffusers'
    unformatted text."""
    import json  # noqa: PLC0415

    from diffusers import StableDiffusionPipeline  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    from inference.finetuned import FinetuneFolderError, load_embedding, read_finetune  # noqa: PLC0415

    folder = tmp_path / "sd2_ti"
    folder.mkdir()
    save_file({"S*": torch.randn(1, 1024)}, folder / "learned_embeds.safetensors")
    (folder / "concept.json").write_text(
        json.dumps(
            {
                "method": "textual_inversion",
                "placeholder_token": "S*",
                "class_word": "dog",
                "base_model": "stabilityai/stable-diffusion-2-1-base",
                "files": {"embeddings": "learned_embeds.safetensors"},
            }
        )
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    with pytest.raises(FinetuneFolderError, match=r"1024 wide, but this base's text encoder takes 32-wide") as err:
        load_embedding(pipe, read_finetune(folder))
    assert "{" not in str(err.value)


def test_case7_a_shard_spec_error_is_one_line(
    tiny_sd_path, tiny_image_encoder_path, tmp_path, capsys, fresh_accelerate_state
):
    """Case 7: train_shards that match nothing: one error line and exit 2 from the trainer, no traceback."""
    from training.global_mapping import main as global_main  # noqa: PLC0415

    with pytest.raises(SystemExit) as stop:
        global_main(
            [
                f"pretrained_model_name_or_path={tiny_sd_path}",
                f"image_encoder_name_or_path={tiny_image_encoder_path}",
                f"train_shards={tmp_path / 'none-*.tar'}",
                f"output_dir={tmp_path / 'run'}",
                "report_to=none",
                "max_steps=1",
                "mixed_precision=no",
            ]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "no shards found" in err and "Traceback" not in err


def test_case9_the_web_demo_refuses_oversized_uploads_while_decoding(tmp_path, monkeypatch):
    """Case 9: with the web demo's limits on, PIL refuses an image over the shared pixel limit as Gradio opens
    it (before the pixels are decoded), and Gradio gets a file-size limit."""
    import warnings  # noqa: PLC0415

    from encoders.common.images import MAX_IMAGE_PIXELS  # noqa: PLC0415
    from inference import app  # noqa: PLC0415

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    side = int(MAX_IMAGE_PIXELS**0.5) + 16
    Image.new("1", (side, side), 0).save(tmp_path / "big.png")
    Image.new("RGB", (640, 480), "red").save(tmp_path / "photo.png")
    with warnings.catch_warnings():
        app.limit_uploads()
        with pytest.raises((Image.DecompressionBombWarning, Image.DecompressionBombError)):
            Image.open(tmp_path / "big.png")
        assert Image.open(tmp_path / "photo.png").size == (640, 480)
    assert app.MAX_UPLOAD == "20mb"
