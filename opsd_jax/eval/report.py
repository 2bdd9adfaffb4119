"""Benchmark report: `scores.json` (fractions in [0, 1]) and `report.md` (x100, paper style)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from opsd_jax.eval.datasets import DATASETS, REFERENCE_RESULTS
from opsd_jax.eval.scoring import BenchmarkScores

SCORES_FILE = "scores.json"
REPORT_FILE = "report.md"


def scores_to_json(scores: BenchmarkScores, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready dict of every figure, the extractor, the reference rows and `metadata`."""
    return {
        "benchmark": "MER-UniBench",
        "scale": "fractions in [0, 1]; report.md shows x100",
        "extractor": scores.extractor,
        "mean": scores.mean,
        "partial_mean": scores.partial_mean,
        "missing_datasets": scores.missing_datasets,
        "datasets": {
            name: {
                "display_name": next(d.display_name for d in DATASETS if d.name == name),
                "metric": score.metric,
                "primary": score.primary,
                "secondary": score.secondary,
                "num_samples": score.num_samples,
                "expected_samples": score.expected_samples,
                "complete": score.complete,
                "details": score.details,
            }
            for name, score in scores.datasets.items()
        },
        "references": [dataclasses.asdict(reference) for reference in REFERENCE_RESULTS],
        "metadata": dict(metadata or {}),
    }


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_report(scores: BenchmarkScores, title: str = "This run") -> str:
    """The headline table (this run and the reference rows), a per-dataset detail table and notes."""
    header = ["Model"] + [f"{d.display_name} ({d.primary_metric})" for d in DATASETS] + ["Mean"]
    run_row = [f"**{title}**"] + [
        _cell(100 * scores.datasets[d.name].primary) if d.name in scores.datasets else "–" for d in DATASETS
    ]
    run_row.append(_cell(None if scores.mean is None else 100 * scores.mean))
    rows = [run_row]
    for reference in REFERENCE_RESULTS:
        rows.append(
            [f"{reference.model} [{reference.source}]"]
            + [_cell(reference.per_dataset.get(d.name)) for d in DATASETS]
            + [_cell(reference.mean)]
        )
    lines = ["# MER-UniBench", "", f"Extractor: `{scores.extractor}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "| Dataset | Metric | Primary | Secondary | Samples | Test set |", "|---|---|---|---|---|---|"]
    for d in DATASETS:
        if d.name not in scores.datasets:
            lines.append(f"| {d.display_name} | {d.primary_metric} | – | – | 0 | {d.test_size} |")
            continue
        score = scores.datasets[d.name]
        secondary = ", ".join(f"{key} {100 * value:.2f}" for key, value in score.secondary.items()) or "–"
        flag = "" if score.complete else " (partial)"
        lines.append(
            f"| {d.display_name} | {score.metric} | {100 * score.primary:.2f} | {secondary} | "
            f"{score.num_samples}{flag} | {d.test_size} |"
        )
    lines.append("")
    if scores.mean is None:
        lines.append(
            f"Mean not reported: missing {', '.join(scores.missing_datasets)}. "
            f"Mean over the {len(scores.datasets)} present: {100 * scores.partial_mean:.2f}."
        )
    else:
        lines.append("Mean = plain mean of the nine primary scores (HIT x4, WAF x4, F_s x1).")
    if any(not score.complete for score in scores.datasets.values()):
        lines.append(
            "Datasets marked (partial) have fewer samples than the official test set; not comparable to the paper."
        )
    if "builtin" in scores.extractor:
        lines.append(
            "The built-in lexicon extractor is not the benchmark's LLM extractor (and its sentiment comes from a "
            "wheel-polarity vote), so these figures are indicative, not comparable to the paper's."
        )
    return "\n".join(lines) + "\n"


def write_report(
    scores: BenchmarkScores, out_dir: str | Path, metadata: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write scores.json and report.md into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / SCORES_FILE, out_dir / REPORT_FILE
    document = json.dumps(scores_to_json(scores, metadata), indent=2, allow_nan=False)
    json_path.write_text(document + "\n", encoding="utf-8")
    markdown_path.write_text(markdown_report(scores), encoding="utf-8")
    return json_path, markdown_path
