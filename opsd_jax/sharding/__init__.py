"""Device mesh and logical-axis sharding."""

from opsd_jax.sharding.mesh import (
    MeshConfig,
    activation_axis_parts,
    activation_batch_shards,
    activation_sharding,
    active_activation_mesh,
    constrain,
    constrain_activation,
    logical_to_spec,
    make_mesh,
    mesh_axes,
    move_split,
    param_shardings,
    shard_batch,
    shard_module,
    to_host,
)
from opsd_jax.sharding.rules import LOGICAL_AXIS_RULES, MESH_AXES, AxisRules, resolve_rules

__all__ = [
    "LOGICAL_AXIS_RULES",
    "AxisRules",
    "MESH_AXES",
    "MeshConfig",
    "activation_axis_parts",
    "activation_batch_shards",
    "activation_sharding",
    "active_activation_mesh",
    "constrain",
    "constrain_activation",
    "logical_to_spec",
    "make_mesh",
    "mesh_axes",
    "move_split",
    "param_shardings",
    "resolve_rules",
    "shard_batch",
    "shard_module",
    "to_host",
]
