"""The nine MER-UniBench test sets, their task and primary metric, and published reference scores.

Order, names and sizes follow AffectGPT (`evaluation.py::func_return_scores_one` and the dataset
classes' test-size checks); reference scores are Table 2 of the AffectGPT paper (ICML 2025) and the
OmniOPSD paper's reported mean.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Task = Literal["basic", "sentiment", "fine_grained"]


@dataclasses.dataclass(frozen=True)
class BenchmarkDataset:
    name: str  # the benchmark's lowercase identifier, e.g. "mer2023"
    display_name: str
    task: Task
    test_size: int
    # The dataset's own label words (basic tasks); the benchmark's GT vocabulary, not a restriction on predictions.
    label_words: tuple[str, ...] = ()

    @property
    def primary_metric(self) -> str:
        return {"basic": "HIT", "sentiment": "WAF", "fine_grained": "F_s"}[self.task]


DATASETS: tuple[BenchmarkDataset, ...] = (
    BenchmarkDataset("mer2023", "MER2023", "basic", 411, ("neutral", "angry", "happy", "sad", "worried", "surprise")),
    BenchmarkDataset("mer2024", "MER2024", "basic", 1169, ("neutral", "angry", "happy", "sad", "worried", "surprise")),
    BenchmarkDataset(
        "meld", "MELD", "basic", 2610, ("anger", "joy", "sadness", "neutral", "disgust", "fear", "surprise")
    ),
    BenchmarkDataset("iemocapfour", "IEMOCAP", "basic", 1241, ("happy", "sad", "neutral", "anger")),
    BenchmarkDataset("cmumosi", "CMU-MOSI", "sentiment", 686),
    BenchmarkDataset("cmumosei", "CMU-MOSEI", "sentiment", 4659),
    BenchmarkDataset("sims", "CH-SIMS", "sentiment", 457),
    BenchmarkDataset("simsv2", "CH-SIMS v2", "sentiment", 1034),
    BenchmarkDataset("ovmerdplus", "OV-MERD+", "fine_grained", 532),
)
DATASET_NAMES: tuple[str, ...] = tuple(dataset.name for dataset in DATASETS)
_BY_NAME = {dataset.name: dataset for dataset in DATASETS}


def get_dataset(name: str) -> BenchmarkDataset:
    """Look a dataset up by its benchmark name, case-insensitively ("MER2023", "IEMOCAPFour", "ovmerdplus")."""
    dataset = _BY_NAME.get(str(name).strip().lower())
    if dataset is None:
        raise ValueError(f"dataset: unknown MER-UniBench dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return dataset


@dataclasses.dataclass(frozen=True)
class ReferenceResult:
    model: str
    source: str
    mean: float  # x100
    per_dataset: dict[str, float] = dataclasses.field(default_factory=dict)  # dataset name -> primary x100


def _table2_row(*scores: float) -> dict[str, float]:
    return dict(zip(DATASET_NAMES, scores, strict=True))


REFERENCE_RESULTS: tuple[ReferenceResult, ...] = (
    ReferenceResult(
        "AffectGPT (A,V,T)",
        "AffectGPT paper, Table 2",
        74.77,
        _table2_row(78.54, 78.80, 55.65, 60.54, 81.30, 80.90, 88.49, 86.18, 62.52),
    ),
    ReferenceResult(
        "Emotion-LLaMA (A,V,T)",
        "AffectGPT paper, Table 2",
        64.17,
        _table2_row(59.38, 73.62, 46.76, 55.47, 66.13, 67.66, 78.32, 77.23, 52.97),
    ),
    ReferenceResult("OmniOPSD", "OmniOPSD paper, reported mean", 84.19),
)
