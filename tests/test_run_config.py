"""Typed run configs: YAML + key=value overrides, errors that name the key, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from encoders.common.config import ConfigError, load_config, parse_config_cli, save_config


@dataclass
class Subspace:
    dim: int = 8
    distance: Literal["dot", "cosine", "l2"] = "cosine"


@dataclass
class ExampleConfig:
    learning_rate: float = 1e-4
    max_steps: int = 10
    layers: tuple[int, ...] = (24, 4, 8, 12, 16)
    placeholder_token: str = "S*"
    resume_from_checkpoint: str | None = None
    push_to_hub: bool = False
    subspace: Subspace = field(default_factory=Subspace)

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 2.0e-5\nmax_steps: 5\nsubspace:\n  dim: 4\n")
    cfg = load_config(
        ExampleConfig, path, ["max_steps=7", "subspace.distance=l2", "layers=24,4", "resume_from_checkpoint=latest"]
    )
    assert cfg.learning_rate == 2e-5 and cfg.max_steps == 7
    assert cfg.subspace == Subspace(dim=4, distance="l2")
    assert cfg.layers == (24, 4) and cfg.resume_from_checkpoint == "latest"
    assert load_config(ExampleConfig, None, ["learning_rate=1e-6"]).learning_rate == 1e-6  # YAML 1.1 "1e-6"


@pytest.mark.parametrize(
    "override, named",
    [
        ("learning_rat=1", "learning_rat"),
        ("subspace.dimm=3", "subspace.dimm"),
        ("max_steps=many", "max_steps"),
        ("subspace.distance=manhattan", "subspace.distance"),
        ("push_to_hub=perhaps", "push_to_hub"),
        ("max_steps=0", "max_steps"),
        ("no_equals_sign", "no_equals_sign"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(ExampleConfig, None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"max_stepz.*bad\.yaml|bad\.yaml.*max_stepz"):
        load_config(ExampleConfig, path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ExampleConfig, None, ["subspace.dim=3", "layers=[1,2,3]", "push_to_hub=true"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(ExampleConfig, saved) == cfg


def test_cli_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        parse_config_cli(ExampleConfig, ["--help"], prog="x")
    out = capsys.readouterr().out
    assert "subspace.distance" in out and "learning_rate" in out


def test_cli_error_exits_with_message(capsys):
    with pytest.raises(SystemExit):
        parse_config_cli(ExampleConfig, ["bogus=1"], prog="x")
    assert "bogus" in capsys.readouterr().err


def test_cli_accepts_dashed_keys_like_diffusers_scripts():
    cfg = parse_config_cli(
        ExampleConfig, ["--learning-rate=3e-4", "--max_steps", "4", "--push_to_hub", "--subspace.dim", "2", "layers=1"]
    )
    assert cfg.learning_rate == 3e-4 and cfg.max_steps == 4 and cfg.push_to_hub is True
    assert cfg.subspace.dim == 2 and cfg.layers == (1,)


def test_cli_dashed_unknown_key_still_named(capsys):
    with pytest.raises(SystemExit):
        parse_config_cli(ExampleConfig, ["--max-stepz", "3"], prog="x")
    assert "max_stepz" in capsys.readouterr().err


def test_trainers_take_base_like_every_other_command(tmp_path):
    from training.common_config import TrainConfig

    assert parse_config_cli(TrainConfig, ["--base", "some/model"]).pretrained_model_name_or_path == "some/model"
    assert load_config(TrainConfig, None, ["base=x"]).pretrained_model_name_or_path == "x"
    both = tmp_path / "both.yaml"
    both.write_text("base: x\npretrained_model_name_or_path: y\n")
    with pytest.raises(ConfigError, match="base"):
        load_config(TrainConfig, both)


def test_every_shipped_training_config_loads_into_its_trainer_config():
    """Each YAML in configs/train and configs/finetune parses with its trainer's keys (a typo fails here, not
    on a cluster); the per-base variants name their base."""
    from inference.evaluate import EvalConfig
    from training.global_mapping import GlobalMappingConfig
    from training.infusion import InfusionConfig
    from training.ip_adapter import IPAdapterConfig
    from training.local_mapping import LocalMappingConfig
    from training.location_mlp import LocationMLPConfig
    from training.textual_inversion import TextualInversionConfig

    classes = {
        "global_mapping": GlobalMappingConfig,
        "local_mapping": LocalMappingConfig,
        "location_mlp": LocationMLPConfig,
        "textual_inversion": TextualInversionConfig,
        "batex": TextualInversionConfig,
        "infusion": InfusionConfig,
        "ip_adapter": IPAdapterConfig,
        "evaluate": EvalConfig,
    }
    root = Path(__file__).resolve().parent.parent / "configs"
    paths = sorted([*root.glob("train/*.yaml"), *root.glob("finetune/*.yaml")])
    assert len(paths) >= 14
    for path in paths:
        cls = classes[next(k for k in classes if path.stem.startswith(k))]
        required = {
            InfusionConfig: ["concept_dir=photos", "class_word=dog"],
            TextualInversionConfig: ["concept_dir=photos", "initializer_token=dog", "class_word=dog"],
            LocationMLPConfig: ["train_shards=pairs"],
        }.get(cls, [])
        cfg = load_config(cls, path, required)
        if path.stem.endswith("_sdxl"):
            assert cfg.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0", path
        if path.stem.endswith("_sd21"):
            assert cfg.pretrained_model_name_or_path == "stabilityai/stable-diffusion-2-1-base", path
    assert load_config(
        TextualInversionConfig, root / "finetune/batex_sdxl.yaml", ["concept_dir=photos", "initializer_token=dog"]
    ).subspace.enabled
