"""scores.json and report.md."""

from __future__ import annotations

import json

import pytest

from opsd_jax.eval.datasets import DATASET_NAMES
from opsd_jax.eval.report import markdown_report, scores_to_json, write_report
from opsd_jax.eval.scoring import BenchmarkScores, DatasetScore


def _scores(names, extractor="llm:qwen"):
    datasets = {
        name: DatasetScore(name, "HIT", 0.5 + i / 100, {"ACC": 0.25} if i == 4 else {}, 10, 10, {"per_wheel": []})
        for i, name in enumerate(names)
    }
    primaries = [score.primary for score in datasets.values()]
    mean = sum(primaries) / len(primaries)
    return BenchmarkScores(datasets, extractor, mean if len(names) == 9 else None, mean)


def test_markdown_has_run_reference_rows_and_extractor():
    text = markdown_report(_scores(DATASET_NAMES))
    lines = text.splitlines()
    assert "Extractor: `llm:qwen`" in text
    run_row = next(line for line in lines if line.startswith("| **This run**"))
    assert run_row.split(" | ")[1:3] == ["50.00", "51.00"] and run_row.endswith(f"{100 * (0.5 + 0.04):.2f} |")
    for needed in ("AffectGPT (A,V,T)", "74.77", "Emotion-LLaMA (A,V,T)", "64.17", "OmniOPSD", "84.19", "ACC 25.00"):
        assert needed in text
    assert "Mean = plain mean of the nine primary scores" in text and "indicative" not in text


def test_partial_run_and_builtin_extractor_are_flagged():
    text = markdown_report(_scores(DATASET_NAMES[:3], extractor="builtin-lexicon"))
    assert "Mean not reported: missing iemocapfour" in text and "Mean over the 3 present: 51.00" in text
    assert "not the benchmark's LLM extractor" in text


def test_write_report_json(tmp_path):
    json_path, markdown_path = write_report(_scores(DATASET_NAMES), tmp_path / "out", {"predictions": "p.jsonl"})
    data = json.loads(json_path.read_text())
    assert data == scores_to_json(_scores(DATASET_NAMES), {"predictions": "p.jsonl"})
    assert data["mean"] == pytest.approx(0.54) and data["extractor"] == "llm:qwen" and data["missing_datasets"] == []
    assert data["datasets"]["meld"]["display_name"] == "MELD" and data["datasets"]["meld"]["complete"] is True
    assert [r["mean"] for r in data["references"]] == [74.77, 64.17, 84.19]
    assert markdown_path.read_text() == markdown_report(_scores(DATASET_NAMES))
