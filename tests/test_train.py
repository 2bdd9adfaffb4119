"""The training run: a real run on a tiny generated dataset, exact resume, preemption, safe checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from opsd_jax import train as train_module
from opsd_jax.checkpoint import RunCheckpointer, abstract_like
from opsd_jax.config import load_config
from opsd_jax.data.builders import SyntheticAffectConfig, build_synthetic_affect
from opsd_jax.testing.tiny_run import LABELS, build_tiny_run_files, tiny_affect_clips
from opsd_jax.train import Trainer, classification_scores, label_vocabulary, predicted_label


@pytest.fixture(scope="module")
def run_setup(tiny_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    files = build_tiny_run_files(root, tiny_untied[1])  # 8 training clips, 4 test clips
    return files.checkpoint, files.dataset, root


def config_for(run_setup, output: str, *extra: str):
    checkpoint, dataset, root = run_setup
    return load_config(
        None,
        [
            f"model.checkpoint={checkpoint}",
            f"data.train_dir={dataset}",
            f"data.eval_dir={dataset}",
            "data.prompt_length=160",
            "data.eval_clips=4",
            "train.batch_size=2",
            "train.total_steps=4",
            "train.lr=1e-3",
            "sampling.num_samples=2",
            "sampling.max_new_tokens=4",
            "run.save_every=2",
            "run.eval_every=4",
            f"run.output_dir={root / output}",
            "prompt.instruction=Which emotion? <answer></answer>",
            "prompt.privileged_template=Evidence: {rationale}",
            "mesh.fsdp=-1",
            *extra,
        ],
    )


def params_of(trainer) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


def test_resumed_run_reproduces_the_uninterrupted_one(run_setup):
    whole = Trainer(config_for(run_setup, "whole"))
    summary = whole.run()
    assert summary.steps == 4 and len(summary.losses) == 4 and all(np.isfinite(summary.losses))
    assert "eval/accuracy" in summary.final_metrics

    first = Trainer(config_for(run_setup, "split"))
    part = first.run(max_steps=2)
    first.checkpointer.close()
    assert part.steps == 2
    second = Trainer(config_for(run_setup, "split"))
    rest = second.run(resume=True)
    assert rest.steps == 4
    np.testing.assert_array_equal(part.losses + rest.losses, summary.losses)
    for a, b in zip(params_of(whole), params_of(second)):
        np.testing.assert_array_equal(a, b)

    # `opsd-jax export` reads the trained parameters back from the run directory.
    from opsd_jax.export_cli import load_trained_params

    exported = load_trained_params(run_setup[2] / "whole")
    for a, b in zip(jax.tree.leaves(nnx.state(exported.params, nnx.Param)), params_of(whole)):
        np.testing.assert_array_equal(np.asarray(a), b)

    logs = [json.loads(line) for line in (run_setup[2] / "whole" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logs] == [1, 2, 3, 4]
    assert (run_setup[2] / "whole" / "summary.json").is_file()
    assert list((run_setup[2] / "whole" / "logs" / "tensorboard").iterdir())


def test_sigterm_saves_and_stops(run_setup):
    trainer = Trainer(config_for(run_setup, "preempted", "run.save_every=100"))

    def preempt(step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = trainer.run(on_step=preempt)
    assert summary.preempted and summary.steps == 1
    assert trainer.checkpointer.latest_step() == 1


def test_a_half_written_checkpoint_is_never_loaded(run_setup):
    trainer = Trainer(config_for(run_setup, "crash", "train.total_steps=2"))
    trainer.run()
    directory = run_setup[2] / "crash" / "checkpoints"
    # What a process killed during an asynchronous save leaves: a temporary directory with part of step 3.
    partial = directory / "3.orbax-checkpoint-tmp-1234"
    shutil.copytree(directory / "2", partial)
    shutil.rmtree(partial / "state")
    reader = RunCheckpointer(directory)
    assert reader.latest_step() == 2
    state, meta = reader.restore(None, abstract_like(trainer.state))
    assert meta["step"] == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainer.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_importance_ratio_takes_the_distribution_rollouts_were_drawn_from(run_setup):
    """At sampling temperature 0.7 with top-k 5, the step's behaviour log-probabilities are those of the
    tempered, filtered distribution (float64 reference from the model's logits), not the plain model's."""
    from opsd_jax.train import _clips

    temperature, top_k = 0.7, 5
    trainer = Trainer(
        config_for(
            run_setup,
            "ratio",
            f"sampling.temperature={temperature}",
            f"sampling.top_k={top_k}",
            f"loss.temperature={temperature}",
        )
    )
    batch = jax.tree.map(lambda x: x[0], trainer.make_step_batch(_clips(next(trainer.iterator)), step=0))
    hidden = trainer.model.completion_hidden(batch.student, batch.completion, batch.completion_mask)
    logits = np.asarray(hidden @ trainer.model.head_kernel(), np.float64) / temperature  # [N, C, V]
    kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
    filtered = np.where(logits >= kth, logits, -np.inf)
    filtered -= filtered.max(-1, keepdims=True)
    logprobs = filtered - np.log(np.exp(filtered).sum(-1, keepdims=True))
    tokens, mask = np.asarray(batch.completion), np.asarray(batch.completion_mask)
    expected = np.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(batch.sampler_logprobs)[mask], expected[mask], atol=2e-4)
    trainer.checkpointer.close()


def test_one_decode_over_the_step_gives_each_micro_batch_its_rollouts(run_setup):
    """`sampling.rollout_batch: step` decodes the two micro-batches' prompts together: each micro-batch
    gets the rollouts (tokens, behaviour log-probabilities) its own decode would have given it."""
    from opsd_jax.train import _clips

    batches = {}
    for mode in ("micro_batch", "step"):
        extra = ("train.batch_size=4", "train.grad_accum_steps=2", f"sampling.rollout_batch={mode}")
        trainer = Trainer(config_for(run_setup, f"rollouts_{mode}", *extra))
        batches[mode] = trainer.make_step_batch(_clips(next(trainer.iterator)), step=0)
        trainer.checkpointer.close()
    per_micro, whole = batches["micro_batch"], batches["step"]
    assert whole.completion.shape[:2] == (2, 4)  # [micro-batches, rows]: 2 prompts x 2 samples each
    np.testing.assert_array_equal(np.asarray(whole.completion), np.asarray(per_micro.completion))
    np.testing.assert_array_equal(np.asarray(whole.completion_mask), np.asarray(per_micro.completion_mask))
    np.testing.assert_allclose(np.asarray(whole.sampler_logprobs), np.asarray(per_micro.sampler_logprobs), atol=1e-5)
    assert np.asarray(whole.completion_mask).any()


def test_predictions_name_each_clip_and_score_as_evaluate_does(run_setup):
    trainer = Trainer(config_for(run_setup, "predict"))
    rows = trainer.predict()
    assert sorted(row["id"] for row in rows) == [f"test{i}" for i in range(4)]
    assert all(row["subtitle"] == ("hi" if row["label"] == "happy" else "oh") for row in rows)
    predicted, truth = [row["predicted"] for row in rows], [row["label"] for row in rows]
    scores = classification_scores(predicted, truth, sorted(LABELS))
    assert trainer.evaluate() == {"eval/accuracy": scores["accuracy"], "eval/macro_f1": scores["macro_f1"]}
    trainer.checkpointer.close()


def test_label_parsing_and_scores():
    vocabulary = ["happy", "sad", "angry"]
    assert predicted_label("I think <answer>Sad</answer>", vocabulary) == "sad"
    assert predicted_label("the words sound angry, but the face says happy", vocabulary) == "happy"
    assert predicted_label("no idea", vocabulary) is None
    # `opsd-jax eval`'s rule (`answer_text`): the last answer block, where a first one can be a draft.
    assert predicted_label("<answer>sad</answer> On reflection: <answer>happy</answer>", vocabulary) == "happy"
    assert predicted_label("<think>sad?</think><answer>angry", vocabulary) == "angry"
    scores = classification_scores(["happy", None, "sad", "sad"], ["happy", "sad", "sad", "angry"], vocabulary)
    assert scores["accuracy"] == 0.5
    assert scores["macro_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # sad: tp 1, fp 1, fn 1


def test_the_label_vocabulary_is_read_without_decoding_media(run_setup, monkeypatch):
    calls = []
    load_split = train_module.load_split
    monkeypatch.setattr(
        train_module, "load_split", lambda *args, **kwargs: calls.append(kwargs) or load_split(*args, **kwargs)
    )
    assert label_vocabulary(str(run_setup[1]), "train") == sorted(LABELS)
    assert calls == [{"decode_media": False}]


def test_two_processes_match_one_process(run_setup):
    """2 processes x 2 CPU devices (jax.distributed over gloo on 127.0.0.1) against 1 process x 4 devices."""
    import socket
    import subprocess
    import sys

    checkpoint, dataset, root = run_setup
    overrides = [
        f"model.checkpoint={checkpoint}",
        f"data.train_dir={dataset}",
        "data.prompt_length=160",
        "train.batch_size=2",
        "train.total_steps=3",
        "train.lr=1e-5",
        "sampling.num_samples=2",
        "sampling.max_new_tokens=4",
        "run.eval_every=100",
        "run.save_every=100",
        "prompt.instruction=Which emotion? <answer></answer>",
        "prompt.privileged_template=Evidence: {rationale}",
        "mesh.data=2",
        "mesh.fsdp=2",
    ]

    def launch(devices: int, output: str, env: dict[str, str]):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opsd_jax.testing.multihost_worker",
                str(devices),
                *overrides,
                f"run.output_dir={root / output}",
            ],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def losses(process) -> list[float]:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        line = [row for row in out.splitlines() if row.startswith("LOSSES ")]
        return json.loads(line[0][len("LOSSES ") :]) if line else []

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cluster = {"OPSD_COORDINATOR": f"127.0.0.1:{port}", "OPSD_NUM_PROCESSES": "2"}
    workers = [launch(2, "two_processes", {**cluster, "OPSD_PROCESS_ID": str(i)}) for i in range(2)]
    single = launch(4, "one_process", {})
    two = [losses(worker) for worker in workers][0]
    one = losses(single)
    assert len(one) == 3
    # Three steps of 2 clips stay within the first epoch of the 8 training clips, so both layouts see the
    # same clips each step (later epochs reshuffle within each process's shard). Same rollouts (keyed by
    # clip id), reduced in another order: equal up to float rounding. A small learning rate keeps Adam's
    # first steps (~lr * g / |g|) from amplifying that rounding into different sampled tokens.
    np.testing.assert_allclose(two, one, rtol=1e-5)


# ----- the run directory: refusing to mix runs, readers that touch nothing, corrupt and missing checkpoints -----


@pytest.fixture(scope="module")
def finished_run(run_setup):
    """A 3-step run saving every step (checkpoints 1, 2, 3 kept) and its trainer; tests copy the directory."""
    trainer = Trainer(
        config_for(
            run_setup,
            "finished",
            "train.total_steps=3",
            "run.save_every=1",
            "run.keep_last=3",
            "run.keep_best=0",
            "run.eval_every=100",
            "data.eval_dir=",
        )
    )
    trainer.run()
    trainer.checkpointer.close()
    return trainer, run_setup[2] / "finished"


def copy_run(finished_run, tmp_path):
    directory = tmp_path / "run"
    shutil.copytree(finished_run[1], directory)
    return directory


def write_run_config(run_setup, directory, tmp_path, *extra):
    """The run's own config.yaml with run.output_dir pointing at `directory`: what `opsd-jax train --config` reads."""
    import yaml

    config = yaml.safe_load((directory / "config.yaml").read_text())
    config["run"]["output_dir"] = str(directory)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_lora_run_saves_only_its_adapters_and_resumes_exactly(run_setup):
    lora_settings = ("model.lora.rank=4", "model.lora.alpha=8", "teacher.mode=frozen")
    whole = Trainer(config_for(run_setup, "lora_whole", *lora_settings))
    summary = whole.run()
    first = Trainer(config_for(run_setup, "lora_split", *lora_settings))
    part = first.run(max_steps=2)
    first.checkpointer.close()
    second = Trainer(config_for(run_setup, "lora_split", *lora_settings))
    rest = second.run(resume=True)
    saved = second.checkpointer.manager.item_metadata(2)["state"]  # readable once a restore registered its handler
    assert not saved.get("frozen") and not saved.get("teacher_params")  # no base weight, no teacher copy
    saved_paths = ["/".join(map(str, path)) for path, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]]
    assert saved_paths and all("_lora_" in path for path in saved_paths)
    np.testing.assert_array_equal(part.losses + rest.losses, summary.losses)
    for a, b in zip(params_of(whole), params_of(second)):
        np.testing.assert_array_equal(a, b)


def test_training_into_an_existing_run_without_resume_is_refused(run_setup, finished_run, tmp_path, capsys):
    from opsd_jax.cli import main

    directory = copy_run(finished_run, tmp_path)
    before = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    config = write_run_config(run_setup, directory, tmp_path)
    assert main(["train", "--config", str(config), "train.total_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(directory) in err
    assert "--resume" in err and "run.output_dir" in err and "--overwrite" in err
    after = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    assert after == before  # nothing of the old run was touched


def test_overwrite_clears_the_previous_run(run_setup, finished_run, tmp_path):
    from opsd_jax.train import clear_run_directory, existing_run_files

    directory = copy_run(finished_run, tmp_path)
    (directory / "notes.txt").write_text("mine")
    assert existing_run_files(directory) == ["config.yaml", "summary.json", "logs/metrics.jsonl", "checkpoints/"]
    clear_run_directory(directory)
    assert existing_run_files(directory) == [] and (directory / "notes.txt").read_text() == "mine"


def test_export_of_a_live_run_deletes_nothing(finished_run, tmp_path):
    from opsd_jax.export_cli import load_trained_params

    directory = copy_run(finished_run, tmp_path)
    # The save training is writing right now: orbax's temporary directory of step 4.
    pending = directory / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    shutil.copytree(directory / "checkpoints" / "3", pending)
    exported = load_trained_params(directory)
    assert pending.is_dir() and sorted(p.name for p in pending.iterdir()) == sorted(
        p.name for p in (directory / "checkpoints" / "3").iterdir()
    )
    for a, b in zip(jax.tree.leaves(nnx.state(exported.params, nnx.Param)), params_of(finished_run[0])):
        np.testing.assert_array_equal(np.asarray(a), b)


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_resume_skips_a_corrupt_latest_checkpoint(finished_run, tmp_path, caplog, damage):
    trainer = finished_run[0]
    directory = copy_run(finished_run, tmp_path)
    target = _largest_file(directory / "checkpoints" / "3" / "state")
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    reader = RunCheckpointer(directory / "checkpoints", read_only=True)
    with caplog.at_level("WARNING"):
        state, meta = reader.restore(None, abstract_like(trainer.state))
    assert meta["step"] == 2
    assert any("skipping checkpoint step 3" in r.getMessage() for r in caplog.records)
    # Asked for explicitly, the corrupt step is a one-line error naming it.
    from opsd_jax.models.weights import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint step 3 does not restore") as error:
        reader.restore(3, abstract_like(trainer.state))
    assert "\n" not in str(error.value)


def test_a_missing_step_and_another_model_are_one_line_errors(finished_run, tmp_path, capsys):
    from opsd_jax.export_cli import main as export_main
    from opsd_jax.models.weights import CheckpointError

    trainer, directory = finished_run
    reader = RunCheckpointer(directory / "checkpoints", read_only=True)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 9; saved steps: 1, 2, 3"):
        reader.restore(9, abstract_like(trainer.state))
    # A model config whose embedding differs: the error names the parameter and both shapes.
    abstract = abstract_like(trainer.state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract.params)
    path, first = leaves[0]
    changed = jax.ShapeDtypeStruct((first.shape[0] + 1, *first.shape[1:]), first.dtype, sharding=first.sharding)
    params = jax.tree_util.tree_unflatten(treedef, [changed] + [leaf for _, leaf in leaves[1:]])
    with pytest.raises(CheckpointError, match=r"has params/\S+ of shape .* the model config gives"):
        reader.restore(None, dataclasses.replace(abstract, params=params))
    capsys.readouterr()  # the restore above warned (logged once a CLI call has configured logging)
    assert export_main(["--checkpoint", str(directory), "--out", str(tmp_path / "x"), "--step", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint at step 9" in err


def test_resume_without_a_checkpoint_says_so_or_refuses(run_setup, caplog):
    from opsd_jax.models.weights import CheckpointError

    trainer = Trainer(config_for(run_setup, "typo"))
    with caplog.at_level("WARNING"):
        assert trainer.restore() == 0
    assert any("no checkpoint in" in r.getMessage() and "starting at step 0" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match="no checkpoint in .* to resume from"):
        trainer.restore(required=True)
    trainer.checkpointer.close()


@pytest.mark.parametrize("what", ["loss", "params"])
def test_a_diverged_step_stops_the_run_and_keeps_the_good_checkpoints(run_setup, what):
    from opsd_jax.train import TrainingDiverged

    trainer = Trainer(
        config_for(
            run_setup,
            f"diverged_{what}",
            "train.total_steps=4",
            "run.save_every=1",
            "run.keep_last=2",
            "run.keep_best=0",
            "run.eval_every=100",
            "data.eval_dir=",
        )
    )
    real_step = trainer.step_fn

    def step_that_diverges_at_3(state, batch):
        state, metrics = real_step(state, batch)
        if int(state.step) == 3:
            if what == "loss":
                metrics = {**metrics, "loss": jax.numpy.nan}
            else:  # finite metrics, but the update left an inf in the parameters
                state = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.inf), state.params))
        return state, metrics

    trainer.step_fn = step_that_diverges_at_3
    with pytest.raises(TrainingDiverged, match=r"^step 3: .*the last checkpoint is step 2"):
        trainer.run()
    trainer.checkpointer.close()
    reader = RunCheckpointer(run_setup[2] / f"diverged_{what}" / "checkpoints", read_only=True)
    assert reader.all_steps() == [1, 2]
    state, meta = reader.restore(None, abstract_like(trainer.state))
    assert meta["step"] == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    logged = [
        json.loads(line)["step"]
        for line in (run_setup[2] / f"diverged_{what}" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2] + ([3] if what == "params" else [])


def test_prompts_longer_than_the_bucket_are_named_before_training_or_left_out(run_setup, tmp_path, caplog):
    from opsd_jax.config import ConfigError
    from opsd_jax.data.builders import load_split

    checkpoint, _, _ = run_setup

    def generate_long(split, config):
        for clip in tiny_affect_clips(split, config):
            if clip["id"] in ("train5", "test2"):
                clip["subtitle"] = "a long line said in the clip " * 12
            yield clip

    dataset = build_synthetic_affect(
        tmp_path / "data",
        SyntheticAffectConfig(
            name="long",
            num_frames=2,
            height=28,
            width=28,
            max_audio_seconds=0.5,
            generator=generate_long,
            splits=("train", "test"),
        ),
    )
    overrides = [f"data.train_dir={dataset}", f"data.eval_dir={dataset}", f"run.output_dir={tmp_path / 'run'}"]
    with pytest.raises(
        ConfigError,
        match=r"\(train\): 1 of 8 clips have prompts longer than data\.prompt_length=160 / "
        r"data\.teacher_prompt_length=160: 'train5' \(\d+ student, \d+ teacher tokens\); raise "
        r"data\.prompt_length to \d+ and data\.teacher_prompt_length to \d+, or set "
        r"data\.skip_long_prompts=true",
    ):
        Trainer(config_for(run_setup, "long", *overrides))
    with caplog.at_level("WARNING"):
        trainer = Trainer(config_for(run_setup, "long", *overrides, "data.skip_long_prompts=true"))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "left out 1 of 8 clips" in said and "'train5'" in said and "left out 1 of 4 clips" in said
    test_split = load_split(dataset, "test")
    kept = sorted(test_split[i]["id"].decode() for i in trainer.eval_indices)
    assert kept == ["test0", "test1", "test3"]
    seen = set()
    for _ in range(4):  # one epoch of the 7 clips that fit, in batches of 2 (plus one of the next epoch)
        seen |= {str(i) for i in next(trainer.iterator)["id"]}
    assert "train5" not in seen and len(seen) == 7
    trainer.checkpointer.close()
    assert load_split(dataset, "train")  # the dataset itself is untouched


def test_a_run_you_can_watch(run_setup, caplog, monkeypatch):
    """Each step logs its learning rate, time, rollout throughput and MFU (to the log, metrics.jsonl, TensorBoard
    and, offline, Weights & Biases); every run.log_rollouts_every steps the first prompt's rollouts go to
    rollouts.jsonl and TensorBoard's text; --resume says which step it resumed from."""
    import logging

    from opsd_jax.opsd.step import learning_rate_schedule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_for(
        run_setup,
        "watched",
        "train.total_steps=3",
        "train.warmup_steps=2",
        "run.log_rollouts_every=2",
        "run.wandb_project=opsd-test",
    )
    with caplog.at_level(logging.INFO, logger="opsd_jax"):
        Trainer(config).run(max_steps=2)
    logs = run_setup[2] / "watched" / "logs"
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    schedule = learning_rate_schedule(config.train)
    assert [row["train/lr"] for row in rows] == pytest.approx([float(schedule(0)), float(schedule(1))])
    for row in rows:
        assert row["perf/step_seconds"] > row["perf/rollout_seconds"] > 0 and row["perf/rollout_tokens_per_second"] > 0
        assert 0 < row["perf/mfu"] < 1 and row["perf/model_tflops"] > 0
    said = [record.getMessage() for record in caplog.records if record.name == "opsd_jax.train"]
    assert any(line.startswith("step 2 of 2: loss ") and "rollout tokens/s, MFU " in line for line in said), said

    rollouts = [json.loads(line) for line in (logs / "rollouts.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rollouts] == [0, 1] and {r["step"] for r in rollouts} == {2}
    assert rollouts[0]["prompt_id"].startswith("train")
    for record in rollouts:
        divergence = record["divergence"]
        assert 0 <= divergence["mean"] <= divergence["max"] and 0 <= divergence["max_position"] < record["tokens"]
        top = record["at_max"]["teacher_top"]
        assert len(top) == 5 and all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))
    tags = {value.tag for event in tensorboard_events(logs / "tensorboard") for value in event.summary.value}
    assert {"rollouts/text_summary", "perf/mfu", "train/lr"} <= tags, tags

    # Weights & Biases, offline: the same metrics at the same steps as metrics.jsonl, and the rollouts' text.
    (run_file,) = (logs / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    for row in rows:
        assert {name: history[row["step"]][name] for name in row if name != "step"} == pytest.approx(
            {name: value for name, value in row.items() if name != "step"}
        )
    assert history[2]["rollouts"].startswith("| prompt | sample |")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opsd_jax"):
        Trainer(config).run(resume=True)
    assert any("resuming from checkpoint step 2 of " in record.getMessage() for record in caplog.records)


def tensorboard_events(directory):
    """Every event of the TensorBoard files in `directory` (TFRecord framing: length, its CRC, data, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(directory.glob("events.out.tfevents*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            yield Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4


def wandb_records(path):
    """The records of a Weights & Biases run file (`run-ID.wandb`): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of records with a 7-byte header: CRC, length, type full / first / middle / last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    offset, block, pending = 7, 32768, b""
    while offset + 7 <= len(data):
        left = block - offset % block
        if left < 7:  # a block's tail too short for a header is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""
        elif kind == 0:
            pending = b""
