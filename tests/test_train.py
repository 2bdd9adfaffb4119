"""The training run: a real run on a tiny generated dataset, exact resume, preemption, safe checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from opsd_jax.checkpoint import RunCheckpointer, abstract_like
from opsd_jax.config import load_config
from opsd_jax.data.builders import SyntheticAffectConfig, build_synthetic_affect
from opsd_jax.testing.tokenizer import build_tiny_tokenizer
from opsd_jax.train import Trainer, classification_scores, predicted_label

LABELS = ("happy", "sad")


def generate_clips(split: str, config: SyntheticAffectConfig):
    rng = np.random.default_rng(0 if split == "train" else 1)
    for index in range(8 if split == "train" else 4):
        label = LABELS[index % 2]
        yield dict(
            id=f"{split}{index}", frames=rng.integers(0, 256, config.frame_shape, dtype=np.uint8), sample_fps=2.0,
            audio=0.1 * rng.standard_normal(6000).astype(np.float32), task="basic", label=label,
            subtitle="hi" if label == "happy" else "oh", dataset="toy", rationale=f"it is {label}",
        )


@pytest.fixture(scope="module")
def run_setup(tiny_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    checkpoint = root / "thinker"
    shutil.copytree(tiny_untied[1], checkpoint)
    build_tiny_tokenizer(checkpoint)
    dataset = build_synthetic_affect(root / "data", SyntheticAffectConfig(
        name="toy", num_frames=2, height=28, width=28, max_audio_seconds=0.5, generator=generate_clips,
        splits=("train", "test"),
    ))
    return checkpoint, dataset, root


def config_for(run_setup, output: str, *extra: str):
    checkpoint, dataset, root = run_setup
    return load_config(None, [
        f"model.checkpoint={checkpoint}", f"data.train_dir={dataset}", f"data.eval_dir={dataset}",
        "data.prompt_length=160", "data.eval_clips=4", "train.batch_size=2", "train.total_steps=4", "train.lr=1e-3",
        "sampling.num_samples=2", "sampling.max_new_tokens=4", "run.save_every=2", "run.eval_every=4",
        f"run.output_dir={root / output}", "prompt.instruction=Which emotion? <answer></answer>",
        "prompt.privileged_template=Evidence: {rationale}", "mesh.fsdp=-1", *extra,
    ])


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
    from opsd_jax.opsd.teacher import completion_hidden
    from opsd_jax.train import _clips

    temperature, top_k = 0.7, 5
    trainer = Trainer(config_for(run_setup, "ratio", f"sampling.temperature={temperature}", f"sampling.top_k={top_k}",
                                 f"loss.temperature={temperature}"))
    batch = jax.tree.map(lambda x: x[0], trainer.make_step_batch(_clips(next(trainer.iterator)), step=0))
    hidden = completion_hidden(trainer.model, batch.student, batch.completion, batch.completion_mask)
    logits = np.asarray(hidden @ trainer.model.head_kernel(), np.float64) / temperature  # [N, C, V]
    kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
    filtered = np.where(logits >= kth, logits, -np.inf)
    filtered -= filtered.max(-1, keepdims=True)
    logprobs = filtered - np.log(np.exp(filtered).sum(-1, keepdims=True))
    tokens, mask = np.asarray(batch.completion), np.asarray(batch.completion_mask)
    expected = np.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(batch.sampler_logprobs)[mask], expected[mask], atol=2e-4)
    trainer.checkpointer.close()


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
    scores = classification_scores(["happy", None, "sad", "sad"], ["happy", "sad", "sad", "angry"], vocabulary)
    assert scores["accuracy"] == 0.5
    assert scores["macro_f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # sad: tp 1, fp 1, fn 1


def test_two_processes_match_one_process(run_setup):
    """2 processes x 2 CPU devices (jax.distributed over gloo on 127.0.0.1) against 1 process x 4 devices."""
    import socket
    import subprocess
    import sys

    checkpoint, dataset, root = run_setup
    overrides = [
        f"model.checkpoint={checkpoint}", f"data.train_dir={dataset}", "data.prompt_length=160", "train.batch_size=2",
        "train.total_steps=3", "train.lr=1e-5", "sampling.num_samples=2", "sampling.max_new_tokens=4",
        "run.eval_every=100", "run.save_every=100", "prompt.instruction=Which emotion? <answer></answer>",
        "prompt.privileged_template=Evidence: {rationale}", "mesh.data=2", "mesh.fsdp=2",
    ]

    def launch(devices: int, output: str, env: dict[str, str]):
        return subprocess.Popen(
            [sys.executable, "-m", "opsd_jax.testing.multihost_worker", str(devices), *overrides,
             f"run.output_dir={root / output}"],
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def losses(process) -> list[float]:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        line = [row for row in out.splitlines() if row.startswith("LOSSES ")]
        return json.loads(line[0][len("LOSSES "):]) if line else []

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
