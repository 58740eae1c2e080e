"""What is evaluated: the concepts and fine-tune runs, and the rows (method x concept x sampling) in table order."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from encoders.common.config import ConfigError
from encoders.common.images import find_mask, list_photos

from ..finetuned import CONCEPT_FILE, FinetuneFolderError, FinetuneRun, read_finetune
from ..methods import method_class
from .config import EvalConfig
from .prompts import DREAMBOOTH_CLASSES
from .protocols import CUSTOM_SAMPLING, Protocol, Sampling


@dataclass
class ConceptFolder:
    """A folder of photos of one concept (DreamBooth layout) and its class word."""

    name: str
    photos_dir: Path
    class_word: str

    @property
    def photos(self) -> list[Path]:
        return list_photos(self.photos_dir)

    def mask_for(self, photo: Path, mask_dir: str | Path | None = None) -> Path | None:
        """The photo's mask (`encoders.common.images.find_mask`, the rule the fine-tunes use too)."""
        return find_mask(photo, mask_dir)


@dataclass
class Run(FinetuneRun):
    """A fine-tune to evaluate: its folder, method, concept.json and concept."""

    concept: ConceptFolder = None


@dataclass
class Row:
    """One row of the table: a method on a concept, with the sampling it is generated with."""

    method: str
    label: str
    concept: ConceptFolder
    payload: Run | None
    sampling: Sampling
    spatial: bool = False
    layout: str | None = None  # spatial rows' boxes: "constant" (the protocol's fixed layout) or "location_mlp"

    @property
    def name(self) -> str:
        return self.label if self.payload is None else f"{self.label} ({self.payload.label})"

    def record(self) -> dict:
        return {
            "row": self.name,
            "method": self.method,
            "concept": self.concept.name,
            "run": None if self.payload is None else str(self.payload.folder),
            "spatial_guidance": self.spatial,
            "layout": self.layout,
            "sampling": asdict(self.sampling),
        }


def file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "concept"


def _class_from_name(folder: Path) -> str:
    if folder.name in DREAMBOOTH_CLASSES:
        return DREAMBOOTH_CLASSES[folder.name]
    raise ConfigError(f"concept {folder}: give its class word as {folder}=<class word>")


def resolve_concepts_and_runs(config: EvalConfig) -> tuple[list[ConceptFolder], list[Run]]:
    """Concepts from the runs' concept.json files and from `concepts`, deduplicated by photo folder."""
    concepts: dict[Path, ConceptFolder] = {}

    def concept_for(folder: Path, class_word: str | None) -> ConceptFolder:
        folder = folder.resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"concept folder {folder} does not exist")
        if folder not in concepts:
            name = folder.name
            taken = {c.name for c in concepts.values()}
            suffix = 2
            while name in taken:
                name, suffix = f"{folder.name}_{suffix}", suffix + 1
            concepts[folder] = ConceptFolder(name, folder, class_word or _class_from_name(folder))
        return concepts[folder]

    runs = []
    for entry in config.runs:
        run = read_finetune(entry)
        if "concept_dir" not in run.info:
            raise FinetuneFolderError(f"{run.folder / CONCEPT_FILE}: no concept_dir (the photos to score against)")
        concept = concept_for(Path(run.info["concept_dir"]), run.class_word or None)
        runs.append(Run(run.method, run.folder, run.info, concept))
    for entry in config.concepts:
        path, _, word = entry.partition("=")
        concept_for(Path(path), word.strip() or None)
    if not concepts:
        raise ConfigError("nothing to evaluate: give runs=DIR,... (fine-tune outputs) and/or concepts=DIR,...")
    return list(concepts.values()), runs


def sampling_for(config: EvalConfig, protocol: Protocol | None, method: str, spatial: bool = False) -> Sampling:
    """The method's sampler, steps and guidance: the protocol's (its "+ spatial" rows' where it has one for them,
    or the custom defaults), with what the user set for every method on top."""
    cfg = config
    paper = protocol.sampling_for(method) if protocol is not None else CUSTOM_SAMPLING
    if spatial and protocol is not None and protocol.spatial_sampling is not None:
        paper = protocol.spatial_sampling
    given = [
        k
        for k, v in (
            ("scheduler", cfg.scheduler),
            ("steps", cfg.num_inference_steps),
            ("guidance", cfg.guidance_scale),
        )
        if v is not None
    ]
    return Sampling(
        cfg.scheduler or paper.scheduler,
        paper.steps if cfg.num_inference_steps is None else cfg.num_inference_steps,
        paper.guidance if cfg.guidance_scale is None else float(cfg.guidance_scale),
        paper.source + (f"; {', '.join(given)} set for every method" if given and protocol is not None else ""),
    )


def plan_rows(
    config: EvalConfig,
    protocol: Protocol | None,
    concepts: Sequence[ConceptFolder],
    runs: Sequence[Run],
    location_mlp: Callable[[], object],
) -> list[Row]:
    """Every row to generate, in table order: per concept its base row(s), then each method's ("+ spatial" rows
    where the protocol has them: the protocol's constant layout, and the location MLP's boxes when
    `location_mlp()` finds one)."""
    methods = config.methods
    spatial = protocol is not None and protocol.spatial_rows
    layouts = ["constant"] if spatial else []
    if spatial and location_mlp() is not None:
        layouts.append("location_mlp")
    elif spatial and (config.location_mlp or config.encoders):
        warnings.warn(
            "no location MLP (location_mlp=, or encoders with location_mlp/): only the constant-layout '+ spatial' "
            "rows are made",
            stacklevel=2,
        )
    out = []
    for concept in concepts:
        rows = []
        candidates = [("elite", None)] if "elite" in methods and config.encoders else []
        candidates += [("ip_adapter", None)] if "ip_adapter" in methods and config.ip_adapter else []
        candidates += [(run.method, run) for run in runs if run.concept is concept and run.method in methods]
        for method, run in candidates:
            label = method + (" + semantic" if run is not None and run.semantic_inversion else "")
            rows.append(Row(method, label, concept, run, sampling_for(config, protocol, method)))
            if method == "base" or not method_class(method).spatial_guidance:
                continue
            for layout in layouts:
                name = f"{label} + spatial" + (" (location MLP)" if layout == "location_mlp" else "")
                sampling = sampling_for(config, protocol, method, spatial=True)
                rows.append(Row(method, name, concept, run, sampling, spatial=True, layout=layout))
        if config.infusion_measures:  # a reference for each sampling the rows use
            samplings = list(dict.fromkeys(r.sampling for r in rows)) or [sampling_for(config, protocol, "base")]
            base = [
                Row("base", "base" if len(samplings) == 1 else f"base [{s.key}]", concept, None, s) for s in samplings
            ]
        else:
            base = (
                [Row("base", "base", concept, None, sampling_for(config, protocol, "base"))]
                if "base" in methods
                else []
            )
        out += base + rows
    return out
