"""Shared fixtures: small emotion-wheel files the tests write themselves, and the MER-UniBench files.

Everything that only needs wheel-format files runs on `tiny_wheel_dir` / `tiny_wheels`, always. The
cross-checks against the benchmark's own files (the real wheels, AffectGPT's released predictions, the
reference document) read them from `OPSD_MERUNIBENCH_DIR`, else `../shared/merunibench` beside the
repository (never copied into it). Without them those tests are skipped, with the reason in pytest's
summary; with `OPSD_REQUIRE_MERUNIBENCH=1` (set by `.ci/run`) their absence fails them instead.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import openpyxl
import pytest

from opsd_jax.eval.wheels import SYNONYM_RUNS, EmotionWheels, load_emotion_wheels

REPOSITORY = Path(__file__).resolve().parents[2]
MERUNIBENCH_DIR = Path(os.environ.get("OPSD_MERUNIBENCH_DIR") or REPOSITORY / "../shared/merunibench").resolve()
REQUIRE_MERUNIBENCH = "OPSD_REQUIRE_MERUNIBENCH"


def merunibench_dir() -> Path:
    """The benchmark files; when missing, skips the test (fails it under OPSD_REQUIRE_MERUNIBENCH=1)."""
    if not (MERUNIBENCH_DIR / "emotion_wheel").is_dir() or not (MERUNIBENCH_DIR / "affectgpt_predictions").is_dir():
        reason = (
            f"MER-UniBench files not found at {MERUNIBENCH_DIR} (expected emotion_wheel/ and affectgpt_predictions/; "
            "set OPSD_MERUNIBENCH_DIR or place them at ../shared/merunibench beside the repository)"
        )
        if os.environ.get(REQUIRE_MERUNIBENCH, "") not in ("", "0"):
            pytest.fail(f"{reason}; {REQUIRE_MERUNIBENCH} is set, so this cross-check must run")
        pytest.skip(reason)
    return MERUNIBENCH_DIR


@pytest.fixture(scope="session")
def wheel_dir() -> Path:
    """The benchmark's own seven emotion-wheel files."""
    return merunibench_dir() / "emotion_wheel"


@pytest.fixture(scope="session")
def wheels(wheel_dir) -> EmotionWheels:
    return load_emotion_wheels(wheel_dir)


# ----- small wheel-format files ----------------------------------------------------------------------------

# Each wheel: level1 -> level2 -> level3 words. Surprise is in wheels 1-4 only, disgust in wheels 1, 2 and 4
# only (the real wheels drop labels per wheel too); "neutral" is in no file, as in the real ones.
_BRANCHES = {
    "happy": {"joy": ["joyful", "excited"], "relief": ["relieved"]},
    "sad": {"sorrow": ["grief"]},
    "angry": {"anger": ["mad"]},
    "worried": {"nervous": ["anxious"]},
    "surprise": {"amazed": ["astonished"]},
    "disgust": {"revulsion": ["loathing"]},
}
_WHEEL_LEVEL1 = {
    k: [w for w in _BRANCHES if (w != "surprise" or k <= 4) and (w != "disgust" or k in (1, 2, 4))] for k in range(1, 6)
}
_SYNONYMS = {"happy": "[glad, cheerful]", "sad": "[unhappy]"}  # in run 1 only; the other runs list none
_FORMS = {
    "happy": "happy, happier",
    "glad": "glad",
    "cheerful": "cheerful",
    "joy": "joy",
    "excited": "excited",
    "relieved": "relieved",
    "sad": "sad, sadder",
    "unhappy": "unhappy",
    "angry": "angry, angrier",
    "anger": "anger",
    "worried": "worried, worry",
    "nervous": "nervous",
    "surprise": "surprise, surprised",
    "disgust": "disgust, disgusted",
}


def write_tiny_wheels(directory: Path) -> Path:
    """The seven files in the benchmark's formats (format.csv, synonym.xlsx with 8 runs, wheel1..5.xlsx with
    blank cells carried down), over a few emotion words."""
    directory.mkdir(parents=True, exist_ok=True)
    words = []
    for k, level1_words in _WHEEL_LEVEL1.items():
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(["level1", "level2", "level3"])
        for level1 in level1_words:
            for branch, (level2, leaves) in enumerate(_BRANCHES[level1].items()):
                for leaf, level3 in enumerate(leaves):
                    sheet.append([level1 if branch == leaf == 0 else None, level2 if leaf == 0 else None, level3])
                    words += [level1, level2, level3]
        book.save(directory / f"wheel{k}.xlsx")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append([name for run in range(1, SYNONYM_RUNS + 1) for name in (f"word_run{run}", f"synonym_run{run}")])
    for word in dict.fromkeys(words):
        sheet.append(
            [cell for run in range(SYNONYM_RUNS) for cell in (word, _SYNONYMS.get(word) if run == 0 else None)]
        )
    book.save(directory / "synonym.xlsx")
    with (directory / "format.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "format"])
        writer.writerows(_FORMS.items())
    return directory


@pytest.fixture(scope="session")
def tiny_wheel_dir(tmp_path_factory) -> Path:
    return write_tiny_wheels(tmp_path_factory.mktemp("tiny_wheels"))


@pytest.fixture(scope="session")
def tiny_wheels(tiny_wheel_dir) -> EmotionWheels:
    return load_emotion_wheels(tiny_wheel_dir)


# ----- AffectGPT's released predictions -----------------------------------------------------------------


def load_openset(dataset: str) -> tuple[list[str], list[str]]:
    """AffectGPT's epoch-60 extracted labels: (sample names, extractor answer strings)."""
    data = np.load(merunibench_dir() / "affectgpt_predictions" / dataset / "ckpt60-openset.npz")
    return [str(name) for name in data["filenames"]], [str(item) for item in data["fileitems"]]


def load_sentiment(dataset: str) -> tuple[list[str], list[str]]:
    """AffectGPT's epoch-60 sentiment answers: (sample names, positive / negative / neutral / other)."""
    data = np.load(merunibench_dir() / "affectgpt_predictions" / dataset / "ckpt60-openset-sentiment.npz")
    return [str(name) for name in data["filenames"]], [str(item) for item in data["fileitems"]]


def load_reasons(dataset: str) -> dict[str, str]:
    """AffectGPT's epoch-60 free-text answers: sample name -> text."""
    path = merunibench_dir() / "affectgpt_predictions" / dataset / "ckpt60.npz"
    return {str(name): str(text) for name, text in np.load(path, allow_pickle=True)["name2reason"].item().items()}


@pytest.fixture(scope="session", params=["tiny", "merunibench"])
def any_wheels(request) -> EmotionWheels:
    """For rules that hold for both: the small files (always) and the benchmark's own (when present)."""
    return request.getfixturevalue("tiny_wheels" if request.param == "tiny" else "wheels")
