"""Who may import whom (ARCHITECTURE.md), checked on the source: every `import` of every module, at the
top or inside a function, so a new arrow in the wrong direction fails here before it ships."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("data_prep", "encoders", "inference", "training")

# package -> top-level names it must never import (the project's packages and third-party ones)
FORBIDDEN = {
    "encoders": {"data_prep", "inference", "training", "accelerate", "deepspeed", "webdataset", "pycocotools"},
    "inference": {"data_prep", "training", "accelerate", "deepspeed", "webdataset", "pycocotools"},
    "data_prep": {"inference", "training", "accelerate", "deepspeed"},
    "training": set(),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports resolved to the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_they_may(package):
    bad = []
    for path in _sources(package):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_nothing_but_tests_and_benchmarks_imports_training():
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for package in ("data_prep", "encoders", "inference")
        for path in _sources(package)
        for line, module in _imports(path)
        if module.split(".")[0] == "training"
    ]
    assert not bad, "\n".join(bad)


def test_the_ground_floor_imports_nothing_of_the_project():
    """`encoders.common` is what every package builds on: it may import only itself (and third parties)."""
    bad = []
    for path in _sources("encoders/common"):
        for line, module in _imports(path):
            if module.split(".")[0] in PACKAGES and not module.startswith("encoders.common"):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_import_circles_between_modules():
    """Imports between the project's modules form no circle, counting imports inside functions too (not those
    under `if TYPE_CHECKING:`, which never run)."""
    graph: dict[str, set[str]] = {}
    modules = {}
    for package in PACKAGES:
        for path in _sources(package):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            name = name.removesuffix(".__init__")
            modules[name] = path
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps = set()
        type_only = {  # imports under `if TYPE_CHECKING:` are for annotations and never run
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
        top_level = [
            n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in type_only
        ]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in top_level:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
            else:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps

    seen, stack, circles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            circles.append(" -> ".join(stack[stack.index(node) :] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not circles, "\n".join(circles)


def test_no_file_names_a_document_outside_the_repository():
    """Code, configs and docs state facts where they are used; they never point at files not shipped."""
    outside = ("DESIGN.md", "papers/", "../shared")
    bad = []
    for path in [
        *REPO.glob("*.md"),
        *(p for pkg in (*PACKAGES, "configs", "benchmarks", "tests") for p in (REPO / pkg).rglob("*")),
    ]:
        if (
            path.is_file()
            and path.suffix in (".py", ".md", ".yaml", ".json", ".sbatch")
            and path.name != Path(__file__).name
        ):
            text = path.read_text(errors="ignore")
            bad += [f"{path.relative_to(REPO)} mentions {word}" for word in outside if word in text]
    assert not bad, "\n".join(bad)


def test_the_lean_inference_package_does_not_need_the_evaluation_room():
    """`inference/evaluation/` sits beside the generation code, not under it: nothing in `inference` outside the
    room imports it, but for `inference/evaluate.py`, the `python -m inference.evaluate` alias."""
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _sources("inference")
        if "evaluation" not in path.relative_to(REPO).parts and path.name != "evaluate.py"
        for line, module in _imports(path)
        if module.startswith("inference.evaluation")
    ]
    assert not bad, "\n".join(bad)
