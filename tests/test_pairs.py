"""Location-pair shards: COCO pairs against the sample annotations, generated pairs with the tiny SD + DETR."""

from __future__ import annotations

import json
import shutil
from itertools import combinations

import pytest
import torch
import webdataset as wds

from data_prep.cli import main as data_prep_main
from data_prep.pairs import check_pair_sample, read_coco_pairs, write_coco_pairs
from data_prep.pairs_generate import (
    GenerationSettings,
    best_detections,
    match_labels,
    plan_items,
    with_article,
    write_generated_pairs,
)
from data_prep.sources import SourceError
from data_prep.writer import ShardJob


def _read_samples(folder):
    samples = {}
    for tar in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            samples[s["__key__"]] = s
    return samples


def _expected_coco_pairs(path):
    """Independent reading of the annotation file: largest non-crowd instance per category and image."""
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    largest = {}
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            continue
        slot = (ann["image_id"], ann["category_id"])
        if slot not in largest or ann["area"] > largest[slot]["area"]:
            largest[slot] = ann
    expected = {}
    for image_id in sizes:
        cats = sorted(c for (i, c) in largest if i == image_id)
        for a, b in combinations(cats, 2):
            w, h = sizes[image_id]
            boxes = []
            for c in (a, b):
                x, y, bw, bh = largest[(image_id, c)]["bbox"]
                boxes.append([max(x, 0) / w, max(y, 0) / h, min(x + bw, w) / w, min(y + bh, h) / h])
            expected[f"coco_{image_id}_{a}_{b}"] = {
                "words": [names[a], names[b]],
                "boxes": boxes,
                "annotation_ids": [largest[(image_id, a)]["id"], largest[(image_id, b)]["id"]],
            }
    return expected


def test_coco_pairs_match_the_annotations(tmp_path, data_dir):
    annotations = data_dir / "coco_sample" / "annotations.json"
    expected = _expected_coco_pairs(annotations)
    assert len(expected) == 7  # 4 categories in one image (6 pairs) + 2 in another (1 pair)
    manifest = write_coco_pairs(annotations, ShardJob(tmp_path / "pairs", "pairs-coco", progress=False))
    assert manifest["samples"] == 7 and manifest["skipped"] == {"crowd": 1}
    assert manifest["source"]["counts"]["images_with_one_category"] == 3
    samples = _read_samples(tmp_path / "pairs")
    assert set(samples) == set(expected)
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        check_pair_sample(meta, key)
        assert meta["source"] == "coco" and "jpg" not in sample  # COCO pairs carry no image
        assert meta["words"] == expected[key]["words"]
        assert meta["annotation_ids"] == expected[key]["annotation_ids"]
        for got, want in zip(meta["boxes"], expected[key]["boxes"]):
            assert got == pytest.approx(want, abs=1e-9)
    # spot check by hand: person 185837 (bbox 379.02,202.47,67.17,178.47) and bus 167614 (0,73.89,416.44,305.13)
    # in the 640x427 photo 128372
    person_bus = json.loads(samples["coco_128372_1_6"]["json"])
    assert person_bus["words"] == ["person", "bus"]
    assert person_bus["boxes"][0] == pytest.approx([379.02 / 640, 202.47 / 427, 446.19 / 640, 380.94 / 427])
    assert person_bus["boxes"][1] == pytest.approx([0.0, 73.89 / 427, 416.44 / 640, 379.02 / 427])


def test_coco_pairs_are_deterministic_and_resume(tmp_path, data_dir):
    annotations = data_dir / "coco_sample" / "annotations.json"
    write_coco_pairs(annotations, ShardJob(tmp_path / "a", "pairs-coco", shard_size=3, progress=False))
    write_coco_pairs(annotations, ShardJob(tmp_path / "b", "pairs-coco", shard_size=3, workers=2, progress=False))
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars == ["pairs-coco-000000.tar", "pairs-coco-000001.tar", "pairs-coco-000002.tar"]
    for name in tars:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # resume: a deleted shard is rewritten identically, the others are kept
    before = (tmp_path / "a" / tars[1]).read_bytes()
    (tmp_path / "a" / tars[1]).unlink()
    manifest = write_coco_pairs(annotations, ShardJob(tmp_path / "a", "pairs-coco", shard_size=3, progress=False))
    assert manifest["samples"] == 7 and (tmp_path / "a" / tars[1]).read_bytes() == before


def test_coco_pairs_bad_input(tmp_path, data_dir):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(SourceError, match="broken.json"):
        read_coco_pairs(bad)
    single = tmp_path / "single.json"
    data = json.loads((data_dir / "coco_sample" / "annotations.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 194216]  # bears only
    data["annotations"].append({"id": 1, "image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1]})  # unknown image
    data["annotations"].append({"id": 2, "image_id": 194216, "bbox": [0, 0, 1, 1]})  # no category
    single.write_text(json.dumps(data))
    records, report = read_coco_pairs(single)
    assert records == [] and report.skipped["unknown_image"] == 1 and report.skipped["malformed_annotation"] == 1
    with pytest.raises(SourceError, match="no image has two categories"):
        write_coco_pairs(single, ShardJob(tmp_path / "out", "pairs-coco", progress=False))


def test_pairs_coco_command_line(tmp_path, data_dir, capsys):
    out = tmp_path / "cli"
    code = data_prep_main(
        [
            "pairs",
            "coco",
            "--annotations",
            str(data_dir / "coco_sample" / "annotations.json"),
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 7 and manifest["settings"]["kind"] == "pairs-coco"
    assert data_prep_main(["pairs", "coco", "--annotations", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err


# ---- generated pairs -------------------------------------------------------------------------


def test_plan_items_and_prompts():
    items = plan_items(["cat", "apple", "traffic light"], images_per_pair=2, seed=3)
    assert [it.words for it in items[::2]] == [("cat", "apple"), ("cat", "traffic light"), ("apple", "traffic light")]
    assert items[0].prompt == "a photo of a cat and an apple"
    assert items[4].key == "gen_apple__traffic_light__0000"
    assert len({it.seed for it in items}) == 6
    assert plan_items(["cat", "apple"], 1, seed=3)[0].seed == items[0].seed  # a seed depends on its key only
    assert with_article("scissors") == "scissors"
    with pytest.raises(ValueError, match="{a}"):
        plan_items(["cat", "dog"], 1, template="a photo of {b}")


def test_best_detections_picks_the_most_confident_query():
    logits = torch.full((1, 3, 4), -10.0)  # 3 labels + no-object
    logits[0, 0, 3] = 5  # query 0: nothing
    logits[0, 1, 0] = 5  # query 1: label 0
    logits[0, 2, 2] = 1  # query 2: label 2 or nothing, half and half
    logits[0, 2, 3] = 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.4], [0.9, 0.9, 0.4, 0.4]]])
    scores, xyxy = best_detections(logits, boxes, [0, 2])
    assert scores[0, 0] > 0.99 and scores[0, 1] == pytest.approx(0.5, abs=1e-3)
    assert xyxy[0, 0].tolist() == pytest.approx([0.0, 0.3, 0.5, 0.7])
    assert xyxy[0, 1].tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0])  # clipped to the image


def test_match_labels_names_missing_nouns():
    id2label = {0: "person", 1: "Dog", 2: "N/A"}
    assert match_labels(["dog", "person"], id2label) == {"dog": 1, "person": 0}
    with pytest.raises(ValueError, match="no label for: unicorn"):
        match_labels(["dog", "unicorn"], id2label)


@pytest.fixture(scope="module")
def planted_detector(tiny_detector_path, tmp_path_factory):
    """The tiny DETR with its class head set to see a cat and a dog in every image, and nothing else."""
    from transformers import AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(tiny_detector_path)
    head = model.class_labels_classifier
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[model.config.label2id["cat"]] = 6.0
        head.bias[model.config.label2id["dog"]] = 6.0
    out = tmp_path_factory.mktemp("planted") / "detector"
    model.save_pretrained(out)
    shutil.copy(tiny_detector_path / "preprocessor_config.json", out)
    return out


def test_generated_pairs_keep_only_detected_nouns(tmp_path, tiny_sd_path, planted_detector):
    settings = GenerationSettings(
        pipeline=str(tiny_sd_path),
        detector=str(planted_detector),
        threshold=0.3,
        num_inference_steps=2,
        guidance_scale=1.0,
        batch_size=2,
    )
    job = ShardJob(tmp_path / "gen", "pairs-gen", shard_size=3, progress=False)
    manifest = write_generated_pairs(["cat", "dog", "car"], settings, job, images_per_pair=2, seed=0)
    # pairs: cat+dog (found), cat+car and dog+car (car is never found)
    assert manifest["items"] == 6 and manifest["samples"] == 2 and manifest["skipped"] == {"not_detected": 4}
    samples = _read_samples(tmp_path / "gen")
    assert set(samples) == {"gen_cat__dog__0000", "gen_cat__dog__0001"}
    import io

    from PIL import Image

    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        check_pair_sample(meta, key)
        assert meta["source"] == "generated" and meta["words"] == ["cat", "dog"]
        assert meta["prompt"] == "a photo of a cat and a dog" and min(meta["scores"]) >= 0.3
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
    # resume: a second run keeps every shard and writes nothing new
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gen").glob("*.tar")}
    again = write_generated_pairs(["cat", "dog", "car"], settings, job, images_per_pair=2, seed=0)
    assert again["samples"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gen").glob("*.tar")} == stamps


def test_pairs_generate_command_line_errors(tmp_path, tiny_sd_path, tiny_detector_path, capsys):
    vocab = tmp_path / "nouns.txt"
    vocab.write_text("cat\nunicorn\n")
    code = data_prep_main(
        [
            "pairs",
            "generate",
            "--pipeline",
            str(tiny_sd_path),
            "--detector",
            str(tiny_detector_path),
            "--vocab",
            str(vocab),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "no label for: unicorn" in capsys.readouterr().err
    code = data_prep_main(
        [
            "pairs",
            "generate",
            "--pipeline",
            str(tiny_sd_path),
            "--detector",
            str(tiny_detector_path),
            "--vocab",
            str(tmp_path / "none.txt"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "none.txt" in capsys.readouterr().err


def test_tiny_detector_loads_offline(tiny_detector_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(tiny_detector_path)
    processor = AutoImageProcessor.from_pretrained(tiny_detector_path)
    assert type(model).__name__ == "DetrForObjectDetection" and len(model.config.id2label) == 80
    assert model.config.id2label[16] == "dog"
    with torch.no_grad():
        out = model(**processor(images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt"))
    assert out.logits.shape == (1, model.config.num_queries, 81) and out.pred_boxes.shape[-1] == 4


def test_crop_and_pair_readers_agree_on_bad_and_duplicate_annotations(tmp_path):
    """One COCO reader (issue 27): NaN / inf boxes are malformed and repeats (same id, or the same image,
    category and box) are duplicates for crops and pairs alike."""
    from data_prep.records import CropSettings
    from data_prep.sources.coco import read_coco

    (tmp_path / "images").mkdir()
    box = [10, 10, 40, 40]
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "segmentation": [], "area": 900},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40], "segmentation": []},
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [5, 5, 30, 30], "segmentation": []},  # same id
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": box, "segmentation": []},  # same content
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 2, 3], "segmentation": []},
            {"id": 5, "image_id": 1, "category_id": 2, "bbox": [1, 1, float("inf"), 3], "segmentation": []},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))  # json writes NaN / Infinity, as some exporters do
    crops, crop_report = read_coco(path, tmp_path / "images", CropSettings(min_side=1, mask_from_box=True))
    pairs, pair_report = read_coco_pairs(path)
    for report in (crop_report, pair_report):
        assert report.skipped["malformed_annotation"] == 2
        assert report.skipped["duplicate_annotation"] == 2
    assert [c.annotation_id for c in crops] == [1, 2]
    assert len(pairs) == 1 and pairs[0].annotation_ids == (1, 2)
