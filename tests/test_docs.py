"""README and docs/: short README, links that resolve, and every documented command parses (issue 27).

Each fenced `bash` command that runs a module of this repository (`zsp STAGE ...`, `python -m MOD ...`,
`accelerate launch ... -m MOD ...`) is parsed by that module's own command line, exactly as a user's
shell would pass it, and stopped before it runs: argparse commands after `parse_args`, trainers and
`inference.evaluate` after their config is loaded (so every key, value and `--config` file must be
right). Commands written with placeholders (`...`, `[optional]`, `$VARIABLE`) are illustrations and
are left out.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from inference.zsp import resolve

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 15_000


def _commands(page: Path) -> list[str]:
    """Shell commands of the page's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _module_and_args(command: str) -> tuple[str, list[str]] | None:
    """(module, argv) for a command that runs one of this repository's modules; None for anything else."""
    if any(mark in command for mark in ("...", "[", "$")):
        return None
    words = shlex.split(command, comments=True)
    if words[0] == "zsp":  # the one entry point: the module it runs and what it hands on
        words = ["python", *resolve(words[1:])]
    if words[:2] == ["python", "-m"] or words[:2] == ["accelerate", "launch"]:
        if "-m" not in words:
            return None
        at = words.index("-m")
        module = words[at + 1]
        if module.split(".")[0] in {"inference", "training", "data_prep", "encoders"}:
            return module, words[at + 2 :]
    return None


DOCUMENTED = sorted(
    {
        (page.relative_to(ROOT).as_posix(), command)
        for page in PAGES
        for command in _commands(page)
        if _module_and_args(command)
    }
)


class _Parsed(Exception):
    """Raised where a command has parsed its arguments, so nothing runs."""


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text()) <= README_LIMIT


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    text = page.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]+)?(?:#([^)\s]+))?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link to {target} does not resolve"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {target or page.name}"


def test_documented_commands_are_found():
    # the README's one-command-per-stage list alone has 8; a regex that stopped matching would pass vacuously
    assert len(DOCUMENTED) >= 20, DOCUMENTED


@pytest.mark.parametrize("page,command", DOCUMENTED, ids=[f"{p}:{c[:60]}" for p, c in DOCUMENTED])
def test_documented_command_parses(page, command, monkeypatch):
    module_name, argv = _module_and_args(command)
    packages_with_cli = {"inference", "data_prep"}  # `python -m PACKAGE` runs PACKAGE/__main__.py -> PACKAGE.cli
    module = importlib.import_module(module_name + ".cli" if module_name in packages_with_cli else module_name)
    main = module.main
    if hasattr(module, "parse_config_cli"):
        real = module.parse_config_cli

        def parse_then_stop(*args, **kwargs):
            raise _Parsed(real(*args, **kwargs))

        monkeypatch.setattr(module, "parse_config_cli", parse_then_stop)
    else:
        real_parse = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            raise _Parsed(real_parse(self, args, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(ROOT)
    try:
        main(argv)
    except _Parsed:
        return
    except SystemExit as err:
        pytest.fail(f"{page}: `{command}` does not parse (exit {err.code})")
    pytest.fail(f"{page}: `{command}` ran past its argument parsing")
