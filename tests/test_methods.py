"""Generation methods as one registry (issue 27): what each method declares, and a sixth method added as one
class that the command line and the evaluation then use unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.common.finetune_folder import write_concept_info
from inference import evaluate
from inference.cli import main as cli_main
from inference.methods import (
    METHODS,
    GenerationMethod,
    MethodError,
    check_guidance,
    register_method,
)


class EchoWord(GenerationMethod):
    """A toy sixth method: its "training" writes one word, and it generates by repeating that word in the prompt
    (so the images differ from the plain prompt's). It exists only in this test, registered as a user would."""

    name = "echo_word"
    from_runs = True
    prompts_seen: list = []  # every prompt its generate was called with, to check who generated

    def __init__(self, pipe, run, word: str):
        super().__init__(pipe, run)
        self.word = word

    @classmethod
    def load(cls, pipe, source=None, token=None):
        return cls(pipe, source, source.result_path().read_text().strip())

    def prompt_word(self, class_word: str) -> str:
        return self.word

    def generate(self, prompts, latents, generators=None, **sampling):
        echoed = [f"{p}, {self.word}, {self.word}" for p in prompts]
        type(self).prompts_seen += echoed
        return super().generate(echoed, latents, generators, **sampling)


@pytest.fixture
def echo_method():
    register_method(EchoWord)
    EchoWord.prompts_seen = []
    yield EchoWord
    METHODS.pop(EchoWord.name)


def _echo_run(folder, concept_dir, word="puppy"):
    """What the toy method's trainer would leave: its result and a concept.json naming the method."""
    folder.mkdir(parents=True)
    (folder / "word.txt").write_text(word)
    write_concept_info(
        folder,
        {"method": "echo_word", "class_word": "dog", "concept_dir": str(concept_dir), "files": {"result": "word.txt"}},
    )
    return folder


def test_the_five_methods_and_what_they_declare():
    assert set(METHODS) >= {"base", "elite", "textual_inversion", "batex", "infusion"}
    assert [name for name, cls in METHODS.items() if cls.from_runs] == ["textual_inversion", "batex", "infusion"]
    assert not METHODS["infusion"].spatial_guidance and METHODS["infusion"].refusal
    assert all(METHODS[m].spatial_guidance for m in ("base", "elite", "textual_inversion", "batex"))
    with pytest.raises(MethodError, match="spatial guidance with infusion is not supported"):
        check_guidance([METHODS["infusion"].__new__(METHODS["infusion"])])
    with pytest.raises(MethodError, match="registered twice"):
        register_method(type("Other", (GenerationMethod,), {"name": "elite"}))


def test_an_unregistered_method_folder_is_refused_naming_the_registered_ones(tmp_path, data_dir):
    from inference.finetuned import FinetuneFolderError, read_finetune

    folder = _echo_run(tmp_path / "echo", data_dir / "concepts" / "dreambooth" / "dog")
    with pytest.raises(FinetuneFolderError, match="unknown method 'echo_word'.*textual_inversion"):
        read_finetune(folder)


def test_a_sixth_method_generates_through_the_cli(echo_method, tiny_sd_path, data_dir, tmp_path):
    folder = _echo_run(tmp_path / "echo", data_dir / "concepts" / "dreambooth" / "dog")
    out = tmp_path / "out"
    common = ["--base", str(tiny_sd_path), "--steps", "2", "--height", "32", "--width", "32", "--quiet"]
    assert (
        cli_main(["generate", *common, "--finetune", str(folder), "--prompt", "a photo of puppy", "--out", str(out)])
        == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    assert settings["finetunes"] == [{"folder": str(folder), "method": "echo_word", "prompt_word": "puppy"}]
    assert echo_method.prompts_seen == ["a photo of puppy, puppy, puppy"]
    plain = tmp_path / "plain"
    assert cli_main(["generate", *common, "--prompt", "a photo of puppy", "--out", str(plain)]) == 0

    echoed = np.asarray(Image.open(out / settings["prompts"][0]["images"][0]), dtype=np.float32)
    base = np.asarray(Image.open(plain / settings["prompts"][0]["images"][0]), dtype=np.float32)
    assert np.abs(echoed - base).max() > 0  # the method's own generate ran (the repeated word changed the text)


def test_a_sixth_method_gets_rows_in_the_evaluation(echo_method, tiny_sd_path, tiny_eval_models, data_dir, tmp_path):
    folder = _echo_run(tmp_path / "echo", data_dir / "concepts" / "dreambooth" / "dog")
    result = evaluate.main(
        [
            f"base={tiny_sd_path}",
            f"runs={folder}",
            f"out={tmp_path / 'eval'}",
            "num_prompts=2",
            "seeds=0",
            "num_inference_steps=2",
            "resolution=32",
            "infusion_measures=true",
            "fisher_timesteps=500",
            f"clip_model={tiny_eval_models / 'eval_clip'}",
            f"dino_model={tiny_eval_models / 'dino'}",
            f"detector_model={tiny_eval_models / 'detector'}",
        ]
    )
    rows = {row["method"]: row for row in result["summary"]}
    assert set(rows) == {"base", "echo_word (echo)"}
    echo = rows["echo_word (echo)"]
    assert echo["images"] == rows["base"]["images"] > 0 and -1 <= echo["clip_t"] <= 1
    assert any(p.endswith("puppy, puppy") and "puppy" in p.split(",")[0] for p in echo_method.prompts_seen)
    assert echo["fisher_generic"] == 0.0  # the default noise_predictions: the UNet is untouched by a word
    assert torch.isfinite(torch.tensor(echo["w2_generic"]))
