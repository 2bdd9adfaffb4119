"""The one logical-axis table: logical names used by modules -> mesh axes.

Modules annotate parameters with logical axis names only (`logical_axes` metadata); activations and
batches use the same names. This table decides placement, as MaxText's `logical_axis_rules` do, and a
config may override single entries (`mesh.logical_axis_rules`).
"""

from __future__ import annotations

from typing import Iterator, Mapping

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
    # Activations. Rows over every batch-carrying axis; within a row, the model width whole (FSDP gathers
    # the weights instead of splitting activations into partial sums), heads and MLP over tensor.
    "batch": ("data", "fsdp"),
    "length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_mlp": "tensor",
    # The output head's logits in the loss: the vocabulary split over every chip (rows gathered).
    "activation_vocab": ("data", "fsdp", "tensor"),
    # The encoders' rows (vision patches, audio chunks): spread over the same axes, so that each chip
    # encodes its share of a micro-batch's clips instead of every chip all of them.
    "media": ("data", "fsdp"),
    # An embedding lookup's rows: over the batch axes that the table's width ("embed") leaves free, so that its
    # gradient is scattered into each chip's slice of the table (`opsd_jax.models.layers.Embed`).
    "lookup_batch": "data",
    # Text decoder parameters: FSDP over the model width, tensor parallelism over heads, MLP and vocab.
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    # Encoders are small (~0.65 B each at 7B): FSDP over their width, no tensor parallelism.
    "encoder_embed": "fsdp",
    "encoder_heads": None,
    "encoder_mlp": None,
    "encoder_norm": None,
    "encoder_patch": None,
    "encoder_kernel": None,
}


class AxisRules(Mapping[str, MeshAxes]):
    """A resolved table (logical name -> mesh axes): read-only and hashable, so that a jitted program can
    take it as a static argument (a run's `StepSettings` carries it)."""

    __slots__ = ("_table",)

    def __init__(self, table: Mapping[str, MeshAxes]):
        self._table = dict(table)

    def __getitem__(self, name: str) -> MeshAxes:
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._table.items())))

    def __repr__(self) -> str:
        return f"AxisRules({self._table!r})"


def resolve_rules(overrides: Mapping[str, MeshAxes] | None = None) -> AxisRules:
    """The default table with `overrides` (a config's `mesh.logical_axis_rules`) applied; lists become tuples.

    A run resolves its table once (`MeshConfig.axis_rules`) and passes it to every placement: parameters
    (`from_pretrained`, `param_shardings`), batches (`place_inputs`, `place_step_batch`, `shard_batch`) and
    activations (`constrain`, `activation_sharding`). Without one, those use this default table.
    """
    rules = dict(LOGICAL_AXIS_RULES)
    for name, target in (overrides or {}).items():
        if name not in rules:
            raise KeyError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        rules[name] = tuple(target) if isinstance(target, (list, tuple)) else target
    return AxisRules(rules)
