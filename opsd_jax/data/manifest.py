"""The clip manifest: one JSON object per line (JSONL), one line per clip.

Example line (wrapped here):

    {"id": "sample_00000001", "video": "video/sample_00000001.mp4", "audio": "audio/sample_00000001.wav",
     "subtitle": "I can't believe you did that.", "label": "angry", "dataset": "mer2023",
     "task": "basic", "split": "test"}

Fields:

| field       | type                 | required | meaning                                                            |
|-------------|----------------------|----------|--------------------------------------------------------------------|
| `id`        | string               | yes      | unique within the manifest                                         |
| `video`     | path string          | yes      | the clip's video; a relative path resolves against the manifest's directory |
| `audio`     | path string or null  | no       | a separate audio file (e.g. the datasets' pre-extracted wav); null or absent = the video's own audio track |
| `subtitle`  | string               | no       | what is said in the clip; may be empty (default "")               |
| `task`      | string               | yes      | `basic`, `fine_grained` or `sentiment`                             |
| `label`     | string               | for `basic` | one basic emotion, e.g. `happy`                                |
| `labels`    | list of strings      | for `fine_grained` | open-vocabulary emotions, at least one                  |
| `sentiment` | number               | for `sentiment` | valence, e.g. in [-3, 3] (CMU-MOSI) or [-1, 1] (CH-SIMS)     |
| `dataset`   | string               | no       | the source dataset, e.g. `mer2023` (default "")                    |
| `split`     | string               | no       | letters, digits and `_` (it names a TFDS split); default `train`   |
| `rationale` | string or null       | no       | an evidence-aware explanation of the label (written by `opsd_jax.rationales`) |

A clip may carry label fields beyond the one its task needs. Blank lines are ignored; unknown fields are an
error (they are usually typos). Every error names the file, the line number and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opsd_jax.data.jsonl import decode_utf8

TASKS = ("basic", "fine_grained", "sentiment")
SPLIT_PATTERN = re.compile(r"^\w+$")
_NULL_IS_DEFAULT = ("subtitle", "dataset", "split")
FIELDS = ("id", "video", "audio", "subtitle", "task", "label", "labels", "sentiment", "dataset", "split", "rationale")


class ManifestError(ValueError):
    """A manifest line that cannot become a clip; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """One manifest record. `video` and `audio` are paths as given (resolved ones after `read_manifest`)."""

    id: str
    video: Path
    task: str
    audio: Path | None = None
    subtitle: str = ""
    label: str | None = None
    labels: tuple[str, ...] | None = None
    sentiment: float | None = None
    dataset: str = ""
    split: str = "train"
    rationale: str | None = None

    def __post_init__(self):
        _expect_text(self.id, "id", allow_empty=False)
        if isinstance(self.video, str):
            object.__setattr__(self, "video", Path(_expect_text(self.video, "video", allow_empty=False)))
        elif not isinstance(self.video, Path):
            raise _field_error("video", "a path string", self.video)
        if isinstance(self.audio, str):
            object.__setattr__(self, "audio", Path(_expect_text(self.audio, "audio", allow_empty=False)))
        elif self.audio is not None and not isinstance(self.audio, Path):
            raise _field_error("audio", "a path string or null", self.audio)
        _expect_text(self.subtitle, "subtitle")
        _expect_text(self.dataset, "dataset")
        _expect_text(self.split, "split", allow_empty=False)
        if not SPLIT_PATTERN.match(self.split):
            raise _field_error("split", "letters, digits and '_' only (it names a dataset split)", self.split)
        labels, sentiment = check_labels(self.task, self.label, self.labels, self.sentiment)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "sentiment", sentiment)
        if self.rationale is not None:
            _expect_text(self.rationale, "rationale")

    def resolved(self, base_dir: Path) -> Clip:
        """This clip with relative media paths made absolute against `base_dir`."""
        base_dir = Path(base_dir)
        return dataclasses.replace(
            self,
            video=(base_dir / self.video).resolve(),
            audio=None if self.audio is None else (base_dir / self.audio).resolve(),
        )

    def to_json(self, base_dir: Path | None = None) -> dict[str, Any]:
        """The manifest record; media under `base_dir` are written relative to it (portable manifests)."""
        record: dict[str, Any] = {"id": self.id, "video": _portable(self.video, base_dir)}
        record["audio"] = None if self.audio is None else _portable(self.audio, base_dir)
        record.update(subtitle=self.subtitle, task=self.task)
        if self.label is not None:
            record["label"] = self.label
        if self.labels is not None:
            record["labels"] = list(self.labels)
        if self.sentiment is not None:
            record["sentiment"] = self.sentiment
        record.update(dataset=self.dataset, split=self.split)
        if self.rationale is not None:
            record["rationale"] = self.rationale
        return record


def check_labels(task: str, label: str | None, labels, sentiment) -> tuple[tuple[str, ...] | None, float | None]:
    """Checks the task and its label fields (the task's own one must be present); returns (labels as a
    tuple, sentiment as a float). Raises `ManifestError` naming the field."""
    if task not in TASKS:
        raise _field_error("task", f"one of {', '.join(TASKS)}", task)
    if label is not None:
        _expect_text(label, "label", allow_empty=False)
    if labels is not None:
        if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
            raise _field_error("labels", "a list of strings", labels)
        for index, item in enumerate(labels):
            _expect_text(item, f"labels[{index}]", allow_empty=False)
        labels = tuple(labels)
    if sentiment is not None:
        if isinstance(sentiment, bool) or not isinstance(sentiment, (int, float)) or not math.isfinite(sentiment):
            raise _field_error("sentiment", "a finite number", sentiment)
        sentiment = float(sentiment)
    needed = {"basic": "label", "fine_grained": "labels", "sentiment": "sentiment"}[task]
    value = {"label": label, "labels": labels, "sentiment": sentiment}[needed]
    if value is None or (needed == "labels" and not value):
        raise ManifestError(
            f"field '{needed}': missing; task '{task}' needs a {needed} "
            f"({'non-empty list' if needed == 'labels' else 'value'})"
        )
    return labels, sentiment


def _field_error(field: str, expected: str, value: Any) -> ManifestError:
    return ManifestError(f"field '{field}': expected {expected}, got {value!r}")


def _expect_text(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _field_error(field, "a string", value)
    if not allow_empty and not value.strip():
        raise _field_error(field, "a non-empty string", value)
    return value


def _portable(path: Path, base_dir: Path | None) -> str:
    if base_dir is None or not path.is_absolute():
        return str(path)
    base_dir = Path(base_dir).resolve()
    return path.relative_to(base_dir).as_posix() if path.is_relative_to(base_dir) else str(path)


def clip_from_record(record: Any) -> Clip:
    """A parsed JSON object -> `Clip` (paths as written); raises `ManifestError` naming the field."""
    if not isinstance(record, dict):
        raise ManifestError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ManifestError(f"field '{unknown[0]}': unknown field; expected only {', '.join(FIELDS)}")
    for field in ("id", "video", "task"):
        if field not in record:
            raise ManifestError(f"field '{field}': missing (required)")
    # null means "the default" for the fields that have a non-null default
    values = {key: value for key, value in record.items() if not (value is None and key in _NULL_IS_DEFAULT)}
    return Clip(**values)


def scan_manifest(path: str | Path) -> tuple[list[Clip], list[tuple[int, str | None, str]]]:
    """Every readable clip of a JSONL manifest (media paths resolved against its directory) and every
    line that is not one: `(line number, its id when it has one, the error)`. A duplicate id is an
    error of its later line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    clips: list[Clip] = []
    problems: list[tuple[int, str | None, str]] = []
    first_line: dict[str, int] = {}
    text = decode_utf8(path.read_bytes(), path, ManifestError)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append((number, None, f"invalid JSON ({error.msg} at column {error.colno})"))
            continue
        record_id = record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None
        try:
            clip = clip_from_record(record)
        except ManifestError as error:
            problems.append((number, record_id, str(error)))
            continue
        if clip.id in first_line:
            problems.append(
                (number, clip.id, f"field 'id': duplicate id {clip.id!r} (first on line {first_line[clip.id]})")
            )
            continue
        first_line[clip.id] = number
        clips.append(clip.resolved(path.parent))
    return clips, problems


def read_manifest(path: str | Path) -> list[Clip]:
    """All clips of a JSONL manifest, media paths resolved against its directory, ids unique; the first
    bad line raises `ManifestError` naming the file, line and field."""
    clips, problems = scan_manifest(path)
    if problems:
        number, _, message = problems[0]
        raise ManifestError(f"{path}:{number}: {message}")
    return clips


def write_manifest(path: str | Path, clips: Iterable[Clip]) -> Path:
    """Writes `clips` as JSONL (media under the manifest's directory as relative paths); ids must be unique."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lines = []
    for index, clip in enumerate(clips):
        if clip.id in seen:
            raise ManifestError(f"{path}: clip {index}: field 'id': duplicate id {clip.id!r}")
        seen.add(clip.id)
        lines.append(json.dumps(clip.to_json(path.parent), ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
