"""MER-UniBench label normalisation G_k: word forms -> synonyms -> the innermost level of emotion wheel k.

A re-implementation of AffectGPT's `my_affectgpt/evaluation/wheel.py` (`func_backward_case3` with
`level='level1'`, the only variant behind the published numbers). It reads the benchmark's own seven
files from a user-given directory; none of them is shipped with this package.

Mapping one label w under wheel k (k = 1..5):
  1. lowercase and strip w; drop it if it is not a known word form (`format.csv`);
  2. C = the union of the synonym-map entries (`synonym.xlsx`, 8 runs merged) of every base word of w;
  3. return the level-1 word of wheel k for the alphabetically first c in sorted(C) that wheel k holds;
     drop w if wheel k holds none.
The sorted-first rule is kept exactly, with its odd results ("fear" is also a form of "fearless", so
wheel 2 maps fear -> happy; "neutral" is in no file, so it always maps to nothing): the published
scores depend on them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import openpyxl

WHEEL_NUMBERS = (1, 2, 3, 4, 5)
FORMAT_FILE = "format.csv"
SYNONYM_FILE = "synonym.xlsx"
SYNONYM_RUNS = 8
UPSTREAM_REPOSITORY = "https://github.com/zeroQiaoba/AffectGPT"
UPSTREAM_DIRECTORY = "AffectGPT/emotion_wheel/"

# file name -> what it is (used in the error for a missing file).
WHEEL_DIRECTORY_FILES: dict[str, str] = {
    FORMAT_FILE: "word forms: base word -> comma-separated surface forms",
    SYNONYM_FILE: "synonyms of the 253 emotion-wheel words, 8 GPT runs",
    **{f"wheel{k}.xlsx": f"emotion wheel {k}: level1 / level2 / level3 word lists" for k in WHEEL_NUMBERS},
}


class WheelFilesError(FileNotFoundError):
    """An emotion-wheel file is missing or malformed; the message names the file and how to get it."""


def _missing_file_message(path: Path) -> str:
    return (
        f"emotion-wheel file {path} is missing ({WHEEL_DIRECTORY_FILES.get(path.name, 'MER-UniBench file')}). "
        f"It is part of the MER-UniBench benchmark: {UPSTREAM_DIRECTORY}{path.name} in {UPSTREAM_REPOSITORY}. "
        f"Download all seven files with `opsd-jax eval fetch-wheels --dest {path.parent}` and pass that "
        "directory as --wheel-dir."
    )


def split_label_string(text: str | Sequence[str] | None) -> list[str]:
    """The benchmark's `string_to_list`: "[happy, 'sad']" -> ["happy", "sad"].

    Strips one leading "[" and one trailing "]", splits on quotes and commas, trims items and drops
    empty ones. A list passes through unchanged (as upstream). Items are not lowercased here.
    """
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(item) for item in text]
    text = str(text)
    if text.startswith("["):
        text = text[1:]
    if text.endswith("]"):
        text = text[:-1]
    return [item.strip() for item in re.split(r"['\",]", text) if item.strip()]


def read_word_forms(path: Path) -> dict[str, tuple[str, ...]]:
    """`format.csv` -> {surface form: base words}. Every base word is also a form of itself."""
    path = Path(path)
    if not path.is_file():
        raise WheelFilesError(_missing_file_message(path))
    forms: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"name", "format"} <= set(reader.fieldnames):
            raise WheelFilesError(f"{path}: expected columns 'name' and 'format', got {reader.fieldnames}")
        for line_number, row in enumerate(reader, start=2):
            base = row["name"] or ""
            if not base:
                raise WheelFilesError(f"{path}:{line_number}: empty 'name' cell")
            for form in split_label_string(row["format"] or ""):
                forms.setdefault(form, []).append(base)
            forms.setdefault(base, []).append(base)
    return {form: tuple(bases) for form, bases in forms.items()}


def _xlsx_rows(path: Path, columns: Sequence[str]) -> list[tuple[object, ...]]:
    """Rows of the first sheet as tuples ordered like `columns`; fully blank rows are skipped
    (pandas, which upstream uses, drops trailing blank rows too)."""
    path = Path(path)
    if not path.is_file():
        raise WheelFilesError(_missing_file_message(path))
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        rows = iter(workbook.worksheets[0].iter_rows(values_only=True))
        header = [str(cell).strip() if cell is not None else "" for cell in next(rows, ())]
        missing = [name for name in columns if name not in header]
        if missing:
            raise WheelFilesError(f"{path}: missing column(s) {missing}; header is {header}")
        indices = [header.index(name) for name in columns]
        selected = []
        for row in rows:
            if all(cell is None for cell in row):
                continue
            selected.append(tuple(row[i] if i < len(row) else None for i in indices))
        return selected
    finally:
        workbook.close()


def _cell_text(path: Path, row_number: int, column: str, value: object) -> str:
    if not isinstance(value, str):
        raise WheelFilesError(f"{path}: row {row_number}, column {column!r}: expected text, got {value!r}")
    return value


def read_wheel(path: Path) -> dict[str, dict[str, list[str]]]:
    """`wheelK.xlsx` -> {level1: {level2: [level3, ...]}}, blank cells carried down from the row above."""
    path = Path(path)
    columns = ("level1", "level2", "level3")
    tree: dict[str, dict[str, list[str]]] = {}
    current = ["", "", ""]
    for row_number, row in enumerate(_xlsx_rows(path, columns), start=2):
        for level, value in enumerate(row):
            if value is not None:
                current[level] = _cell_text(path, row_number, columns[level], value)
            current[level] = current[level].lower().strip()
        level1, level2, level3 = current
        tree.setdefault(level1, {}).setdefault(level2, []).append(level3)
    if not tree:
        raise WheelFilesError(f"{path}: no rows under the header")
    return tree


def innermost_level_map(tree: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, str]:
    """Every level1, level2 and level3 word of one wheel -> its level1 word."""
    mapping: dict[str, str] = {}
    for level1, branches in tree.items():
        mapping[level1] = level1
        for level2, leaves in branches.items():
            mapping[level2] = level1
            for level3 in leaves:
                mapping[level3] = level1
    return mapping


def read_synonyms(path: Path, wheel_words: Iterable[str]) -> dict[str, frozenset[str]]:
    """`synonym.xlsx` -> {word: emotion-wheel words it stands for}, union over the 8 runs.

    Each run maps its wheel word to itself and each of its synonyms to it. `wheel_words` (every word
    of every wheel) checks the file, as upstream asserts.
    """
    path = Path(path)
    wheel_words = frozenset(wheel_words)
    columns = [name for run in range(1, SYNONYM_RUNS + 1) for name in (f"word_run{run}", f"synonym_run{run}")]
    merged: dict[str, set[str]] = {}
    for row_number, row in enumerate(_xlsx_rows(path, columns), start=2):
        for run in range(SYNONYM_RUNS):
            word_column = columns[2 * run]
            word = _cell_text(path, row_number, word_column, row[2 * run]).strip().lower()
            if word not in wheel_words:
                raise WheelFilesError(f"{path}: row {row_number}, column {word_column!r}: {word!r} is in no wheel")
            merged.setdefault(word, set()).add(word)
            synonyms = row[2 * run + 1]
            if synonyms is None:
                continue
            for synonym in split_label_string(_cell_text(path, row_number, columns[2 * run + 1], synonyms)):
                merged.setdefault(synonym.strip().lower(), set()).add(word)
    return {word: frozenset(targets) for word, targets in merged.items()}


class EmotionWheels:
    """The benchmark's label normalisation, precomputed for every known word form and wheel.

    Build it with `load_emotion_wheels(directory)`. Immutable after construction.
    """

    def __init__(
        self,
        word_forms: Mapping[str, Sequence[str]],
        synonyms: Mapping[str, frozenset[str]],
        wheel_trees: Sequence[Mapping[str, Mapping[str, Sequence[str]]]],
    ):
        if len(wheel_trees) != len(WHEEL_NUMBERS):
            raise ValueError(f"wheel_trees: expected {len(WHEEL_NUMBERS)} wheels, got {len(wheel_trees)}")
        self.wheel_trees = tuple(wheel_trees)
        self.level1_words = tuple(frozenset(tree) for tree in wheel_trees)
        wheel_maps = [innermost_level_map(tree) for tree in wheel_trees]
        table: dict[str, tuple[str | None, ...]] = {}
        for form, bases in word_forms.items():
            candidates = set()
            for base in bases:
                if base not in synonyms:
                    raise WheelFilesError(f"{FORMAT_FILE}: base word {base!r} has no entry in {SYNONYM_FILE}")
                candidates |= synonyms[base]
            ordered = sorted(candidates)
            # The alphabetically first candidate present in the wheel decides (upstream's sorted-first rule).
            table[form] = tuple(
                next((wheel_map[c] for c in ordered if c in wheel_map), None) for wheel_map in wheel_maps
            )
        self._table = table

    @property
    def vocabulary(self) -> frozenset[str]:
        """Every word form the normalisation knows (7,386 with the official files)."""
        return frozenset(self._table)

    def map_word(self, word: str, wheel: int) -> str | None:
        """One label -> the level1 word of `wheel` (1..5), or None when it is dropped."""
        return self.map_word_all(word)[_wheel_index(wheel)]

    def map_word_all(self, word: str) -> tuple[str | None, ...]:
        """One label -> its level1 word in each of the five wheels (None where it is dropped)."""
        return self._table.get(word.lower().strip(), (None,) * len(WHEEL_NUMBERS))

    def normalise(self, labels: Iterable[str], wheel: int) -> frozenset[str]:
        """G_k: a label list -> the set of level1 words of wheel `wheel`, dropped labels removed."""
        index = _wheel_index(wheel)
        mapped = (self.map_word_all(label)[index] for label in labels)
        return frozenset(word for word in mapped if word is not None)


def _wheel_index(wheel: int) -> int:
    if wheel not in WHEEL_NUMBERS:
        raise ValueError(f"wheel: expected one of {WHEEL_NUMBERS}, got {wheel!r}")
    return wheel - 1


def load_emotion_wheels(directory: str | Path) -> EmotionWheels:
    """Read format.csv, synonym.xlsx and wheel1..5.xlsx from `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WheelFilesError(
            f"emotion-wheel directory {directory} does not exist. It must hold the MER-UniBench files "
            f"{', '.join(WHEEL_DIRECTORY_FILES)} ({UPSTREAM_DIRECTORY} in {UPSTREAM_REPOSITORY}); download "
            f"them with `opsd-jax eval fetch-wheels --dest {directory}`."
        )
    for name in WHEEL_DIRECTORY_FILES:
        if not (directory / name).is_file():
            raise WheelFilesError(_missing_file_message(directory / name))
    trees = [read_wheel(directory / f"wheel{k}.xlsx") for k in WHEEL_NUMBERS]
    wheel_words = {word for tree in trees for word in innermost_level_map(tree)}
    synonyms = read_synonyms(directory / SYNONYM_FILE, wheel_words)
    word_forms = read_word_forms(directory / FORMAT_FILE)
    return EmotionWheels(word_forms, synonyms, trees)
