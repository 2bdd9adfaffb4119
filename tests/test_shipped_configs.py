"""Every shipped config in configs/ runs its first training step on the CPU, shrunk to a tiny thinker
(`opsd_jax.testing.tiny_run.shrink_config`): rollouts, teacher, update, evaluation, a restorable checkpoint."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from opsd_jax.checkpoint import RunCheckpointer, abstract_like
from opsd_jax.config import load_config
from opsd_jax.models import lora
from opsd_jax.testing.tiny_run import REPLACED_FIELDS, build_tiny_run_files, longest_prompts, shrink_config
from opsd_jax.train import Trainer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# The largest step: the GPU config's 16 micro-batches of 2 prompts.
TRAIN_CLIPS = 32


@pytest.fixture(scope="module")
def tiny_files(tiny_untied, tmp_path_factory):
    return build_tiny_run_files(tmp_path_factory.mktemp("shipped_configs"), tiny_untied[1], train_clips=TRAIN_CLIPS)


def flat_fields(config, prefix: str = "") -> dict[str, object]:
    """Dotted name -> value of every leaf setting of a config tree."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{field.name}."))
        else:
            out[f"{prefix}{field.name}"] = value
    return out


def test_the_shipped_configs_include_remat_ones():
    assert len(CONFIGS) >= 5
    assert sum(load_config(path, num_devices=None).model.remat for path in CONFIGS) >= 4  # TPU and GPU configs


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_config_runs_its_first_step_shrunk(path, tiny_files, tmp_path):
    began = time.perf_counter()
    config = load_config(path, num_devices=None)
    tiny = shrink_config(
        config,
        tiny_files,
        output_dir=tmp_path / "run",
        num_devices=jax.device_count(),
        prompt_lengths=longest_prompts(config, tiny_files),
    )
    original, shrunk = flat_fields(config), flat_fields(tiny)
    kept = {name for name in original if name not in REPLACED_FIELDS}
    assert {name: shrunk[name] for name in kept} == {name: original[name] for name in kept}
    assert (
        tiny.train.batch_size
        // tiny.train.grad_accum_steps
        * tiny.sampling.num_samples
        % (tiny.mesh.data * tiny.mesh.fsdp)
        == 0
    ), "the rollout rows must shard over every batch-carrying device"

    trainer = Trainer(tiny)
    try:
        summary = trainer.run(max_steps=1)
    finally:
        trainer.checkpointer.close()
    assert trainer.model.model.remat == config.model.remat
    assert trainer.model.model.remat_policy == config.model.remat_policy
    assert trainer.model.model.attention == config.model.attention  # splash runs interpreted on the CPU
    assert lora.is_adapted(trainer.model) == (config.model.lora is not None)
    expected_dtype = np.dtype(config.model.param_dtype)
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(trainer.state.params)} == {expected_dtype}
    metrics = summary.final_metrics
    assert summary.steps == 1 and np.isfinite(summary.losses).all()
    assert metrics["train/completion_length"] > 0  # the rollouts sampled tokens
    assert np.isfinite(metrics["train/teacher_logprob"])  # the teacher scored them
    assert metrics["train/grad_norm"] > 0 and np.isfinite(metrics["train/grad_norm"])  # and the update had a gradient
    assert int(trainer.state.step) == 1
    assert "eval/accuracy" in metrics

    reader = RunCheckpointer(tmp_path / "run" / "checkpoints")
    assert reader.latest_step() == 1
    saved = trainer.state.saved()  # a LoRA run's checkpoint leaves out the frozen base (its model.checkpoint)
    state, meta = reader.restore(None, abstract_like(saved))
    assert meta["step"] == 1
    restored, live = jax.tree.leaves(state), jax.tree.leaves(saved)
    assert len(restored) == len(live)
    for a, b in zip(restored, live):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print(f"{path.name}: one shrunk step in {time.perf_counter() - began:.1f} s")
