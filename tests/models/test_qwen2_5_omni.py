"""`from_pretrained`: every checkpoint layout real checkpoints use, the errors, and the sharded forward."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.config import MeshConfig
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.models.weights import CheckpointError
from opsd_jax.sharding import make_mesh, shard_batch
from opsd_jax.testing.reference import rewrite_checkpoint

IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [0, 0, 0, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)


def forward(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


@pytest.fixture(scope="module")
def baseline(tiny_untied):
    _, checkpoint = tiny_untied
    return forward(from_pretrained(checkpoint))


def test_full_omni_checkpoint_with_thinker_prefix_and_talker(tiny_untied, baseline, tmp_path, caplog):
    _, checkpoint = tiny_untied
    talker = {"talker.model.norm.weight": np.ones(8, np.float32), "token2wav.code.weight": np.ones((2, 2), np.float32)}
    full = rewrite_checkpoint(checkpoint, tmp_path / "full", rename=lambda n: "thinker." + n, extra=talker, shards=3)
    with caplog.at_level(logging.INFO, logger="opsd_jax.models.weights"):
        model = from_pretrained(full)
    assert "skipped 2 talker/token2wav tensors" in caplog.text
    np.testing.assert_array_equal(forward(model), baseline)


def test_transformers5_in_memory_names(tiny_untied, baseline, tmp_path):
    _, checkpoint = tiny_untied

    def in_memory(name: str) -> str:
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        if name.startswith(("audio_tower.", "visual.")):
            return "model." + name
        return name

    model = from_pretrained(rewrite_checkpoint(checkpoint, tmp_path / "v5", rename=in_memory))
    np.testing.assert_array_equal(forward(model), baseline)


def test_missing_lm_head_means_tied_embeddings(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    model = from_pretrained(rewrite_checkpoint(checkpoint, tmp_path / "tied", drop=("lm_head.weight",)))
    assert model.lm_head is None
    hidden = jnp.ones((1, 1, 64))
    np.testing.assert_allclose(
        np.asarray(model.logits(hidden)), np.asarray(hidden @ model.model.embed_tokens.embedding[...].T), atol=1e-6
    )


def test_missing_tensor_names_it(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    broken = rewrite_checkpoint(checkpoint, tmp_path / "missing", drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(128, 64\)|model shape \(64, 128\)"):
        from_pretrained(broken)


def test_unexpected_tensor_names_it(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    extra = {"model.layers.9.self_attn.q_proj.weight": np.zeros((64, 64), np.float32)}
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.self_attn\.q_proj\.weight.*\(64, 64\)"):
        from_pretrained(rewrite_checkpoint(checkpoint, tmp_path / "extra", extra=extra))


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    bad = {"model.norm.weight": np.ones(65, np.float32)}
    broken = rewrite_checkpoint(checkpoint, tmp_path / "shape", drop=("model.norm.weight",), extra=bad)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint shape \(65,\).*shape \(64,\)"):
        from_pretrained(broken)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 8}}')
    with pytest.raises(CheckpointError, match="missing field 'text_config.num_attention_heads'"):
        from_pretrained(tmp_path)


def test_no_safetensors_files(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors files"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied"])
def test_sharded_forward_on_eight_devices_equals_one_device(fixture, request):
    assert jax.device_count() == 8
    _, checkpoint = request.getfixturevalue(fixture)
    single = forward(from_pretrained(checkpoint))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = from_pretrained(checkpoint, mesh=mesh)
    q_kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    batch = shard_batch({"ids": jnp.asarray(IDS), "mask": jnp.asarray(MASK)}, mesh)
    sharded = jax.jit(lambda ids, mask: model(ids, attention_mask=mask))(batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)
