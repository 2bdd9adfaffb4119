"""The benchmark's metrics: hand-computed cases, and AffectGPT's real extracted labels scored against
ground truth generated here, cross-checked with a straightforward independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opsd_jax.eval import metrics
from opsd_jax.eval.datasets import DATASET_NAMES, get_dataset
from tests.eval.conftest import load_openset, load_sentiment
from tests.eval.test_wheels import _independent_normalisation

F = frozenset


# -------------------------------------------------------------------------------------------------
# Hand-computed cases
# -------------------------------------------------------------------------------------------------


def test_overlap_precision_recall_by_hand():
    truths = [F({"a", "b"}), F({"a"}), F(), F({"c"})]
    preds = [F({"a", "c"}), F(), F({"a"}), F({"c", "d", "e", "f"})]
    # sample 1: P 1/2, R 1/2; sample 2: empty prediction -> P 0, R 0; sample 3 skipped (empty GT);
    # sample 4: P 1/4, R 1.
    precision, recall, count = metrics.overlap_precision_recall(truths, preds)
    assert count == 3
    assert precision == pytest.approx((0.5 + 0 + 0.25) / 3, abs=1e-15)
    assert recall == pytest.approx((0.5 + 0 + 1) / 3, abs=1e-15)
    # F from the dataset-level P and R, not the mean of per-sample F (which would be (0.5 + 0 + 0.4) / 3).
    assert metrics.f_from_precision_recall(precision, recall) == pytest.approx(2 * 0.25 * 0.5 / 0.75, abs=1e-15)


def test_f_without_overlap_is_zero_not_nan():
    assert metrics.f_from_precision_recall(0.0, 0.0) == 0.0


def test_hit_rate_by_hand():
    truths = [F({"happy"}), F(), F({"sad"}), F({"mad"})]
    preds = [F({"happy", "sad"}), F({"happy"}), F(), F({"mad"})]
    assert metrics.hit_rate(truths, preds) == (pytest.approx(2 / 3, abs=1e-15), 3)  # extra labels are not penalised


def test_no_scorable_sample_is_an_error():
    with pytest.raises(ValueError, match="no sample"):
        metrics.hit_rate([F()], [F({"happy"})])
    with pytest.raises(ValueError, match="no sample"):
        metrics.overlap_precision_recall([F()], [F()])
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        metrics.hit_rate([F(), F()], [F()])


def test_weighted_f1_and_accuracy_by_hand():
    y_true = np.array([True, True, True, False])
    y_pred = np.array([True, False, False, False])
    # class True: tp 1, fp 0, fn 2 -> F1 = 2/4 = 0.5, support 3; class False: tp 1, fp 2, fn 0 -> F1 = 2/4, support 1.
    assert metrics.weighted_f1(y_true, y_pred) == pytest.approx(0.5, abs=1e-15)
    assert metrics.accuracy(y_true, y_pred) == 0.5
    # A class never predicted has F1 0 (sklearn's zero_division default); weights are true supports.
    y_true, y_pred = np.array([True, True, False]), np.array([True, True, True])
    assert metrics.weighted_f1(y_true, y_pred) == pytest.approx((2 / 3) * (2 * 2 / (2 * 2 + 1)), abs=1e-15)


def test_sentiment_scores_by_hand():
    ground_truth = [1.2, -0.4, 0.0, 2.0, -3.0, 0.6]
    responses = ["positive", "neutral", "positive", "mixed", "negative", "Positive"]
    # GT 0 dropped -> 5 samples; y = [T, F, T, F, T]; neutral, "mixed" and "Positive" (case matters) -> 0 -> False:
    # y_hat = [T, F, F, F, F].
    result = metrics.sentiment_scores(ground_truth, responses)
    assert (result.num_scored, result.num_zero_dropped, result.num_unrecognised) == (5, 1, 2)
    assert result.accuracy == pytest.approx(3 / 5, abs=1e-15)
    f1_true, f1_false = 2 * 1 / (2 * 1 + 0 + 2), 2 * 2 / (2 * 2 + 2 + 0)
    assert result.weighted_f1 == pytest.approx((3 * f1_true + 2 * f1_false) / 5, abs=1e-15)
    assert [metrics.sentiment_value(r) for r in ("positive", "negative", "neutral", "mixed", "")] == [1, -1, 0, 0, 0]
    with pytest.raises(ValueError, match="every ground-truth value is 0"):
        metrics.sentiment_scores([0.0], ["positive"])


def test_fine_grained_scores_by_hand(any_wheels):
    wheels = any_wheels
    ground_truth = [["happy", "angry"], ["neutral"], ["surprise"]]
    predictions = ["[joy, sad]", "[happy]", []]
    # Sample 1 in every wheel: G = {happy-ish, angry-ish}, P = {happy-ish, sad} -> P 1/2, R 1/2.
    # Sample 2: neutral maps to nothing -> skipped everywhere.
    # Sample 3: surprise maps in wheels 1-4 (empty prediction -> 0, 0) and to nothing in wheel 5 (skipped).
    result = metrics.fine_grained_scores(ground_truth, predictions, wheels)
    assert [w.num_scored for w in result.per_wheel] == [2, 2, 2, 2, 1]
    assert [w.f_score for w in result.per_wheel] == pytest.approx([0.25] * 4 + [0.5], abs=1e-15)
    assert result.f_score == pytest.approx(0.3, abs=1e-15)
    assert result.precision == pytest.approx(0.3, abs=1e-15) and result.recall == pytest.approx(0.3, abs=1e-15)


def test_hit_rate_scores_by_hand(any_wheels):
    wheels = any_wheels
    ground_truth = ["happy", "neutral", "surprise", "disgust"]
    predictions = [["joy", "sad"], ["happy"], [], ["disgust"]]
    # Wheels 1, 2, 4: 3 scored (neutral dropped), hits 1 + 0 + 1 -> 2/3. Wheel 3: disgust maps to nothing,
    # 2 scored, hits 1 + 0 -> 1/2. Wheel 5: surprise and disgust map to nothing, 1 scored, 1 hit.
    result = metrics.hit_rate_scores(ground_truth, predictions, wheels)
    assert [w.num_scored for w in result.per_wheel] == [3, 3, 2, 3, 1]
    assert [w.hit_rate for w in result.per_wheel] == pytest.approx([2 / 3, 2 / 3, 1 / 2, 2 / 3, 1], abs=1e-15)
    assert result.hit_rate == pytest.approx(0.7, abs=1e-15)


def test_benchmark_mean_is_the_plain_mean_of_nine():
    scores = {name: (i + 1) / 10 for i, name in enumerate(DATASET_NAMES)}
    assert metrics.benchmark_mean(scores) == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError, match="missing \\['ovmerdplus'\\]"):
        metrics.benchmark_mean({name: 0.5 for name in DATASET_NAMES[:-1]})


# -------------------------------------------------------------------------------------------------
# AffectGPT's released predictions against generated ground truth, and an independent implementation
# -------------------------------------------------------------------------------------------------


def _parse(text):
    body = text[1:] if text.startswith("[") else text
    body = body[:-1] if body.endswith("]") else body
    return [part.strip().lower() for part in body.replace("'", ",").replace('"', ",").split(",") if part.strip()]


@pytest.fixture(scope="module")
def reference(wheel_dir):
    return _independent_normalisation(wheel_dir)[1]


def _independent_sets(labels, backward):
    return [{m for m in (backward(label, k) for label in labels) if m is not None} for k in range(1, 6)]


@pytest.mark.parametrize("dataset", ["mer2023", "mer2024", "meld", "iemocapfour"])
def test_hit_rate_on_affectgpt_predictions(dataset, wheels, reference):
    names, items = load_openset(dataset)
    assert len(names) == get_dataset(dataset).test_size
    rng = np.random.default_rng(sum(map(ord, dataset)))
    ground_truth = list(rng.choice(get_dataset(dataset).label_words, size=len(names)))
    result = metrics.hit_rate_scores(ground_truth, items, wheels)

    truth_sets = [_independent_sets([truth], reference) for truth in ground_truth]
    pred_sets = [_independent_sets(_parse(item), reference) for item in items]
    per_wheel = []
    for k in range(5):
        hits = [len(g[k] & p[k]) for g, p in zip(truth_sets, pred_sets) if g[k]]
        assert result.per_wheel[k].num_scored == len(hits)
        per_wheel.append(sum(hits) / len(hits))
    assert result.hit_rate == pytest.approx(sum(per_wheel) / 5, abs=1e-12)
    assert 0.05 < result.hit_rate < 0.95  # a real mixture of hits and misses, not a degenerate case
    # Every neutral sample leaves every wheel.
    assert all(w.num_scored <= len(names) - ground_truth.count("neutral") for w in result.per_wheel)


def test_fine_grained_on_affectgpt_predictions(wheels, reference):
    names, items = load_openset("ovmerdplus")
    assert len(names) == 532
    rng = np.random.default_rng(0)
    vocabulary = sorted({label for item in items for label in _parse(item)})
    ground_truth = [list(rng.choice(vocabulary, size=rng.integers(0, 5), replace=False)) for _ in names]
    # Make some ground truths overlap the prediction so the score is not near zero.
    ground_truth = [
        truth + _parse(item)[:1] if i % 2 else truth for i, (truth, item) in enumerate(zip(ground_truth, items))
    ]
    result = metrics.fine_grained_scores(ground_truth, items, wheels)

    truth_sets = [_independent_sets([t.lower() for t in truth], reference) for truth in ground_truth]
    pred_sets = [_independent_sets(_parse(item), reference) for item in items]
    f_scores, precisions, recalls = [], [], []
    for k in range(5):
        p_list, r_list = [], []
        for g_all, p_all in zip(truth_sets, pred_sets):
            g, p = g_all[k], p_all[k]
            if not g:
                continue
            p_list.append(len(g & p) / len(p) if p else 0.0)
            r_list.append(len(g & p) / len(g))
        precision, recall = sum(p_list) / len(p_list), sum(r_list) / len(r_list)
        (
            precisions.append(precision),
            recalls.append(recall),
            f_scores.append(2 * precision * recall / (precision + recall)),
        )
    assert result.f_score == pytest.approx(sum(f_scores) / 5, abs=1e-12)
    assert result.precision == pytest.approx(sum(precisions) / 5, abs=1e-12)
    assert result.recall == pytest.approx(sum(recalls) / 5, abs=1e-12)
    assert 0.1 < result.f_score < 0.9


def _reference_weighted_f1(y_true, y_pred):
    """Textbook weighted F1 from per-class precision and recall."""
    total = 0.0
    for label in set(y_true) | set(y_pred):
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        predicted = sum(p == label for p in y_pred)
        actual = sum(t == label for t in y_true)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * actual
    return total / len(y_true)


@pytest.mark.parametrize("dataset", ["cmumosi", "cmumosei", "sims", "simsv2"])
def test_sentiment_on_affectgpt_predictions(dataset):
    names, responses = load_sentiment(dataset)
    assert len(names) == get_dataset(dataset).test_size
    rng = np.random.default_rng(len(names))
    scale = 3.0 if dataset.startswith("cmu") else 1.0
    ground_truth = np.round(rng.uniform(-scale, scale, size=len(names)), 1)
    ground_truth[rng.choice(len(names), size=len(names) // 10, replace=False)] = 0.0
    result = metrics.sentiment_scores(list(ground_truth), responses)

    keep = [i for i, value in enumerate(ground_truth) if value != 0]
    y_true = [ground_truth[i] > 0 for i in keep]
    y_pred = [{"positive": 1, "negative": -1}.get(responses[i], 0) > 0 for i in keep]
    assert result.num_scored == len(keep) and result.num_zero_dropped == len(names) - len(keep)
    assert result.num_unrecognised == sum(r not in ("positive", "negative", "neutral") for r in responses) > 0
    assert result.accuracy == pytest.approx(sum(t == p for t, p in zip(y_true, y_pred)) / len(keep), abs=1e-12)
    assert result.weighted_f1 == pytest.approx(_reference_weighted_f1(y_true, y_pred), abs=1e-12)
    assert not math.isnan(result.weighted_f1)
