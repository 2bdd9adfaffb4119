"""The synthetic affect task: deterministic clips, the cue -> emotion rule, class balance, cue read-back,
the TFDS builder fed by `SyntheticExamples`, and the manifest's media. Tiny clips (4 frames of 56 x 56,
1 s of audio)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from opsd_jax.data import synthetic
from opsd_jax.data.builders import SyntheticAffectConfig, build_synthetic_affect, load_split
from opsd_jax.data.manifest import read_manifest
from opsd_jax.data.media import read_audio, read_video

N_TRAIN, N_TEST, SEED = 12, 4, 7
RULE_CLIPS = 400  # clips drawn (not encoded) to check the rule and the balance


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic_manifest(directory, N_TRAIN, N_TEST, SEED)
    return directory


@pytest.fixture(scope="module")
def drawn_clips() -> list[dict]:
    return [synthetic.clip_at(SEED, "train", index) for index in range(RULE_CLIPS)]


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_same_seed_gives_the_same_bytes(manifest_dir, tmp_path):
    again = synthetic.write_synthetic_manifest(tmp_path / "again", N_TRAIN, N_TEST, SEED)
    assert again == tmp_path / "again" / "manifest.jsonl"
    first, second = files_of(manifest_dir), files_of(tmp_path / "again")
    assert len(first) == N_TRAIN + N_TEST + 2  # one mp4 per clip, the manifest and the cue table
    assert first == second
    other = synthetic.write_synthetic_manifest(tmp_path / "other", 2, 0, SEED + 1)
    assert files_of(other.parent)["video/train_00000.mp4"] != first["video/train_00000.mp4"]


def test_a_clip_depends_on_seed_split_and_index_only():
    clip = synthetic.clip_at(SEED, "train", 3)
    same = synthetic.clip_at(SEED, "train", 3)
    for key in ("frames", "audio"):
        np.testing.assert_array_equal(clip[key], same[key])
    assert (clip["subtitle"], clip["label"], clip["cues"]) == (same["subtitle"], same["label"], same["cues"])
    assert clip["id"] == "train_00003" and clip["label"] == synthetic.EMOTIONS[3]
    assert clip["frames"].shape == (4, 56, 56, 3) and clip["frames"].dtype == np.uint8
    assert clip["audio"].shape == (16000,) and clip["audio"].dtype == np.float32
    assert np.abs(clip["audio"]).max() <= 1.0
    assert not np.array_equal(clip["frames"], synthetic.clip_at(SEED, "test", 3)["frames"])
    assert not np.array_equal(clip["frames"], synthetic.clip_at(SEED + 1, "train", 3)["frames"])
    assert len({frame.tobytes() for frame in clip["frames"]}) > 1  # the head and the mouth move


def test_the_rule_maps_face_valence_and_voice_arousal_to_the_emotion(drawn_clips):
    assert synthetic.emotion_of("positive", "high") == "happy"
    assert synthetic.emotion_of("positive", "low") == "neutral"
    assert synthetic.emotion_of("negative", "high") == "angry"
    assert synthetic.emotion_of("negative", "low") == "sad"
    for clip in drawn_clips:
        cues = clip["cues"]
        assert synthetic.emotion_of(cues.valence, cues.arousal) == clip["label"]
        assert (cues.brow_slant > synthetic.BROW_THRESHOLD) == (cues.valence == "negative")  # brows agree
        assert (cues.loudness > synthetic.LOUDNESS_THRESHOLD) == (cues.arousal == "high")  # loudness agrees
        assert synthetic.words_emotion(clip["subtitle"]) == cues.words_emotion


def test_classes_are_balanced_and_no_single_cue_decides(drawn_clips):
    labels = [clip["label"] for clip in drawn_clips]
    assert collections.Counter(labels) == {emotion: RULE_CLIPS // 4 for emotion in synthetic.EMOTIONS}
    by_valence, by_arousal = collections.defaultdict(set), collections.defaultdict(set)
    for clip in drawn_clips:
        by_valence[clip["cues"].valence].add(clip["label"])
        by_arousal[clip["cues"].arousal].add(clip["label"])
    assert all(len(emotions) == 2 for emotions in (*by_valence.values(), *by_arousal.values()))
    # The words are the clip's own emotion half the time: 400 Bernoulli(1/2) draws, +-4.5 standard deviations.
    agree = np.mean([clip["cues"].words_emotion == clip["label"] for clip in drawn_clips])
    assert 0.39 < agree < 0.61
    rng = np.random.default_rng(0)
    assert all(synthetic.make_clip(rng, "sad", agree_probability=1.0)["cues"].words_emotion == "sad" for _ in range(20))
    assert all(synthetic.make_clip(rng, "sad", agree_probability=0.0)["cues"].words_emotion != "sad" for _ in range(20))


def test_the_cues_read_back_from_the_drawn_media(drawn_clips):
    for clip in drawn_clips[:100]:
        read = synthetic.read_cues(clip["frames"], clip["audio"])
        cues = clip["cues"]
        assert read["emotion"] == clip["label"] and read["brows_agree"] and read["loudness_agrees"], clip["id"]
        assert abs(read["mouth_curve"] - cues.mouth_curve) < 0.012  # one pixel of a 56-pixel frame is 0.018
        assert abs(read["brow_slant"] - cues.brow_slant) < 0.1
        assert abs(read["pitch_hz"] / cues.pitch_hz - 1) < 0.04  # syllables wander +-3 % around the pitch
        assert abs(read["loudness"] / cues.loudness - 1) < 0.1


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label: expected one of happy, sad, angry, neutral, got 'bored'"):
        synthetic.make_clip(rng, "bored")
    with pytest.raises(ValueError, match=r"agree_probability: expected a probability in \[0, 1\], got 1.5"):
        synthetic.make_clip(rng, "happy", agree_probability=1.5)
    with pytest.raises(ValueError, match="n_test: expected a non-negative integer, got -1"):
        synthetic.write_synthetic_manifest("/nonexistent", 1, -1)
    with pytest.raises(ValueError, match=r"sizes\['train'\]: expected a non-negative integer"):
        synthetic.SyntheticExamples({"train": 2.5})
    with pytest.raises(ValueError, match="frames: no drawn face found"):
        synthetic.read_face(np.full((2, 56, 56, 3), 200, np.uint8))
    with pytest.raises(ValueError, match="valence/arousal: expected positive|negative"):
        synthetic.emotion_of("positive", "medium")


def test_the_tfds_builder_writes_the_generated_clips(tmp_path):
    examples = synthetic.SyntheticExamples({"train": 6, "test": 2}, rationales={"train_00001": "A reason."})
    config = SyntheticAffectConfig(
        name="tiny",
        generator=examples,
        splits=("train", "test"),
        seed=SEED,
        num_frames=4,
        height=56,
        width=56,
        max_audio_seconds=1.5,
    )
    dataset_dir = build_synthetic_affect(tmp_path, config)
    for split, size in (("train", 6), ("test", 2)):
        written = {example["id"].decode(): example for example in load_split(dataset_dir, split)}
        assert sorted(written) == [synthetic.clip_id(split, index) for index in range(size)]
        for index in range(size):
            expected = synthetic.clip_at(SEED, split, index)
            example = written[expected["id"]]
            np.testing.assert_array_equal(example["frames"], expected["frames"])
            assert example["audio_length"] == 16000 and example["audio"].shape == (24000,)
            np.testing.assert_array_equal(example["audio"][:16000], expected["audio"])
            assert not example["audio"][16000:].any()
            assert example["sample_fps"] == synthetic.FPS
            assert example["label"].decode() == expected["label"]
            assert example["subtitle"].decode() == expected["subtitle"]
            assert example["task"].decode() == "basic" and example["dataset"].decode() == "synthetic_affect"
            assert example["rationale"].decode() == ("A reason." if expected["id"] == "train_00001" else "")


def test_the_manifest_media_decode_and_show_their_cues(manifest_dir):
    clips = read_manifest(manifest_dir / "manifest.jsonl")
    cue_table = [json.loads(line) for line in (manifest_dir / "cues.jsonl").read_text().splitlines()]
    assert [clip.id for clip in clips] == [row["id"] for row in cue_table]
    assert collections.Counter(clip.split for clip in clips) == {"train": N_TRAIN, "test": N_TEST}
    manifest_lines = (manifest_dir / "manifest.jsonl").read_text().splitlines()
    assert json.loads(manifest_lines[0])["video"] == "video/train_00000.mp4"  # portable, relative paths
    largest_error = 0
    for clip, row in zip(clips, cue_table):
        expected = synthetic.clip_at(SEED, clip.split, int(clip.id.split("_")[1]))
        assert (clip.label, clip.subtitle, clip.task, clip.dataset) == (
            expected["label"],
            expected["subtitle"],
            "basic",
            "synthetic_affect",
        )
        assert row == {
            "id": clip.id,
            "split": clip.split,
            "label": clip.label,
            "subtitle": clip.subtitle,
            **expected["cues"].to_json(),
        }
        video = read_video(clip.video, record_id=clip.id, num_frames=4, size=(56, 56))
        audio = read_audio(clip.video, record_id=clip.id)
        assert video.frames.shape == (4, 56, 56, 3) and video.sample_fps == synthetic.FPS
        # yuv420p halves the colour resolution, so colour edges blur; brightness stays within a few levels
        # (measured: mean luma error 0.7 to 1.7 levels per clip).
        error = np.abs(synthetic.luma(video.frames) - synthetic.luma(expected["frames"]))
        assert error.mean() < 3.0
        largest_error = max(largest_error, error.mean())
        assert 16000 <= audio.size <= 16000 + 2048  # AAC pads to whole 1024-sample frames
        read = synthetic.read_cues(video.frames, audio)
        assert read["emotion"] == clip.label and read["brows_agree"] and read["loudness_agrees"], clip.id
    assert largest_error > 0  # the video really went through the codec
