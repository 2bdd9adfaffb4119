"""A tiny MER2023 pack as the dataset ships it, for tests of the data commands and the README recipe."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from opsd_jax.data import media


def write_mer2023_pack(root: Path, labels: dict[str, dict[str, dict[str, str]]], subtitles: dict[str, str]) -> Path:
    """`root` as MER2023 ships: label-6way.npz (`labels`: corpus -> clip -> {"emo": label}), video/NAME.mp4
    with their own audio tracks (6 random frames of 48 x 64 at 8 fps, 0.75 s of a tone per clip), and
    subtitle_chieng.csv with the English `subtitles` of some clips. Returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / "label-6way.npz", **labels)
    rng = np.random.default_rng(0)
    names = [name for corpus in labels.values() for name in corpus]
    for index, name in enumerate(names):
        tone = (0.3 * np.sin(2 * np.pi * (300 + 100 * index) * np.arange(12000) / 16000)).astype(np.float32)
        media.write_video(
            root / "video" / f"{name}.mp4", rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8), 8, audio=tone
        )
    with (root / "subtitle_chieng.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["name", "chinese", "english"], *([name, "", text] for name, text in subtitles.items())]
        )
    return root
