"""`opsd-jax rationales` end to end: a CLI process killed with SIGKILL halfway and resumed, merge, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opsd_jax.cli import main
from opsd_jax.data.manifest import read_manifest, write_manifest
from tests.eval.fake_chat_server import FakeChatServer, Reply
from tests.rationales.test_generate import KEY, KEY_ENV, clip_of, good_answer, lines_of, make_clips, write_test_video

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """10 train clips and 2 test clips over one tiny video, written as a manifest with relative paths."""
    root = tmp_path_factory.mktemp("cli_data")
    video = write_test_video(root / "video" / "six.mp4", 6)
    clips = make_clips(10, video) + make_clips(2, video, split="test", start=10)
    return write_manifest(root / "manifest.jsonl", clips)


def _args(manifest: Path, out: Path, server: FakeChatServer, *extra: str) -> list[str]:
    return [
        "rationales",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--model",
        "test-model",
        "--base-url",
        server.base_url,
        "--api-key-env",
        KEY_ENV,
        "--frames",
        "2",
        "--concurrency",
        "2",
        "--timeout",
        "2",
        "--max-retries",
        "3",
        "--backoff-base",
        "0.01",
        "--no-progress",
        *extra,
    ]


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the CLI exited early ({process.returncode}): {process.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {count} lines in {limit_s} s")


def test_killed_run_resumes_every_id_once_sending_only_the_missing(manifest, tmp_path, monkeypatch, capsys):
    def reply(request, attempt):
        clip_id = clip_of(request)
        if clip_id == "clip_01" and attempt == 0:
            return Reply(status=429, headers={"Retry-After": "0"})
        if clip_id == "clip_02" and attempt == 0:
            return Reply(status=500)
        if clip_id == "clip_03" and attempt == 0:
            return Reply(text=good_answer(clip_id), delay_s=4.0)  # hangs past the 2 s timeout
        return Reply(text=good_answer(clip_id), delay_s=0.3, prompt_tokens=50, completion_tokens=20)

    out = tmp_path / "rationales.jsonl"
    train = [f"clip_{i:02d}" for i in range(10)]
    with FakeChatServer(reply) as server:
        command = [sys.executable, "-m", "opsd_jax.cli", *_args(manifest, out, server, "--split", "train")]
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, KEY_ENV: KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            _wait_for_lines(out, 3, process)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            killed_output = b"".join(process.communicate(timeout=10))
        assert process.returncode == -signal.SIGKILL
        written = [record["id"] for record in lines_of(out)]
        assert 3 <= len(written) < 10, written  # killed halfway
        missing = sorted(set(train) - set(written))
        with out.open("a") as handle:  # as if the kill had landed in the middle of a write
            handle.write(f'{{"id": "{missing[0]}", "status": "ok", "rationa')
        sent = len(server.requests)

        monkeypatch.setenv(KEY_ENV, KEY)
        with pytest.warns(UserWarning, match="incomplete last line"):
            assert main(_args(manifest, out, server, "--split", "train", "--cost-per-1k-input", "1")) == 0
        printed = capsys.readouterr()

        resent = [clip_of(request) for request in server.requests[sent:]]
        assert sorted(set(resent)) == missing  # nothing already written is asked for again
        # Each missing clip is asked for once, except retries of a clip whose first attempt failed.
        assert all(resent.count(clip_id) == 1 for clip_id in missing if clip_id >= "clip_04")
        assert all(headers["Authorization"] == f"Bearer {KEY}" for headers in server.headers)

    records = lines_of(out)  # every line parses: the cut-short one was dropped
    ids = [record["id"] for record in records]
    assert sorted(ids) == train and len(set(ids)) == len(ids)  # test-split clips were left alone
    assert all(record["status"] == "ok" and record["rationale"] == good_answer(record["id"]) for record in records)
    assert f"{len(missing)} written, {len(written)} already there, 0 failed" in printed.out
    assert "cost: " in printed.out
    for text in (out.read_text(), printed.out, printed.err, killed_output.decode()):
        assert KEY not in text  # the key travels in the header only


def test_merge_command_and_exit_codes(manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    out = tmp_path / "r.jsonl"
    always_down = {"clip_10"}

    def reply(request, attempt):
        clip_id = clip_of(request)
        return Reply(status=503) if clip_id in always_down else Reply(text=good_answer(clip_id))

    with FakeChatServer(reply) as server:
        assert main(_args(manifest, out, server, "--split", "test", "--max-retries", "0")) == 1
        printed = capsys.readouterr()
        assert f"${KEY_ENV} is not set" in printed.err and "rerun the same command" in printed.err
        assert all("Authorization" not in headers for headers in server.headers)
        always_down.clear()
        assert main(_args(manifest, out, server, "--split", "test")) == 0
    assert sorted(record["id"] for record in lines_of(out)) == ["clip_10", "clip_11"]

    merged = tmp_path / "merged" / "manifest.jsonl"
    assert (
        main(
            [
                "rationales",
                "merge",
                "--manifest",
                str(manifest),
                "--rationales",
                str(out),
                "--out",
                str(merged),
                "--require-split",
                "test",
            ]
        )
        == 0
    )
    assert "merged 2 of 12 clips' rationales" in capsys.readouterr().out
    clips = {clip.id: clip for clip in read_manifest(merged)}
    assert clips["clip_10"].rationale == good_answer("clip_10") and clips["clip_00"].rationale is None
    assert clips["clip_10"].video == read_manifest(manifest)[10].video  # media paths still resolve

    assert (
        main(
            [
                "rationales",
                "merge",
                "--manifest",
                str(manifest),
                "--rationales",
                str(out),
                "--out",
                str(tmp_path / "m2.jsonl"),
                "--require-split",
                "train",
            ]
        )
        == 2
    )
    assert "10 clips of split 'train' have no rationale" in capsys.readouterr().err


def test_errors_exit_2_naming_the_file_or_field(manifest, tmp_path, capsys):
    with FakeChatServer(lambda request, attempt: Reply(status=401, error_message="invalid key")) as server:
        missing = tmp_path / "absent.jsonl"
        assert main(_args(missing, tmp_path / "r.jsonl", server)) == 2
        assert f"manifest {missing} does not exist" in capsys.readouterr().err

        typo = tmp_path / "typo.jsonl"
        typo.write_text(json.dumps({"id": "a", "video": "v.mp4", "task": "basic", "lable": "sad"}) + "\n")
        assert main(_args(typo, tmp_path / "r.jsonl", server)) == 2
        assert f"{typo}:1: field 'lable': unknown field" in capsys.readouterr().err

        broken_out = tmp_path / "broken.jsonl"
        broken_out.write_text('{"id": "clip_00", "status": "ok", "rationale": "r"}\n{oops}\n')
        assert main(_args(manifest, broken_out, server)) == 2
        assert f"{broken_out}:2: invalid JSON" in capsys.readouterr().err

        assert main(_args(manifest, tmp_path / "r.jsonl", server, "--split", "dev")) == 2
        assert "split 'dev': no clip of" in capsys.readouterr().err

        assert main(_args(manifest, tmp_path / "r.jsonl", server)) == 2  # a rejected key stops the run
        assert "HTTP 401" in (err := capsys.readouterr().err) and f"is ${KEY_ENV} set?" in err
        # Stopped at once: no line written, and not all 12 clips asked for (the ones already taken up by the
        # two workers when the first 401 came back may still go out).
        assert (tmp_path / "r.jsonl").read_text() == "" and len(server.requests) < 12

    assert main(["rationales", "--manifest", str(manifest)]) == 2
    assert "--out, --model, --base-url required" in capsys.readouterr().err
    assert (
        main(
            [
                "rationales",
                "merge",
                "--manifest",
                str(manifest),
                "--rationales",
                str(broken_out),
                "--out",
                str(manifest),
            ]
        )
        == 2
    )
    assert "is the input manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["rationales", "--params", "[1]"])
    assert info.value.code == 2 and "expected a JSON object" in capsys.readouterr().err


def test_help_describes_the_command():
    with pytest.raises(SystemExit) as info:
        main(["rationales", "--help"])
    assert info.value.code == 0
    for command in (["rationales", "--help"], ["rationales", "merge", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "opsd_jax.cli", *command],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0
    assert "--require-split" in result.stdout and "MANIFEST with each clip's `rationale`" in result.stdout


def test_an_echoed_key_is_written_nowhere(manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "r.jsonl"
    reply = lambda request, attempt: Reply(status=400, error_message="bad image", echo_authorization=True)  # noqa: E731
    with FakeChatServer(reply) as server:
        main(_args(manifest, out, server, "--split", "test"))
    printed = capsys.readouterr()
    written = out.read_text()
    assert [record["status"] for record in lines_of(out)] == ["failed", "failed"] and "Bearer [REDACTED]" in written
    for text in (written, printed.out, printed.err):
        assert KEY not in text


def test_limit_leaving_clips_missing_exits_1_and_says_why(manifest, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    out = tmp_path / "r.jsonl"
    with FakeChatServer(lambda request, attempt: Reply(text=good_answer(clip_of(request)))) as server:
        assert main(_args(manifest, out, server, "--split", "test", "--limit", "1")) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "1 clips have no line yet (1 were left for later by --limit)" in last
        assert main(_args(manifest, out, server, "--split", "test")) == 0
    assert len(lines_of(out)) == 2
