"""Mesh construction and logical-axis placement on 1, 4 and 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opsd_jax.config import MeshConfig
from opsd_jax.models.layers import Linear
from opsd_jax.sharding import (
    LOGICAL_AXIS_RULES,
    logical_to_spec,
    make_mesh,
    move_split,
    resolve_rules,
    shard_batch,
    shard_module,
)


@pytest.mark.parametrize(
    "devices, config, shape",
    [
        (1, MeshConfig(), (1, 1, 1)),
        (4, MeshConfig(data=2, fsdp=-1, tensor=1), (2, 2, 1)),
        (8, MeshConfig(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
        (8, MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    ],
)
def test_mesh_shapes(devices, config, shape):
    mesh = make_mesh(config, jax.devices()[:devices])
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_logical_to_spec_uses_the_table_and_replicates_what_does_not_divide():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rules = resolve_rules()
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (6, 128), mesh, rules) == P(None, "tensor")
    assert logical_to_spec(("batch", None), (8, 3), mesh, rules) == P("fsdp", None)  # data has size 1
    # A mesh axis is used at most once per array.
    assert logical_to_spec(("embed", "embed"), (8, 8), mesh, rules) == P("fsdp", None)


def test_rule_overrides():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rules = resolve_rules({"mlp": None, "embed": ["fsdp", "tensor"]})
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P(("fsdp", "tensor"), None)
    assert LOGICAL_AXIS_RULES["mlp"] == "tensor"  # the shared table itself is untouched
    with pytest.raises(KeyError, match="unknown logical axis 'nope'"):
        resolve_rules({"nope": None})


@pytest.mark.parametrize("devices", [1, 4, 8])
def test_shard_module_and_batch(devices):
    tensor = 2 if devices >= 4 else 1
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=tensor), jax.devices()[:devices])
    layer = Linear(16, 32, use_bias=True, axes=("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
    expected = np.asarray(layer(x))
    shard_module(layer, mesh)
    assert layer.kernel[...].sharding.spec == (P("fsdp", "tensor") if devices > 1 else P(None, None))
    batch = shard_batch({"x": x, "step": 3}, mesh)
    assert batch["step"] == 3
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, v: m(v))(layer, batch["x"])), expected, atol=1e-6)


def test_move_split_moves_one_dimensions_axes_onto_another_where_they_divide():
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    embed_split = NamedSharding(mesh, P("fsdp", "tensor"))
    assert move_split(embed_split, (64, 128), source=0, target=1).spec == P(None, ("tensor", "fsdp"))
    assert move_split(embed_split, (64, 6), source=0, target=1) is embed_split  # 6 does not split 8 ways
    whole = NamedSharding(mesh, P(None, "tensor"))
    assert move_split(whole, (64, 128), source=0, target=1) is whole  # nothing to move
