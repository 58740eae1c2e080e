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
    hub = SimpleNamespace(
        pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4", license="creativeml-openrail-m"
    )
    header = card_header(hub, ["elite"])
    assert "base_model: CompVis/stable-diffusion-v1-4" in header and "license: creativeml-openrail-m" in header

    export = tmp_path / "encoders"
    (export / "global_mapping").mkdir(parents=True)
    (export / "global_mapping" / "config.json").write_text('{"_class_name": "GlobalMapping"}')
    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "validation" / "step-000010.png").write_bytes(b"\x89PNG fake")
    config = SimpleNamespace(
        pretrained_model_name_or_path=str(local),
        image_encoder_name_or_path="openai/clip-vit-large-patch14",
        output_dir=str(run),
        license="creativeml-openrail-m",
    )
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
    for path in (
        "checkpoint-500/optimizer.bin",
        "checkpoint-500",
        "logs/events.out",
        "random_states_0.pkl",
        "validation/step-000010.png",
        ".lock",
    ):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
    for path in ("local_mapping/config.json", "learned_embeds.safetensors", "README.md", "samples.png", "concept.json"):
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path


def _hub_cache(monkeypatch, tmp_path, repo: str, files: dict) -> None:
    """A Hugging Face cache holding `repo` at main, as `snapshot_download` / `hf_hub_download` leave it
    (the tests run offline: what the loaders read is the cache)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, write in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_fine_tunes_and_concept_files_load_from_hub_ids(tmp_path, monkeypatch, tiny_sd_path):
    import torch

    from encoders.common.finetune_folder import FinetuneFolderError, read_finetune
    from inference.concept import Concept
    from inference.finetuned import load_embedding
    from inference.loading import load_base_pipeline

    pipe = load_base_pipeline(str(tiny_sd_path), device="cpu", dtype="float32", safety_checker=False)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    concept = Concept(torch.randn(width), None, None, {"source": "test"})
    _hub_cache(
        monkeypatch,
        tmp_path,
        "someone/cat-toy",
        {
            # the sd-concepts-library layout: a pickled dict, its token in a text file, no concept.json
            "learned_embeds.bin": lambda p: torch.save({"<cat-toy>": torch.randn(width)}, p),
            "token_identifier.txt": lambda p: p.write_text("<cat-toy>\n"),
            "type_of_concept.txt": lambda p: p.write_text("object"),
            "concepts/teapot.safetensors": lambda p: concept.save(p),
        },
    )
    run = read_finetune("someone/cat-toy")
    assert run.method == "textual_inversion" and run.placeholder_token == "<cat-toy>"
    assert load_embedding(pipe, run) == "<cat-toy>" and "<cat-toy>" in pipe.tokenizer.get_vocab()
    loaded = Concept.load("someone/cat-toy/concepts/teapot.safetensors")
    torch.testing.assert_close(loaded.w0, concept.w0)
    for missing in ("someone/absent", "someone/absent/x.safetensors"):
        try:
            (read_finetune if missing.count("/") == 1 else Concept.load)(missing)
        except (FinetuneFolderError, ValueError) as err:
            assert "absent" in str(err)
        else:
            raise AssertionError(f"{missing} loaded")
