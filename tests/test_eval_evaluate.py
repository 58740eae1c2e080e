"""`python -m inference.evaluate` on the tiny models: every method, one table, known equalities."""

from __future__ import annotations

import ast
import csv
import json
import math
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from inference import evaluate


def bundled_prompt_lists(data_dir):
    """The object / live prompt lists and the class table of the bundled DreamBooth file."""
    text = (data_dir / "prompts" / "dreambooth_prompts_and_classes.txt").read_text()
    lists = re.findall(r"prompt_list = \[(.*?)\]", text, flags=re.S)
    parsed = [
        [ast.literal_eval(m).replace("{0} {1}", "{}") for m in re.findall(r"('.*?')\.format", block)] for block in lists
    ]
    classes = dict(
        line.split(",", 1)
        for line in text.split("Prompts")[0].splitlines()
        if "," in line and "subject_name" not in line
    )
    return parsed, classes


def test_shipped_prompts_match_dreambooth(data_dir):
    (objects, live), classes = bundled_prompt_lists(data_dir)
    assert list(evaluate.DREAMBOOTH_OBJECT_PROMPTS) == objects and len(objects) == 25
    assert list(evaluate.DREAMBOOTH_LIVE_PROMPTS) == live and len(live) == 25
    assert evaluate.DREAMBOOTH_CLASSES == classes


def test_prompt_specs_choose_list_and_add_coi(tmp_path):
    cfg = evaluate.EvalConfig(num_prompts=3, coi=True, coi_objects=["dog", "car"])
    dog = evaluate.ConceptFolder("dog", tmp_path, "dog")
    specs = evaluate.prompt_specs(cfg, dog)
    assert [s.template for s in specs[:3]] == list(evaluate.DREAMBOOTH_LIVE_PROMPTS[:3])
    assert [(s.template, s.coi_target) for s in specs[3:]] == [("a photo of {} and a car", "car")]  # not its own class
    pot = evaluate.ConceptFolder("teapot", tmp_path, "teapot")
    cfg = evaluate.EvalConfig(num_prompts=25)
    assert [s.template for s in evaluate.prompt_specs(cfg, pot)][-5:] == list(evaluate.DREAMBOOTH_OBJECT_PROMPTS[-5:])
    bad = tmp_path / "p.txt"
    bad.write_text("a photo of {}\nno placeholder here\n")
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.prompt_specs(evaluate.EvalConfig(prompts=str(bad)), pot)


def test_markdown_table_leaves_out_empty_columns():
    table = evaluate.markdown_table([{"method": "base", "concept": "dog", "images": 2, "clip_t": 0.25, "clip_i": None}])
    assert table.splitlines()[0] == "| method | concept | images | CLIP-T |"
    assert "0.2500" in table


def make_runs(tmp_path, sd_path, concept_dir):
    """A Textual Inversion run whose embedding is exactly the word `dog`, and an Infusion run for dog."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from encoders.infusion import InfusionResiduals

    tokenizer = CLIPTokenizer.from_pretrained(sd_path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_path, subfolder="text_encoder")
    dog = text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("dog</w>")].detach()
    ti = tmp_path / "ti_dog"
    ti.mkdir()
    save_file({"S*": dog[None].clone()}, str(ti / "learned_embeds.safetensors"))
    info = {"concept_dir": str(concept_dir), "placeholder_token": "S*", "class_word": "dog"}
    (ti / "concept.json").write_text(
        json.dumps({**info, "method": "textual_inversion", "files": {"embeddings": "learned_embeds.safetensors"}})
    )

    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    residuals = InfusionResiduals.for_unet(unet, "dog", base_model=str(sd_path))
    with torch.no_grad():
        for p in residuals.residuals:
            p.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    inf = tmp_path / "inf_dog"
    residuals.save_pretrained(inf / "infusion")
    (inf / "concept.json").write_text(json.dumps({**info, "method": "infusion", "files": {"residuals": "infusion"}}))
    return ti, inf


def test_evaluate_all_methods_end_to_end(tiny_sd_path, tiny_eval_models, tiny_encoders_path, data_dir, tmp_path):
    concept_dir = data_dir / "concepts" / "dreambooth" / "dog"
    ti, inf = make_runs(tmp_path, tiny_sd_path, concept_dir)
    out = tmp_path / "eval"
    args = [
        f"base={tiny_sd_path}",
        f"runs={ti},{inf}",
        f"encoders={tiny_encoders_path}",
        f"out={out}",
        "num_prompts=2",
        "seeds=0",
        "num_inference_steps=2",
        "resolution=32",
        "coi=true",
        "coi_objects=car",
        "infusion_measures=true",
        "fisher_timesteps=200,800",
        "detection_threshold=0.0",
        f"clip_model={tiny_eval_models / 'eval_clip'}",
        f"dino_model={tiny_eval_models / 'dino'}",
        f"detector_model={tiny_eval_models / 'detector'}",
    ]
    result = evaluate.main(args)
    summary = {row["method"]: row for row in result["summary"]}
    assert set(summary) == {"base", "elite", "textual_inversion (ti_dog)", "infusion (inf_dog)"}
    for row in summary.values():
        assert row["images"] == 5  # 2 DreamBooth prompts + 1 CoI prompt + 2 generic prompts, 1 seed
        assert -1 <= row["clip_t"] <= 1 and -1 <= row["clip_i"] <= 1 and -1 <= row["dino_i"] <= 1
        assert row["coi_likelihood"] in (0.0, 1.0)
        assert row["sampling"] == "DDIM 2 steps, guidance 7.5"
        for key in ("fisher_generic", "fisher_class", "w2_generic", "w2_concept"):
            assert row[key] >= 0 and math.isfinite(row[key]), (row["method"], key)

    # same seeds, same noise: an embedding equal to the word "dog" reproduces the base model exactly
    base, ti_row = summary["base"], summary["textual_inversion (ti_dog)"]
    for key in ("clip_t", "clip_i", "dino_i", "coi_likelihood"):
        assert ti_row[key] == pytest.approx(base[key], abs=1e-6)
    for key in ("w2_generic", "w2_concept", "fisher_generic", "fisher_class"):
        assert ti_row[key] == pytest.approx(0.0, abs=1e-3)  # the token changes nothing the prompts do not name
    # Infusion keeps the base model on prompts without its class word (its base stream, bit for bit) ...
    infusion = summary["infusion (inf_dog)"]
    assert infusion["fisher_generic"] == 0.0
    assert infusion["w2_generic"] == pytest.approx(0.0, abs=1e-3)
    # ... and changes it where the class word is: noise predictions and images
    assert infusion["fisher_class"] > 1e-6
    assert infusion["w2_concept"] > 1e-3

    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert all("S*" not in r["prompt"] and "<" not in r["prompt"] for r in rows)  # CLIP-T text says "dog"
    assert {r["prompt"] for r in rows} == {
        "a dog in the jungle",
        "a dog in the snow",
        "a photo of dog and a car",
        *evaluate.GENERIC_PROMPTS[:2],
    }
    assert {r["kind"] for r in rows if r["prompt"] in evaluate.GENERIC_PROMPTS} == {"generic"}
    assert all(r["clip_i"] == "" for r in rows if r["kind"] == "generic")
    assert (out / "results.md").read_text().startswith("| method | concept |")
    assert (out / "grids" / "dog.png").is_file()
    recorded = json.loads((out / "results.json").read_text())
    assert recorded["summary"] and {r["sampling"]["scheduler"] for r in recorded["rows"]} == {"ddim"}

    # a re-run reuses the images on disk (resume) and gives the same table
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert len(stamps) == 20
    again = evaluate.main(args)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    assert again["summary"] == result["summary"]


def test_evaluate_errors_name_the_problem(tmp_path):
    with pytest.raises(Exception, match="unknown methods"):
        evaluate.EvalConfig(methods=["dreambooth"])
    cfg = evaluate.EvalConfig(runs=[str(tmp_path)])
    with pytest.raises(evaluate.FinetuneFolderError, match="concept.json"):
        evaluate.resolve_concepts_and_runs(cfg)
    odd = tmp_path / "my_photos"
    odd.mkdir()
    with pytest.raises(Exception, match="class word"):
        evaluate.resolve_concepts_and_runs(evaluate.EvalConfig(concepts=[str(odd)]))
    concepts, _ = evaluate.resolve_concepts_and_runs(evaluate.EvalConfig(concepts=[f"{odd}=mug"]))
    assert concepts[0].class_word == "mug" and concepts[0].name == "my_photos"


def test_evaluation_imports_no_training_stack():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    probe = (
        "import sys, inference.evaluate, inference.evaluation.metrics, encoders.infusion, encoders.subspace\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'training', 'data_prep', 'deepspeed', 'webdataset', 'pycocotools'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(repo)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_elite_mask_lookup(data_dir):
    teapot = evaluate.ConceptFolder("teapot", data_dir / "concepts" / "dreambooth" / "teapot", "teapot")
    masks = data_dir / "concepts" / "masks"
    assert teapot.mask_for(teapot.photos[4], masks) == masks / "teapot_04.png"
    assert teapot.mask_for(teapot.photos[0], masks) is None
    assert teapot.mask_for(teapot.photos[4]) is None  # no masks/ folder beside the photos


def test_protocol_all_reproduces_each_papers_setup(
    tiny_sd_path, tiny_eval_models, encoders_with_location_mlp, data_dir, tmp_path
):
    concept_dir = data_dir / "concepts" / "dreambooth" / "dog"
    ti, inf = make_runs(tmp_path, tiny_sd_path, concept_dir)
    info = json.loads((ti / "concept.json").read_text())
    (ti / "concept.json").write_text(json.dumps({**info, "semantic_inversion": True}))  # trained with anchors
    out = tmp_path / "eval"
    result = evaluate.main(
        [
            f"base={tiny_sd_path}",
            f"runs={ti},{inf}",
            f"encoders={encoders_with_location_mlp}",
            f"out={out}",
            "protocol=all",
            "num_prompts=1",
            "seeds=0,1",
            "num_inference_steps=2",
            "resolution=32",
            "fisher_timesteps=500",
            "detection_threshold=0.0",
            f"clip_model={tiny_eval_models / 'eval_clip'}",
            f"dino_model={tiny_eval_models / 'dino'}",
            f"detector_model={tiny_eval_models / 'detector'}",
        ]
    )
    tables = {name: {row["method"]: row for row in r["summary"]} for name, r in result["protocols"].items()}
    assert list(tables) == ["elite", "compositional", "infusion"]
    combined = (out / "results.md").read_text()
    assert all(f"## {name}:" in combined for name in tables)

    # ELITE's protocol: each method with its own paper's sampler and guidance; lambda by prompt kind
    elite = tables["elite"]
    assert elite["elite"]["sampling"] == "LMS 2 steps, guidance 5"
    assert elite["textual_inversion + semantic (ti_dog)"]["sampling"] == "DDIM 2 steps, guidance 10"
    assert elite["infusion (inf_dog)"]["sampling"] == "DDIM 2 steps, guidance 8"
    with open(out / "elite" / "scores.csv") as f:
        scores = list(csv.DictReader(f))
    assert {r["elite_scale"] for r in scores if r["method"] == "elite"} == {"0.6000"}  # "a S* in the jungle": editing

    # Compositional Inversion's Table 1: TI (+ semantic) with and without spatial guidance (its constant layout,
    # and the location MLP's boxes as an extra row), PNDM for plain rows and LMS for guided ones, on
    # "S* dog and <COCO class>" prompts, CLIP-T = 2.5 x cos against "dog and <class>", the CoI likelihood
    comp = tables["compositional"]
    assert {
        "textual_inversion + semantic (ti_dog)",
        "textual_inversion + semantic + spatial (ti_dog)",
        "textual_inversion + semantic + spatial (location MLP) (ti_dog)",
        "elite",
        "elite + spatial",
        "elite + spatial (location MLP)",
        "infusion (inf_dog)",
    } <= set(comp)
    for name, row in comp.items():
        spatial = "+ spatial" in name
        assert row["sampling"] == ("LMS" if spatial else "PNDM") + " 2 steps, guidance 7.5", name
        assert row["coi_likelihood"] in (0.0, 1.0) and -2.5 <= row["clip_t"] <= 2.5
    assert comp["elite + spatial"]["location_loss"] >= 0
    with open(out / "compositional" / "scores.csv") as f:
        scores = list(csv.DictReader(f))
    assert {r["prompt"] for r in scores} == {"dog and person"}  # COCO's first class; S* read as "dog"
    assert "seeded 8888" in (out / "compositional" / "results.md").read_text()  # the notebook's noise stream
    guided = [r for r in scores if "+ spatial" in r["row"]]
    assert guided and all(r["location_loss_first"] and r["location_loss_last"] for r in guided)
    images = out / "compositional" / "images"
    placed = json.loads(next(images.glob("textual_inversion_semantic_spatial_ti_dog/dog/*.json")).read_text())["placed"]
    assert [(p["from"], tuple(p["box"])) for p in placed] == [
        ("given", (0.1, 0.2, 0.5, 0.8)),
        ("given", (0.6, 0.2, 0.95, 0.8)),
    ]
    assert placed[1]["token"] == "person"
    sidecar = next(images.glob("textual_inversion_semantic_spatial_location_MLP_ti_dog/dog/*.json"))
    placed = json.loads(sidecar.read_text())["placed"]
    assert [p["from"] for p in placed] == ["location_mlp", "location_mlp"] and placed[1]["token"] == "person"
    # guided and unguided images differ (same seed; the official samplers: PNDM plain, LMS guided)
    plain = Image.open(next((out / "compositional" / "images" / "elite" / "dog").glob("*_s0.png")))
    steered = Image.open(next((out / "compositional" / "images" / "elite_spatial" / "dog").glob("*_s0.png")))
    assert plain.tobytes() != steered.tobytes()

    # Infusion's protocol: Fisher and W2 for every method, against a base row with the same sampling
    inf_table = tables["infusion"]
    assert {"base [lms-2-g5]", "base [ddim-2-g10]", "base [ddim-2-g8]"} <= set(inf_table)
    for row in inf_table.values():
        for key in ("fisher_generic", "fisher_class", "w2_generic", "w2_concept"):
            assert math.isfinite(row[key]) and row[key] >= 0
    assert inf_table["infusion (inf_dog)"]["fisher_generic"] == 0.0 < inf_table["infusion (inf_dog)"]["fisher_class"]
    recorded = json.loads((out / "infusion" / "results.json").read_text())
    assert recorded["protocol"]["name"] == "infusion" and recorded["seeds"] == [0, 1]


def test_protocol_errors_and_sampling_overrides():
    with pytest.raises(Exception, match="unknown protocol"):
        evaluate.EvalConfig(protocol="dreambooth")
    with pytest.raises(Exception, match="unknown scheduler"):
        evaluate.EvalConfig(scheduler="heun2")
    from inference.evaluation.protocols import PROTOCOL_TABLE

    cfg = evaluate.protocol_config(evaluate.EvalConfig(out="o"), PROTOCOL_TABLE["compositional"])
    assert cfg.seeds == list(range(10)) and cfg.append_class_word and cfg.prompts == "composition"
    assert cfg.out.endswith("compositional")
    cfg = evaluate.protocol_config(evaluate.EvalConfig(out="o", seeds=[3]), PROTOCOL_TABLE["infusion"])
    assert cfg.seeds == [3] and cfg.infusion_measures


def test_infusion_protocol_against_a_folder_of_real_images(tiny_sd_path, tiny_eval_models, data_dir, tmp_path):
    """reference_images=DIR: W2 on generic prompts and the Fisher divergence compare with real images (captions
    from <stem>.txt), as Infusion's paper with LAION; results.md says which reference was used."""
    import shutil

    concept_dir = data_dir / "concepts" / "dreambooth" / "dog"
    _, inf = make_runs(tmp_path, tiny_sd_path, concept_dir)
    real = tmp_path / "real"
    real.mkdir()
    for k, photo in enumerate(sorted((data_dir / "coco_sample" / "images").glob("*.jpg"))[:4]):
        shutil.copy(photo, real / photo.name)
        if k < 2:
            photo_caption = real / f"{photo.stem}.txt"
            photo_caption.write_text("a photo of a street\n")
    out = tmp_path / "eval"
    keys = [
        f"base={tiny_sd_path}",
        f"runs={inf}",
        "methods=base,infusion",
        "protocol=infusion",
        "num_prompts=2",
        "seeds=0,1",
        "num_inference_steps=2",
        "resolution=32",
        "fisher_timesteps=500",
        "w2_samples=3",
        f"clip_model={tiny_eval_models / 'eval_clip'}",
        f"dino_model={tiny_eval_models / 'dino'}",
    ]
    table = {
        r["method"]: r
        for r in evaluate.main([*keys, f"out={out}", f"reference_images={real}"])["protocols"]["infusion"]["summary"]
    }
    base = next(row for name, row in table.items() if name.startswith("base"))
    assert base["w2_generic"] > 0  # the base model against real images is no longer 0 by construction
    assert base["fisher_generic"] == 0.0 and base["w2_concept"] == 0.0
    report = (out / "infusion" / "results.md").read_text()
    assert f"3 real images of {real} for W2" in report or f"4 real images of {real}" in report
    assert "2 without a caption file" in report

    fallback = evaluate.main([*keys, f"out={out}"])["protocols"]["infusion"]["summary"]  # the same images
    assert next(r for r in fallback if r["method"].startswith("base"))["w2_generic"] == 0.0
    assert "quick fallback" in (out / "infusion" / "results.md").read_text()


def test_dreambench_protocol_one_reference_photo_and_its_columns(tiny_sd_path, tiny_eval_models, data_dir, tmp_path):
    """protocol=dreambench: 4 images per prompt, one fixed reference photo per subject (00.jpg), the published
    column order DINO, CLIP-I, CLIP-T."""
    out = tmp_path / "bench"
    result = evaluate.main(
        [
            f"base={tiny_sd_path}",
            f"concepts={data_dir / 'concepts' / 'dreambooth' / 'dog'}",
            "methods=base",
            "protocol=dreambench",
            "num_prompts=1",
            "num_inference_steps=2",
            "resolution=32",
            f"clip_model={tiny_eval_models / 'eval_clip'}",
            f"dino_model={tiny_eval_models / 'dino'}",
            f"out={out}",
        ]
    )
    (row,) = result["protocols"]["dreambench"]["summary"]
    assert row["images"] == 4 and set(row) >= {"dino_i", "clip_i", "clip_t"}
    report = (out / "dreambench" / "results.md").read_text()
    assert "| DINO-I | CLIP-I | CLIP-T |" in report and "dog: 00.jpg" in report


def test_textual_inversion_and_batex_protocols_score_the_right_prompts(
    tiny_sd_path, tiny_eval_models, data_dir, tmp_path
):
    """protocol=textual_inversion: CLIP-I and CLIP-T on "A photo of S*" (S* removed from the text); protocol=batex:
    CLIP-I on the reconstructions only, CLIPScore (>= 0, "*" in the text) on the edits only."""
    concept_dir = data_dir / "concepts" / "dreambooth" / "dog"
    ti, _ = make_runs(tmp_path, tiny_sd_path, concept_dir)
    common = [
        f"base={tiny_sd_path}",
        f"runs={ti}",
        "methods=textual_inversion",
        "seeds=0,1",
        "num_inference_steps=2",
        "resolution=32",
        f"clip_model={tiny_eval_models / 'eval_clip'}",
        f"dino_model={tiny_eval_models / 'dino'}",
    ]
    for protocol in ("textual_inversion", "batex"):
        evaluate.main([*common, f"protocol={protocol}", "num_prompts=2", f"out={tmp_path / protocol}"])
    with open(tmp_path / "textual_inversion" / "textual_inversion" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    first = [r for r in rows if r["prompt_index"] == "0"]
    assert {r["prompt"] for r in first} == {"A photo of"} and all(r["clip_i"] and r["clip_t"] for r in first)
    with open(tmp_path / "batex" / "batex" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    reconstruction = [r for r in rows if r["prompt_index"] == "0"]
    edits = [r for r in rows if r["prompt_index"] != "0"]
    assert all(r["clip_i"] and not r["clip_t"] for r in reconstruction)
    assert edits and all(not r["clip_i"] and float(r["clip_t"]) >= 0 for r in edits)
    assert {r["prompt"] for r in edits} == {"A photo of * on the beach"}
