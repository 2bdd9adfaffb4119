"""The demo's report: per condition, one table of every reference and arm (mean ± standard deviation over
seeds), and a plot of held-out accuracy against step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from opsd_jax.demo.data import CONDITIONS

COLUMNS = (
    ("all/accuracy", "accuracy"),
    ("all/macro_f1", "macro-F1"),
    ("misleading/accuracy", "misleading subtitle"),
    ("swapped/accuracy", "media swapped"),
    ("media_reliance", "reliance on media"),
    ("all/valence_accuracy", "valence (face) right"),
    ("all/arousal_accuracy", "arousal (voice) right"),
)
CHANCE = {
    "all/accuracy": 0.25,
    "all/macro_f1": 0.25,
    "misleading/accuracy": 0.25,
    "swapped/accuracy": 0.25,
    "media_reliance": 0.0,
    "all/valence_accuracy": 0.5,
    "all/arousal_accuracy": 0.5,
}


def rows_of(seeds: list[dict[str, Any]], condition: str) -> dict[str, list[dict[str, float]]]:
    """Row name -> its scores per seed (references first, then the arms, in run order)."""
    rows: dict[str, list[dict[str, float]]] = {"chance": [CHANCE] * len(seeds)}
    for result in seeds:
        data = result["conditions"][condition]
        for name, scores in data["references"].items():
            rows.setdefault(name, []).append(scores)
        for name, arm in data["arms"].items():
            rows.setdefault(name, []).append(arm["scores"])
    return rows


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)):.1f}"


def table(seeds: list[dict[str, Any]], condition: str) -> str:
    header = "| " + " | ".join(["row", *(title for _, title in COLUMNS)]) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, per_seed in rows_of(seeds, condition).items():
        cells = [cell([s[key] for s in per_seed if key in s]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def markdown(seeds: list[dict[str, Any]], conditions: list[str], descriptions: dict[str, str]) -> str:
    clips = seeds[0]["conditions"][conditions[0]]["references"]["subtitle_only"]["all/clips"]
    parts = [
        f"Held-out clips ({int(clips)} per seed), student prompt (no privileged context); accuracy and "
        f"macro-F1 in %, mean ± sample standard deviation over seeds {', '.join(str(s['seed']) for s in seeds)}. "
        "Teacher rows use the teacher's prompt."
    ]
    for condition in conditions:
        train, test = CONDITIONS[condition]
        parts.append(
            f"\n### {condition}: subtitles agree with the label {100 * train:.0f}% in training, "
            f"{100 * test:.0f}% at test\n\n{table(seeds, condition)}"
        )
    parts.append("\n" + "\n".join(f"- `{name}`: {text}" for name, text in descriptions.items()))
    return "\n".join(parts) + "\n"


def plot(seeds: list[dict[str, Any]], conditions: list[str], path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend above

    figure, axes = plt.subplots(1, len(conditions), figsize=(6.5 * len(conditions), 4.2), dpi=120, squeeze=False)
    for axis, condition in zip(axes[0], conditions):
        for arm in seeds[0]["conditions"][condition]["arms"]:
            curves = []
            for result in seeds:
                start = result["conditions"][condition]["references"]["warm_start"]["all/accuracy"]
                history = result["conditions"][condition]["arms"][arm]["history"]
                curves.append([(0, start)] + [(row["step"], row["eval/accuracy"]) for row in history])
            steps = [step for step, _ in curves[0]]
            accuracy = 100 * np.mean([[value for _, value in curve] for curve in curves], axis=0)
            axis.plot(steps, accuracy, marker="o", label=arm)
        subtitle = 100 * np.mean(
            [r["conditions"][condition]["references"]["subtitle_only"]["all/accuracy"] for r in seeds]
        )
        axis.axhline(subtitle, color="black", linestyle="--", label="subtitle only")
        axis.axhline(25, color="gray", linestyle=":", label="chance (4 classes)")
        axis.set_xlabel("training step")
        axis.set_ylabel("held-out accuracy (%), student prompt")
        axis.set_title(f"{condition}, mean of {len(seeds)} seed(s)")
        axis.set_ylim(0, 100)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
