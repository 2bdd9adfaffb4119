"""TFDS builders writing ArrayRecord without TensorFlow: `mer` from a manifest of real clips, and the
generated-content mechanism of `synthetic_affect`."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from opsd_jax.data import media
from opsd_jax.data.builders import (
    ClipConfig,
    MerConfig,
    SyntheticAffectConfig,
    build_mer,
    build_synthetic_affect,
    load_split,
)
from opsd_jax.data.manifest import ManifestError, read_manifest

CONFIG = dict(num_frames=4, height=56, width=56, max_audio_seconds=1.0)


def write_dataset(root: Path) -> Path:
    """Four clips: video + own audio track (1.5 s: audio cut to 1 s), video + separate wav (0.5 s: padded),
    and the three tasks; returns the manifest."""
    rng = np.random.default_rng(0)

    def frames(count: int) -> np.ndarray:
        return rng.integers(0, 256, (count, 48, 64, 3), dtype=np.uint8)

    def sine(seconds: float, hz: float) -> np.ndarray:
        return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)

    media.write_video(root / "video/a.mp4", frames(15), 10, audio=sine(1.5, 300))
    media.write_video(root / "video/b.mp4", frames(6), 5)
    media.write_wav(root / "audio/b.wav", sine(0.5, 500))
    media.write_video(root / "video/c.mp4", frames(20), 10, audio=sine(2.0, 700))
    media.write_video(root / "video/d.mp4", frames(9), 10, audio=sine(1.0, 900))
    records = [
        {
            "id": "a",
            "video": "video/a.mp4",
            "subtitle": "I won!",
            "task": "basic",
            "label": "happy",
            "dataset": "mer2023",
            "split": "train",
            "rationale": "Smiling; cheerful voice.",
        },
        {
            "id": "b",
            "video": "video/b.mp4",
            "audio": "audio/b.wav",
            "task": "fine_grained",
            "labels": ["sad", "tired"],
            "dataset": "ovmerdplus",
            "split": "train",
        },
        {
            "id": "c",
            "video": "video/c.mp4",
            "subtitle": "Fine.",
            "task": "sentiment",
            "sentiment": -1.25,
            "dataset": "cmumosi",
            "split": "test",
        },
        {"id": "d", "video": "video/d.mp4", "task": "basic", "label": "angry", "split": "train"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mer_clips")
    manifest = write_dataset(root)
    dataset_dir = build_mer(manifest, tmp_path_factory.mktemp("tfds"), MerConfig(name="tiny", **CONFIG))
    return manifest, dataset_dir


def by_id(source) -> dict[str, dict]:
    return {example["id"].decode(): example for example in (source[index] for index in range(len(source)))}


def test_mer_writes_array_record_splits(built):
    _, dataset_dir = built
    assert sorted(path.name for path in dataset_dir.glob("*.array_record*")) == [
        "mer-test.array_record-00000-of-00001",
        "mer-train.array_record-00000-of-00001",
    ]
    assert sorted(by_id(load_split(dataset_dir, "train"))) == ["a", "b", "d"]
    assert sorted(by_id(load_split(dataset_dir, "test"))) == ["c"]
    with pytest.raises(ValueError, match="split 'validation' is not in .*; it has test, train"):
        load_split(dataset_dir, "validation")


def test_mer_examples_hold_the_decoded_media_at_static_shapes(built):
    manifest, dataset_dir = built
    clips = {clip.id: clip for clip in read_manifest(manifest)}
    examples = by_id(load_split(dataset_dir, "train")) | by_id(load_split(dataset_dir, "test"))
    for clip_id, example in examples.items():
        clip = clips[clip_id]
        video = media.read_video(clip.video, num_frames=4, size=(56, 56))
        np.testing.assert_array_equal(example["frames"], video.frames)
        assert example["frames"].shape == (4, 56, 56, 3) and example["frames"].dtype == np.uint8
        assert example["sample_fps"] == pytest.approx(video.sample_fps)
        waveform = media.read_audio(clip.audio or clip.video)
        length = min(len(waveform), 16000)
        assert example["audio"].shape == (16000,) and example["audio_length"] == length
        np.testing.assert_array_equal(example["audio"][:length], waveform[:length])
        assert not example["audio"][length:].any()
    assert examples["a"]["audio_length"] == 16000  # 1.5 s cut to max_audio_seconds
    assert examples["b"]["audio_length"] == 8000  # the separate 0.5 s wav, padded
    assert examples["b"]["sample_fps"] == pytest.approx(4 / 6 * 5)


def test_mer_examples_carry_the_manifest_fields(built):
    _, dataset_dir = built
    examples = by_id(load_split(dataset_dir, "train")) | by_id(load_split(dataset_dir, "test"))
    text = {
        name: {field: examples[name][field].decode() for field in ("subtitle", "task", "label", "dataset", "rationale")}
        for name in examples
    }
    assert text["a"] == {
        "subtitle": "I won!",
        "task": "basic",
        "label": "happy",
        "dataset": "mer2023",
        "rationale": "Smiling; cheerful voice.",
    }
    assert text["b"] == {"subtitle": "", "task": "fine_grained", "label": "", "dataset": "ovmerdplus", "rationale": ""}
    assert [label.decode() for label in examples["b"]["labels"]] == ["sad", "tired"]
    assert len(examples["a"]["labels"]) == 0 and np.isnan(examples["a"]["sentiment"])
    assert examples["c"]["sentiment"] == np.float32(-1.25) and text["c"]["task"] == "sentiment"


def test_existing_builds_are_reused_unless_overwritten(built, tmp_path):
    manifest, _ = built
    data_dir = tmp_path / "tfds"
    config = MerConfig(name="reuse", **CONFIG)
    first = build_mer(manifest, data_dir, config)
    lines = manifest.read_text().splitlines()
    smaller = manifest.parent / "smaller.jsonl"
    smaller.write_text(lines[0] + "\n" + lines[2] + "\n")
    assert build_mer(smaller, data_dir, config) == first and len(load_split(first, "train")) == 3
    assert build_mer(smaller, data_dir, config, overwrite=True) == first and len(load_split(first, "train")) == 1


def test_an_interrupted_build_leaves_no_dataset_and_resumes_where_it_stopped(built, tmp_path, monkeypatch):
    from opsd_jax.data.builders import mer

    manifest, reference_dir = built
    decoded, real = [], mer.load_clip_media

    def stop_after_two(clip, **options):
        if len(decoded) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C or a preempted machine stops a long build
        decoded.append(clip.id)
        return real(clip, **options)

    monkeypatch.setattr(mer, "load_clip_media", stop_after_two)
    config, data_dir = MerConfig(name="resume", **CONFIG), tmp_path / "tfds"
    with pytest.raises(KeyboardInterrupt):
        build_mer(manifest, data_dir, config)
    assert not list(data_dir.rglob("dataset_info.json"))  # no half-written dataset in place
    first_run = list(decoded)
    decoded.clear()
    monkeypatch.setattr(
        mer, "load_clip_media", lambda clip, **options: decoded.append(clip.id) or real(clip, **options)
    )
    dataset_dir = build_mer(manifest, data_dir, config)
    assert len(first_run) == 2 and sorted(decoded) == sorted({"a", "b", "c", "d"} - set(first_run))
    for split in ("train", "test"):
        resumed, reference = by_id(load_split(dataset_dir, split)), by_id(load_split(reference_dir, split))
        assert resumed.keys() == reference.keys()
        for clip_id, example in resumed.items():
            np.testing.assert_array_equal(example["frames"], reference[clip_id]["frames"])
            np.testing.assert_array_equal(example["audio"], reference[clip_id]["audio"])
    assert not (data_dir / "mer" / "resume" / "decoded").exists()  # removed once the dataset is in place


def test_unreadable_media_raise_or_are_skipped_and_recorded(built, tmp_path):
    manifest, _ = built
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 512)
    broken = tmp_path / "broken.jsonl"
    records = [
        {"id": "a", "video": str(manifest.parent / "video/a.mp4"), "task": "basic", "label": "happy"},
        {"id": "z", "video": "broken.mp4", "task": "basic", "label": "sad"},
    ]
    broken.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(media.MediaError, match=r"clip 'z': cannot read .*broken.mp4"):
        build_mer(broken, tmp_path / "tfds", MerConfig(name="strict", **CONFIG))
    dataset_dir = build_mer(broken, tmp_path / "tfds", MerConfig(name="lenient", on_error="skip", **CONFIG))
    assert sorted(by_id(load_split(dataset_dir, "train"))) == ["a"]
    skipped = tfds.builder_from_directory(str(dataset_dir)).info.metadata["skipped"]
    assert list(skipped) == ["z"] and "not a readable media file" in skipped["z"]


def test_a_bad_manifest_names_line_and_field(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        '{"id": "a", "video": "a.mp4", "task": "basic", "label": "happy"}\n'
        '{"id": "b", "video": "b.mp4", "task": "sentiment"}\n'
    )
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: field 'sentiment': missing"):
        build_mer(manifest, tmp_path / "tfds", MerConfig(name="bad", **CONFIG))


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_frames=3), "num_frames must be a positive multiple of 2"),
        (dict(height=50), "height must be a positive multiple of 28"),
        (dict(width=0), "width must be a positive multiple of 28"),
        (dict(max_audio_seconds=0.01), "max_audio_seconds must give at least 400 samples"),
    ],
)
def test_config_shapes_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        ClipConfig(name="x", **(CONFIG | override))
    with pytest.raises(ValueError, match="on_error must be one of"):
        MerConfig(name="x", on_error="ignore")


def affect_examples(split: str, config: SyntheticAffectConfig):
    """A stand-in for the synthetic task's content: seeded frames, a tone and a label per example."""
    rng = np.random.default_rng([config.seed, len(split)])
    for index in range(3):
        yield dict(
            id=f"{split}_{index}",
            frames=rng.integers(0, 256, config.frame_shape, dtype=np.uint8),
            sample_fps=2.0,
            audio=rng.standard_normal(8000 + 4000 * index).astype(np.float32) * 0.1,
            task="basic",
            label=("happy", "sad", "angry")[index],
            subtitle=f"line {index}",
        )


def test_synthetic_affect_writes_what_its_generator_yields(tmp_path):
    config = SyntheticAffectConfig(name="toy", generator=affect_examples, splits=("train", "test"), seed=3, **CONFIG)
    dataset_dir = build_synthetic_affect(tmp_path, config)
    assert dataset_dir.parent.parent.name == "synthetic_affect"
    for split in ("train", "test"):
        written = by_id(load_split(dataset_dir, split))
        for expected in affect_examples(split, config):
            example = written[expected["id"]]
            np.testing.assert_array_equal(example["frames"], expected["frames"])
            length = min(len(expected["audio"]), 16000)
            assert example["audio_length"] == length
            np.testing.assert_array_equal(example["audio"][:length], expected["audio"][:length])
            assert example["label"].decode() == expected["label"] and example["sample_fps"] == 2.0
        assert sorted(written) == [f"{split}_{index}" for index in range(3)]


def test_synthetic_affect_rejects_examples_off_the_static_shape(tmp_path):
    def wrong_shape(split, config):
        yield dict(
            id="x",
            frames=np.zeros((2, 56, 56, 3), np.uint8),
            sample_fps=2.0,
            audio=np.zeros(100, np.float32),
            task="basic",
            label="happy",
        )

    with pytest.raises(ValueError, match=r"clip 'x': frames must be uint8 of shape \(4, 56, 56, 3\)"):
        build_synthetic_affect(tmp_path, SyntheticAffectConfig(name="bad", generator=wrong_shape, **CONFIG))
    with pytest.raises(ValueError, match="config 'empty' has no generator"):
        build_synthetic_affect(tmp_path, SyntheticAffectConfig(name="empty", **CONFIG))


def test_an_empty_manifest_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ManifestError, match=r"empty\.jsonl: the manifest holds no clip"):
        build_mer(empty, tmp_path / "tfds", MerConfig(name="empty", **CONFIG))
