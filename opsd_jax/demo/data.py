"""The demo's data: synthetic clips of two conditions, rule-based rationales, and the datasets every stage reads.

Per condition (`CONDITIONS`: how often the training and the test subtitles agree with the label) the clips
are written once, rationales are written for them by the rule-based stand-in of the frontier model, and
these TFDS datasets are built from manifests that differ only where a stage needs them to:

| dataset        | split(s)     | what differs from the clips                                                  |
|----------------|--------------|------------------------------------------------------------------------------|
| `main`         | train, test  | nothing (each clip with its own rationale)                                   |
| `warm`         | train        | media of a random partner clip (`random_partners`), independent of the label; |
|                |              | half the evidence is a label statement (`with_some_label_statements`)        |
| `label`        | train, test  | privileged context: only the ground-truth label (`label_statement`)          |
| `mismatched`   | train, test  | privileged context: a random partner clip's rationale                        |
| `no_subtitle`  | train, test  | subtitles removed (the media-only reference)                                 |
| `swapped`      | test         | media of a random partner clip (the media-swap evaluation)                   |
| `swapped_no_subtitle` | test  | both                                                                         |

Only the teacher's prompt reads `rationale`; the student's prompt and the evaluation's are built from media
and subtitle alone, so the privileged variants change what the teacher sees and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from opsd_jax.data.builders import build_mer
from opsd_jax.data.builders.mer import MerConfig
from opsd_jax.data.manifest import Clip, read_manifest, write_manifest
from opsd_jax.data.synthetic import write_synthetic_manifest
from opsd_jax.rationales.generate import merge_rationales
from opsd_jax.rationales.rule_based import write_rule_based_rationales

# Condition -> (probability that a training subtitle names the clip's label, the same for test subtitles).
# 1/4 at test is chance agreement: the subtitle names a uniformly random emotion.
CONDITIONS: dict[str, tuple[float, float]] = {"standard": (0.5, 0.5), "shortcut": (0.8, 0.25)}

# Seed streams (mixed with the run's seed): partners of training clips, partners of test clips, the warm
# start's clips whose evidence is a label statement.
_TRAIN_PARTNERS, _TEST_PARTNERS, _WARM_STATEMENTS = 101, 102, 103


def random_partners(count: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """`[count]` int: for each clip, another clip's index drawn uniformly at random from the others.

    Draws depend on the seed and the count only, never on labels, so the partner's label is independent of
    the clip's (up to the exclusion of the clip itself).
    """
    if count < 2:
        raise ValueError(f"count: expected at least 2 clips to pair, got {count}")
    rng = np.random.default_rng(seed)
    return (np.arange(count) + rng.integers(1, count, size=count)) % count


def label_statement(label: str) -> str:
    """The label-privileged teacher's context: the ground-truth label and nothing else."""
    return f"The emotion is {label}."


def with_some_label_statements(clips: list[Clip], seed: int | tuple[int, ...], fraction: float = 0.5) -> list[Clip]:
    """`fraction` of the clips (drawn at random, independently of the label) with `label_statement` as their
    evidence: the warm start teaches reading both forms, so that the label-privileged teacher knows its label."""
    chosen = np.random.default_rng(seed).random(len(clips)) < fraction
    return [
        dataclasses.replace(c, rationale=label_statement(str(c.label))) if pick else c for c, pick in zip(clips, chosen)
    ]


def with_partner_media(clips: list[Clip], partners: np.ndarray) -> list[Clip]:
    return [dataclasses.replace(c, video=clips[j].video, audio=clips[j].audio) for c, j in zip(clips, partners)]


def with_partner_rationales(clips: list[Clip], partners: np.ndarray) -> list[Clip]:
    return [dataclasses.replace(c, rationale=clips[j].rationale) for c, j in zip(clips, partners)]


def with_label_statements(clips: list[Clip]) -> list[Clip]:
    return [dataclasses.replace(c, rationale=label_statement(str(c.label))) for c in clips]


def without_subtitles(clips: list[Clip]) -> list[Clip]:
    return [dataclasses.replace(c, subtitle="") for c in clips]


@dataclasses.dataclass(frozen=True)
class ConditionData:
    """The built datasets of one condition (dataset name -> TFDS dataset directory) and its manifest."""

    manifest: Path
    datasets: dict[str, Path]


def build_condition(directory: Path, condition: str, *, train_clips: int, test_clips: int, seed: int) -> ConditionData:
    """Writes the clips of `condition` under `directory` (reused when present) and builds its datasets."""
    train_agree, test_agree = CONDITIONS[condition]
    manifest = directory / "manifest.jsonl"
    if not manifest.is_file():
        write_synthetic_manifest(
            directory,
            train_clips,
            test_clips,
            seed=seed,
            agree_probability=train_agree,
            test_agree_probability=test_agree,
        )
    rationales = directory / "rationales.jsonl"
    write_rule_based_rationales(manifest, rationales, split=None)  # resumable: a rerun sends nothing
    merged = directory / "manifest_with_rationales.jsonl"
    if not merged.is_file():
        merge_rationales(manifest, rationales, merged, require_split="train")
    clips = read_manifest(merged)
    train = [c for c in clips if c.split == "train"]
    test = [c for c in clips if c.split == "test"]
    train_partners = random_partners(len(train), (seed, _TRAIN_PARTNERS))
    test_partners = random_partners(len(test), (seed, _TEST_PARTNERS))
    swapped_test = with_partner_media(test, test_partners)
    variants = {
        "warm": with_some_label_statements(with_partner_media(train, train_partners), (seed, _WARM_STATEMENTS)),
        "label": with_label_statements(train + test),
        "mismatched": with_partner_rationales(train, train_partners) + with_partner_rationales(test, test_partners),
        "no_subtitle": without_subtitles(train + test),
        "swapped": swapped_test,
        "swapped_no_subtitle": without_subtitles(swapped_test),
    }
    config = MerConfig(name="demo", num_frames=4, height=56, width=56, max_audio_seconds=1.0)
    datasets = {"main": build_mer(merged, directory / "tfds" / "main", config)}
    for name, variant in variants.items():
        variant_manifest = write_manifest(directory / f"manifest_{name}.jsonl", variant)
        datasets[name] = build_mer(variant_manifest, directory / "tfds" / name, config)
    return ConditionData(manifest=merged, datasets=datasets)
