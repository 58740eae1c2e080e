"""The embedded tiny default and the CLIP tokenizer built from the shipped vocabulary."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from encoders.tiny import TINY_RESOLUTION, build_tiny_models
from encoders.tokenizer import build_clip_tokenizer


def test_tokenizer_gives_clip_ids():
    tok = build_clip_tokenizer()
    ids = tok("a photo of a dog", padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(ids) == 77 and set(ids[7:]) == {49407}
    assert len(tok) == 49408


def test_tokenizer_folder_loads_with_from_pretrained(tiny_sd_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tok.model_max_length == 77


def _weights(folder):
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(folder)}::{k}"] = v
    return out


def test_tiny_bundle_is_deterministic(tiny_models, tmp_path):
    build_tiny_models(tmp_path, ["sd", "image_encoder"])
    for name in ("sd", "image_encoder"):
        a, b = _weights(tiny_models / name), _weights(tmp_path / name)
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_tiny_build_keeps_existing_folder(tiny_models, tmp_path, capsys):
    build_tiny_models(tmp_path, ["image_encoder"])
    stamp = (tmp_path / "image_encoder" / "config.json").stat().st_mtime_ns
    build_tiny_models(tmp_path, ["image_encoder"])
    assert (tmp_path / "image_encoder" / "config.json").stat().st_mtime_ns == stamp
    assert "kept" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_tiny_pipeline_generates_configured_size(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    assert pipe.vae_scale_factor == 2  # read from the VAE config, not SD's 8
    out = pipe(
        "a photo of a dog",
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_tiny_image_encoder_has_24_layers_and_16x16_patches(tiny_image_encoder_path):
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tiny_image_encoder_path)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224), output_hidden_states=True)
    assert len(out.hidden_states) == 25  # embeddings + 24 layers
    assert out.last_hidden_state.shape == (1, 257, 32)
