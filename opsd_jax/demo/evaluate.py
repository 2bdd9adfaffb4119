"""Scores that show whether a model reads the media: accuracy and macro-F1 on three views of the held-out clips.

* `all`: every held-out clip, as it is;
* `misleading`: the clips whose subtitle names another emotion than the label (a subtitle reader fails all);
* `swapped`: every clip with its media replaced by a random partner clip's (`data.random_partners`), label
  and subtitle kept. A model that reads the media loses accuracy here; one that ignores them does not, so
  `all - swapped` is the arm's reliance on the media.

On all clips, also which cue an answer gets right (`cue_scores`): the valence the face shows and the arousal
the voice carries (chance 1/2 each). A model that hears the voice but not the face is right on arousal and
at chance on valence: 50 % accuracy, whichever of the two it misses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opsd_jax.data.manifest import Clip
from opsd_jax.data.synthetic import EMOTIONS, VALENCE_AROUSAL, words_emotion
from opsd_jax.train import classification_scores

SUBSETS = ("all", "misleading", "swapped")
Row = dict[str, str | None]  # Trainer.predict's: id, subtitle, label, predicted


def misleading_ids(clips: Iterable[Clip]) -> set[str]:
    """Ids of the clips whose subtitle names an emotion other than their label."""
    return {c.id for c in clips if words_emotion(c.subtitle) not in (None, c.label)}


def view_scores(
    rows: Sequence[Row], swapped_rows: Sequence[Row] | None, misleading: set[str], vocabulary: Sequence[str] = EMOTIONS
) -> dict[str, float]:
    """`{subset}/accuracy`, `{subset}/macro_f1` and `{subset}/clips` for `SUBSETS`, plus `media_reliance`
    (all - swapped accuracy). `rows` and `swapped_rows`: per clip predictions on the clips as they are and
    media-swapped (None: no swapped view, and no `swapped/*` or `media_reliance`)."""
    views = {"all": list(rows), "misleading": [r for r in rows if r["id"] in misleading]}
    if swapped_rows is not None:
        views["swapped"] = list(swapped_rows)
    scores: dict[str, float] = {}
    for name, subset in views.items():
        values = classification_scores(
            [r["predicted"] for r in subset], [str(r["label"]) for r in subset], list(vocabulary)
        )
        scores.update({f"{name}/{metric}": value for metric, value in values.items()})
        scores[f"{name}/clips"] = float(len(subset))
    if swapped_rows is not None:
        scores["media_reliance"] = scores["all/accuracy"] - scores["swapped/accuracy"]
    scores.update({f"all/{name}": value for name, value in cue_scores(rows).items()})
    return scores


def cue_scores(rows: Sequence[Row]) -> dict[str, float]:
    """`valence_accuracy` / `arousal_accuracy`: the fraction of `rows` whose predicted emotion has the label's
    face valence / voice arousal (`synthetic.VALENCE_AROUSAL`); an answer that names no emotion has neither."""
    cues = [(VALENCE_AROUSAL.get(str(r["predicted"])), VALENCE_AROUSAL[str(r["label"])]) for r in rows]
    count = max(len(cues), 1)
    return {
        "valence_accuracy": sum(p is not None and p[0] == t[0] for p, t in cues) / count,
        "arousal_accuracy": sum(p is not None and p[1] == t[1] for p, t in cues) / count,
    }


def subtitle_only_rows(clips: Iterable[Clip]) -> list[Row]:
    """The subtitle-only baseline's answers: the emotion each clip's subtitle is typical of."""
    return [
        {"id": c.id, "subtitle": c.subtitle, "label": c.label, "predicted": words_emotion(c.subtitle)} for c in clips
    ]
