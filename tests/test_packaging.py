"""What a wheel install holds: every package, the vocabulary assets, the example configs (as
`zsp_configs`, found by `--config configs/...` from any folder and written out by `zsp-configs`)
and the console scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of what the build reads (the build writes build/ beside its source)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("data_prep", "encoders", "inference", "training", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    return next(out.glob("*.whl"))


def test_the_wheel_holds_every_package_the_assets_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in sorted(REPO.glob("*/**/__init__.py")):
        relative = init.relative_to(REPO).as_posix()
        if relative.split("/")[0] in ("data_prep", "encoders", "inference", "training"):
            assert relative in names, f"{relative} is not in the wheel: add its package to pyproject's packages"
    configs = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert {f"zsp_configs/{c}" for c in configs} <= names
    assert "encoders/assets/bpe_simple_vocab_16e6.txt.gz" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert (
        "zsp-configs = encoders.common.config:write_configs_main" in scripts
        and "zsp-app = inference.app:main" in scripts
    )


def test_configs_are_found_and_written_out_from_an_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "from encoders.common.config import resolve_config_path, write_configs_main\n"
        "print(resolve_config_path('configs/train/global_mapping.yaml'))\n"
        "raise SystemExit(write_configs_main(['--out', 'mine']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert done.returncode == 0, done.stderr
    found = Path(done.stdout.splitlines()[0])
    assert found == target / "zsp_configs" / "train" / "global_mapping.yaml"
    written = elsewhere / "mine" / "configs" / "finetune" / "textual_inversion.yaml"
    assert written.read_text() == (REPO / "configs" / "finetune" / "textual_inversion.yaml").read_text()
