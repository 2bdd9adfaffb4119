"""`opsd-jax data convert | build | check` on a tiny MER2023 layout of real (decodable) clips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_jax.cli import main
from opsd_jax.data.builders import load_split
from tests.mer_pack import write_mer2023_pack

SHAPE = ["--num-frames", "4", "--height", "56", "--width", "56", "--max-audio-seconds", "1"]
LABELS = {
    "test1_corpus": {"t1": {"emo": "happy"}, "t2": {"emo": "sad"}},
    "train_corpus": {"r1": {"emo": "angry"}, "r2": {"emo": "neutral"}, "r3": {"emo": "worried"}},
}


@pytest.fixture(scope="module")
def mer2023(tmp_path_factory) -> Path:
    """A MER2023 pack as shipped: label-6way.npz, video/ with their own audio tracks, a subtitle CSV."""
    return write_mer2023_pack(
        tmp_path_factory.mktemp("mer2023-dataset-process"), LABELS, {"t1": "I won!", "r1": "Go away."}
    )


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def manifest_ids(path: Path) -> dict[str, str]:
    return {record["id"]: record["split"] for record in map(json.loads, path.read_text().splitlines())}


def test_convert_writes_train_and_test_and_names_a_missing_split(mer2023, tmp_path, capsys):
    code, out, _ = run(
        capsys, "data", "convert", "--dataset", "MER2023", "--root", str(mer2023), "--out", str(tmp_path / "all.jsonl")
    )
    assert code == 0 and "wrote 5 clips (test: 2, train: 3)" in out
    assert manifest_ids(tmp_path / "all.jsonl") == {
        "t1": "test",
        "t2": "test",
        "r1": "train",
        "r2": "train",
        "r3": "train",
    }
    code, _, _ = run(
        capsys,
        "data",
        "convert",
        "--dataset",
        "mer2023",
        "--root",
        str(mer2023),
        "--out",
        str(tmp_path / "test.jsonl"),
        "--splits",
        "test",
    )
    assert code == 0 and set(manifest_ids(tmp_path / "test.jsonl").values()) == {"test"}
    code, _, err = run(
        capsys,
        "data",
        "convert",
        "--dataset",
        "mer2023",
        "--root",
        str(mer2023),
        "--out",
        str(tmp_path / "dev.jsonl"),
        "--splits",
        "train,dev",
    )
    assert code == 2 and "no 'dev' split; it has test, train" in err and not (tmp_path / "dev.jsonl").exists()


def test_build_prints_the_train_dir_and_a_rerun_reuses_it(mer2023, tmp_path, capsys):
    manifest = mer2023 / "manifest.jsonl"
    assert (
        run(capsys, "data", "convert", "--dataset", "mer2023", "--root", str(mer2023), "--out", str(manifest))[0] == 0
    )
    argv = ["data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "tfds"), "--name", "mer2023", *SHAPE]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "test: 2 clips, train: 3 clips" in out
    train_dir = Path(out.strip().splitlines()[-1].removeprefix("data.train_dir="))
    assert train_dir == (tmp_path / "tfds" / "mer" / "mer2023" / "1.0.0").resolve()
    assert sorted(example["id"].decode() for example in load_split(train_dir, "train")) == ["r1", "r2", "r3"]
    assert load_split(train_dir, "test")[0]["frames"].shape == (4, 56, 56, 3)
    rerun = run(capsys, *argv)[1]
    assert "Downloading and preparing" in out and "Downloading and preparing" not in rerun  # reused as it is
    assert rerun.splitlines()[-2:] == out.splitlines()[-2:]
    code, _, err = run(
        capsys, "data", "build", "--manifest", str(manifest), "--out", str(tmp_path / "t"), "--num-frames", "3"
    )
    assert code == 2 and "num_frames must be a positive multiple of 2, got 3" in err


def test_check_tables_every_problem_by_clip_and_exits_nonzero(mer2023, tmp_path, capsys):
    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    manifest = tmp_path / "manifest.jsonl"
    assert (
        run(capsys, "data", "convert", "--dataset", "mer2023", "--root", str(mer2023), "--out", str(manifest))[0] == 0
    )
    checkpoint = tmp_path / "tokenizer"
    build_tiny_tokenizer(checkpoint)
    config = ["--config", "demo_tiny", f"model.checkpoint={checkpoint}"]
    code, out, _ = run(capsys, "data", "check", "--manifest", str(manifest), *config, *SHAPE)
    assert code == 0 and "5 clips, no problems (media, labels and prompt lengths)" in out

    (tmp_path / "video").mkdir()
    (tmp_path / "video" / "broken.mp4").write_bytes(b"not a video")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    records[0]["subtitle"] = "happy " * 200  # ~200 more tokens: over demo_tiny's data.prompt_length 192
    records[1]["label"] = "bored"  # a word MER2023 does not use
    records[2]["video"] = str(tmp_path / "video" / "broken.mp4")
    records.append({"id": "x9", "video": "video/t1.mp4", "task": "basic", "dataset": "mer2023"})  # no label
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    code, out, _ = run(capsys, "data", "check", "--manifest", str(manifest), *config, *SHAPE)
    assert code == 1
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| clip")
    }
    ids = [record["id"] for record in records]
    assert set(rows) == {ids[0], ids[1], ids[2], "x9"}, out
    assert rows[ids[0]].startswith("prompt: ") and "over 192 (data.prompt_length=192" in rows[ids[0]]
    assert "label 'bored' is not one of mer2023's classes" in rows[ids[1]]
    assert rows[ids[2]].startswith("media: ") and "broken.mp4" in rows[ids[2]]
    assert "line 6: field 'label': missing" in rows["x9"]
    assert "4 problem(s) in 4 of 6 clips" in out

    # Without a config, the media and labels only; a config without a checkpoint is named before decoding.
    code, out, _ = run(capsys, "data", "check", "--manifest", str(manifest), *SHAPE)
    assert code == 1 and "3 problem(s)" in out
    code, _, err = run(capsys, "data", "check", "--manifest", str(manifest), "--config", "demo_tiny")
    assert code == 2 and "model.checkpoint: empty" in err
