"""MER-UniBench metrics, exactly as AffectGPT computes them (`ew_metric.py`, `evaluation.py`).

Pure functions. Set-level functions take labels already normalised per wheel; dataset-level functions
take raw label lists plus an `EmotionWheels` and average over the five wheels (level1).

* Fine-grained (OV-MERD+): per wheel k, over the samples whose normalised GT is non-empty,
  P_k = mean |G∩P| / |P| (0 when P is empty), R_k = mean |G∩P| / |G|, F_k = 2 P_k R_k / (P_k + R_k)
  (F from the dataset-level P and R, not a mean of per-sample F); F_s = mean_k F_k.
* Basic (MER2023, MER2024, MELD, IEMOCAP): HIT_k = mean |G∩P| over samples whose normalised GT is
  non-empty (neutral samples, and e.g. surprise under wheel 5, drop out); HIT = mean_k HIT_k.
* Sentiment (MOSI, MOSEI, SIMS, SIMS v2): the extractor's answer string maps positive -> 1,
  negative -> -1, neutral -> 0 and anything else -> 0; samples with GT == 0 are dropped; both sides are
  binarised as (value > 0); WAF = support-weighted F1 over the two classes, ACC = accuracy.
* Mean = plain mean of the nine primary scores.

One deliberate difference: where upstream divides 0/0 (P_k + R_k = 0, i.e. no overlap at all) it gets
NaN; here F_k is 0.0, its limit, so a degenerate model scores 0 instead of poisoning the mean.
An empty set of scorable samples is an error rather than NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from opsd_jax.eval.datasets import DATASET_NAMES
from opsd_jax.eval.wheels import WHEEL_NUMBERS, EmotionWheels, split_label_string

SENTIMENT_VALUES: dict[str, int] = {"positive": 1, "negative": -1, "neutral": 0}


# --------------------------------------------------------------------------------------------------
# Set level (one wheel, labels already normalised)
# --------------------------------------------------------------------------------------------------


def overlap_precision_recall(
    ground_truths: Sequence[frozenset[str]], predictions: Sequence[frozenset[str]]
) -> tuple[float, float, int]:
    """(P_k, R_k, number of samples scored) for one wheel; samples with an empty GT set are skipped."""
    _check_same_length(ground_truths, predictions)
    precisions, recalls = [], []
    for truth, predicted in zip(ground_truths, predictions):
        if not truth:
            continue
        overlap = len(truth & predicted)
        precisions.append(overlap / len(predicted) if predicted else 0.0)
        recalls.append(overlap / len(truth))
    if not precisions:
        raise ValueError("overlap_precision_recall: no sample has a ground truth that maps into this wheel")
    return float(np.mean(precisions)), float(np.mean(recalls)), len(precisions)


def f_from_precision_recall(precision: float, recall: float) -> float:
    """Harmonic mean; 0.0 where upstream would divide 0/0."""
    total = precision + recall
    return 2.0 * precision * recall / total if total > 0 else 0.0


def hit_rate(ground_truths: Sequence[frozenset[str]], predictions: Sequence[frozenset[str]]) -> tuple[float, int]:
    """(HIT_k, number of samples scored) for one wheel: mean |G∩P| over samples with a non-empty G."""
    _check_same_length(ground_truths, predictions)
    hits = [len(truth & predicted) for truth, predicted in zip(ground_truths, predictions) if truth]
    if not hits:
        raise ValueError("hit_rate: no sample has a ground truth that maps into this wheel (all neutral?)")
    return float(np.mean(hits)), len(hits)


# --------------------------------------------------------------------------------------------------
# Dataset level (raw labels, five wheels)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WheelScore:
    wheel: int
    num_scored: int
    # Fine-grained datasets fill precision, recall and f_score; basic datasets fill hit_rate.
    precision: float | None = None
    recall: float | None = None
    f_score: float | None = None
    hit_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class FineGrainedScores:
    f_score: float  # F_s, primary
    precision: float  # Precision_s
    recall: float  # Recall_s
    per_wheel: tuple[WheelScore, ...]


@dataclasses.dataclass(frozen=True)
class HitRateScores:
    hit_rate: float  # primary
    per_wheel: tuple[WheelScore, ...]


@dataclasses.dataclass(frozen=True)
class SentimentScores:
    weighted_f1: float  # WAF, primary
    accuracy: float
    num_scored: int  # after dropping GT == 0
    num_zero_dropped: int
    num_unrecognised: int  # predictions that were none of positive / negative / neutral (counted as 0)


def _normalised_labels(labels: str | Sequence[str]) -> list[str]:
    return [label.lower().strip() for label in split_label_string(labels)]


def fine_grained_scores(
    ground_truths: Sequence[str | Sequence[str]], predictions: Sequence[str | Sequence[str]], wheels: EmotionWheels
) -> FineGrainedScores:
    """F_s, Precision_s, Recall_s (OV-MERD+). Each element is a label list or a "[a, b]" string."""
    _check_same_length(ground_truths, predictions)
    truths = [_normalised_labels(labels) for labels in ground_truths]
    predicted = [_normalised_labels(labels) for labels in predictions]
    per_wheel = []
    for wheel in WHEEL_NUMBERS:
        precision, recall, count = overlap_precision_recall(
            [wheels.normalise(labels, wheel) for labels in truths],
            [wheels.normalise(labels, wheel) for labels in predicted],
        )
        per_wheel.append(WheelScore(wheel, count, precision, recall, f_from_precision_recall(precision, recall)))
    return FineGrainedScores(
        f_score=float(np.mean([score.f_score for score in per_wheel])),
        precision=float(np.mean([score.precision for score in per_wheel])),
        recall=float(np.mean([score.recall for score in per_wheel])),
        per_wheel=tuple(per_wheel),
    )


def hit_rate_scores(
    ground_truths: Sequence[str | Sequence[str]], predictions: Sequence[str | Sequence[str]], wheels: EmotionWheels
) -> HitRateScores:
    """HIT rate averaged over the five wheels (MER2023, MER2024, MELD, IEMOCAP). GT is a label word."""
    _check_same_length(ground_truths, predictions)
    truths = [_normalised_labels(labels) for labels in ground_truths]
    predicted = [_normalised_labels(labels) for labels in predictions]
    per_wheel = []
    for wheel in WHEEL_NUMBERS:
        rate, count = hit_rate(
            [wheels.normalise(labels, wheel) for labels in truths],
            [wheels.normalise(labels, wheel) for labels in predicted],
        )
        per_wheel.append(WheelScore(wheel, count, hit_rate=rate))
    return HitRateScores(hit_rate=float(np.mean([score.hit_rate for score in per_wheel])), per_wheel=tuple(per_wheel))


def sentiment_value(response: str) -> int:
    """The benchmark's fixed rule on the exact extractor answer: positive 1, negative -1, else 0."""
    return SENTIMENT_VALUES.get(response, 0)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of equal entries. y_true, y_pred: [N] (any comparable dtype)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_same_length(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence) -> np.ndarray:
    """F1 of each of `labels` (exact matches); an undefined one (the label neither true nor predicted)
    counts as 0. y_true, y_pred: [N] (a prediction may be None: it matches no label). Returns [len(labels)]."""
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    _check_same_length(y_true, y_pred)
    scores = []
    for label in labels:
        true_positive = np.sum((y_pred == label) & (y_true == label))
        false_positive = np.sum((y_pred == label) & (y_true != label))
        false_negative = np.sum((y_pred != label) & (y_true == label))
        denominator = 2 * true_positive + false_positive + false_negative
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return np.asarray(scores, dtype=np.float64)


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> float:
    """The unweighted mean of `per_class_f1` over `labels` (a label never predicted scores 0)."""
    return float(np.mean(per_class_f1(y_true, y_pred, labels)))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn's f1_score(average='weighted'): per-class F1 over the classes seen in either array,
    weighted by true support; an undefined per-class F1 counts as 0. y_true, y_pred: [N]."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_same_length(y_true, y_pred)
    if y_true.size == 0:
        raise ValueError("weighted_f1: empty input")
    labels = np.union1d(y_true, y_pred)
    support = np.asarray([np.sum(y_true == label) for label in labels])
    return float(np.sum(per_class_f1(y_true, y_pred, labels) * support) / y_true.size)


def sentiment_scores(ground_truths: Sequence[float], responses: Sequence[str]) -> SentimentScores:
    """WAF and ACC for one sentiment dataset. ground_truths: [N] valence; responses: the extractor's answers."""
    _check_same_length(ground_truths, responses)
    values = np.asarray(ground_truths, dtype=np.float64)
    predicted = np.asarray([sentiment_value(response) for response in responses], dtype=np.float64)
    keep = values != 0
    if not np.any(keep):
        raise ValueError("sentiment_scores: every ground-truth value is 0; nothing to score")
    y_true, y_pred = values[keep] > 0, predicted[keep] > 0
    return SentimentScores(
        weighted_f1=weighted_f1(y_true, y_pred),
        accuracy=accuracy(y_true, y_pred),
        num_scored=int(keep.sum()),
        num_zero_dropped=int((~keep).sum()),
        num_unrecognised=sum(response not in SENTIMENT_VALUES for response in responses),
    )


def benchmark_mean(primary_scores: Mapping[str, float]) -> float:
    """The MER-UniBench Mean: the plain mean of the nine datasets' primary scores."""
    missing = [name for name in DATASET_NAMES if name not in primary_scores]
    unknown = [name for name in primary_scores if name not in DATASET_NAMES]
    if missing or unknown:
        raise ValueError(f"benchmark_mean: needs exactly the nine datasets; missing {missing}, unknown {unknown}")
    return float(np.mean([primary_scores[name] for name in DATASET_NAMES]))


def _check_same_length(first: Sequence, second: Sequence) -> None:
    if len(first) != len(second):
        raise ValueError(f"ground truths and predictions differ in length: {len(first)} vs {len(second)}")
