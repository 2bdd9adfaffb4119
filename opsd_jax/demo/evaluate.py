"""Scores that show whether a model reads the media: accuracy and macro-F1 on three views of the held-out clips.

* `all`: every held-out clip, as it is;
* `misleading`: the clips whose subtitle names another emotion than the label (a subtitle reader fails all);
* `swapped`: every clip with its media replaced by a random partner clip's (`data.random_partners`), label
  and subtitle kept. A model that reads the media loses accuracy here; one that ignores them does not, so
  `all - swapped` is the arm's reliance on the media.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opsd_jax.data.manifest import Clip
from opsd_jax.data.synthetic import EMOTIONS, words_emotion
from opsd_jax.train import classification_scores

SUBSETS = ("all", "misleading", "swapped")
Row = dict[str, str | None]  # Trainer.predict's: id, subtitle, label, predicted


def misleading_ids(clips: Iterable[Clip]) -> set[str]:
    """Ids of the clips whose subtitle names an emotion other than their label."""
    return {c.id for c in clips if words_emotion(c.subtitle) not in (None, c.label)}


def view_scores(rows: Sequence[Row], swapped_rows: Sequence[Row] | None, misleading: set[str],
                vocabulary: Sequence[str] = EMOTIONS) -> dict[str, float]:
    """`{subset}/accuracy`, `{subset}/macro_f1` and `{subset}/clips` for `SUBSETS`, plus `media_reliance`
    (all - swapped accuracy). `rows` and `swapped_rows`: per clip predictions on the clips as they are and
    media-swapped (None: no swapped view, and no `swapped/*` or `media_reliance`)."""
    views = {"all": list(rows), "misleading": [r for r in rows if r["id"] in misleading]}
    if swapped_rows is not None:
        views["swapped"] = list(swapped_rows)
    scores: dict[str, float] = {}
    for name, subset in views.items():
        values = classification_scores([r["predicted"] for r in subset], [str(r["label"]) for r in subset],
                                       list(vocabulary))
        scores.update({f"{name}/{metric}": value for metric, value in values.items()})
        scores[f"{name}/clips"] = float(len(subset))
    if swapped_rows is not None:
        scores["media_reliance"] = scores["all/accuracy"] - scores["swapped/accuracy"]
    return scores


def subtitle_only_rows(clips: Iterable[Clip]) -> list[Row]:
    """The subtitle-only baseline's answers: the emotion each clip's subtitle is typical of."""
    return [{"id": c.id, "subtitle": c.subtitle, "label": c.label, "predicted": words_emotion(c.subtitle)}
            for c in clips]
