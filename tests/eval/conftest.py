"""Shared fixtures: the MER-UniBench files (read from ../shared/merunibench, never copied) and the
loaded emotion wheels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opsd_jax.eval.wheels import EmotionWheels, load_emotion_wheels

MERUNIBENCH_DIR = (Path(__file__).resolve().parents[2] / "../shared/merunibench").resolve()


def merunibench_dir() -> Path:
    """The benchmark files; a missing directory fails the test (these tests must not silently skip)."""
    if not (MERUNIBENCH_DIR / "emotion_wheel").is_dir() or not (MERUNIBENCH_DIR / "affectgpt_predictions").is_dir():
        pytest.fail(
            f"MER-UniBench files not found at {MERUNIBENCH_DIR} (expected emotion_wheel/ and "
            "affectgpt_predictions/ beside the repository, i.e. ../shared/merunibench from its root). "
            "Get the wheel files with `opsd-jax eval fetch-wheels --dest <that>/emotion_wheel`."
        )
    return MERUNIBENCH_DIR


@pytest.fixture(scope="session")
def wheel_dir() -> Path:
    return merunibench_dir() / "emotion_wheel"


@pytest.fixture(scope="session")
def wheels(wheel_dir) -> EmotionWheels:
    return load_emotion_wheels(wheel_dir)


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
