"""`python -m inference.evaluate`: one protocol's evaluation, or all of them, from the command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from encoders.common.config import ConfigError, parse_config_cli
from encoders.common.files import atomic_write_text

from ..loading import (
    ModelLoadError,
    default_image_size,
    load_base_pipeline,
)
from .config import EvalConfig, protocol_config
from .generation import RowGenerator
from .overfitting import OverfittingMeasures
from .plan import plan_rows, resolve_concepts_and_runs
from .prompts import prompt_specs
from .protocols import Protocol, protocols_for
from .report import markdown_table, protocol_report, row_means, with_overall, write_results
from .scoring import Scorer


class Evaluator:
    """One protocol's evaluation (`evaluate()` runs several): the planned rows (`plan`), their images
    (`generation`), their scores (`scoring`, `overfitting`) and the results (`report`).

    `reuse`: an Evaluator of an earlier protocol whose pipeline, loaded methods and scoring models are taken over.
    """

    def __init__(self, config: EvalConfig, protocol: Protocol | None = None, reuse: Evaluator | None = None):
        self.config = config
        self.protocol = protocol
        self.out = Path(config.out)
        self.seeds = list(config.seeds) if config.seeds is not None else [0, 1, 2, 3, 4]
        if reuse is not None:
            self.pipe = reuse.pipe
        else:
            self.pipe = load_base_pipeline(
                config.base, device=config.device, dtype=config.dtype, safety_checker=False, allow_sdxl=True
            )
            self.pipe.set_progress_bar_config(disable=True)
        height, width = (int(config.resolution),) * 2 if config.resolution else default_image_size(self.pipe)
        noise_seed = config.noise_seed if config.noise_seed is not None else getattr(protocol, "noise_seed", None)
        self.generator = RowGenerator(
            config,
            self.pipe,
            self.seeds,
            height,
            width,
            reuse=None if reuse is None else reuse.generator,
            noise_seed=None if noise_seed is None or noise_seed < 0 else noise_seed,
        )
        self.scorer = reuse.scorer if reuse is not None else Scorer(config, self.pipe.device)
        self.scorer.use(protocol)  # this protocol's text rule, reference photos and DINO view
        self.concepts, self.runs = resolve_concepts_and_runs(config)
        self.notes: list[str] = []
        if self.generator.noise_seed is not None:
            self.notes.append(
                f"Initial noise: image k of every prompt is the k-th draw of one generator seeded "
                f"{self.generator.noise_seed} (the official notebook's way; noise_seed=-1: each image from its own "
                "seed)."
            )

    def protocol_measures(self, means: dict) -> dict:
        """The row means a paper's table has (its protocol's metrics); every one for the custom evaluation."""
        if self.protocol is None:
            return means
        scored = ("clip_t", "clip_i", "dino_i", "coi_likelihood")
        return {k: v for k, v in means.items() if k not in scored or k in self.protocol.metrics}

    def report(self, summary: Sequence[dict]) -> str:
        return protocol_report(self.protocol, self.seeds, summary, self.notes)

    def run(self) -> dict:
        """Plan the rows, generate and score each, and write the results; returns the summary."""
        self.out.mkdir(parents=True, exist_ok=True)
        per_image: list[dict] = []
        summary: list[dict] = []
        rows_for_grid: dict[str, list] = {}
        jobs = plan_rows(self.config, self.protocol, self.concepts, self.runs, lambda: self.generator.location_mlp)
        if not jobs:
            raise ConfigError(f"nothing to run: methods={self.config.methods} match no run/encoders/concept given")
        refs: dict[str, tuple] = {}
        overfitting = OverfittingMeasures(self.config, self.generator, self.seeds)
        if self.config.infusion_measures:
            self.notes.append("Fisher divergence and W2 " + overfitting.describe_reference())
        if self.protocol is not None and self.protocol.reference_photos == "dreambench":
            used = ", ".join(f"{c.name}: {self.scorer.reference_paths(c)[0].name}" for c in self.concepts)
            self.notes.append(f"One reference photo per subject ({used}); DINO after Resize 256 + CenterCrop 224.")
        for row in tqdm(jobs, desc=f"evaluate ({self.config.protocol})"):
            concept = row.concept
            if concept.name not in refs:
                refs[concept.name] = self.scorer.references(concept)
            clip_refs, dino_refs, first_photo = refs[concept.name]
            specs = prompt_specs(self.config, concept)
            items = self.generator.generate(row, specs)
            scores = self.scorer.score(row, items, clip_refs, dino_refs)
            for record in scores:
                per_image.append(
                    {
                        "row": row.name,
                        "method": row.method,
                        "run": "" if row.payload is None else str(row.payload.folder),
                        "concept": concept.name,
                        **record,
                    }
                )
            entry = {
                "method": row.name,
                "concept": concept.name,
                "sampling": row.sampling.describe(),
                "images": len(scores),
                **self.protocol_measures(row_means(scores)),
            }
            if self.config.infusion_measures:
                entry.update(overfitting.measure(row, items))
            if row.method != "base" or "base" in self.config.methods:
                summary.append(entry)
                first_seed = self.seeds[0]
                shown = [
                    (spec, image) for spec, seed, image, _ in items if seed == first_seed and spec.kind != "generic"
                ]
                shown = shown[: self.config.grid_prompts]
                columns = " | ".join(spec.template.format("*") for spec, _ in shown)
                fits = (
                    (len(shown) + 1) * (max(96, self.generator.width) + 4) // 6
                )  # the default font is ~6 px a character
                rows_for_grid.setdefault(concept.name, []).append(
                    (f"{row.name}: {columns}"[:fits], [first_photo], [image for _, image in shown])
                )
        summary = with_overall(summary)
        write_results(
            self.out, self.config, self.protocol, self.seeds, jobs, per_image, summary, rows_for_grid, self.notes
        )
        return {"summary": summary, "out": str(self.out), "protocol": self.config.protocol}


def evaluate(config: EvalConfig) -> dict:
    """Run `config.protocol`: the custom evaluation, one paper's, or all three (one pipeline, scoring
    models loaded once; `out/<protocol>/` each and one combined `out/results.md`)."""
    if config.protocol == "custom":
        return Evaluator(config).run()
    results, reports, evaluator = {}, [], None
    for protocol in protocols_for(config.protocol):
        evaluator = Evaluator(protocol_config(config, protocol), protocol, reuse=evaluator)
        results[protocol.name] = evaluator.run()
        reports.append(evaluator.report(results[protocol.name]["summary"]))
    atomic_write_text(Path(config.out) / "results.md", "# Evaluation\n\n" + "\n".join(reports))
    return {"protocols": results, "out": config.out}


def main(argv: list[str] | None = None) -> dict:
    config = parse_config_cli(
        EvalConfig,
        argv,
        prog="python -m inference.evaluate",
        description="Generate with base / ELITE / Textual Inversion / BaTex / Infusion on the same concepts, "
        "prompts and seeds, and score them (CLIP-T, CLIP-I, DINO-I, CoI likelihood, latent Fisher and W2); "
        "protocol=elite|compositional|infusion|textual_inversion|batex|dreambench|all reproduces each paper's "
        "evaluation.",
    )
    try:
        result = evaluate(config)
    except (ConfigError, FileNotFoundError, ValueError, ModelLoadError) as err:
        print(f"python -m inference.evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    if "summary" in result:
        print(markdown_table(result["summary"]))
        print(f"wrote {config.out}/results.md, summary.csv, scores.csv, results.json, grids/ and images/")
    else:
        print((Path(config.out) / "results.md").read_text(encoding="utf-8"))
        print(
            f"wrote {config.out}/results.md and, per protocol, {config.out}/<protocol>/ (tables, scores, grids, images)"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
