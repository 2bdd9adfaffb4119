"""Per-dataset scoring dispatch and the benchmark mean over records."""

from __future__ import annotations

import pytest

from opsd_jax.eval import metrics
from opsd_jax.eval.datasets import DATASET_NAMES, get_dataset
from opsd_jax.eval.predictions import PredictionRecord
from opsd_jax.eval.scoring import score_dataset, score_records


def _record(dataset, index, truth, labels=(), sentiment=None):
    return PredictionRecord(dataset, str(index), "", truth, tuple(labels), sentiment, "test")


def test_each_task_uses_its_metric(any_wheels):
    wheels = any_wheels
    basic = [
        _record("meld", 0, "joy", ["happy"]),
        _record("meld", 1, "neutral", ["sad"]),
        _record("meld", 2, "anger", ["sad"]),
    ]
    score = score_dataset("meld", basic, wheels)
    assert score.metric == "HIT" and score.primary == pytest.approx(0.5, abs=1e-15)
    assert score.num_samples == 3 and score.expected_samples == 2610 and not score.complete
    assert [w["num_scored"] for w in score.details["per_wheel"]] == [2] * 5

    sentiment = [
        _record("sims", 0, 0.8, sentiment="positive"),
        _record("sims", 1, -0.2, sentiment="mixed"),
        _record("sims", 2, 0.0, sentiment="negative"),
    ]
    score = score_dataset("sims", sentiment, wheels)
    assert score.metric == "WAF" and score.primary == 1.0 and score.secondary == {"ACC": 1.0}
    assert score.details == {"num_scored": 2, "num_zero_ground_truth_dropped": 1, "num_unrecognised_sentiment": 1}

    fine = [_record("ovmerdplus", 0, ("happy", "sad"), ["joy"])]
    score = score_dataset("ovmerdplus", fine, wheels)
    expected = metrics.fine_grained_scores([["happy", "sad"]], [["joy"]], wheels)
    assert score.metric == "F_s" and score.primary == expected.f_score
    assert score.secondary == {"precision": expected.precision, "recall": expected.recall}


def test_unextracted_or_misfiled_records_are_errors(tiny_wheels):
    wheels = tiny_wheels
    with pytest.raises(ValueError, match="sims/0: not extracted yet"):
        score_dataset("sims", [_record("sims", 0, 1.0, ["happy"], sentiment=None)], wheels)
    with pytest.raises(ValueError, match="score_dataset\\(meld\\): got a record of sims"):
        score_dataset("meld", [_record("sims", 0, 1.0, sentiment="positive")], wheels)


def test_mean_needs_all_nine(tiny_wheels):
    wheels = tiny_wheels
    truths = {"basic": "sad", "sentiment": -1.0, "fine_grained": ("sad",)}
    records = [
        _record(name, 0, truths[get_dataset(name).task], ["sad"] if i % 2 else ["happy"], sentiment="negative")
        for i, name in enumerate(DATASET_NAMES)
    ]
    scores = score_records(records, wheels, "test")
    primaries = [scores.datasets[name].primary for name in DATASET_NAMES]
    assert scores.mean == pytest.approx(sum(primaries) / 9, abs=1e-15) and scores.partial_mean == scores.mean
    partial = score_records(records[:5], wheels, "test")
    assert partial.mean is None and partial.missing_datasets == list(DATASET_NAMES[5:])
    assert partial.partial_mean == pytest.approx(sum(primaries[:5]) / 5, abs=1e-15)
