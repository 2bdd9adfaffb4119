"""Readers of what training produced: a run directory or a Hugging Face one, checked before loading, then the
thinker in bfloat16 on the config's mesh with the run's parameters."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from opsd_jax.config import ConfigError, load_config
from opsd_jax.models.weights import CheckpointError
from opsd_jax.sharding import make_mesh
from opsd_jax.testing.tiny_run import write_tiny_run
from opsd_jax.trained import load_thinker, open_source


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    """(run directory, saved parameters of steps 1 and 2)."""
    output = tmp_path_factory.mktemp("trained_run") / "run"
    config = load_config(
        None,
        [
            f"model.checkpoint={checkpoint}",
            f"run.output_dir={output}",
            "prompt.instruction=Which emotion?",
            "mesh.fsdp=-1",
        ],
    )
    return output, write_tiny_run(config, (1, 2))


def test_a_run_directory_brings_its_config_and_overrides_apply(run, checkpoint, tmp_path):
    output, _ = run
    source = open_source(output)
    assert source.run_dir == output and source.base_dir == checkpoint and source.step is None and source.configured
    assert source.config.prompt.instruction == "Which emotion?"
    changed = open_source(output, step=1, overrides=["prompt.instruction=Who?", "mesh.data=2"])
    assert changed.step == 1 and changed.config.prompt.instruction == "Who?" and changed.config.mesh.data == 2
    other = tmp_path / "other.yaml"
    other.write_text(f"model:\n  checkpoint: {checkpoint}\nprompt:\n  instruction: From a file\n")
    assert open_source(output, config_file=other).config.prompt.instruction == "From a file"
    plain = open_source(checkpoint)
    assert plain.run_dir is None and not plain.configured and plain.config.model.checkpoint == str(checkpoint)


def test_bad_sources_are_named_before_anything_loads(run, checkpoint, tmp_path):
    output, _ = run
    with pytest.raises(CheckpointError, match=r"--checkpoint .*nowhere: does not exist"):
        open_source(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"neither a Hugging Face checkpoint directory .* nor a training run"):
        open_source(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 7; saved steps: 1, 2"):
        open_source(output, step=7)
    with pytest.raises(CheckpointError, match=r"--step 1: .* is a Hugging Face checkpoint directory"):
        open_source(checkpoint, step=1)
    with pytest.raises(ConfigError, match=r"mesh: data x fsdp x tensor = 3 x 1 x 1 = 3, but 8 devices"):
        open_source(output, overrides=["mesh.data=3", "mesh.fsdp=1"])
    moved = tmp_path / "moved"
    shutil.copytree(output, moved)
    (moved / "config.yaml").write_text(
        (moved / "config.yaml").read_text().replace(str(checkpoint), str(tmp_path / "gone"))
    )
    with pytest.raises(
        CheckpointError, match=r"config\.yaml: model\.checkpoint .*gone \(the run's base checkpoint\) is missing"
    ):
        open_source(moved)


def test_the_run_loads_in_bfloat16_sharded_over_the_mesh(run):
    output, saved = run
    mesh = make_mesh(open_source(output).config.mesh)
    for step, expected in ((1, saved[0]), (None, saved[1])):
        model, restored = load_thinker(open_source(output, step=step), dtype="bfloat16", mesh=mesh)
        assert restored == (step or 2)
        params = nnx.state(model, nnx.Param)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            assert got.dtype == jax.numpy.bfloat16
            np.testing.assert_array_equal(np.asarray(got), want.astype(jax.numpy.bfloat16))
    # The weights are spread as in training (FSDP over the 8 devices): each holds 1/8 of the embedding.
    embedding = model.model.embed_tokens.embedding.get_value()
    assert len(embedding.sharding.device_set) == 8
    assert embedding.addressable_shards[0].data.size == embedding.size // 8
