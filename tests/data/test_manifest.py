"""The JSONL clip manifest: round trip, path resolution, and errors that name file, line and field."""

import json
from pathlib import Path

import pytest

from opsd_jax.data.manifest import Clip, ManifestError, read_manifest, write_manifest

GOOD = {"id": "c1", "video": "video/c1.mp4", "task": "basic", "label": "happy"}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_round_trip_resolves_paths_against_the_manifest(tmp_path):
    clips = [
        Clip(
            id="a",
            video=tmp_path / "video" / "a.mp4",
            audio=tmp_path / "audio" / "a.wav",
            task="basic",
            label="angry",
            subtitle="Why?",
            dataset="mer2023",
            split="test",
        ),
        Clip(id="b", video=Path("/elsewhere/b.avi"), task="fine_grained", labels=["sad", "tired"], rationale="R."),
        Clip(id="c", video=tmp_path / "c.mp4", task="sentiment", sentiment=-1.4, label="sad"),
    ]
    path = write_manifest(tmp_path / "manifest.jsonl", clips)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["video"] == "video/a.mp4" and records[0]["audio"] == "audio/a.wav"  # portable
    assert records[1]["video"] == "/elsewhere/b.avi" and records[1]["audio"] is None
    assert read_manifest(path) == clips
    assert read_manifest(path)[1].labels == ("sad", "tired") and read_manifest(path)[1].split == "train"


def test_relative_paths_resolve_against_the_manifest_directory_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = write_lines(tmp_path / "sub" / "m.jsonl", [GOOD | {"audio": "../a.wav"}, "", "   "])
    monkeypatch.chdir(tmp_path)
    (clip,) = read_manifest(path)  # blank lines are skipped
    assert clip.video == tmp_path / "sub" / "video" / "c1.mp4"
    assert clip.audio == tmp_path / "a.wav"
    assert clip.subtitle == "" and clip.dataset == "" and clip.split == "train"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "video": ', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        (json.dumps({"video": "v.mp4", "task": "basic", "label": "happy"}), "field 'id': missing"),
        (json.dumps(GOOD | {"id": 7}), "field 'id': expected a string, got 7"),
        (json.dumps(GOOD | {"id": "  "}), "field 'id': expected a non-empty string"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "video"}), "field 'video': missing"),
        (json.dumps(GOOD | {"audio": 3}), "field 'audio': expected a path string or null"),
        (json.dumps(GOOD | {"task": "emotion"}), "field 'task': expected one of basic, fine_grained, sentiment"),
        (json.dumps(GOOD | {"label": None}), "field 'label': missing; task 'basic'"),
        (json.dumps(GOOD | {"task": "fine_grained", "labels": []}), "field 'labels': missing; task 'fine_grained'"),
        (json.dumps(GOOD | {"task": "fine_grained", "labels": "happy"}), "field 'labels': expected a list of strings"),
        (json.dumps(GOOD | {"labels": ["ok", ""]}), "field 'labels[1]': expected a non-empty string"),
        (json.dumps(GOOD | {"task": "sentiment"}), "field 'sentiment': missing; task 'sentiment'"),
        (json.dumps(GOOD | {"sentiment": "high"}), "field 'sentiment': expected a finite number"),
        (json.dumps(GOOD | {"sentiment": True}), "field 'sentiment': expected a finite number"),
        (json.dumps(GOOD | {"split": "test-1"}), "field 'split': expected letters, digits and '_'"),
        (json.dumps(GOOD | {"subtitle": ["a"]}), "field 'subtitle': expected a string"),
        (json.dumps(GOOD | {"lable": "sad"}), "field 'lable': unknown field"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "m.jsonl", [GOOD | {"id": "first"}, "", line])
    with pytest.raises(ManifestError) as error:
        read_manifest(path)
    assert str(error.value).startswith(f"{path}:3: ")
    assert message in str(error.value)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [GOOD, GOOD | {"id": "c2"}, GOOD])
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: field 'id': duplicate id 'c1' \(first on line 1\)"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest(tmp_path / "out.jsonl", [Clip(id="a", video=Path("v"), task="basic", label="x")] * 2)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


def test_encodings_a_bom_and_line_separators(tmp_path):
    record = {"id": "a", "video": "a.mp4", "task": "basic", "label": "happy", "subtitle": "one\u2028two"}
    path = tmp_path / "m.jsonl"
    path.write_bytes(("\ufeff" + json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    (clip,) = read_manifest(path)  # a BOM (Windows editors) is read; U+2028 inside a string splits no line
    assert clip.id == "a" and clip.subtitle == "one\u2028two"
    path.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=rf"^{path}:2: not UTF-8 text \(byte 0xe9 at offset 23\)"):
        read_manifest(path)
