"""Guided composition: personalized tokens (ELITE, Textual Inversion) with ordinary words, boxes given or
predicted by the location MLP, through the command line users run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from inference.cli import main as inference_main
from inference.composition import default_words, parse_token_box, plan_guidance
from inference.inputs import ConceptInputError


@pytest.fixture(scope="module")
def location_mlp_folder(encoders_with_location_mlp):
    return encoders_with_location_mlp


def _ti_folder(root):
    root.mkdir(parents=True, exist_ok=True)
    save_file(
        {"S*": torch.randn(1, 32, generator=torch.Generator().manual_seed(1))}, root / "learned_embeds.safetensors"
    )
    info = {
        "method": "textual_inversion",
        "placeholder_token": "S*",
        "class_word": "cat",
        "files": {"embeddings": "learned_embeds.safetensors"},
    }
    (root / "concept.json").write_text(json.dumps(info))
    return root


def _generate(tmp_path, tiny_sd_path, *extra):
    out = tmp_path / "out"
    code = inference_main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--steps",
            "2",
            "--height",
            "16",
            "--quiet",
            "--no-safety-checker",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return json.loads((out / "settings.json").read_text())


def test_token_boxes_and_default_words():
    assert parse_token_box("dog=0,0.5,0.5,1") == ("dog", (0.0, 0.5, 0.5, 1.0))
    assert parse_token_box("0.1,0.1,0.9,0.9") == (None, (0.1, 0.1, 0.9, 0.9))
    with pytest.raises(ValueError, match="x0 < x1"):
        parse_token_box("S*=0.5,0,0.2,1")
    with pytest.raises(ValueError, match="nothing before"):
        parse_token_box("=0,0,1,1")
    assert default_words("a S* playing with a teddy bear and a dog", ["dog", "teddy bear", "cat"]) == [
        "teddy bear",
        "dog",
    ]
    assert default_words("a dogma", ["dog"]) == []  # whole words only


def test_plan_needs_boxes_or_two_tokens_for_the_location_mlp():
    with pytest.raises(ConceptInputError, match="no box for 'S\\*'"):
        plan_guidance("S* with a dog", {"S*": None}, ["dog"], {"dog": (0, 0, 0.5, 1)})
    with pytest.raises(ConceptInputError, match="not a token placed"):
        plan_guidance("S* with a dog", {"S*": None}, [], {"cat": (0, 0, 0.5, 1)})
    with pytest.raises(ConceptInputError, match="does not contain the word 'cat'"):
        plan_guidance("S* with a dog", {"S*": None}, ["cat"], {})
    placed = plan_guidance(
        "S* with a dog", {"S*": None, "S2": None}, ["dog"], {"S*": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)}
    )
    assert [(t.name, t.source) for t in placed] == [("S*", "given"), ("dog", "given")]  # S2 is not in the prompt


def test_a_textual_inversion_token_and_a_word_placed_by_the_location_mlp(tmp_path, tiny_sd_path, location_mlp_folder):
    """`generate --finetune DIR --prompt "a photo of S* playing with a dog" --spatial-guidance`: the TI token
    and the prompt's known noun each get a box from the location MLP; the losses are recorded."""
    ti = _ti_folder(tmp_path / "ti")
    settings = _generate(
        tmp_path,
        tiny_sd_path,
        "--finetune",
        str(ti),
        "--prompt",
        "a photo of S* playing with a dog",
        "--spatial-guidance",
        "--location-mlp",
        str(location_mlp_folder),
    )
    record = settings["prompts"][0]
    assert [p["token"] for p in record["placed"]] == ["S*", "dog"]
    assert all(p["from"] == "location_mlp" for p in record["placed"]) and record["placed"][1]["as_noun"] == "dog"
    steps = record["location_loss_guided_steps"]
    assert steps and all(set(s) == {"before", "after"} for s in steps) and steps[0]["after"] < steps[0]["before"]
    assert len(record["location_loss_per_step"]) == len(steps)  # every step of this short run is guided
    # beside the image: the image with both boxes, then S*'s and the dog's attention maps
    sheet = Image.open(tmp_path / "out" / record["attention_maps"][0])
    assert record["attention_maps"] == [record["images"][0].replace(".png", "-attention.png")]
    assert sheet.width == 150 + 3 * 192 and record["attention_maps"][0] in settings["files"]


def test_two_elite_concepts_and_a_word_with_given_boxes(tmp_path, tiny_sd_path, tiny_encoders_path, data_dir):
    photos = data_dir / "concepts" / "dreambooth"
    settings = _generate(
        tmp_path,
        tiny_sd_path,
        "--encoders",
        str(tiny_encoders_path),
        "--image",
        str(photos / "dog" / "00.jpg"),
        "--image",
        str(photos / "cat" / "00.jpg"),
        "--prompt",
        "S1 and S2 next to a person",
        "--box",
        "S1=0,0,0.4,1",
        "--box",
        "S2=0.4,0,0.8,1",
        "--box",
        "person=0.8,0,1,1",
    )
    placed = settings["prompts"][0]["placed"]
    assert [(p["token"], p["from"]) for p in placed] == [("S1", "given"), ("S2", "given"), ("person", "given")]
    assert placed[2]["box"] == [0.8, 0.0, 1.0, 1.0] and settings["prompts"][0]["location_loss_guided_steps"]
    assert Image.open(tmp_path / "out" / settings["prompts"][0]["attention_maps"][0]).width == 150 + 4 * 192  # 3 maps


def test_guidance_with_infusion_is_refused_clearly(tmp_path, tiny_sd_path):
    from encoders.infusion import InfusionResiduals

    run = tmp_path / "inf"
    run.mkdir()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    InfusionResiduals.for_unet(unet, class_word="cat").save_pretrained(run / "infusion")
    (run / "concept.json").write_text(
        json.dumps({"method": "infusion", "class_word": "cat", "files": {"residuals": "infusion"}})
    )
    code = inference_main(
        [
            "generate",
            "--base",
            str(tiny_sd_path),
            "--steps",
            "1",
            "--height",
            "16",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
            "--finetune",
            str(run),
            "--prompt",
            "a cat",
            "--box",
            "cat=0,0,1,1",
        ]
    )
    assert code == 2
