"""The rule-based rationale writer: an OpenAI-compatible server on 127.0.0.1 that reads the synthetic clips'
cues from the frames and audio of each request, driven by the real `generate_rationales` + `ChatClient`.
Tiny synthetic clips (4 frames of 56 x 56, 1 s of audio)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

import pytest

from opsd_jax.data import synthetic
from opsd_jax.data.manifest import read_manifest
from opsd_jax.rationales.client import ChatClient
from opsd_jax.rationales.generate import generate_rationales, merge_rationales, read_rationales
from opsd_jax.rationales.prompt import PROMPT_SHA
from opsd_jax.rationales.rule_based import (
    FACE_WORDS,
    MODEL_NAME,
    VOICE_WORDS,
    RuleBasedServer,
    write_rationale,
    write_rule_based_rationales,
)

N_TRAIN, N_TEST, SEED = 16, 4, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(manifest path, cue table rows by id, rationale file, the run's summary)."""
    directory = tmp_path_factory.mktemp("rule_based")
    manifest = synthetic.write_synthetic_manifest(directory, N_TRAIN, N_TEST, SEED)
    cues = {row["id"]: row for row in map(json.loads, (directory / "cues.jsonl").read_text().splitlines())}
    out = directory / "rationales.jsonl"
    return manifest, cues, out, write_rule_based_rationales(manifest, out)


def test_every_training_clip_gets_one_rationale_naming_its_cues_and_emotion(written):
    manifest, cues, out, summary = written
    assert (summary.selected, summary.done, summary.failed, summary.unfinished, summary.remaining) == (
        N_TRAIN,
        N_TRAIN,
        0,
        0,
        0,
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == [synthetic.clip_id("train", i) for i in range(N_TRAIN)]
    agreeing = 0
    for line in lines:
        row = cues[line["id"]]
        assert line["status"] == "ok" and line["model"] == MODEL_NAME and line["prompt_sha"] == PROMPT_SHA
        assert line["audio"] is True and line["frames"] == synthetic.NUM_FRAMES and line["attempts"] == 1
        text = line["rationale"]
        assert text.endswith(f"makes this {row['label']}.")
        assert FACE_WORDS[row["valence"]][0] in text and VOICE_WORDS[row["arousal"]][0] in text
        assert f'"{row["subtitle"]}"' in text
        if row["words_emotion"] == row["label"]:
            agreeing += 1
            assert "fit that" in text
        else:
            assert f"sound {row['words_emotion']}, but the face and the voice outweigh them" in text
        # What the server read off the media is exactly what generated them.
        assert text == write_rationale(row["valence"], row["arousal"], row["subtitle"], row["label"])
    assert 0 < agreeing < N_TRAIN  # both kinds of words occur in this sample


def test_the_run_resumes_and_the_rationales_merge_into_the_manifest(written, tmp_path):
    manifest, _, out, _ = written
    partial = tmp_path / "partial.jsonl"
    kept = out.read_text().splitlines(keepends=True)[:5]
    partial.write_text("".join(kept) + '{"id": "train_000', encoding="utf-8")  # a write cut short by a crash
    with pytest.warns(UserWarning, match="incomplete last line"):
        summary = write_rule_based_rationales(manifest, partial)
    assert (summary.skipped, summary.done, summary.remaining) == (5, N_TRAIN - 5, 0)
    assert {key: record["rationale"] for key, record in read_rationales(partial).items()} == {
        key: record["rationale"] for key, record in read_rationales(out).items()
    }
    again = write_rule_based_rationales(manifest, partial)
    assert (again.skipped, again.done, again.requests) == (N_TRAIN, 0, 0)

    merged = tmp_path / "manifest_with_rationales.jsonl"
    merge = merge_rationales(manifest, out, merged, require_split="train")
    assert (merge.merged, merge.without) == (N_TRAIN, N_TEST)
    for clip in read_manifest(merged):
        assert bool(clip.rationale) == (clip.split == "train")


def test_a_label_the_media_do_not_show_gets_a_failed_line(written, tmp_path):
    manifest, cues, _, _ = written
    clips = [clip for clip in read_manifest(manifest) if clip.split == "train"][:2]
    wrong = "happy" if clips[0].label != "happy" else "sad"
    clips[0] = dataclasses.replace(clips[0], label=wrong)
    out = tmp_path / "wrong.jsonl"
    summary = write_rule_based_rationales(clips, out)
    assert (summary.done, summary.failed) == (1, 1)
    record = read_rationales(out)[clips[0].id]
    row = cues[clips[0].id]
    assert record["status"] == "failed" and "HTTP 422" in record["error"]
    assert f"show {row['label']}, not '{wrong}'" in record["error"]


def test_requests_without_audio_or_off_the_route_are_refused(written, tmp_path):
    manifest, _, _, _ = written
    with RuleBasedServer() as server:
        client = ChatClient(server.base_url, MODEL_NAME, api_key_env=None, max_retries=0, timeout_s=30)
        out = tmp_path / "no_audio.jsonl"
        summary = generate_rationales(
            manifest, out, client, split="train", limit=1, include_audio=False, progress=False
        )
        assert summary.failed == 1
        error = next(iter(read_rationales(out).values()))["error"]
        assert "HTTP 400" in error and "include_audio=True" in error

        for path, body, status, message in (
            ("/v1/models", b"{}", 404, "no route /v1/models"),
            ("/v1/chat/completions", b"not json", 400, "body: not JSON"),
            ("/v1/chat/completions", b'{"messages": 3}', 400, "'messages' list"),
        ):
            request = urllib.request.Request(server.base_url[: -len("/v1")] + path, data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=10)
            assert caught.value.code == status
            assert message in json.loads(caught.value.read())["error"]["message"]
        assert server.requests == 0  # none of these was answered


def test_the_wording_covers_missing_and_unknown_words():
    text = write_rationale("negative", "low", "", "sad")
    assert "Nothing is said." in text and text.endswith("A displeased face with a subdued voice makes this sad.")
    assert 'The words "hello there" carry no clear feeling.' in write_rationale(
        "positive", "low", "hello there", "neutral"
    )
    with pytest.raises(ValueError, match="valence/arousal: expected positive|negative and high|low"):
        write_rationale("calm", "low", "", "sad")


def test_the_server_thread_stops_on_exit():
    with RuleBasedServer() as server:
        url = server.base_url
        thread = server._thread
        assert thread.is_alive()
    assert not thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", data=b"{}", method="POST"), timeout=5)
