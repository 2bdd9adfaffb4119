"""`opsd-jax generate`: one clip from files, a manifest of clips, and unreadable media."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from opsd_jax.cli import main
from opsd_jax.data.manifest import Clip, write_manifest
from opsd_jax.data.media import write_video, write_wav
from opsd_jax.testing.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tiny_untied, tmp_path_factory):
    """The tiny thinker with the tiny tokenizer beside it, as a real checkpoint directory holds both."""
    directory = tmp_path_factory.mktemp("generate_ckpt")
    shutil.copytree(tiny_untied[1], directory, dirs_exist_ok=True)
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    frames = rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    video = write_video(directory / "clip.mp4", frames, fps=4, audio=tone)
    wav = write_wav(directory / "voice.wav", tone[:24000])
    return video, wav


ARGS = ["--max-new-tokens", "6", "--max-pixels", str(56 * 56), "--max-frames", "4"]


def test_one_clip_prints_an_answer(checkpoint, clip_files, capsys):
    video, wav = clip_files
    assert main(["generate", "--checkpoint", str(checkpoint), "--video", str(video), "--subtitle", "I can't believe it!", *ARGS]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["generate", "--checkpoint", str(checkpoint), "--video", str(video), "--audio", str(wav), *ARGS]) == 0
    assert main(["generate", "--checkpoint", str(checkpoint), "--video", str(video), "--no-audio", *ARGS]) == 0
    # Greedy decoding is deterministic: the same clip gives the same answer.
    assert main(["generate", "--checkpoint", str(checkpoint), "--video", str(video), "--subtitle", "I can't believe it!", *ARGS]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first


def test_manifest_writes_one_answer_per_clip(checkpoint, clip_files, tmp_path):
    video, wav = clip_files
    clips = [Clip(id=f"c{i}", video=str(video), audio=str(wav) if i % 2 else None, subtitle="Hello", label="happy",
                  dataset="demo", task="basic", split="test") for i in range(3)]
    manifest = write_manifest(tmp_path / "clips.jsonl", clips)
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--checkpoint", str(checkpoint), "--manifest", str(manifest), "--out", str(out),
                 "--batch-size", "2", *ARGS]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"] and all(isinstance(r["output"], str) for r in rows)


def test_unreadable_video_names_the_file(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert main(["generate", "--checkpoint", str(checkpoint), "--video", str(broken), *ARGS]) == 2
    assert str(broken) in capsys.readouterr().err
