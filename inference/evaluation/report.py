"""The results: row means, the markdown table (headed by the protocol), and the files written under `out`."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from encoders.common.config import config_to_dict
from encoders.common.files import atomic_write_json, atomic_write_text
from encoders.common.version import package_version

from ..pictures import make_grid, save_image_atomic
from .config import EvalConfig
from .plan import Row, file_slug
from .protocols import Protocol


def row_means(rows: list[dict]) -> dict:
    """Row means: CLIP-T over the prompts about the concept (the CoI prompts where there are no others),
    CLIP-I / DINO-I over every prompt with the concept, CoI over the CoI prompts; generic prompts only
    feed the overfitting measures."""
    about = [r for r in rows if r["kind"] != "generic"]
    plain = [r for r in about if r["kind"] == "concept"] or about

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    out = {
        "clip_t": mean(plain, "clip_t"),
        "clip_i": mean(about, "clip_i"),
        "dino_i": mean(about, "dino_i"),
        "coi_likelihood": mean(about, "coi_hit"),
    }
    guided = mean(about, "location_loss_last")
    if guided is not None:
        out["location_loss"] = guided
    return out


def with_overall(summary: list[dict]) -> list[dict]:
    """Append one `all` row per method (mean over its concepts) when there are several concepts."""
    concepts = {row["concept"] for row in summary}
    if len(concepts) < 2:
        return summary
    out = list(summary)
    for method in dict.fromkeys(row["method"] for row in summary):
        rows = [r for r in summary if r["method"] == method]
        overall = {
            "method": method,
            "concept": "all",
            "sampling": rows[0].get("sampling"),
            "images": sum(r["images"] for r in rows),
        }
        for key in rows[0]:
            if key in overall or key == "concept":
                continue
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            overall[key] = sum(values) / len(values) if values else None
        out.append(overall)
    return out


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


COLUMNS = (
    ("method", "method"),
    ("concept", "concept"),
    ("sampling", "sampling"),
    ("images", "images"),
    ("clip_t", "CLIP-T"),
    ("clip_i", "CLIP-I"),
    ("dino_i", "DINO-I"),
    ("coi_likelihood", "CoI likelihood"),
    ("location_loss", "L_loc (last step)"),
    ("fisher_generic", "latent Fisher, generic prompts"),
    ("fisher_class", "latent Fisher, class-word prompts"),
    ("w2_generic", "latent W2, generic prompts"),
    ("w2_concept", "latent W2, concept prompts"),
)


def markdown_table(summary: Sequence[dict], metrics: Sequence[str] = ()) -> str:
    """The summary as a markdown table (columns without any value are left out); `metrics` first, in that order
    (a paper's table order, e.g. DreamBench's DINO, CLIP-I, CLIP-T), after the row's name and sampling."""
    order = {key: k for k, key in enumerate(metrics)}
    columns = sorted(
        COLUMNS, key=lambda c: (c[0] not in ("method", "concept", "sampling", "images"), order.get(c[0], 99))
    )
    present = [(key, title) for key, title in columns if any(row.get(key) is not None for row in summary)]
    lines = ["| " + " | ".join(title for _, title in present) + " |", "|" + "---|" * len(present)]
    for row in summary:
        lines.append("| " + " | ".join(_fmt(row.get(key)) or "-" for key, _ in present) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    out: Path,
    config: EvalConfig,
    protocol: Protocol | None,
    seeds: Sequence[int],
    jobs: Sequence[Row],
    per_image: list[dict],
    summary: list[dict],
    grids: dict[str, list],
    notes: Sequence[str] = (),
) -> None:
    """scores.csv, summary.csv, results.md, results.json and grids/ under `out`."""

    def write_csv(rows: list[dict], path: Path) -> None:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows([{k: _fmt(row.get(k)) for k in keys} for row in rows])
        atomic_write_text(path, buffer.getvalue())

    write_csv(per_image, out / "scores.csv")
    write_csv(summary, out / "summary.csv")
    atomic_write_text(out / "results.md", protocol_report(protocol, seeds, summary, notes))
    atomic_write_json(
        out / "results.json",
        {
            "config": config_to_dict(config),
            "protocol": None if protocol is None else asdict(protocol),
            "seeds": seeds,
            "rows": [row.record() for row in jobs],
            "package_version": package_version(),
            "summary": summary,
        },
    )
    for name, rows in grids.items():
        save_image_atomic(make_grid(rows), out / "grids" / f"{file_slug(name)}.png")


def protocol_report(
    protocol: Protocol | None, seeds: Sequence[int], summary: Sequence[dict], notes: Sequence[str] = ()
) -> str:
    """The markdown table, headed by the protocol and its settings when it is a paper's, then the notes."""
    tail = "".join(f"\n{note}\n" for note in notes)
    if protocol is None:
        return markdown_table(summary) + tail
    p = protocol
    lines = [
        f"## {p.name}: {p.paper}",
        "",
        f"{len(seeds)} images per prompt (seeds {', '.join(map(str, seeds))}); "
        f"each row's sampler in its `sampling` column; CLIP-T = {p.text_alignment.describe()}.",
        "",
    ]
    return "\n".join(lines) + markdown_table(summary, p.metrics) + tail
