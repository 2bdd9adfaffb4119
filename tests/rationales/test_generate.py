"""`generate_rationales` against a fake OpenAI-compatible server on 127.0.0.1: validation, failures, resume,
merge. Tiny 56x56 videos, short timeouts, no real sleeping between retries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from opsd_jax.data.manifest import Clip, read_manifest, write_manifest
from opsd_jax.data.media import write_video
from opsd_jax.rationales.client import ChatClient, ChatClientError
from opsd_jax.rationales.generate import (
    InvalidRationale,
    RationaleFile,
    RationaleFileError,
    ValidationRules,
    generate_rationales,
    merge_rationales,
    read_rationales,
    validate_rationale,
)
from opsd_jax.rationales.prompt import PROMPT_SHA
from tests.eval.fake_chat_server import FakeChatServer, Reply, SleepRecorder

KEY_ENV = "TEST_RATIONALES_KEY"
KEY = "sk-test-rationales-secret"
LABELS = ("angry", "happy", "sad")
_ID_IN_PROMPT = re.compile(r"This is (clip_\d+),")


# ----- helpers shared with test_cli.py ------------------------------------------------------------------------


def write_test_video(path: Path, num_frames: int, *, audio: bool = False) -> Path:
    """A 56x56 video at 6 fps whose frames are all different (flat grey levels 20, 60, 100, ...)."""
    frames = np.stack([np.full((56, 56, 3), 20 + 40 * t, np.uint8) for t in range(num_frames)])
    sound = np.sin(np.linspace(0, 2 * np.pi * 440 * num_frames / 6, 16000 * num_frames // 6)) * 0.3 if audio else None
    return write_video(path, frames, fps=6, audio=None if sound is None else sound.astype(np.float32))


def make_clips(count: int, video: Path, *, split: str = "train", start: int = 0) -> list[Clip]:
    return [
        Clip(
            id=f"clip_{i:02d}",
            video=video,
            task="basic",
            label=LABELS[i % 3],
            split=split,
            subtitle=f"This is clip_{i:02d}, and I mean it.",
        )
        for i in range(start, start + count)
    ]


def clip_of(request: dict) -> str:
    """The clip id a request is about (its subtitle names it)."""
    return _ID_IN_PROMPT.search(request["messages"][-1]["content"][-1]["text"]).group(1)


def good_answer(clip_id: str) -> str:
    return (
        f"In {clip_id} the brows are drawn together and the jaw is set; the clipped, forceful delivery that "
        "the exclamation implies and the words 'I mean it' point the same way."
    )


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    broken = root / "broken.mp4"
    broken.write_bytes(b"this is not a video file " * 40)
    return {
        "six": write_test_video(root / "six.mp4", 6),
        "three": write_test_video(root / "three.mp4", 3),
        "with_audio": write_test_video(root / "with_audio.mp4", 6, audio=True),
        "broken": broken,
        "missing": root / "missing.mp4",
    }


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def _client(server: FakeChatServer, **options) -> ChatClient:
    settings = dict(
        api_key_env=KEY_ENV,
        timeout_s=1.0,
        max_retries=2,
        max_concurrency=3,
        backoff_base_s=0.01,
        sleep=SleepRecorder(),
        seed=0,
    )
    settings.update(options)
    return ChatClient(server.base_url, "test-model", **settings)


def _good_server(**reply_fields) -> FakeChatServer:
    return FakeChatServer(lambda request, attempt: Reply(text=good_answer(clip_of(request)), **reply_fields))


def _requested(server: FakeChatServer, since: int = 0) -> list[str]:
    return [clip_of(request) for request in server.requests[since:]]


# ----- a healthy run -----------------------------------------------------------------------------------------


def test_one_validated_line_per_clip_with_usage_and_cost(media, tmp_path, key):
    clips = make_clips(4, media["six"]) + make_clips(1, media["three"], start=4)
    out = tmp_path / "rationales.jsonl"
    with _good_server(prompt_tokens=100, completion_tokens=40) as server:
        client = _client(server, cost_per_1k_prompt_tokens=1.0, cost_per_1k_completion_tokens=2.0)
        summary = generate_rationales(
            clips,
            out,
            client,
            frames_per_clip=4,
            progress=False,
            request_params={"temperature": 0.0, "max_tokens": 200},
        )
    records = lines_of(out)
    assert sorted(r["id"] for r in records) == [c.id for c in clips]
    for record in records:
        assert record["status"] == "ok" and record["rationale"] == good_answer(record["id"])
        assert record["model"] == "test-model" and record["attempts"] == 1 and record["prompt_sha"] == PROMPT_SHA
        assert record["usage"] == {"prompt_tokens": 100, "completion_tokens": 40, "cost": pytest.approx(0.18)}
        assert record["audio"] is False
    frames = {r["id"]: r["frames"] for r in records}
    assert frames == {"clip_00": 4, "clip_01": 4, "clip_02": 4, "clip_03": 4, "clip_04": 3}  # 3-frame video: no repeats
    by_clip = {clip_of(request): request for request in server.requests}
    assert len(server.requests) == 5
    assert sum(part["type"] == "image_url" for part in by_clip["clip_04"]["messages"][0]["content"]) == 3
    assert by_clip["clip_00"]["temperature"] == 0.0 and by_clip["clip_00"]["max_tokens"] == 200
    assert all(headers["Authorization"] == f"Bearer {KEY}" for headers in server.headers)
    assert KEY not in out.read_text()
    assert (summary.done, summary.skipped, summary.failed, summary.unfinished, summary.remaining) == (5, 0, 0, 0, 0)
    assert (summary.requests, summary.prompt_tokens, summary.completion_tokens) == (5, 500, 200)
    assert summary.cost == pytest.approx(5 * 0.18)
    assert server.peak_in_flight <= 3


def test_audio_is_sent_when_asked(media, tmp_path):
    with _good_server() as server:
        summary = generate_rationales(
            make_clips(1, media["with_audio"]),
            tmp_path / "r.jsonl",
            _client(server),
            frames_per_clip=2,
            include_audio=True,
            progress=False,
        )
    assert summary.done == 1 and lines_of(tmp_path / "r.jsonl")[0]["audio"] is True
    content = server.requests[0]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "input_audio", "text"]


# ----- validation ------------------------------------------------------------------------------------------


RULES = ValidationRules(min_words=8, max_words=40, min_chars=40, max_chars=300)
ANGRY = Clip(id="a", video="v.mp4", task="basic", label="angry")


@pytest.mark.parametrize(
    "text, finish_reason, reason",
    [
        ("", "stop", "empty"),
        ("   \n ", "stop", "empty"),
        ("<think>the face looks tense</think>", "stop", "empty"),
        ("Angry.", "stop", "only repeats the label"),
        ("The emotion is angry, angry, angry, angry, angry and angry.", "stop", "only repeats the label"),
        ("The label says angry, and the tight jaw and the raised brows agree with it.", "stop", "mentions 'label'"),
        ("Given the annotation, the tight jaw and the raised brows show anger here.", "stop", "mentions 'annotation'"),
        ("Tight jaw, raised brows.", "stop", "4 words"),
        ("The jaw " * 30, "stop", "60 words"),
        ("A tight jaw and lowered brows, and the voice " + "x" * 400, "stop", "characters"),
        (good_answer("a"), "length", "token limit"),
    ],
)
def test_invalid_answers(text, finish_reason, reason):
    with pytest.raises(InvalidRationale, match=re.escape(reason)):
        validate_rationale(text, ANGRY, RULES, finish_reason)


def test_valid_answer_is_cleaned():
    answer = "<think>weighing cues</think>\n  The jaw is tight and the brows are lowered;\n\nthe words are clipped.  "
    assert validate_rationale(answer, ANGRY, RULES, "stop") == (
        "The jaw is tight and the brows are lowered; the words are clipped."
    )


def test_rules_for_prompt_leave_slack():
    rules = ValidationRules.for_prompt(120)
    assert (rules.min_words, rules.max_words, rules.min_chars, rules.max_chars) == (15, 150, 60, 1500)
    with pytest.raises(ValueError, match="min_words"):
        ValidationRules(min_words=50, max_words=10)


def test_invalid_answers_are_asked_again_then_recorded_failed(media, tmp_path):
    def reply(request, attempt):
        clip_id = clip_of(request)
        if clip_id == "clip_00" and attempt == 0:
            return Reply(text="Angry.")
        if clip_id == "clip_01":  # never valid
            return Reply(text="The label is happy, so the smile and the bright eyes of the person show happiness.")
        if clip_id == "clip_02" and attempt < 2:
            return Reply(text="")
        return Reply(text=good_answer(clip_id))

    out = tmp_path / "r.jsonl"
    with FakeChatServer(reply) as server:
        summary = generate_rationales(
            make_clips(4, media["six"]), out, _client(server), frames_per_clip=2, validation_retries=2, progress=False
        )
    requested = _requested(server)
    assert {c: requested.count(c) for c in sorted(set(requested))} == {
        "clip_00": 2,
        "clip_01": 3,
        "clip_02": 3,
        "clip_03": 1,
    }
    records = {r["id"]: r for r in lines_of(out)}
    assert len(records) == 4 and len(lines_of(out)) == 4
    assert records["clip_00"]["status"] == "ok" and records["clip_00"]["attempts"] == 2
    assert records["clip_02"]["status"] == "ok" and records["clip_02"]["attempts"] == 3
    failed = records["clip_01"]
    assert failed["status"] == "failed" and failed["attempts"] == 3 and "mentions 'label'" in failed["error"]
    assert failed["last_answer"].startswith("The label is happy")
    assert failed["usage"]["prompt_tokens"] == 3 * 10  # every attempt is paid for
    assert (summary.done, summary.failed, summary.requests) == (3, 1, 9)


# ----- media and endpoint failures --------------------------------------------------------------------------


def test_unreadable_video_is_recorded_failed_and_the_others_succeed(media, tmp_path):
    clips = make_clips(2, media["six"]) + make_clips(1, media["broken"], start=2)
    clips += make_clips(1, media["missing"], start=3)
    out = tmp_path / "r.jsonl"
    with _good_server() as server:
        summary = generate_rationales(clips, out, _client(server), frames_per_clip=2, progress=False)
    records = {r["id"]: r for r in lines_of(out)}
    assert sorted(_requested(server)) == ["clip_00", "clip_01"]  # nothing sent for unreadable media
    statuses = [records[c]["status"] for c in ("clip_00", "clip_01", "clip_02", "clip_03")]
    assert statuses == ["ok", "ok", "failed", "failed"]
    for clip_id, name in (("clip_02", "broken"), ("clip_03", "missing")):
        assert clip_id in records[clip_id]["error"] and str(media[name]) in records[clip_id]["error"]
        assert records[clip_id]["video"] == str(media[name]) and records[clip_id]["attempts"] == 0
    assert "no such file" in records["clip_03"]["error"]
    assert (summary.done, summary.failed, summary.unfinished) == (2, 2, 0)
    assert summary.first_error.startswith("clip 'clip_02'")


def test_429_500_and_hangs_are_retried_lasting_errors_stay_missing(media, tmp_path):
    healthy = {"clip_03": False}

    def reply(request, attempt):
        clip_id = clip_of(request)
        if clip_id == "clip_00" and attempt == 0:
            return Reply(status=429, headers={"Retry-After": "0"})
        if clip_id == "clip_01" and attempt < 2:
            return Reply(status=500)
        if clip_id == "clip_02" and attempt == 0:
            return Reply(text=good_answer(clip_id), delay_s=4.0)  # beyond the client's 2 s timeout
        if clip_id == "clip_03" and not healthy["clip_03"]:
            return Reply(status=503)
        if clip_id == "clip_04":
            return Reply(status=400, error_message="image too large")
        return Reply(text=good_answer(clip_id))

    out = tmp_path / "r.jsonl"
    clips = make_clips(5, media["six"])
    with FakeChatServer(reply) as server:
        first = generate_rationales(clips, out, _client(server, timeout_s=2.0), frames_per_clip=2, progress=False)
        records = {r["id"]: r for r in lines_of(out)}
        assert sorted(records) == ["clip_00", "clip_01", "clip_02", "clip_04"]  # clip_03: no line, retried later
        assert all(records[c]["status"] == "ok" for c in ("clip_00", "clip_01", "clip_02"))
        assert records["clip_04"]["status"] == "failed" and "HTTP 400" in records["clip_04"]["error"]
        assert (first.done, first.failed, first.unfinished, first.remaining) == (3, 1, 1, 1)
        assert re.match(
            r"clip 'clip_0(3': gave up after 3 attempts.*HTTP 503|4': HTTP 400)", first.first_error
        )  # whichever ended first
        assert _requested(server).count("clip_03") == 3  # 1 + max_retries
        sent = len(server.requests)

        healthy["clip_03"] = True
        second = generate_rationales(clips, out, _client(server), frames_per_clip=2, progress=False)
    assert _requested(server, since=sent) == ["clip_03"]
    assert (second.done, second.skipped, second.unfinished, second.remaining) == (1, 4, 0, 0)
    assert sorted(r["id"] for r in lines_of(out)) == [c.id for c in clips]


def test_a_rejected_key_stops_the_run(media, tmp_path):
    with FakeChatServer(lambda request, attempt: Reply(status=401, error_message="bad key")) as server:
        with pytest.raises(ChatClientError, match="HTTP 401.*bad key") as info:
            generate_rationales(
                make_clips(6, media["six"]),
                tmp_path / "r.jsonl",
                _client(server, max_concurrency=1),
                frames_per_clip=2,
                chunk_size=2,
                progress=False,
            )
    assert info.value.status == 401
    assert (tmp_path / "r.jsonl").read_text() == "" and len(server.requests) <= 2  # the run stopped at once


# ----- interruption and resume -------------------------------------------------------------------------------


class InterruptingClient(ChatClient):
    """A client whose `map` raises after `budget` results in all (a crash in the middle of a run)."""

    def __init__(self, *args, budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = budget

    def map(self, requests, **kwargs):
        for item in super().map(requests, **kwargs):
            if self.budget == 0:
                raise KeyboardInterrupt("injected crash")
            self.budget -= 1
            yield item


def test_interrupted_run_resumes_every_id_once_sending_only_the_missing(media, tmp_path):
    clips = make_clips(9, media["six"])
    out = tmp_path / "r.jsonl"
    with _good_server(delay_s=0.02) as server:
        crashing = InterruptingClient(
            server.base_url, "test-model", timeout_s=1.0, max_concurrency=2, budget=4, sleep=SleepRecorder()
        )
        with pytest.raises(KeyboardInterrupt):
            generate_rationales(clips, out, crashing, frames_per_clip=2, chunk_size=3, progress=False)
        written = [r["id"] for r in lines_of(out)]
        assert len(written) == 4
        missing = sorted({c.id for c in clips} - set(written))
        # A crash in the middle of a write leaves a cut-short last line.
        with out.open("a") as handle:
            handle.write(f'{{"id": "{missing[0]}", "status": "ok", "rationale": "The bro')
        sent = len(server.requests)
        with pytest.warns(UserWarning, match="incomplete last line"):
            summary = generate_rationales(clips, out, _client(server), frames_per_clip=2, chunk_size=3, progress=False)
    resent = _requested(server, since=sent)
    assert sorted(resent) == missing  # each missing clip once, nothing already written
    ids = [r["id"] for r in lines_of(out)]  # every line parses: the cut-short one is gone
    assert sorted(ids) == [c.id for c in clips] and len(ids) == len(set(ids))
    assert (summary.skipped, summary.done, summary.remaining) == (4, 5, 0)
    third = generate_rationales(clips, out, _client(server), frames_per_clip=2, progress=False)
    assert (third.skipped, third.done, third.requests) == (9, 0, 0)


def test_retry_failed_replaces_failed_lines(media, tmp_path):
    valid = {"now": False}

    def reply(request, attempt):
        clip_id = clip_of(request)
        return Reply(text=good_answer(clip_id) if valid["now"] or clip_id != "clip_01" else "Happy.")

    clips = make_clips(3, media["six"])
    out = tmp_path / "r.jsonl"
    with FakeChatServer(reply) as server:
        generate_rationales(clips, out, _client(server), frames_per_clip=2, validation_retries=0, progress=False)
        assert {r["id"]: r["status"] for r in lines_of(out)}["clip_01"] == "failed"
        valid["now"] = True
        plain = generate_rationales(clips, out, _client(server), frames_per_clip=2, progress=False)
        assert (plain.skipped, plain.requests) == (3, 0)  # failed lines count as done
        sent = len(server.requests)
        retried = generate_rationales(clips, out, _client(server), frames_per_clip=2, retry_failed=True, progress=False)
    assert _requested(server, since=sent) == ["clip_01"]
    assert (retried.retried_failed, retried.done, retried.skipped) == (1, 1, 2)
    records = lines_of(out)
    assert sorted(r["id"] for r in records) == ["clip_00", "clip_01", "clip_02"]
    assert all(r["status"] == "ok" for r in records)
    assert not (tmp_path / "r.jsonl.tmp").exists()


def test_limit_and_split(media, tmp_path):
    clips = make_clips(2, media["six"]) + make_clips(3, media["six"], split="test", start=2)
    out = tmp_path / "r.jsonl"
    with _good_server() as server:
        summary = generate_rationales(
            clips, out, _client(server), frames_per_clip=2, split="test", limit=2, progress=False
        )
        assert sorted(_requested(server)) == ["clip_02", "clip_03"]
        assert (summary.selected, summary.done, summary.remaining) == (3, 2, 1)
        with pytest.raises(ValueError, match="split 'tst'.*splits present: test, train"):
            generate_rationales(clips, out, _client(server), split="tst", progress=False)


# ----- the file itself ---------------------------------------------------------------------------------------


def test_file_is_locked_and_never_takes_an_id_twice(tmp_path):
    path = tmp_path / "r.jsonl"
    with RationaleFile(path) as first:
        first.append({"id": "x", "status": "ok", "rationale": "text"})
        with pytest.raises(RationaleFileError, match="another run"):
            RationaleFile(path).__enter__()
        with pytest.raises(RationaleFileError, match="'x' is already in the file"):
            first.append({"id": "x", "status": "ok", "rationale": "again"})
    with RationaleFile(path) as again:  # the lock went with the first holder
        assert list(again.records) == ["x"]


@pytest.mark.parametrize(
    "content, match",
    [
        (
            '{"id": "a", "status": "ok", "rationale": "r"}\n{"id": "a", "status": "failed"}\n',
            r":2: field 'id': 'a' appears twice",
        ),
        ('{"id": "a", "status": "ok", "rationale": "r"}\nnot json\n', r":2: invalid JSON"),
        ('{"id": "a", "status": "done"}\n', r":1: field 'status'"),
        ('{"id": "a", "status": "ok"}\n', r":1: field 'rationale'"),
        ('["a"]\n', r":1: field 'id'"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, content, match):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    with pytest.raises(RationaleFileError, match=re.escape(str(path)) + match):
        read_rationales(path)
    with pytest.raises(RationaleFileError, match=match):
        RationaleFile(path).__enter__()


# ----- merge ---------------------------------------------------------------------------------------------------


def _manifest_with_rationales(tmp_path: Path, video: Path) -> tuple[Path, Path]:
    clips = make_clips(3, video) + make_clips(1, video, split="test", start=3)
    clips[2] = Clip(**{**clips[2].__dict__, "rationale": "an older rationale kept as it was"})
    manifest = write_manifest(tmp_path / "data" / "manifest.jsonl", clips)
    records = [
        {"id": "clip_00", "status": "ok", "rationale": "rationale zero"},
        {"id": "clip_01", "status": "failed", "error": "cannot read"},
        {"id": "clip_03", "status": "ok", "rationale": "rationale three"},
        {"id": "elsewhere", "status": "ok", "rationale": "not in this manifest"},
    ]
    rationales = tmp_path / "r.jsonl"
    rationales.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest, rationales


def test_merge_writes_a_new_manifest(media, tmp_path):
    manifest, rationales = _manifest_with_rationales(tmp_path, media["six"])
    out = tmp_path / "data" / "manifest.rationales.jsonl"
    summary = merge_rationales(manifest, rationales, out)
    merged = {clip.id: clip for clip in read_manifest(out)}
    assert {key: clip.rationale for key, clip in merged.items()} == {
        "clip_00": "rationale zero",
        "clip_01": None,
        "clip_02": "an older rationale kept as it was",
        "clip_03": "rationale three",
    }
    original = {clip.id: clip for clip in read_manifest(manifest)}
    assert all(merged[key].video == original[key].video == media["six"].resolve() for key in merged)
    assert (summary.clips, summary.merged, summary.without, summary.failed, summary.unmatched) == (4, 2, 1, 1, 1)


def test_merge_errors(media, tmp_path):
    manifest, rationales = _manifest_with_rationales(tmp_path, media["six"])
    with pytest.raises(RationaleFileError, match=r"1 clips of split 'train' have no rationale \(first: clip_01\)"):
        merge_rationales(manifest, rationales, tmp_path / "m2.jsonl", require_split="train")
    assert merge_rationales(manifest, rationales, tmp_path / "m3.jsonl", require_split="test").merged == 2
    with pytest.raises(ValueError, match="is the input manifest"):
        merge_rationales(manifest, rationales, manifest)
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text(json.dumps({"id": "nobody", "status": "ok", "rationale": "r"}) + "\n")
    with pytest.raises(RationaleFileError, match="none of its 1 ids is in"):
        merge_rationales(manifest, stranger, tmp_path / "m4.jsonl")
    with pytest.raises(FileNotFoundError, match="rationale file .*absent.jsonl does not exist"):
        merge_rationales(manifest, tmp_path / "absent.jsonl", tmp_path / "m5.jsonl")
