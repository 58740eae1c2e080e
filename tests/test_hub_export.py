"""What goes to the Hub: cards that name Hub models (never local paths) with a license and samples, and
uploads of what loads only."""

from __future__ import annotations

import fnmatch
from types import SimpleNamespace

from training.export import HUB_IGNORE, card_header, hub_name, push_folder_to_hub, write_model_card


def test_cards_name_hub_models_and_never_local_paths(tmp_path):
    local = tmp_path / "my" / "private" / "sd"
    local.mkdir(parents=True)
    assert hub_name("CompVis/stable-diffusion-v1-4") == ("CompVis/stable-diffusion-v1-4", True)
    assert hub_name(str(local)) == ("sd", False)
    hub = SimpleNamespace(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4", license="creativeml-openrail-m")
    header = card_header(hub, ["elite"])
    assert "base_model: CompVis/stable-diffusion-v1-4" in header and "license: creativeml-openrail-m" in header

    export = tmp_path / "encoders"
    (export / "global_mapping").mkdir(parents=True)
    (export / "global_mapping" / "config.json").write_text('{"_class_name": "GlobalMapping"}')
    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "validation" / "step-000010.png").write_bytes(b"\x89PNG fake")
    config = SimpleNamespace(pretrained_model_name_or_path=str(local), image_encoder_name_or_path="openai/clip-vit-large-patch14",
                             output_dir=str(run), license="creativeml-openrail-m")
    card = write_model_card(export, config, "notes").read_text()
    assert str(tmp_path) not in card and "base_model:" not in card  # a local base is not claimed as a Hub model
    assert "a local folder when trained" in card and "openai/clip-vit-large-patch14" in card
    assert "![validation samples](samples.png)" in card and (export / "samples.png").is_file()


def test_push_uploads_only_what_loads(tmp_path, monkeypatch):
    calls = {}
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.update(k))
    (tmp_path / "local_mapping").mkdir()
    (tmp_path / "local_mapping" / "config.json").write_text("{}")
    push_folder_to_hub(tmp_path, "user/elite")
    ignored = calls["ignore_patterns"]
    assert ignored == HUB_IGNORE and "local_mapping" in calls["commit_message"]
    for path in ("checkpoint-500/optimizer.bin", "checkpoint-500", "logs/events.out", "random_states_0.pkl",
                 "validation/step-000010.png", ".lock"):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
    for path in ("local_mapping/config.json", "learned_embeds.safetensors", "README.md", "samples.png", "concept.json"):
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
