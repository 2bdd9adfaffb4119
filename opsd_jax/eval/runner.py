"""MER-UniBench answers from a checkpoint: benchmark clips -> the jitted sampler -> the predictions file.

    clips of the requested datasets (manifests, or built TFDS `mer` datasets; one split)
      -> leave out the clips already in the predictions file (resume)
      -> batches: decoded media + the student prompt (`opsd_jax.generation`) -> greedy answers
      -> appended to the predictions JSONL (`opsd_jax.eval.predictions` schema) batch by batch

A crash loses at most the batch in flight; a rerun with the same output directory generates only the
missing clips. `generation.json` beside the predictions records what made them (checkpoint, prompt,
decoding and media settings), and a rerun with other settings is refused rather than mixed in.
Extraction, scoring and the report are `opsd-jax eval score`'s (`opsd_jax.eval.cli`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from opsd_jax.data.builders import load_split
from opsd_jax.data.jsonl import read_complete
from opsd_jax.data.manifest import Clip, read_manifest
from opsd_jax.data.pipeline import MODEL_INPUTS, ProcessorInputs
from opsd_jax.eval.datasets import DATASET_NAMES, BenchmarkDataset, get_dataset
from opsd_jax.eval.predictions import GroundTruth, PredictionRecord, PredictionsError, parse_record
from opsd_jax.generation import GenerationSettings, Reader, answer, batches, clip_inputs

PREDICTIONS_FILE = "predictions.jsonl"
GENERATION_FILE = "generation.json"


@dataclasses.dataclass(frozen=True)
class BenchmarkClip:
    """One test clip: its benchmark record's key and ground truth, and a loader of its model inputs.

    `load()` returns the clip's processor arrays (`pixel_values_videos [patches, 1176]`, `video_grid_thw
    [3]`, `video_second_per_grid`, and unless audio is off `input_features [128, frames]`,
    `feature_attention_mask [frames]`) plus `subtitle`: what `encode_clip_batch` takes.
    """

    dataset: str  # benchmark name, e.g. "mer2023"
    id: str
    ground_truth: GroundTruth
    load: Callable[[], dict[str, Any]] = dataclasses.field(compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.id)


def parse_dataset_names(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "mer2023,MELD" (or a list) -> ("mer2023", "meld") in benchmark order; "all" is all nine."""
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    if not names:
        raise ValueError(
            f"datasets: expected a comma-separated list of {', '.join(DATASET_NAMES)} (or all), got {text!r}"
        )
    if [name.lower() for name in names] == ["all"]:
        return DATASET_NAMES
    chosen = {get_dataset(name).name for name in names}
    return tuple(name for name in DATASET_NAMES if name in chosen)


# --------------------------------------------------------------------------------------------------
# Clips from manifests and built datasets
# --------------------------------------------------------------------------------------------------

_TRUTH_FIELD = {"basic": "label", "fine_grained": "labels", "sentiment": "sentiment"}


def _ground_truth(
    dataset: BenchmarkDataset, task: str, label: str, labels: Sequence[str], sentiment: float, where: str
) -> GroundTruth:
    """The benchmark ground truth of a clip, from the field of its task (which must be the dataset's)."""
    if task != dataset.task:
        raise ValueError(
            f"{where}: field 'task' is {task!r}, but {dataset.name} is a {dataset.task!r} dataset "
            f"(its ground truth is the field {_TRUTH_FIELD[dataset.task]!r})"
        )
    if dataset.task == "basic":
        return label
    if dataset.task == "sentiment":
        if not math.isfinite(sentiment):
            raise ValueError(f"{where}: field 'sentiment' is missing (a {dataset.name} clip needs its valence)")
        return float(sentiment)
    return tuple(labels)


def _check_media(path: Path, clip_id: str, where: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: clip {clip_id!r}: media file {path} does not exist")


def _manifest_inputs(clip: Clip, settings: GenerationSettings) -> dict[str, Any]:
    inputs = clip_inputs(clip.video, clip.audio, record_id=clip.id, settings=settings)
    inputs["subtitle"] = clip.subtitle
    return inputs


def manifest_clips(
    path: Path, datasets: Sequence[str], split: str, settings: GenerationSettings
) -> list[BenchmarkClip]:
    """The clips of `split` whose `dataset` is one of `datasets`, in manifest order; media must exist."""
    wanted = set(datasets)
    clips = []
    for clip in read_manifest(path):
        name = clip.dataset.strip().lower()
        if clip.split != split or name not in wanted:
            continue
        dataset = get_dataset(name)
        where = f"{path}: clip {clip.id!r}"
        truth = _ground_truth(
            dataset,
            clip.task,
            clip.label or "",
            clip.labels or (),
            math.nan if clip.sentiment is None else clip.sentiment,
            where,
        )
        _check_media(clip.video, clip.id, str(path))
        if clip.audio is not None and not settings.no_audio:
            _check_media(clip.audio, clip.id, str(path))
        clips.append(BenchmarkClip(dataset.name, clip.id, truth, functools.partial(_manifest_inputs, clip, settings)))
    return clips


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_inputs(source, index: int, no_audio: bool) -> dict[str, Any]:
    example = ProcessorInputs()(source[index])
    names = [name for name in MODEL_INPUTS if not (no_audio and name in ("input_features", "feature_attention_mask"))]
    return {**{name: example[name] for name in names}, "subtitle": example["subtitle"]}


def tfds_clips(
    dataset_dir: Path, datasets: Sequence[str], split: str, settings: GenerationSettings
) -> list[BenchmarkClip]:
    """The clips of a built `mer` dataset's `split` whose `dataset` is one of `datasets`, in record order.

    An index pass reads the text fields only (frames and audio stay compressed); a clip's media are
    decoded when its batch is generated.
    """
    source = load_split(dataset_dir, split)  # checks the directory and the split
    index_source = load_split(dataset_dir, split, decode_media=False)
    wanted = set(datasets)
    clips = []
    for index in range(len(index_source)):
        example = index_source[index]
        name = _text(example["dataset"]).strip().lower()
        if name not in wanted:
            continue
        dataset, clip_id = get_dataset(name), _text(example["id"])
        where = f"{dataset_dir} ({split}): clip {clip_id!r}"
        truth = _ground_truth(
            dataset,
            _text(example["task"]),
            _text(example["label"]),
            [_text(label) for label in example["labels"]],
            float(example["sentiment"]),
            where,
        )
        clips.append(
            BenchmarkClip(
                dataset.name, clip_id, truth, functools.partial(_tfds_inputs, source, index, settings.no_audio)
            )
        )
    return clips


def collect_clips(
    data: Sequence[Path],
    datasets: Sequence[str],
    split: str,
    settings: GenerationSettings,
    *,
    requested: bool = True,
    limit: int | None = None,
) -> list[BenchmarkClip]:
    """The benchmark clips of every data path (a manifest file or a built TFDS dataset directory).

    Args:
      datasets: benchmark names to keep; with `requested`, each must have at least one clip.
      limit: at most this many clips per dataset (the first ones), for a quick partial run.

    Raises:
      ValueError / FileNotFoundError naming the path (and clip) when a path is neither, a clip's task
      does not match its dataset, a (dataset, id) repeats, or a requested dataset has no clip.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected >= 1 clips per dataset, got {limit}")
    clips: list[BenchmarkClip] = []
    origin: dict[tuple[str, str], Path] = {}
    for path in map(Path, data):
        if path.is_dir():
            found = tfds_clips(path, datasets, split, settings)
        elif path.is_file():
            found = manifest_clips(path, datasets, split, settings)
        else:
            raise FileNotFoundError(
                f"data: {path} does not exist (expected a manifest JSONL file or a built TFDS dataset directory)"
            )
        for clip in found:
            if clip.key in origin:
                raise ValueError(f"data: clip {clip.dataset}/{clip.id} appears twice ({origin[clip.key]} and {path})")
            origin[clip.key] = path
        clips.extend(found)
    present = {clip.dataset for clip in clips}
    missing = [name for name in datasets if name not in present]
    if (requested and missing) or not clips:
        shown = ", ".join(map(str, data))
        raise ValueError(
            f"datasets: no {split!r} clip of {', '.join(missing)} in {shown} (a clip's 'dataset' "
            f"field names its benchmark dataset; present: {', '.join(sorted(present)) or 'none'})"
        )
    if limit is not None:
        seen: collections.Counter[str] = collections.Counter()
        kept = []
        for clip in clips:
            seen[clip.dataset] += 1
            if seen[clip.dataset] <= limit:
                kept.append(clip)
        clips = kept
    return clips


# --------------------------------------------------------------------------------------------------
# Resumable predictions
# --------------------------------------------------------------------------------------------------


def read_done(path: Path) -> dict[tuple[str, str], PredictionRecord]:
    """The records already in a predictions file, by (dataset, id); {} when it does not exist.

    A last line cut short by a crash is dropped from the file (its clip is generated again).
    """
    path = Path(path)
    if not path.exists():
        return {}
    done: dict[tuple[str, str], PredictionRecord] = {}
    for number, line in enumerate(read_complete(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = parse_record(json.loads(line), where)
        except json.JSONDecodeError as err:
            raise PredictionsError(f"{where}: not valid JSON ({err})") from None
        if (record.dataset, record.id) in done:
            raise PredictionsError(f"{where}: duplicate sample {record.dataset}/{record.id}")
        done[(record.dataset, record.id)] = record
    return done


def check_generation_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Checks `settings` against OUT/generation.json when OUT already holds predictions (a resume);
    otherwise records them there."""
    out_dir = Path(out_dir)
    path, predictions = out_dir / GENERATION_FILE, out_dir / PREDICTIONS_FILE
    has_predictions = predictions.is_file() and predictions.stat().st_size > 0
    if has_predictions and path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = [
            f"{key}={recorded.get(key)!r} there, {settings.get(key)!r} now"
            for key in sorted(set(recorded) | set(settings))
            if recorded.get(key) != settings.get(key)
        ]
        if changed:
            raise ValueError(
                f"{path}: the predictions in {out_dir} were generated with other settings "
                f"({'; '.join(changed)}); pass another --out, or delete that directory to start over"
            )
        return
    # No predictions yet: settings recorded by a run that failed before its first answer do not bind.
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class GenerationSummary:
    records: list[PredictionRecord]  # one per clip, in clip order
    generated: int  # clips answered by this call
    reused: int  # clips whose answers were already in the file


def generate_predictions(
    load_model: Callable[[], Reader],
    clips: Sequence[BenchmarkClip],
    settings: GenerationSettings,
    predictions_path: Path,
    *,
    batch_size: int,
    progress: bool = True,
) -> GenerationSummary:
    """Answers every clip not yet in `predictions_path` and appends them there, batch by batch.

    Args:
      load_model: returns the `opsd_jax.generation.Reader` (thinker on its mesh, tokenizer); called only
        when some clip needs an answer.
      batch_size: prompts per sampler call (each batch gets seed `settings.seed + batch number`).

    Raises:
      ValueError when a saved record's ground truth differs from its clip's (the data changed).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    predictions_path = Path(predictions_path)
    done = read_done(predictions_path)
    for clip in clips:
        saved = done.get(clip.key)
        if saved is not None and saved.ground_truth != clip.ground_truth:
            raise ValueError(
                f"{predictions_path}: {clip.dataset}/{clip.id} was saved with ground truth "
                f"{saved.ground_truth!r}, the data now says {clip.ground_truth!r}; pass another --out"
            )
    todo = [clip for clip in clips if clip.key not in done]
    if todo:
        reader = load_model()
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        with (
            predictions_path.open("a", encoding="utf-8") as handle,
            tqdm(total=len(todo), desc="generate", unit="clip", disable=not progress) as bar,
        ):
            for number, batch in enumerate(batches(todo, batch_size)):
                batch_settings = dataclasses.replace(settings, seed=settings.seed + number)
                texts = answer(reader, [clip.load() for clip in batch], batch_settings)
                for clip, text in zip(batch, texts, strict=True):
                    record = PredictionRecord(clip.dataset, clip.id, text, clip.ground_truth)
                    done[clip.key] = record
                    handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                handle.flush()
                bar.update(len(batch))
    return GenerationSummary([done[clip.key] for clip in clips], generated=len(todo), reused=len(clips) - len(todo))
