"""Fine-tune folders used for generation (inference.finetuned): every bad folder is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from inference.finetuned import FinetuneFolderError, load_embedding, read_finetune


def _ti_folder(root, width: int, base_model: str = "tiny"):
    root.mkdir(parents=True, exist_ok=True)
    save_file({"S*": torch.randn(1, width)}, root / "learned_embeds.safetensors")
    info = {
        "method": "textual_inversion",
        "placeholder_token": "S*",
        "class_word": "dog",
        "base_model": base_model,
        "files": {"embeddings": "learned_embeds.safetensors"},
    }
    (root / "concept.json").write_text(json.dumps(info))
    return root


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(FinetuneFolderError, match="does not exist"):
        read_finetune(tmp_path / "nowhere")
    with pytest.raises(FinetuneFolderError, match="has no concept.json"):
        read_finetune(tmp_path)
    (tmp_path / "concept.json").write_text("{not json")
    with pytest.raises(FinetuneFolderError, match="not valid JSON"):
        read_finetune(tmp_path)
    (tmp_path / "concept.json").write_text(json.dumps({"method": "dreambooth"}))
    with pytest.raises(FinetuneFolderError, match="unknown method 'dreambooth'"):
        read_finetune(tmp_path)
    (tmp_path / "concept.json").write_text(json.dumps({"method": "infusion", "class_word": "cat"}))
    with pytest.raises(FinetuneFolderError, match="infusion named in concept.json is missing"):
        read_finetune(tmp_path)
    run = read_finetune(_ti_folder(tmp_path / "ti", 32))
    assert run.method == "textual_inversion" and run.placeholder_token == "S*" and run.class_word == "dog"


def test_embedding_loads_under_its_token_and_refuses_another_base_model(tmp_path, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    run = read_finetune(_ti_folder(tmp_path / "ti", 32))
    assert load_embedding(pipe, run) == "S*"
    sid = pipe.tokenizer.convert_tokens_to_ids("S*")
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == sid + 1
    with pytest.raises(FinetuneFolderError, match="already in the tokenizer"):
        load_embedding(pipe, run)  # a second run trained as S* needs its own token
    assert load_embedding(pipe, run, token="<dog2>") == "<dog2>"
    wide = read_finetune(_ti_folder(tmp_path / "sd14", 768, base_model="CompVis/stable-diffusion-v1-4"))
    with pytest.raises(FinetuneFolderError, match="trained for CompVis/stable-diffusion-v1-4"):
        load_embedding(pipe, wide, token="<wide>")
