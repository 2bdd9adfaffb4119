"""Score extracted predictions: one primary (and secondary) figure per dataset, and the benchmark mean."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from opsd_jax.eval import metrics
from opsd_jax.eval.datasets import DATASET_NAMES, get_dataset
from opsd_jax.eval.predictions import PredictionRecord, group_by_dataset
from opsd_jax.eval.wheels import EmotionWheels


@dataclasses.dataclass(frozen=True)
class DatasetScore:
    dataset: str
    metric: str  # HIT, WAF or F_s
    primary: float  # in [0, 1]
    secondary: dict[str, float]  # ACC (sentiment), precision / recall (fine-grained)
    num_samples: int
    expected_samples: int  # the official test-set size
    details: dict[str, object]  # per-wheel figures, dropped / unrecognised counts

    @property
    def complete(self) -> bool:
        return self.num_samples == self.expected_samples


@dataclasses.dataclass(frozen=True)
class BenchmarkScores:
    datasets: dict[str, DatasetScore]  # benchmark order
    extractor: str
    mean: float | None  # the MER-UniBench Mean, only when all nine datasets are present
    partial_mean: float  # mean over the datasets present

    @property
    def missing_datasets(self) -> list[str]:
        return [name for name in DATASET_NAMES if name not in self.datasets]


def score_dataset(name: str, records: Sequence[PredictionRecord], wheels: EmotionWheels) -> DatasetScore:
    """Score one dataset's records; each must carry `labels` (and `sentiment` for sentiment datasets)."""
    dataset = get_dataset(name)
    for record in records:
        if record.dataset != dataset.name:
            raise ValueError(f"score_dataset({dataset.name}): got a record of {record.dataset} ({record.id})")
        if record.labels is None or (dataset.task == "sentiment" and record.sentiment is None):
            raise ValueError(f"{record.dataset}/{record.id}: not extracted yet (labels / sentiment missing)")
    truths = [record.ground_truth for record in records]
    common = dict(
        dataset=dataset.name,
        metric=dataset.primary_metric,
        num_samples=len(records),
        expected_samples=dataset.test_size,
    )
    if dataset.task == "sentiment":
        result = metrics.sentiment_scores(truths, [record.sentiment for record in records])
        return DatasetScore(
            primary=result.weighted_f1,
            secondary={"ACC": result.accuracy},
            details={
                "num_scored": result.num_scored,
                "num_zero_ground_truth_dropped": result.num_zero_dropped,
                "num_unrecognised_sentiment": result.num_unrecognised,
            },
            **common,
        )
    predictions = [record.labels for record in records]
    if dataset.task == "basic":
        result = metrics.hit_rate_scores(truths, predictions, wheels)
        return DatasetScore(
            primary=result.hit_rate,
            secondary={},
            details={"per_wheel": [dataclasses.asdict(score) for score in result.per_wheel]},
            **common,
        )
    result = metrics.fine_grained_scores(truths, predictions, wheels)
    return DatasetScore(
        primary=result.f_score,
        secondary={"precision": result.precision, "recall": result.recall},
        details={"per_wheel": [dataclasses.asdict(score) for score in result.per_wheel]},
        **common,
    )


def score_records(records: Sequence[PredictionRecord], wheels: EmotionWheels, extractor: str) -> BenchmarkScores:
    """Score every dataset present in `records` and the mean."""
    groups = group_by_dataset(records)
    scores = {name: score_dataset(name, groups[name], wheels) for name in DATASET_NAMES if name in groups}
    primary = {name: score.primary for name, score in scores.items()}
    return BenchmarkScores(
        datasets=scores,
        extractor=extractor,
        mean=metrics.benchmark_mean(primary) if len(primary) == len(DATASET_NAMES) else None,
        partial_mean=sum(primary.values()) / len(primary),
    )
