"""`opsd-jax eval --checkpoint ...` end to end on the tiny thinker: generation, resume, scoring, errors.

Clips: two MER2023 (basic) and two CMU-MOSI (sentiment) test clips, plus a MELD clip and a training clip
that are not asked for. Every clip has the same media shapes and subtitle, so every batch of two has the
same prompt length and the sampler compiles once for the whole module.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import opsd_jax.sampling
from opsd_jax.cli import main
from opsd_jax.data.builders import MerConfig, build_mer
from opsd_jax.data.manifest import Clip, write_manifest
from opsd_jax.data.media import write_video, write_wav
from opsd_jax.eval.datasets import DATASET_NAMES
from opsd_jax.eval.runner import (
    GENERATION_FILE,
    PREDICTIONS_FILE,
    check_generation_settings,
    collect_clips,
    parse_dataset_names,
    read_done,
)
from opsd_jax.generation import GenerationSettings
from opsd_jax.testing.tiny_run import tiny_run_directory
from tests.eval.fake_chat_server import FakeChatServer, Reply, last_user_message

# (id, dataset, task, ground-truth field, value, split)
CLIPS = [
    ("m1", "mer2023", "basic", "label", "happy", "test"),
    ("s1", "cmumosi", "sentiment", "sentiment", 1.5, "test"),
    ("m2", "mer2023", "basic", "label", "sad", "test"),
    ("s2", "cmumosi", "sentiment", "sentiment", -2.0, "test"),
    ("e1", "meld", "basic", "label", "joy", "test"),
    ("t1", "mer2023", "basic", "label", "angry", "train"),
]
ASKED = {("mer2023", "m1"), ("mer2023", "m2"), ("cmumosi", "s1"), ("cmumosi", "s2")}
# 4 frames sampled from 2 s at 2 fps; the decoder's minimum pixel count brings 56 x 56 frames to 336 x 336.
MEDIA = ["--max-frames", "4", "--max-pixels", str(56 * 56), "--fps", "2"]
FRAME_SIDE = 336


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six clips of 8 random 56 x 56 frames at 4 fps, each with its own 1 s tone in a wav file."""
    directory = tmp_path_factory.mktemp("eval_clips")
    rng = np.random.default_rng(0)
    clips = []
    for index, (clip_id, dataset, task, field, value, split) in enumerate(CLIPS):
        frames = rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
        tone = (0.3 * np.sin(2 * np.pi * (200 + 50 * index) * np.arange(16000) / 16000)).astype(np.float32)
        video = write_video(directory / f"{clip_id}.mp4", frames, fps=4)
        audio = write_wav(directory / f"{clip_id}.wav", tone)
        clips.append(
            Clip(
                id=clip_id,
                video=str(video),
                audio=str(audio),
                subtitle="I can't believe it!",
                task=task,
                dataset=dataset,
                split=split,
                **{field: value},
            )
        )
    return write_manifest(directory / "manifest.jsonl", clips)


def _count_generate_calls(patch: pytest.MonkeyPatch, calls: list[int]) -> None:
    """Records the batch size of every sampler call (`opsd_jax.generation.decode` looks `generate` up at
    call time)."""
    real = opsd_jax.sampling.generate

    def counting(model, inputs, **kwargs):
        calls.append(np.asarray(inputs["input_ids"]).shape[0])
        return real(model, inputs, **kwargs)

    patch.setattr(opsd_jax.sampling, "generate", counting)


@pytest.fixture
def generate_calls(monkeypatch):
    calls: list[int] = []
    _count_generate_calls(monkeypatch, calls)
    return calls


def _eval(checkpoint, data, tiny_wheel_dir, out, *options):
    return main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data),
            "--wheel-dir",
            str(tiny_wheel_dir),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "5",
            "--no-progress",
            *MEDIA,
            *map(str, options),
        ]
    )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def manifest_run(checkpoint, manifest, tiny_wheel_dir, tmp_path_factory):
    """A run stopped after one clip per dataset (--limit 1), then completed: (out dir, sampler batch sizes
    of the first run, of the second)."""
    out = tmp_path_factory.mktemp("eval_manifest")
    batches: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        _count_generate_calls(patch, batches)
        assert _eval(checkpoint, manifest, tiny_wheel_dir, out, "--datasets", "mer2023,CMUMOSI", "--limit", "1") == 0
        first = list(batches)
        assert _eval(checkpoint, manifest, tiny_wheel_dir, out, "--datasets", "mer2023,cmumosi") == 0
    return out, first, batches[len(first) :]


def test_predictions_hold_one_answer_per_asked_clip(manifest_run):
    out, first, second = manifest_run
    # --limit 1: the first clip of each dataset, in one batch; the rerun answers only the other two.
    assert first == [2] and second == [2]
    rows = _lines(out / PREDICTIONS_FILE)
    assert [(row["dataset"], row["id"]) for row in rows] == [
        ("mer2023", "m1"),
        ("cmumosi", "s1"),
        ("mer2023", "m2"),
        ("cmumosi", "s2"),
    ]
    truths = {row["id"]: row["ground_truth"] for row in rows}
    assert truths == {"m1": "happy", "s1": 1.5, "m2": "sad", "s2": -2.0}
    assert all(isinstance(row["output"], str) and "labels" not in row for row in rows)
    generation = json.loads((out / GENERATION_FILE).read_text())
    assert generation["max_new_tokens"] == 5 and generation["temperature"] == 0.0 and generation["max_frames"] == 4


def test_scores_and_report_match_eval_score(manifest_run, tiny_wheel_dir, tmp_path, capsys):
    out, _, _ = manifest_run
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores["datasets"]) == ["mer2023", "cmumosi"] and scores["mean"] is None
    assert all(scores["datasets"][name]["num_samples"] == 2 for name in ("mer2023", "cmumosi"))
    assert scores["metadata"]["generated"] == 2 and scores["metadata"]["reused"] == 2
    extracted = _lines(out / "predictions.extracted.jsonl")
    assert len(extracted) == 4 and all(row["extractor"] == "builtin-lexicon" for row in extracted)

    assert (
        main(
            [
                "eval",
                "score",
                "--predictions",
                str(out / PREDICTIONS_FILE),
                "--wheel-dir",
                str(tiny_wheel_dir),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rescored = json.loads((tmp_path / "scores.json").read_text())
    assert rescored["datasets"] == scores["datasets"] and rescored["partial_mean"] == scores["partial_mean"]
    report = (out / "report.md").read_text()
    assert (tmp_path / "report.md").read_text() == report
    assert "| **This run** |" in report and "AffectGPT (A,V,T)" in report and "(partial)" in report
    capsys.readouterr()


def test_a_finished_run_generates_nothing(manifest_run, checkpoint, manifest, tiny_wheel_dir, generate_calls):
    out, _, _ = manifest_run
    before = (out / PREDICTIONS_FILE).read_bytes()
    scores = json.loads((out / "scores.json").read_text())
    assert _eval(checkpoint, manifest, tiny_wheel_dir, out, "--datasets", "mer2023,cmumosi") == 0
    assert generate_calls == []
    assert (out / PREDICTIONS_FILE).read_bytes() == before
    again = json.loads((out / "scores.json").read_text())
    assert again["datasets"] == scores["datasets"] and again["metadata"]["reused"] == 4


def _llm_lists_known_words(request, attempt):
    """Extractor stand-in: the openset answer lists the emotion words it finds; sentiment from that list."""
    prompt = last_user_message(request)
    payload = prompt.rsplit("Input: ", 1)[1]
    if prompt.startswith("Please act as an expert"):
        return Reply(text="positive" if "happy" in payload else "negative")
    return Reply(text="[" + ", ".join(re.findall(r"\b(happy|sad|angry)\b", payload.lower())) + "]")


def test_a_finished_run_rescored_with_the_llm_extractor(
    manifest_run, checkpoint, manifest, tiny_wheel_dir, tmp_path, generate_calls, capsys
):
    out = tmp_path / "llm"
    shutil.copytree(manifest_run[0], out)
    with FakeChatServer(_llm_lists_known_words) as server:
        assert (
            _eval(
                checkpoint,
                manifest,
                tiny_wheel_dir,
                out,
                "--datasets",
                "mer2023,cmumosi",
                "--extractor",
                "llm",
                "--llm-base-url",
                server.base_url,
                "--llm-model",
                "fake-qwen",
                "--llm-max-retries",
                "1",
            )
            == 0
        )
        sent = server.count()
    assert generate_calls == []
    scores = json.loads((out / "scores.json").read_text())
    assert scores["extractor"] == "llm:fake-qwen" and scores["metadata"]["extractor_requests_sent"] == sent
    # One openset prompt per distinct answer, one sentiment prompt per distinct CMU-MOSI openset.
    outputs = {row["output"] for row in _lines(out / PREDICTIONS_FILE)}
    assert len(outputs) < sent <= len(outputs) + 2
    assert (out / "extractor_cache.jsonl").is_file()
    assert all(row["extractor"] == "llm:fake-qwen" for row in _lines(out / "predictions.extracted.jsonl"))
    capsys.readouterr()


def test_a_built_tfds_dataset_gives_the_same_answers(
    manifest_run, checkpoint, manifest, tiny_wheel_dir, tmp_path_factory, generate_calls
):
    """The TFDS dataset stores the frames the manifest path decodes (same count, same resize), so greedy
    answers agree clip by clip; clips of other datasets and splits are left out."""
    dataset_dir = build_mer(
        manifest,
        tmp_path_factory.mktemp("eval_tfds"),
        MerConfig(name="eval", num_frames=4, height=FRAME_SIDE, width=FRAME_SIDE, max_audio_seconds=1.0),
    )
    out = tmp_path_factory.mktemp("eval_tfds_out")
    assert _eval(checkpoint, dataset_dir, tiny_wheel_dir, out, "--datasets", "cmumosi,mer2023") == 0
    assert generate_calls == [2, 2]
    from_tfds = {(row["dataset"], row["id"]): row for row in _lines(out / PREDICTIONS_FILE)}
    assert set(from_tfds) == ASKED
    for row in _lines(manifest_run[0] / PREDICTIONS_FILE):
        assert from_tfds[(row["dataset"], row["id"])] == row


def test_bad_requests_fail_before_generating(checkpoint, manifest, tiny_wheel_dir, tmp_path, generate_calls, capsys):
    assert _eval(checkpoint, manifest, tiny_wheel_dir, tmp_path / "a", "--datasets", "mer2023,mer2099") == 2
    err = capsys.readouterr().err
    assert "unknown MER-UniBench dataset 'mer2099'" in err and "ovmerdplus" in err

    missing_wheels = tmp_path / "no_wheels"
    assert _eval(checkpoint, manifest, missing_wheels, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert f"emotion-wheel directory {missing_wheels} does not exist" in err and "fetch-wheels" in err

    assert _eval(checkpoint, manifest, tiny_wheel_dir, tmp_path / "c", "--datasets", "mer2023,sims") == 2
    assert "no 'test' clip of sims" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(checkpoint), "--wheel-dir", str(tiny_wheel_dir)]) == 2
    assert "needs --data" in capsys.readouterr().err

    weights_only = tmp_path / "weights_only"  # an export made without --tokenizer-dir
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, weights_only / name)
    assert _eval(weights_only, manifest, tiny_wheel_dir, tmp_path / "d", "--datasets", "mer2023") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (
        f"opsd-jax: error: checkpoint directory {weights_only} has no tokenizer files "
        "(tokenizer.json or vocab.json or tokenizer.model); copy them from the base model, "
        "or export with `opsd-jax export --tokenizer-dir`"
    )
    assert generate_calls == []


def test_a_rerun_with_other_settings_is_refused(
    manifest_run, checkpoint, manifest, tiny_wheel_dir, generate_calls, capsys
):
    out, _, _ = manifest_run
    assert _eval(checkpoint, manifest, tiny_wheel_dir, out, "--datasets", "mer2023", "--temperature", "0.7") == 2
    err = capsys.readouterr().err
    assert str(out / GENERATION_FILE) in err and "temperature=0.0 there, 0.7 now" in err
    assert generate_calls == []


def test_clip_selection(manifest, tmp_path):
    settings = GenerationSettings()
    assert parse_dataset_names("MELD, mer2023") == ("mer2023", "meld")
    assert len(parse_dataset_names("all")) == 9
    clips = collect_clips([manifest], ("mer2023", "cmumosi", "meld"), "test", settings, limit=1)
    assert [clip.key for clip in clips] == [("mer2023", "m1"), ("cmumosi", "s1"), ("meld", "e1")]
    assert [clip.key for clip in collect_clips([manifest], ("mer2023",), "train", settings)] == [("mer2023", "t1")]
    # No --datasets: every benchmark dataset the data holds, none required.
    found = collect_clips([manifest], DATASET_NAMES, "test", settings, requested=False)
    assert {clip.key for clip in found} == ASKED | {("meld", "e1")}
    with pytest.raises(ValueError, match="no 'test' clip of mer2024"):
        collect_clips([manifest], DATASET_NAMES, "test", settings)
    with pytest.raises(ValueError, match="appears twice"):
        collect_clips([manifest, manifest], ("mer2023",), "test", settings)

    # A clip whose task is not its dataset's: the error names the clip, the field and the dataset's task.
    mislabeled = tmp_path / "mislabeled.jsonl"
    record = {
        "id": "x",
        "video": str(manifest.parent / "m1.mp4"),
        "task": "basic",
        "label": "happy",
        "dataset": "cmumosi",
        "split": "test",
    }
    mislabeled.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"clip 'x': field 'task' is 'basic', but cmumosi is a 'sentiment'"):
        collect_clips([mislabeled], ("cmumosi",), "test", settings)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_clips([tmp_path / "nothing.jsonl"], ("mer2023",), "test", settings)


def test_read_done_drops_a_line_cut_short(tmp_path):
    path = tmp_path / PREDICTIONS_FILE
    whole = json.dumps({"dataset": "mer2023", "id": "a", "output": "happy", "ground_truth": "happy"}) + "\n"
    path.write_text(whole + '{"dataset": "mer2023", "id": "b", "outp')
    with pytest.warns(UserWarning, match="incomplete last line"):
        done = read_done(path)
    assert list(done) == [("mer2023", "a")] and path.read_text() == whole
    assert read_done(tmp_path / "absent.jsonl") == {}


def test_generation_settings_bind_only_once_there_are_predictions(tmp_path):
    check_generation_settings(tmp_path, {"checkpoint": "/a", "max_new_tokens": 8})
    # A run that failed before its first answer leaves settings that a corrected rerun replaces.
    check_generation_settings(tmp_path, {"checkpoint": "/b", "max_new_tokens": 8})
    assert json.loads((tmp_path / GENERATION_FILE).read_text())["checkpoint"] == "/b"
    (tmp_path / PREDICTIONS_FILE).write_text('{"dataset": "meld", "id": "a", "output": "", "ground_truth": "joy"}\n')
    check_generation_settings(tmp_path, {"checkpoint": "/b", "max_new_tokens": 8})
    with pytest.raises(ValueError, match="checkpoint='/b' there, '/c' now"):
        check_generation_settings(tmp_path, {"checkpoint": "/c", "max_new_tokens": 8})
    with pytest.raises(ValueError, match=r"top_p: expected a value in \(0, 1\], got 1.5"):
        GenerationSettings(top_p=1.5)


@pytest.fixture(scope="module")
def run_dir(checkpoint, tmp_path_factory):
    """A training run directory of the tiny thinker whose config sets the instruction, answer length and
    prompt buckets; its mesh takes every device there is (mesh.fsdp: -1)."""
    return tiny_run_directory(
        checkpoint,
        tmp_path_factory.mktemp("eval_run") / "run",
        "sampling.eval_max_new_tokens=5",
        "prompt.instruction=Name the feeling.",
        "sampling.prompt_buckets=[512]",
    )


def test_a_run_directory_evaluates_alike_on_one_and_eight_devices(run_dir, manifest, tiny_wheel_dir, tmp_path):
    """`eval --checkpoint RUN` takes the run's own prompt, answer length and buckets, loads the weights
    sharded over all devices of the mesh, and answers every clip as on a single device. In float32: in
    bfloat16 (the default) another partitioning rounds differently, and the tiny random model's near-tied
    greedy choices can flip (one late token of one clip did when the media became sharded)."""
    import os
    import subprocess
    import sys

    command = [
        "eval",
        "--checkpoint",
        str(run_dir),
        "--data",
        str(manifest),
        "--wheel-dir",
        str(tiny_wheel_dir),
        "--datasets",
        "mer2023,cmumosi",
        "--batch-size",
        "2",
        "--no-progress",
        *MEDIA,
        "--step",
        "2",
        "--dtype",
        "float32",
    ]
    assert main([*command, "--out", str(tmp_path / "eight")]) == 0
    single = subprocess.run(
        [sys.executable, "-m", "opsd_jax.cli", *command, "--out", str(tmp_path / "one")],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    eight, one = _lines(tmp_path / "eight" / PREDICTIONS_FILE), _lines(tmp_path / "one" / PREDICTIONS_FILE)
    assert {(row["dataset"], row["id"]) for row in eight} == ASKED
    assert sorted(eight, key=lambda row: row["id"]) == sorted(one, key=lambda row: row["id"])
    generation = json.loads((tmp_path / "eight" / GENERATION_FILE).read_text())
    assert generation["prompt_config"]["instruction"] == "Name the feeling." and generation["max_new_tokens"] == 5
    assert generation["step"] == 2 and generation["dtype"] == "float32" and generation["prompt_buckets"] == [512]


def test_eval_overrides_apply_and_a_bad_source_stops_before_loading(
    run_dir, manifest, tiny_wheel_dir, tmp_path, generate_calls, capsys
):
    command = [
        "eval",
        "--checkpoint",
        str(run_dir),
        "--data",
        str(manifest),
        "--wheel-dir",
        str(tiny_wheel_dir),
        "--datasets",
        "mer2023",
        "--limit",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
        *MEDIA,
    ]
    assert (
        main(
            [*command, "prompt.instruction=Which one?", "--out", str(tmp_path / "a"), "sampling.eval_max_new_tokens=2"]
        )
        == 0
    )
    generation = json.loads((tmp_path / "a" / GENERATION_FILE).read_text())
    assert generation["prompt_config"]["instruction"] == "Which one?" and generation["max_new_tokens"] == 2
    assert generate_calls == [1]
    capsys.readouterr()
    for extra, expected in (
        (["--step", "9"], "no checkpoint at step 9; saved steps: 1, 2"),
        (["mesh.data=3"], "mesh.fsdp: -1 cannot fill the mesh: 8 devices"),
        (["--checkpoint", str(tmp_path)], "neither a Hugging Face checkpoint directory"),
    ):
        assert main([*command, "--out", str(tmp_path / "b"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert generate_calls == [1]
