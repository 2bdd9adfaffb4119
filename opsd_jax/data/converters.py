"""MER-UniBench datasets as shipped -> the clip manifest (`opsd_jax.data.manifest`).

`convert(name, root, out_manifest, splits=...)` reads one dataset folder and writes the chosen splits: the
benchmark's `test` split and the `train` (and, where the layout has one, `dev`) split the layout defines;
`splits=None` writes every split the dataset has. Dataset names are the benchmark's:
mer2023, mer2024, meld, iemocapfour, cmumosi, cmumosei, sims, simsv2, ovmerdplus.

Layouts. The MER-UniBench packs (AffectGPT's `config.py`: `mer2023-dataset-process/`, `meld-process/`, ...)
hold a label file, a video folder, a pre-extracted wav folder and a subtitle CSV per dataset; where a
dataset's own public release is laid out differently, that layout is read too:

| dataset     | labels (first found)                                                  | video / audio folders   |
|-------------|-----------------------------------------------------------------------|-------------------------|
| mer2023     | `label-6way.npz`: `test1_corpus` (test), `train_corpus`              | `video/` / `audio/`     |
| mer2024     | `semi-label.csv` (`name`, `discrete`): first half = test1; else `label-6way.npz` `test1_corpus`; train: `label-6way.npz` `train_corpus` or `label-disdim.csv` | `video/`, `video-unlabeled/`, `video-labeled/` / `audio/` |
| meld        | `label.npz` (`test_corpus`, `train_corpus`, `val_corpus`); else the official `test_sent_emo.csv`, `train_sent_emo.csv`, `dev_sent_emo.csv` | `subvideo/` or the official `output_repeated_splits_test/`, `train_splits/`, `dev_splits_complete/` / `subaudio/` |
| iemocapfour | `label_4way.npz` `whole_corpus`: Session 5 = test, 1-4 = train      | `subvideo-tgt/` (.avi) / `subaudio/` |
| cmumosi, cmumosei, sims, simsv2 | MMSA `label.csv` (`meta.csv` for CH-SIMS v2): `video_id`, `clip_id`, `text`, `label`, `mode`; else `label.npz` (`test_corpus`, ... with `val`) | `Raw/<video_id>/<clip_id>.mp4`; else `subvideo/`, `subvideo_new/`, `video/`, `video_new/` / `subaudio/`, `audio/` |
| ovmerdplus  | `ovlabel.csv` (`name`, `openset`; an empty list becomes `['neutral']`) | `video/` / `audio/`     |

Assumptions where the reference is silent, from each dataset's public convention: numeric emotions in
npz files index the dataset's class list (MELD `anger, joy, sadness, neutral, disgust, fear, surprise`;
IEMOCAP `happy, sad, neutral, anger`, as AffectGPT's dataset classes); MELD ids are `dia{D}_utt{U}`
(prefixed `train_` / `dev_` outside the test split, where the official release reuses them); MMSA ids
are `{video_id}_{clip_id}`; IEMOCAP's session is the 5th character of the id (`Ses05F_...`).

Subtitles come from the first of `subtitle_chieng.csv`, `transcription-engchi-polish.csv`,
`transcription_merge.csv`, `subtitle_eng.csv` in the root (or `subtitle_file`), column `english` (or
`sentence`) by default, `chinese` with `language="chinese"`. A clip the subtitle file does not list keeps
the text its label file carries (MELD and MMSA CSVs), else "". A clip without a wav in the audio folder
uses its video's own track (`audio: null`). A clip without a video is an error naming it and the folders
searched, or is left out with `missing_media="skip"`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from opsd_jax.data.manifest import Clip, write_manifest

logger = logging.getLogger(__name__)

MER_EMOTIONS = ("neutral", "angry", "happy", "sad", "worried", "surprise")
MELD_EMOTIONS = ("anger", "joy", "sadness", "neutral", "disgust", "fear", "surprise")
IEMOCAP_EMOTIONS = ("happy", "sad", "neutral", "anger")
SUBTITLE_FILES = (
    "subtitle_chieng.csv",
    "transcription-engchi-polish.csv",
    "transcription_merge.csv",
    "subtitle_eng.csv",
)
SUBTITLE_COLUMNS = {"english": ("english", "sentence"), "chinese": ("chinese",)}
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov")


class ConversionError(ValueError):
    """A dataset folder or label file that does not match the expected layout."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One labelled sample of a label file, before its media are looked up."""

    id: str
    split: str
    label: str | None = None
    labels: tuple[str, ...] | None = None
    sentiment: float | None = None
    text: str | None = None  # a transcript shipped with the labels
    name: str | None = None  # the media file stem when it differs from the id
    video_dirs: tuple[str, ...] | None = None  # overrides the dataset's folders (per-split layouts)


@dataclasses.dataclass(frozen=True)
class Layout:
    task: str
    read_entries: Callable[[Path, bool], list[Entry]]  # (root, include_train) -> entries
    video_dirs: tuple[str, ...]
    audio_dirs: tuple[str, ...]
    sentiment_range: tuple[float, float] | None = None
    classes: tuple[str, ...] | None = None  # the basic-emotion words its labels are written with


# ----- label files ---------------------------------------------------------------------------------------


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required if column not in (reader.fieldnames or ())]
        if missing:
            raise ConversionError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        return list(reader)


def _read_corpus(path: Path, key: str) -> dict[str, dict]:
    """The dict stored under `key` of an AffectGPT / MERBench npz label file (name -> {'emo' | 'val': ...})."""
    try:
        archive = np.load(path, allow_pickle=True)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not a readable npz label file ({error})") from None
    with archive:
        if key not in archive.files:
            raise ConversionError(f"{path}: no '{key}' array; found {', '.join(archive.files)}")
        corpus = archive[key].item()
    if not isinstance(corpus, dict):
        raise ConversionError(f"{path}: '{key}' must hold a dict name -> labels, got {type(corpus).__name__}")
    return corpus


def _emotion(value, classes: Sequence[str], where: str) -> str:
    """A label word from a word or a class index, checked against the dataset's classes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < len(classes):
            raise ConversionError(f"{where}: emotion index {value} outside 0..{len(classes) - 1} ({classes})")
        return classes[int(value)]
    word = str(value).strip().lower()
    if word not in classes:
        raise ConversionError(f"{where}: emotion {value!r} is not one of {', '.join(classes)}")
    return word


def _sentiment(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: sentiment {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConversionError(f"{where}: sentiment {value!r} is not finite")
    return number


def _corpus_entries(path: Path, splits: dict[str, str], field: str, convert_value) -> list[Entry]:
    entries = []
    for key, split in splits.items():
        for name, record in _read_corpus(path, key).items():
            where = f"{path} {key}[{name!r}]"
            if not isinstance(record, dict) or field not in record:
                raise ConversionError(f"{where}: expected a dict with '{field}', got {record!r}")
            value = convert_value(record[field], where)
            entries.append(Entry(str(name), split, **value))
    return entries


def _mer_entries(*, semi_label_test: bool) -> Callable[[Path, bool], list[Entry]]:
    def read(root: Path, include_train: bool) -> list[Entry]:
        if semi_label_test and (root / "semi-label.csv").is_file():
            # The MER2024 benchmark split: the first half of the labelled MER-SEMI rows (AffectGPT's test1).
            rows = _read_csv(root / "semi-label.csv", ("name", "discrete"))
            entries = [
                Entry(
                    row["name"],
                    "test",
                    label=_emotion(row["discrete"], MER_EMOTIONS, f"{root / 'semi-label.csv'} row {index + 2}"),
                )
                for index, row in enumerate(rows[: len(rows) // 2])
            ]
        else:
            entries = _corpus_entries(
                _require(root, "label-6way.npz"),
                {"test1_corpus": "test"},
                "emo",
                lambda value, where: {"label": _emotion(value, MER_EMOTIONS, where)},
            )
        if include_train:
            if (root / "label-6way.npz").is_file():
                entries += _corpus_entries(
                    root / "label-6way.npz",
                    {"train_corpus": "train"},
                    "emo",
                    lambda value, where: {"label": _emotion(value, MER_EMOTIONS, where)},
                )
            else:
                path = _require(root, "label-disdim.csv")
                entries += [
                    Entry(
                        row["name"], "train", label=_emotion(row["discrete"], MER_EMOTIONS, f"{path} row {index + 2}")
                    )
                    for index, row in enumerate(_read_csv(path, ("name", "discrete")))
                ]
        return entries

    return read


MELD_CSV_SPLITS = {
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
}


def _meld_entries(root: Path, include_train: bool) -> list[Entry]:
    if (root / "label.npz").is_file():
        splits = {"test_corpus": "test"} | ({"train_corpus": "train", "val_corpus": "dev"} if include_train else {})
        return _corpus_entries(
            root / "label.npz", splits, "emo", lambda value, where: {"label": _emotion(value, MELD_EMOTIONS, where)}
        )
    if not (root / "test_sent_emo.csv").is_file():
        raise ConversionError(f"{root}: found neither label.npz nor test_sent_emo.csv (MELD)")
    entries = []
    for split, (file_name, video_dir) in MELD_CSV_SPLITS.items():
        if split != "test" and not include_train:
            continue
        path = _require(root, file_name)
        for index, row in enumerate(_read_csv(path, ("Dialogue_ID", "Utterance_ID", "Emotion", "Utterance"))):
            name = f"dia{row['Dialogue_ID'].strip()}_utt{row['Utterance_ID'].strip()}"
            entries.append(
                Entry(
                    name if split == "test" else f"{split}_{name}",
                    split,
                    name=name,
                    label=_emotion(row["Emotion"], MELD_EMOTIONS, f"{path} row {index + 2}"),
                    text=row["Utterance"],
                    video_dirs=(video_dir, "subvideo"),
                )
            )
    return entries


def _iemocap_entries(root: Path, include_train: bool) -> list[Entry]:
    path = _require(root, "label_4way.npz")
    entries = []
    for name, record in _read_corpus(path, "whole_corpus").items():
        name = str(name)
        where = f"{path} whole_corpus[{name!r}]"
        if not (name.startswith("Ses") and name[3:5].isdigit()):
            raise ConversionError(f"{where}: expected an IEMOCAP id 'Ses0N...' (N = session)")
        split = "test" if int(name[3:5]) == 5 else "train"
        if split == "test" or include_train:
            entries.append(Entry(name, split, label=_emotion(record["emo"], IEMOCAP_EMOTIONS, where)))
    return entries


MMSA_SPLITS = {"test": "test", "train": "train", "valid": "dev"}


def _sentiment_entries(label_csv: str) -> Callable[[Path, bool], list[Entry]]:
    def read(root: Path, include_train: bool) -> list[Entry]:
        if (root / label_csv).is_file():
            path = root / label_csv
            entries = []
            for index, row in enumerate(_read_csv(path, ("video_id", "clip_id", "text", "label", "mode"))):
                mode = row["mode"].strip().lower()
                if mode not in MMSA_SPLITS:
                    raise ConversionError(
                        f"{path} row {index + 2}: mode {row['mode']!r} is not one of {', '.join(MMSA_SPLITS)}"
                    )
                if mode != "test" and not include_train:
                    continue
                video_id, clip_id = row["video_id"].strip(), row["clip_id"].strip()
                entries.append(
                    Entry(
                        f"{video_id}_{clip_id}",
                        MMSA_SPLITS[mode],
                        text=row["text"],
                        sentiment=_sentiment(row["label"], f"{path} row {index + 2}"),
                        name=clip_id,
                        video_dirs=(f"Raw/{video_id}",),
                    )
                )
            return entries
        if not (root / "label.npz").is_file():
            raise ConversionError(f"{root}: found neither {label_csv} nor label.npz")
        splits = {"test_corpus": "test"} | ({"train_corpus": "train", "val_corpus": "dev"} if include_train else {})
        return _corpus_entries(
            root / "label.npz", splits, "val", lambda value, where: {"sentiment": _sentiment(value, where)}
        )

    return read


def parse_openset(text: str) -> tuple[str, ...]:
    """AffectGPT's `string_to_list`: '[happy, "sad"]' -> ('happy', 'sad'); the empty list -> ('neutral',)."""
    text = (text or "").strip()
    text = text[1:] if text.startswith("[") else text
    text = text[:-1] if text.endswith("]") else text
    for separator in ("'", '"'):
        text = text.replace(separator, ",")
    words = tuple(word.strip() for word in text.split(",") if word.strip())
    return words or ("neutral",)


def _ovmerd_entries(root: Path, include_train: bool) -> list[Entry]:
    path = _require(root, "ovlabel.csv")
    return [
        Entry(row["name"], "test", labels=parse_openset(row["openset"])) for row in _read_csv(path, ("name", "openset"))
    ]


def _require(root: Path, file_name: str) -> Path:
    path = root / file_name
    if not path.is_file():
        raise ConversionError(f"{root}: expected the label file {file_name}")
    return path


LAYOUTS: dict[str, Layout] = {
    "mer2023": Layout("basic", _mer_entries(semi_label_test=False), ("video",), ("audio",), classes=MER_EMOTIONS),
    "mer2024": Layout(
        "basic",
        _mer_entries(semi_label_test=True),
        ("video", "video-unlabeled", "video-labeled"),
        ("audio",),
        classes=MER_EMOTIONS,
    ),
    "meld": Layout(
        "basic",
        _meld_entries,
        ("subvideo", "output_repeated_splits_test"),
        ("subaudio", "audio"),
        classes=MELD_EMOTIONS,
    ),
    "iemocapfour": Layout(
        "basic", _iemocap_entries, ("subvideo-tgt", "subvideo"), ("subaudio", "audio"), classes=IEMOCAP_EMOTIONS
    ),
    "cmumosi": Layout(
        "sentiment", _sentiment_entries("label.csv"), ("subvideo", "video"), ("subaudio", "audio"), (-3.0, 3.0)
    ),
    "cmumosei": Layout(
        "sentiment",
        _sentiment_entries("label.csv"),
        ("subvideo_new", "subvideo", "video"),
        ("subaudio", "audio"),
        (-3.0, 3.0),
    ),
    "sims": Layout(
        "sentiment", _sentiment_entries("label.csv"), ("video", "subvideo"), ("audio", "subaudio"), (-1.0, 1.0)
    ),
    "simsv2": Layout(
        "sentiment", _sentiment_entries("meta.csv"), ("video_new", "video"), ("audio", "subaudio"), (-1.0, 1.0)
    ),
    "ovmerdplus": Layout("fine_grained", _ovmerd_entries, ("video",), ("audio",)),
}
DATASETS = tuple(LAYOUTS)


# ----- subtitles and media -------------------------------------------------------------------------------


def read_subtitles(path: Path, language: str = "english") -> dict[str, str]:
    """name -> subtitle from a subtitle CSV (`name` plus `english`/`sentence` or `chinese` columns)."""
    if language not in SUBTITLE_COLUMNS:
        raise ValueError(f"language must be one of {', '.join(SUBTITLE_COLUMNS)}, got {language!r}")
    rows = _read_csv(path, ("name",))
    columns = rows[0].keys() if rows else ()
    column = next((name for name in SUBTITLE_COLUMNS[language] if name in columns), None)
    if rows and column is None:
        raise ConversionError(
            f"{path}: no {language} column (expected one of "
            f"{', '.join(SUBTITLE_COLUMNS[language])}); found {', '.join(columns)}"
        )
    # Empty cells (pandas' NaN in AffectGPT) are empty subtitles.
    return {row["name"]: (row[column] or "").strip() for row in rows}


def _find_media(root: Path, folders: Sequence[str], stem: str, extensions: Sequence[str]) -> Path | None:
    for folder in folders:
        for extension in extensions:
            candidate = root / folder / f"{stem}{extension}"
            if candidate.is_file():
                return candidate
    return None


def convert(
    dataset_name: str,
    root: str | Path,
    out_manifest: str | Path,
    *,
    language: str = "english",
    subtitle_file: str | Path | None = None,
    splits: Sequence[str] | None = ("test",),
    missing_media: str = "error",
) -> list[Clip]:
    """Writes the manifest of `splits` (None: all) of one MER-UniBench dataset folder and returns its clips
    (see the module doc). A split the dataset does not have is an error naming the ones it has."""
    name = dataset_name.strip().lower()
    if name not in LAYOUTS:
        raise ValueError(f"dataset_name: unknown dataset {dataset_name!r}; expected one of {', '.join(DATASETS)}")
    if missing_media not in ("error", "skip"):
        raise ValueError(f"missing_media must be 'error' or 'skip', got {missing_media!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    layout = LAYOUTS[name]
    entries = layout.read_entries(root, splits is None or any(split != "test" for split in splits))
    if splits is not None:
        available = sorted({entry.split for entry in entries})
        absent = [split for split in splits if split not in available]
        if absent:
            raise ConversionError(f"{name} at {root}: no {absent[0]!r} split; it has {', '.join(available) or 'none'}")
        entries = [entry for entry in entries if entry.split in splits]
    if subtitle_file is not None:
        subtitle_path = Path(subtitle_file) if Path(subtitle_file).is_absolute() else root / subtitle_file
        if not subtitle_path.is_file():
            raise FileNotFoundError(f"subtitle_file {subtitle_path} does not exist")
    else:
        subtitle_path = next((root / file for file in SUBTITLE_FILES if (root / file).is_file()), None)
    subtitles = read_subtitles(subtitle_path, language) if subtitle_path else {}
    clips, missing = [], []
    for entry in entries:
        stem = entry.name or entry.id
        folders = entry.video_dirs or layout.video_dirs
        video = _find_media(root, folders, stem, VIDEO_EXTENSIONS)
        if video is None:
            missing.append(f"{entry.id} (searched {', '.join(str(root / folder) for folder in folders)})")
            continue
        if layout.sentiment_range and not layout.sentiment_range[0] <= entry.sentiment <= layout.sentiment_range[1]:
            raise ConversionError(
                f"{name} clip {entry.id!r}: sentiment {entry.sentiment} outside "
                f"{list(layout.sentiment_range)} (is the label column right?)"
            )
        clips.append(
            Clip(
                id=entry.id,
                video=video,
                task=layout.task,
                audio=_find_media(root, layout.audio_dirs, stem, (".wav",)),
                subtitle=subtitles.get(entry.id, entry.text or "").strip(),
                label=entry.label,
                labels=entry.labels,
                sentiment=entry.sentiment,
                dataset=name,
                split=entry.split,
            )
        )
    if missing and missing_media == "error":
        raise ConversionError(
            f"{name}: {len(missing)} clip(s) have no video file, e.g. {missing[0]}; pass "
            f"missing_media='skip' to leave them out"
        )
    if missing:
        logger.warning("%s: left out %d clip(s) without a video file, e.g. %s", name, len(missing), missing[0])
    write_manifest(out_manifest, clips)
    return clips


def parse_splits(text: str) -> tuple[str, ...]:
    """'train,test' -> ('train', 'test'); an empty list is an error."""
    splits = tuple(part.strip() for part in text.split(",") if part.strip())
    if not splits:
        raise ValueError(f"splits: expected comma-separated split names such as train,test, got {text!r}")
    return splits
