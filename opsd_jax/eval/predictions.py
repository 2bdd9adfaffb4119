"""The predictions file: one JSON object per line, one line per (dataset, sample).

Schema (UTF-8 JSONL; unknown keys are kept but ignored):

    {"dataset": "mer2023",              # benchmark name, case-insensitive: mer2023 mer2024 meld iemocapfour
                                        #   cmumosi cmumosei sims simsv2 ovmerdplus
     "id": "sample_00001998",           # sample name, unique within its dataset
     "output": "<think>...</think><answer>worried, concerned</answer>",   # the model's free text
     "ground_truth": "worried",         # basic: the label word ("happy"; MELD "joy", IEMOCAP "anger", ...)
                                        # ovmerdplus: list of words, or the benchmark's "[a, b]" string
                                        #   ([] is allowed: like the benchmark's ['neutral'] it maps to
                                        #   nothing, so the sample is not scored)
                                        # sentiment: the valence number (MOSI/MOSEI in [-3, 3], SIMS in [-1, 1])
     "labels": ["worried", "concerned"],  # optional: labels already extracted from "output" (null = not yet)
     "sentiment": "negative",           # optional, sentiment datasets: the extractor's sentiment answer
     "extractor": "llm:Qwen2.5-7B-Instruct"}  # optional: what produced "labels" / "sentiment"

`opsd-jax eval score` fills in "labels" (and "sentiment") with the chosen extractor and can write the
completed file back, so a later re-score needs no extractor at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from opsd_jax.eval.datasets import get_dataset
from opsd_jax.eval.wheels import split_label_string

GroundTruth = str | tuple[str, ...] | float


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
    dataset: str
    id: str
    output: str
    ground_truth: GroundTruth
    labels: tuple[str, ...] | None = None
    sentiment: str | None = None
    extractor: str | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "dataset": self.dataset,
            "id": self.id,
            "output": self.output,
            "ground_truth": list(self.ground_truth) if isinstance(self.ground_truth, tuple) else self.ground_truth,
        }
        if self.labels is not None:
            record["labels"] = list(self.labels)
        if self.sentiment is not None:
            record["sentiment"] = self.sentiment
        if self.extractor is not None:
            record["extractor"] = self.extractor
        return record


class PredictionsError(ValueError):
    """A predictions line is malformed; the message names the file, line and field."""


def parse_record(data: Any, where: str = "record") -> PredictionRecord:
    """Validate one decoded JSON object against the schema. `where` prefixes error messages."""
    if not isinstance(data, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(data).__name__}")

    def field(name: str, kinds: tuple[type, ...], required: bool = True) -> Any:
        if name not in data or data[name] is None:
            if required:
                raise PredictionsError(f"{where}: missing field {name!r}")
            return None
        value = data[name]
        if not isinstance(value, kinds) or isinstance(value, bool):
            expected = " or ".join(kind.__name__ for kind in kinds)
            raise PredictionsError(f"{where}: field {name!r} must be {expected}, got {value!r}")
        return value

    try:
        dataset = get_dataset(field("dataset", (str,)))
    except ValueError as err:
        raise PredictionsError(f"{where}: {err}") from None
    sample_id = field("id", (str, int))
    output = field("output", (str,))
    raw_truth = field("ground_truth", (str, list, int, float))
    if dataset.task == "sentiment":
        if not isinstance(raw_truth, (int, float)) or not math.isfinite(raw_truth):
            raise PredictionsError(f"{where}: {dataset.name} ground_truth must be a finite number, got {raw_truth!r}")
        ground_truth: GroundTruth = float(raw_truth)
    elif dataset.task == "basic":
        if not isinstance(raw_truth, str) or not raw_truth.strip():
            raise PredictionsError(f"{where}: {dataset.name} ground_truth must be one label word, got {raw_truth!r}")
        ground_truth = raw_truth
    elif isinstance(raw_truth, str):
        ground_truth = tuple(split_label_string(raw_truth))
    elif isinstance(raw_truth, list) and all(isinstance(item, str) for item in raw_truth):
        ground_truth = tuple(raw_truth)
    else:
        raise PredictionsError(f"{where}: {dataset.name} ground_truth must be a list of words, got {raw_truth!r}")
    labels = field("labels", (list,), required=False)
    if labels is not None and not all(isinstance(label, str) for label in labels):
        raise PredictionsError(f"{where}: field 'labels' must be a list of strings, got {labels!r}")
    return PredictionRecord(
        dataset=dataset.name,
        id=str(sample_id),
        output=output,
        ground_truth=ground_truth,
        labels=tuple(labels) if labels is not None else None,
        sentiment=field("sentiment", (str,), required=False),
        extractor=field("extractor", (str,), required=False),
    )


def read_predictions(path: str | Path) -> list[PredictionRecord]:
    """Read and validate a predictions JSONL file; (dataset, id) pairs must be unique."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"predictions file {path} does not exist")
    records: list[PredictionRecord] = []
    seen: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise PredictionsError(f"{where}: not valid JSON ({err})") from None
            record = parse_record(data, where)
            key = (record.dataset, record.id)
            if key in seen:
                raise PredictionsError(
                    f"{where}: duplicate sample {record.dataset}/{record.id} (first on line {seen[key]})"
                )
            seen[key] = line_number
            records.append(record)
    if not records:
        raise PredictionsError(f"predictions file {path} holds no records")
    return records


def write_predictions(path: str | Path, records: Iterable[PredictionRecord]) -> None:
    """Write records as JSONL (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    temporary.replace(path)


def group_by_dataset(records: Sequence[PredictionRecord]) -> dict[str, list[PredictionRecord]]:
    """Records per dataset name, in file order."""
    groups: dict[str, list[PredictionRecord]] = {}
    for record in records:
        groups.setdefault(record.dataset, []).append(record)
    return groups
