"""The demo's data and scores without a model: leak-free pairings, privileged contexts that reach only the teacher,
the media-swap view, the shortcut condition's subtitles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from opsd_jax.data import chat_template as ct
from opsd_jax.data.manifest import Clip
from opsd_jax.data.synthetic import EMOTIONS, PHRASES
from opsd_jax.demo.data import (
    random_partners,
    with_label_statements,
    with_partner_media,
    with_partner_rationales,
    without_subtitles,
)
from opsd_jax.demo.evaluate import misleading_ids, subtitle_only_rows, view_scores
from opsd_jax.opsd.prompts import PromptConfig, conversation, encode_prompt_pairs

MEDIA = [ct.VideoPart((1, 4, 4), 1.0, 97)]
CONFIG = PromptConfig(instruction="Which emotion? Answer with one word.", privileged_template="Evidence: {rationale}")


def label_contingency(partners: np.ndarray) -> np.ndarray:
    """`[4, 4]` counts of (clip's label, partner's label) with the synthetic task's labels `EMOTIONS[i % 4]`."""
    labels = np.arange(len(partners)) % len(EMOTIONS)
    table = np.zeros((len(EMOTIONS), len(EMOTIONS)), int)
    np.add.at(table, (labels, labels[partners]), 1)
    return table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warm_start_media_come_from_partners_independent_of_the_label(seed):
    count = 400
    partners = random_partners(count, (seed, 101))
    assert np.all(partners != np.arange(count)) and partners.min() >= 0 and partners.max() < count
    table = label_contingency(partners)
    assert chi2_contingency(table).pvalue > 0.01, table
    # Every label's clips get media of every label, near uniformly (expected 25 per cell).
    assert table.min() >= 10, table
    # The pairing the demo used before (each clip takes the next clip's media) is a fixed label mapping.
    rotation = label_contingency((np.arange(count) + 1) % count)
    assert chi2_contingency(rotation).pvalue < 1e-30 and np.count_nonzero(rotation) == len(EMOTIONS)


def clips(count: int = 8) -> list[Clip]:
    return [
        Clip(
            id=f"c{i}",
            video=Path(f"/v/{i}.mp4"),
            task="basic",
            subtitle=PHRASES[EMOTIONS[(i + 1) % 4]][0],
            label=EMOTIONS[i % 4],
            rationale=f"rationale number {i} shows {EMOTIONS[i % 4]}",
        )
        for i in range(count)
    ]


def prompts(batch: list[Clip], builder) -> dict[str, list[str]]:
    ids = encode_prompt_pairs(
        builder, [MEDIA] * len(batch), [c.subtitle for c in batch], [c.rationale for c in batch], CONFIG, length=160
    )
    decode = lambda rows, mask: [builder.tokenizer.decode(r[m.astype(bool)]) for r, m in zip(rows, mask)]  # noqa: E731
    return {
        "student": decode(ids["student_input_ids"], ids["student_attention_mask"]),
        "teacher": decode(ids["teacher_input_ids"], ids["teacher_attention_mask"]),
    }


def test_label_and_mismatched_contexts_reach_only_the_teacher(tiny_prompt_builder):
    original = clips()
    partners = random_partners(len(original), 3)
    base = prompts(original, tiny_prompt_builder)
    label = prompts(with_label_statements(original), tiny_prompt_builder)
    mismatched = prompts(with_partner_rationales(original, partners), tiny_prompt_builder)
    # The student's prompt (what training samples from and what evaluation scores) is the same in all three.
    assert label["student"] == base["student"] == mismatched["student"]
    for i, clip in enumerate(original):
        assert "rationale number" not in base["student"][i] and "Evidence" not in base["student"][i]
        assert f"Evidence: The emotion is {clip.label}." in label["teacher"][i]
        assert "rationale number" not in label["teacher"][i]
        partner = original[partners[i]]
        assert (
            f"Evidence: {partner.rationale}" in mismatched["teacher"][i]
            and clip.rationale not in mismatched["teacher"][i]
        )
    # The evaluation's prompt is `conversation` without a rationale: the privileged field cannot enter it.
    student_text = tiny_prompt_builder.render(conversation(MEDIA, original[0].subtitle, CONFIG))
    assert student_text == tiny_prompt_builder.render(conversation(MEDIA, original[0].subtitle, CONFIG, rationale=None))


def test_variants_change_only_their_field():
    original = clips()
    partners = random_partners(len(original), 0)
    swapped = with_partner_media(original, partners)
    assert [c.video for c in swapped] == [original[j].video for j in partners]
    assert [(c.label, c.subtitle, c.rationale) for c in swapped] == [
        (c.label, c.subtitle, c.rationale) for c in original
    ]
    assert all(c.subtitle == "" and c.video == o.video for c, o in zip(without_subtitles(original), original))


def test_media_swap_view_moves_a_media_reader_and_not_a_subtitle_reader():
    test = clips(40)
    partners = random_partners(len(test), 1)
    truth = {c.id: c.label for c in test}
    # A model that reads only the media answers the label of the clip whose media it sees.
    media_reader = [{"id": c.id, "subtitle": c.subtitle, "label": c.label, "predicted": c.label} for c in test]
    media_reader_swapped = [
        {"id": c.id, "subtitle": c.subtitle, "label": c.label, "predicted": truth[test[j].id]}
        for c, j in zip(test, partners)
    ]
    scores = view_scores(media_reader, media_reader_swapped, misleading_ids(test))
    assert scores["all/accuracy"] == 1.0 and scores["swapped/accuracy"] < 0.5 and scores["media_reliance"] > 0.5
    # A model that repeats the subtitle answers the same whatever the media.
    subtitle_reader = subtitle_only_rows(test)
    scores = view_scores(subtitle_reader, subtitle_only_rows(test), misleading_ids(test))
    assert scores["all/accuracy"] == scores["swapped/accuracy"] and scores["media_reliance"] == 0.0
    assert scores["misleading/accuracy"] == 0.0 and scores["misleading/clips"] == 40  # every subtitle misleads here


def test_test_subtitles_can_agree_at_another_rate_than_training_ones(tmp_path):
    import json

    from opsd_jax.data.synthetic import write_synthetic_manifest

    write_synthetic_manifest(tmp_path, 12, 12, seed=0, agree_probability=1.0, test_agree_probability=0.0)
    cues = [json.loads(line) for line in (tmp_path / "cues.jsonl").read_text().splitlines()]
    agree = {
        split: [c["words_emotion"] == c["label"] for c in cues if c["split"] == split] for split in ("train", "test")
    }
    assert all(agree["train"]) and not any(agree["test"]) and len(agree["test"]) == 12


def test_warm_start_evidence_is_half_label_statements_chosen_independently_of_the_label():
    from opsd_jax.demo.data import label_statement, with_some_label_statements

    original = clips(400)
    warm = with_some_label_statements(original, (0, 103))
    statement = np.array([c.rationale == label_statement(c.label) for c in warm])
    kept = np.array([c.rationale == o.rationale for c, o in zip(warm, original)])
    assert np.all(statement ^ kept) and 0.4 < statement.mean() < 0.6
    by_label = [statement[np.arange(400) % 4 == k].mean() for k in range(4)]
    assert max(by_label) - min(by_label) < 0.2, by_label


def test_scores_say_which_cue_a_model_reads_face_valence_and_voice_arousal():
    test = clips(40)
    valence_of = {"happy": "positive", "neutral": "positive", "angry": "negative", "sad": "negative"}
    # A model that hears the voice but not the face: the right arousal, always the negative-valence emotion.
    voice_only = {"happy": "angry", "neutral": "sad", "angry": "angry", "sad": "sad"}
    rows = [{"id": c.id, "subtitle": c.subtitle, "label": c.label, "predicted": voice_only[c.label]} for c in test]
    scores = view_scores(rows, None, misleading_ids(test))
    assert scores["all/accuracy"] == 0.5
    assert scores["all/arousal_accuracy"] == 1.0 and scores["all/valence_accuracy"] == 0.5
    # ... and one that sees the face but not the voice; an unparsed answer has neither right.
    face_only = {"happy": "neutral", "neutral": "neutral", "angry": "sad", "sad": "sad"}
    rows = [{"id": c.id, "subtitle": c.subtitle, "label": c.label, "predicted": face_only[c.label]} for c in test]
    rows[0]["predicted"] = None
    scores = view_scores(rows, None, misleading_ids(test))
    assert all(valence_of[face_only[c.label]] == valence_of[c.label] for c in test)
    assert scores["all/valence_accuracy"] == 39 / 40 and scores["all/arousal_accuracy"] == 20 / 40  # clip 0: happy
