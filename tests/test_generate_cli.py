"""`opsd-jax generate`: one clip from files, a manifest of clips, and unreadable media."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from opsd_jax.cli import main
from opsd_jax.data.manifest import Clip, write_manifest
from opsd_jax.data.media import write_video, write_wav
from opsd_jax.testing.tiny_run import tiny_run_directory


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


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


def generate(checkpoint, *args: str) -> int:
    """`opsd-jax generate --checkpoint CHECKPOINT --max-new-tokens 6 ... ARGS...`: small clips, short answers,
    unless `args` say otherwise (a later flag wins)."""
    return main(["generate", "--checkpoint", str(checkpoint), *ARGS, *args])


def manifest_of(tmp_path, video, ids, name="clips.jsonl", audio=None):
    """A manifest of one clip per id, all of `video` (and `audio` for every other clip, when given)."""
    clips = [
        Clip(
            id=clip_id,
            video=str(video),
            audio=str(audio) if audio and i % 2 else None,
            subtitle="Hello",
            label="happy",
            dataset="demo",
            task="basic",
            split="test",
        )
        for i, clip_id in enumerate(ids)
    ]
    return write_manifest(tmp_path / name, clips)


def test_one_clip_prints_an_answer(checkpoint, clip_files, capsys):
    video, wav = clip_files
    with_subtitle = ["--video", str(video), "--subtitle", "I can't believe it!"]
    assert generate(checkpoint, *with_subtitle) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert generate(checkpoint, "--video", str(video), "--audio", str(wav)) == 0
    assert generate(checkpoint, "--video", str(video), "--no-audio") == 0
    # Greedy decoding is deterministic: the same clip gives the same answer.
    assert generate(checkpoint, *with_subtitle) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == first


def test_manifest_writes_one_answer_per_clip(checkpoint, clip_files, tmp_path):
    video, wav = clip_files
    manifest = manifest_of(tmp_path, video, ["c0", "c1", "c2"], audio=wav)
    out = tmp_path / "answers.jsonl"
    assert generate(checkpoint, "--manifest", str(manifest), "--out", str(out), "--batch-size", "2") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"] and all(isinstance(r["output"], str) for r in rows)


def test_unreadable_video_names_the_file(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert generate(checkpoint, "--video", str(broken)) == 2
    assert str(broken) in capsys.readouterr().err


def test_manifest_run_resumes_and_never_truncates_the_answers(checkpoint, clip_files, tmp_path, monkeypatch):
    import opsd_jax.generate_cli as generate_cli

    manifest = manifest_of(tmp_path, clip_files[0], ["c0", "c1", "c2", "c3"])
    out = tmp_path / "answers.jsonl"
    earlier = json.dumps({"id": "c0", "dataset": "demo", "output": "EARLIER"})
    out.write_text(earlier + "\n")
    real_answer = generate_cli.answer
    calls = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(generate_cli, "answer", interrupted_on_the_second_batch)
    command = ["--manifest", str(manifest), "--out", str(out), "--batch-size", "2"]
    with pytest.raises(KeyboardInterrupt):
        generate(checkpoint, *command)
    assert out.read_text() == earlier + "\n"  # the earlier answers are intact while a run is in progress
    partial = [json.loads(line)["id"] for line in (tmp_path / "answers.jsonl.partial").read_text().splitlines()]
    assert partial == ["c0", "c1", "c2"]
    monkeypatch.setattr(generate_cli, "answer", real_answer)
    calls.clear()
    assert generate(checkpoint, *command) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2", "c3"] and rows[0]["output"] == "EARLIER"
    assert not (tmp_path / "answers.jsonl.partial").exists()


def test_bad_clips_stop_the_run_or_are_skipped_and_counted(checkpoint, clip_files, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    clips = [
        Clip(id=i, video=str(broken if i == "bad" else clip_files[0]), label="happy", task="basic", split="test")
        for i in ("a", "bad", "b")
    ]
    manifest = write_manifest(tmp_path / "clips.jsonl", clips)
    out = tmp_path / "answers.jsonl"
    command = ["--manifest", str(manifest), "--out", str(out)]
    assert generate(checkpoint, *command) == 2
    assert "'bad'" in capsys.readouterr().err and not out.exists()
    assert generate(checkpoint, *command, "--on-error", "skip") == 1
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert "wrote 2 answers" in said and "skipped 1 clip" in said and "'bad'" in said
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes loading a model fail the test: the errors below must come before it."""
    import opsd_jax.models.qwen2_5_omni as qwen

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(qwen, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing manifest", r"manifest .*nope\.jsonl does not exist"),
        ("malformed manifest", r"clips\.jsonl:2: invalid JSON"),
        ("latin-1 manifest", r"clips\.jsonl:1: not UTF-8 text \(byte 0xe9"),
        ("empty manifest", r"--manifest .*clips\.jsonl: no clip; the file is empty"),
        ("no such split", r"no clip of split 'dev'; it has test"),
        ("no tokenizer", r"has no tokenizer files \(tokenizer\.json or vocab\.json or tokenizer\.model\)"),
        ("--max-new-tokens 0", r"--max-new-tokens: expected >= 1, got 0"),
        ("--temperature -1", r"--temperature: expected a finite value >= 0"),
        ("--top-p 0", r"--top-p: expected a value in \(0, 1\], got 0\.0"),
        ("video is a directory", r"--video .*: is a directory, not a media file"),
    ],
)
def test_expected_errors_are_one_line_before_the_model_loads(
    checkpoint, clip_files, tmp_path, capsys, no_model_load, case, expected
):
    manifest = manifest_of(tmp_path, clip_files[0], ["c0"])
    ckpt = checkpoint
    extra = []
    if case == "missing manifest":
        manifest = tmp_path / "nope.jsonl"
    elif case == "malformed manifest":
        manifest.write_text(manifest.read_text() + "{not json\n")
    elif case == "latin-1 manifest":
        manifest.write_bytes('{"id": "caf\u00e9"}\n'.encode("latin-1"))
    elif case == "empty manifest":
        manifest.write_text("\n")
    elif case == "no such split":
        extra = ["--split", "dev"]
    elif case == "no tokenizer":
        ckpt = tmp_path / "weights_only"
        ckpt.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(checkpoint / name, ckpt / name)
    elif case.startswith("--"):
        extra = case.split()
    if case == "video is a directory":
        source = ["--video", str(tmp_path)]
    else:
        source = ["--manifest", str(manifest), "--out", str(tmp_path / "answers.jsonl")]
    assert generate(ckpt, *source, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert __import__("re").search(expected, err), err


def test_a_prompt_over_the_models_context_is_refused(checkpoint, clip_files, tmp_path, capsys):
    small = tmp_path / "small_context"
    shutil.copytree(checkpoint, small)
    config = json.loads((small / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 48
    (small / "config.json").write_text(json.dumps(config))
    assert generate(small, "--video", str(clip_files[0])) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds the model's context of 48 tokens (max_position_embeddings)" in err and "clip.mp4" in err


@pytest.fixture(scope="module")
def run_dir(checkpoint, tmp_path_factory):
    """A training run directory of the tiny thinker (checkpoints of steps 1 and 2) whose config sets the
    instruction, the answer length, the prompt buckets and interleaved audio."""
    from opsd_jax.testing.tiny_run import build_tiny_affect_dataset

    root = tmp_path_factory.mktemp("generate_run")
    training = build_tiny_affect_dataset(root / "data")  # clips of 2 frames of 28 x 28 and 0.5 s of audio
    return tiny_run_directory(
        checkpoint,
        root / "run",
        "sampling.eval_max_new_tokens=3",
        f"data.train_dir={training}",
        "prompt.instruction=Name the feeling.",
        "sampling.prompt_buckets=[64,512]",
    )


def test_a_run_directory_brings_its_prompt_buckets_and_answer_length(
    run_dir, clip_files, tiny_prompt_builder, monkeypatch
):
    """Nothing of the run is repeated by hand: the instruction, answer length and buckets come from its
    config.yaml, the weights in bfloat16 over the config's mesh (all 8 devices); overrides apply."""
    import opsd_jax.sampling

    seen = []
    real = opsd_jax.sampling.generate

    def recording(model, inputs, **kwargs):
        seen.append((model, tiny_prompt_builder.tokenizer.decode(np.asarray(inputs["input_ids"])[0]), kwargs, inputs))
        return real(model, inputs, **kwargs)

    monkeypatch.setattr(opsd_jax.sampling, "generate", recording)
    command = [
        "generate",
        "--checkpoint",
        str(run_dir),
        "--video",
        str(clip_files[0]),
        "--max-pixels",
        str(56 * 56),
        "--max-frames",
        "4",
    ]
    assert main([*command, "--step", "1"]) == 0
    model, prompt, kwargs, _ = seen[-1]
    assert "Name the feeling." in prompt and kwargs["max_new_tokens"] == 3 and kwargs["prompt_buckets"] == [512]
    assert dict(kwargs["mesh"].shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert model.model.embed_tokens.embedding.get_value().dtype == np.dtype("bfloat16")
    assert (
        main([*command, "prompt.instruction=Which one?", "sampling.eval_max_new_tokens=2", "--dtype", "float32"]) == 0
    )
    model, prompt, kwargs, inputs = seen[-1]
    assert "Which one?" in prompt and kwargs["max_new_tokens"] == 2
    assert model.model.embed_tokens.embedding.get_value().dtype == np.dtype("float32")
    # --max-frames / --max-pixels given: the video is sampled by them (4 frames of 56 x 56, the decoder's minimum
    # pixel count bringing them to 336 x 336), not brought to the training clips.
    assert np.asarray(inputs["video_grid_thw"]).tolist() == [[2, 24, 24]]
    # Without them the clip is brought to the run's training clips: 2 frames of 28 x 28 (one temporal patch of
    # 2 x 2 patches) and 0.5 s of audio (8000 samples: 50 feature frames), as the dataset builder made them.
    assert main(command[:5]) == 0
    inputs = seen[-1][3]
    assert np.asarray(inputs["video_grid_thw"]).tolist() == [[1, 2, 2]]
    assert np.asarray(inputs["feature_attention_mask"]).shape == (1, 50)


def test_a_missing_step_is_named_before_the_model_loads(run_dir, clip_files, capsys, no_model_load):
    assert main(["generate", "--checkpoint", str(run_dir), "--step", "5", "--video", str(clip_files[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint at step 5; saved steps: 1, 2" in err, err
