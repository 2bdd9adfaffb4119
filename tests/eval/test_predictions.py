"""The predictions JSONL schema: validation with file:line messages, round trip."""

from __future__ import annotations

import json

import pytest

from opsd_jax.eval.predictions import (
    PredictionRecord,
    PredictionsError,
    parse_record,
    read_predictions,
    write_predictions,
)


def _write_lines(path, objects):
    path.write_text("".join((obj if isinstance(obj, str) else json.dumps(obj)) + "\n" for obj in objects))
    return path


def test_round_trip_and_ground_truth_forms(tmp_path):
    lines = [
        {"dataset": "MER2023", "id": "s1", "output": "happy", "ground_truth": "happy"},
        {"dataset": "ovmerdplus", "id": 7, "output": "x", "ground_truth": "[happy, 'sad']", "extra": 1},
        {
            "dataset": "ovmerdplus",
            "id": "8",
            "output": "x",
            "ground_truth": ["calm"],
            "labels": ["calm"],
            "extractor": "me",
        },
        {"dataset": "cmumosi", "id": "s1", "output": "x", "ground_truth": -2, "labels": [], "sentiment": "negative"},
    ]
    records = read_predictions(_write_lines(tmp_path / "p.jsonl", lines))
    assert records[0] == PredictionRecord("mer2023", "s1", "happy", "happy")
    assert records[1].id == "7" and records[1].ground_truth == ("happy", "sad")
    assert records[2].labels == ("calm",) and records[2].extractor == "me"
    assert records[3].ground_truth == -2.0 and records[3].sentiment == "negative"
    write_predictions(tmp_path / "out" / "q.jsonl", records)
    assert read_predictions(tmp_path / "out" / "q.jsonl") == records


@pytest.mark.parametrize(
    "line, message",
    [
        ({"id": "1", "output": "", "ground_truth": "happy"}, "missing field 'dataset'"),
        (
            {"dataset": "mer2025", "id": "1", "output": "", "ground_truth": "happy"},
            "unknown MER-UniBench dataset 'mer2025'",
        ),
        ({"dataset": "meld", "id": "1", "ground_truth": "joy"}, "missing field 'output'"),
        ({"dataset": "meld", "id": "1", "output": 3, "ground_truth": "joy"}, "field 'output' must be str"),
        (
            {"dataset": "meld", "id": "1", "output": "", "ground_truth": ["joy"]},
            "meld ground_truth must be one label word",
        ),
        (
            {"dataset": "sims", "id": "1", "output": "", "ground_truth": "positive"},
            "sims ground_truth must be a finite number",
        ),
        ({"dataset": "sims", "id": "1", "output": "", "ground_truth": True}, "field 'ground_truth' must be"),
        (
            {"dataset": "ovmerdplus", "id": "1", "output": "", "ground_truth": [1]},
            "ovmerdplus ground_truth must be a list of words",
        ),
        (
            {"dataset": "meld", "id": "1", "output": "", "ground_truth": "joy", "labels": "joy"},
            "field 'labels' must be list",
        ),
        ("[1, 2]", "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_lines_name_the_line_and_field(tmp_path, line, message):
    good = {"dataset": "meld", "id": "0", "output": "", "ground_truth": "joy"}
    path = _write_lines(tmp_path / "p.jsonl", [good, line])
    with pytest.raises(PredictionsError, match=f"p.jsonl:2: .*{message}"):
        read_predictions(path)


def test_duplicates_empty_and_missing_files(tmp_path):
    line = {"dataset": "meld", "id": "0", "output": "", "ground_truth": "joy"}
    with pytest.raises(PredictionsError, match="p.jsonl:3: duplicate sample meld/0 \\(first on line 1\\)"):
        read_predictions(_write_lines(tmp_path / "p.jsonl", [line, "", line]))
    with pytest.raises(PredictionsError, match="holds no records"):
        read_predictions(_write_lines(tmp_path / "e.jsonl", [""]))
    with pytest.raises(PredictionsError, match="does not exist"):
        read_predictions(tmp_path / "absent.jsonl")
    assert parse_record(line).dataset == "meld"
