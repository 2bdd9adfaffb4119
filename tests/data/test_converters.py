"""MER-UniBench folder layouts -> manifests, on small replicas of each layout written here."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from opsd_jax.data.converters import ConversionError, convert, parse_openset


def touch(root: Path, *relative: str) -> None:
    """Media files only need to exist: the converters look them up, they do not decode them."""
    for name in relative:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def save_npz(path: Path, **corpora: dict) -> None:
    """An AffectGPT / MERBench label file: each key holds a dict name -> labels (a pickled 0-d array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **corpora)


def records(path: Path) -> dict[str, dict]:
    return {record["id"]: record for record in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def clip(video, *, audio=None, subtitle="", task="basic", dataset, split="test", **labels) -> dict:
    return {
        "video": video,
        "audio": audio,
        "subtitle": subtitle,
        "task": task,
        **labels,
        "dataset": dataset,
        "split": split,
    }


def without_ids(found: dict[str, dict]) -> dict[str, dict]:
    return {key: {k: v for k, v in value.items() if k != "id"} for key, value in found.items()}


@pytest.fixture
def mer2023(tmp_path):
    root = tmp_path / "mer2023-dataset-process"
    save_npz(
        root / "label-6way.npz",
        train_corpus={"sample_t1": {"emo": "happy", "val": 2.0}},
        test1_corpus={"sample_a": {"emo": "worried", "val": -1.0}, "sample_b": {"emo": "Neutral"}},
        test2_corpus={"sample_z": {"emo": "sad"}},
    )
    touch(root, "video/sample_a.mp4", "video/sample_b.avi", "video/sample_t1.mp4", "audio/sample_a.wav")
    write_csv(
        root / "subtitle_chieng.csv",
        ["name", "chinese", "english"],
        [["sample_a", "你好", " Hello there. "], ["sample_b", "", ""], ["sample_t1", "走", "Go"]],
    )
    return root


def test_mer2023_test1_corpus_with_subtitles_and_audio(mer2023, tmp_path):
    out = tmp_path / "manifests" / "mer2023.jsonl"
    clips = convert("MER2023", mer2023, out)
    assert len(clips) == 2
    expected = {
        "sample_a": clip(
            str(mer2023 / "video/sample_a.mp4"),
            audio=str(mer2023 / "audio/sample_a.wav"),
            subtitle="Hello there.",
            label="worried",
            dataset="mer2023",
        ),
        "sample_b": clip(str(mer2023 / "video/sample_b.avi"), label="neutral", dataset="mer2023"),
    }
    assert without_ids(records(out)) == expected
    chinese = convert("mer2023", mer2023, tmp_path / "zh.jsonl", language="chinese", splits=None)
    assert {c.id: (c.subtitle, c.split, c.label) for c in chinese} == {
        "sample_a": ("你好", "test", "worried"),
        "sample_b": ("", "test", "neutral"),
        "sample_t1": ("走", "train", "happy"),
    }


def test_manifest_written_inside_the_dataset_uses_relative_paths(mer2023):
    convert("mer2023", mer2023, mer2023 / "manifest.jsonl")
    assert records(mer2023 / "manifest.jsonl")["sample_a"]["video"] == "video/sample_a.mp4"


def test_mer2024_first_half_of_semi_label(tmp_path):
    root = tmp_path / "mer2024"
    write_csv(
        root / "semi-label.csv",
        ["name", "discrete"],
        [["s1", "angry"], ["s2", "surprise"], ["s3", "sad"], ["s4", "happy"], ["s5", "neutral"]],
    )
    touch(root, *(f"video-unlabeled/s{index}.mp4" for index in range(1, 6)))
    clips = convert("mer2024", root, tmp_path / "m.jsonl")
    assert [(c.id, c.label, c.split) for c in clips] == [("s1", "angry", "test"), ("s2", "surprise", "test")]
    # The processed pack: label-6way.npz test1_corpus (AffectGPT's split of the same rows).
    (root / "semi-label.csv").unlink()
    np.savez_compressed(root / "label-6way.npz", test1_corpus={"s3": {"emo": "sad"}}, train_corpus={})
    assert [(c.id, c.label) for c in convert("mer2024", root, tmp_path / "m.jsonl")] == [("s3", "sad")]


def test_meld_npz_class_indices_and_official_csv(tmp_path):
    packed = tmp_path / "meld-process"
    save_npz(
        packed / "label.npz",
        test_corpus={"dia0_utt0": {"emo": 1}, "dia0_utt1": {"emo": "disgust"}},
        train_corpus={"dia9_utt0": {"emo": 0}},
        val_corpus={},
    )
    touch(packed, "subvideo/dia0_utt0.mp4", "subvideo/dia0_utt1.mp4", "subaudio/dia0_utt1.wav")
    assert [(c.id, c.label, c.audio is None) for c in convert("meld", packed, tmp_path / "a.jsonl")] == [
        ("dia0_utt0", "joy", True),
        ("dia0_utt1", "disgust", False),
    ]

    official = tmp_path / "MELD.Raw"
    header = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]
    write_csv(official / "test_sent_emo.csv", header, [[1, "Oh my God!", "Monica", "surprise", "positive", 3, 2]])
    write_csv(official / "train_sent_emo.csv", header, [[1, "Okay.", "Ross", "Neutral", "neutral", 3, 2]])
    write_csv(official / "dev_sent_emo.csv", header, [])
    touch(official, "output_repeated_splits_test/dia3_utt2.mp4", "train_splits/dia3_utt2.mp4")
    convert("meld", official, official / "m.jsonl", splits=None)
    assert without_ids(records(official / "m.jsonl")) == {
        "dia3_utt2": clip(
            "output_repeated_splits_test/dia3_utt2.mp4", subtitle="Oh my God!", label="surprise", dataset="meld"
        ),
        # The official release reuses ids across splits; outside the test split they carry the split.
        "train_dia3_utt2": clip(
            "train_splits/dia3_utt2.mp4", subtitle="Okay.", label="neutral", dataset="meld", split="train"
        ),
    }


def test_iemocap_session_five_is_the_test_split(tmp_path):
    root = tmp_path / "iemocap-process"
    save_npz(
        root / "label_4way.npz",
        whole_corpus={
            "Ses01F_impro01_F000": {"emo": 0},
            "Ses05M_script02_M010": {"emo": 3},
            "Ses05F_impro03_F001": {"emo": 1},
        },
    )
    touch(
        root,
        "subvideo-tgt/Ses01F_impro01_F000.avi",
        "subvideo-tgt/Ses05M_script02_M010.avi",
        "subvideo-tgt/Ses05F_impro03_F001.avi",
        "subaudio/Ses05M_script02_M010.wav",
    )
    write_csv(
        root / "transcription-engchi-polish.csv",
        ["name", "chinese", "english"],
        [["Ses05M_script02_M010", "不", "No."]],
    )
    clips = convert("iemocapfour", root, tmp_path / "m.jsonl")
    assert [(c.id, c.label, c.subtitle, c.audio is not None) for c in clips] == [
        ("Ses05M_script02_M010", "anger", "No.", True),
        ("Ses05F_impro03_F001", "sad", "", False),
    ]
    assert len(convert("iemocapfour", root, tmp_path / "m.jsonl", splits=None)) == 3
    train = convert("iemocapfour", root, tmp_path / "m.jsonl", splits=("train",))
    assert [(c.id, c.split) for c in train] == [("Ses01F_impro01_F000", "train")]
    with pytest.raises(ConversionError, match=r"iemocapfour at .*: no 'dev' split; it has test, train"):
        convert("iemocapfour", root, tmp_path / "m.jsonl", splits=("train", "dev"))


def test_mmsa_sentiment_csv_and_npz(tmp_path):
    mosi = tmp_path / "MOSI"
    write_csv(
        mosi / "label.csv",
        ["video_id", "clip_id", "text", "label", "label_T", "annotation", "mode"],
        [
            ["03bSnISJMiM", "11", "a lot of sad parts", -2.4, 0, "Negative", "test"],
            ["03bSnISJMiM", "12", "but it was good", 1.8, 0, "Positive", "train"],
            ["0h-zjBukYpk", "2", "meh", 0.0, 0, "Neutral", "valid"],
        ],
    )
    touch(mosi, "Raw/03bSnISJMiM/11.mp4", "Raw/03bSnISJMiM/12.mp4", "Raw/0h-zjBukYpk/2.mp4")
    convert("cmumosi", mosi, mosi / "m.jsonl", splits=None)
    assert without_ids(records(mosi / "m.jsonl")) == {
        "03bSnISJMiM_11": clip(
            "Raw/03bSnISJMiM/11.mp4", subtitle="a lot of sad parts", task="sentiment", sentiment=-2.4, dataset="cmumosi"
        ),
        "03bSnISJMiM_12": clip(
            "Raw/03bSnISJMiM/12.mp4",
            subtitle="but it was good",
            task="sentiment",
            sentiment=1.8,
            dataset="cmumosi",
            split="train",
        ),
        "0h-zjBukYpk_2": clip(
            "Raw/0h-zjBukYpk/2.mp4", subtitle="meh", task="sentiment", sentiment=0.0, dataset="cmumosi", split="dev"
        ),
    }
    sims = tmp_path / "sims-process"
    save_npz(sims / "label.npz", test_corpus={"video_0001_0001": {"val": -0.8}})
    touch(sims, "video/video_0001_0001.mp4")
    assert [(c.id, c.sentiment, c.task) for c in convert("sims", sims, tmp_path / "s.jsonl")] == [
        ("video_0001_0001", -0.8, "sentiment")
    ]
    simsv2 = tmp_path / "ch-simsv2s"
    write_csv(
        simsv2 / "meta.csv",
        ["video_id", "clip_id", "text", "label", "mode"],
        [["aqgy3_0001", "00000", "好", 0.6, "test"]],
    )
    touch(simsv2, "Raw/aqgy3_0001/00000.mp4")
    assert [(c.id, c.sentiment) for c in convert("simsv2", simsv2, tmp_path / "v.jsonl")] == [("aqgy3_0001_00000", 0.6)]


def test_sentiment_outside_the_dataset_range_is_an_error(tmp_path):
    sims = tmp_path / "sims"
    save_npz(sims / "label.npz", test_corpus={"v1": {"val": 2.5}})
    touch(sims, "video/v1.mp4")
    with pytest.raises(ConversionError, match=r"sims clip 'v1': sentiment 2.5 outside \[-1.0, 1.0\]"):
        convert("sims", sims, tmp_path / "s.jsonl")


def test_ovmerd_plus_open_set_labels(tmp_path):
    root = tmp_path / "ovmerdplus-process"
    write_csv(
        root / "ovlabel.csv",
        ["name", "openset"],
        [["samplenew3_1", "[happy, 'proud', \"excited\"]"], ["samplenew3_2", "[]"]],
    )
    write_csv(root / "subtitle_eng.csv", ["name", "sentence"], [["samplenew3_1", "We won!"]])
    touch(root, "video/samplenew3_1.mp4", "video/samplenew3_2.mp4", "audio/samplenew3_2.wav")
    convert("ovmerdplus", root, root / "m.jsonl")
    assert without_ids(records(root / "m.jsonl")) == {
        "samplenew3_1": clip(
            "video/samplenew3_1.mp4",
            subtitle="We won!",
            task="fine_grained",
            labels=["happy", "proud", "excited"],
            dataset="ovmerdplus",
        ),
        "samplenew3_2": clip(
            "video/samplenew3_2.mp4",
            audio="audio/samplenew3_2.wav",
            task="fine_grained",
            labels=["neutral"],
            dataset="ovmerdplus",
        ),
    }
    with pytest.raises(ConversionError, match=r"subtitle_eng.csv: no chinese column"):
        convert("ovmerdplus", root, root / "m.jsonl", language="chinese")


@pytest.mark.parametrize(
    "text, words",
    [("[a, b]", ("a", "b")), ("['a','b c']", ("a", "b c")), ("", ("neutral",)), ("[ ]", ("neutral",)), ("x", ("x",))],
)
def test_parse_openset(text, words):
    assert parse_openset(text) == words


def test_missing_video_is_named_or_skipped(mer2023, tmp_path):
    (mer2023 / "video/sample_b.avi").unlink()
    with pytest.raises(ConversionError, match=r"1 clip\(s\) have no video file, e.g. sample_b \(searched .*video\)"):
        convert("mer2023", mer2023, tmp_path / "m.jsonl")
    clips = convert("mer2023", mer2023, tmp_path / "m.jsonl", missing_media="skip")
    assert [c.id for c in clips] == ["sample_a"]


def test_layout_errors_name_the_file_and_value(tmp_path, mer2023):
    with pytest.raises(ValueError, match="unknown dataset 'mer2022'"):
        convert("mer2022", mer2023, tmp_path / "m.jsonl")
    with pytest.raises(ConversionError, match="expected the label file label_4way.npz"):
        convert("iemocapfour", mer2023, tmp_path / "m.jsonl")
    np.savez_compressed(mer2023 / "label-6way.npz", test1_corpus={"sample_a": {"emo": "confused"}})
    with pytest.raises(ConversionError, match=r"test1_corpus\['sample_a'\]: emotion 'confused' is not one of"):
        convert("mer2023", mer2023, tmp_path / "m.jsonl")
    np.savez_compressed(mer2023 / "label-6way.npz", train_corpus={})
    with pytest.raises(ConversionError, match="no 'test1_corpus' array; found train_corpus"):
        convert("mer2023", mer2023, tmp_path / "m.jsonl")
    write_csv(tmp_path / "mosi" / "label.csv", ["video_id", "clip_id", "text", "score", "mode"], [])
    with pytest.raises(ConversionError, match=r"label.csv: missing column\(s\) label"):
        convert("cmumosi", tmp_path / "mosi", tmp_path / "m.jsonl")
