"""The config's mesh section, the device mesh it describes, and placement of parameter trees and batches with
NamedSharding."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opsd_jax.settings import ConfigError
from opsd_jax.sharding.rules import LOGICAL_AXIS_RULES, MESH_AXES, AxisRules, MeshAxes, resolve_rules
from opsd_jax.sharding.topology import TopologyError, parse_topology

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes. -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Overrides of the logical-axis table in `opsd_jax.sharding.rules`: logical name -> mesh axes.
    # A value is a mesh axis name, a list of them, or null (replicated).
    logical_axis_rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The TPU slice the config is written for, as GENERATION:CHIPGRID (e.g. v5p:4x4x2): `opsd-jax
    # compile-check` compiles for it, and training on a TPU refuses a slice of another size.
    topology: str | None = None

    def axis_rules(self) -> AxisRules:
        """The logical-axis table with `logical_axis_rules` applied: a run resolves it once and passes it to
        every placement of parameters, batches and activations."""
        return resolve_rules(self.logical_axis_rules)

    def validate(self, num_devices: int | None) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}: expected a positive size or -1 (take the rest), got {size}")
        auto = [name for name, size in sizes.items() if size == -1]
        if len(auto) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got -1 for {', '.join('mesh.' + a for a in auto)}")
        if self.topology is not None:
            try:
                parse_topology(self.topology)
            except TopologyError as err:
                raise ConfigError(f"mesh.topology: {err}") from None
        if num_devices is None:
            return
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if auto:
            if num_devices % fixed:
                raise ConfigError(
                    f"mesh.{auto[0]}: -1 cannot fill the mesh: {num_devices} devices are not divisible by the "
                    f"product of the other axes ({fixed})"
                )
        elif fixed != num_devices:
            raise ConfigError(
                f"mesh: data x fsdp x tensor = {self.data} x {self.fsdp} x {self.tensor} = {fixed}, "
                f"but {num_devices} devices are available"
            )
        for logical, target in self.logical_axis_rules.items():
            if logical not in LOGICAL_AXIS_RULES:
                raise ConfigError(
                    f"mesh.logical_axis_rules.{logical}: unknown logical axis; known: {sorted(LOGICAL_AXIS_RULES)}"
                )
            for axis in mesh_axes(target):
                if axis not in MESH_AXES:
                    raise ConfigError(
                        f"mesh.logical_axis_rules.{logical}: unknown mesh axis {axis!r}; expected one of {MESH_AXES}"
                    )


def mesh_axes(target: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one rule or spec entry (`None`, one name, or several) as a tuple."""
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def move_split(
    sharding: jax.sharding.Sharding, shape: Sequence[int], source: int, target: int
) -> jax.sharding.Sharding:
    """`sharding` with the mesh axes that split dimension `source` moved onto dimension `target` (after
    its own), `source` left whole. Unchanged when it is not a NamedSharding, `source` is not split, or
    `target` would not divide evenly."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    moved = mesh_axes(spec[source])
    axes = mesh_axes(spec[target]) + moved
    if not moved or shape[target] % math.prod(sharding.mesh.shape[axis] for axis in axes):
        return sharding
    spec[source], spec[target] = None, axes
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def resolve_mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """`(data, fsdp, tensor)` with the -1 axis filled in; `config.validate` has checked divisibility."""
    config.validate(num_devices)
    sizes = [config.data, config.fsdp, config.tensor]
    if -1 in sizes:
        fixed = math.prod(size for size in sizes if size != -1)
        sizes[sizes.index(-1)] = num_devices // fixed
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes],
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` annotated with `logical_axes`.

    A dimension that the mapped mesh axes do not divide is replicated instead (tiny test models and odd
    head counts, such as 28 heads over 8-way tensor parallelism); a mesh axis is used at most once.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(logical_axes, shape):
        target = None if name is None else rules[name]
        axes = tuple(axis for axis in mesh_axes(target) if axis not in used and mesh.shape[axis] > 1)
        if axes and size % math.prod(mesh.shape[axis] for axis in axes):
            logger.debug("replicating axis %s of size %d: not divisible over %s", name, size, axes)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None, rules: Mapping[str, MeshAxes] | None = None
) -> jax.Array:
    """Pins the sharding of an intermediate array inside a jitted function by its logical axes (unchanged
    without a mesh). Where XLA's propagation would otherwise pick a costly layout, e.g. reducing partial
    `[rows, C, vocab]` logits instead of gathering a `[hidden, vocab]` kernel."""
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, resolve_rules() if rules is None else rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# The mesh and rules that `constrain_activation` pins activations to while a program is traced (set by
# `activation_sharding`). A context rather than an argument: the model's layers constrain their outputs
# without every caller threading a mesh through the model's call.
_ACTIVATION_MESH: contextvars.ContextVar[tuple[Mesh, Mapping[str, MeshAxes]] | None] = contextvars.ContextVar(
    "opsd_jax_activation_mesh", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping[str, MeshAxes] | None = None) -> Iterator[None]:
    """While tracing inside this context, `constrain_activation` pins activations on `mesh` (no-op for None).

    Programs that process many tokens per row (the train step, the prefill) trace their model under it,
    so that rows stay sharded over the batch axes at every layer boundary and FSDP gathers the weights;
    the decode loop does not (one token per row: there the weights stay put and activations move).
    """
    token = _ACTIVATION_MESH.set(None if mesh is None else (mesh, resolve_rules() if rules is None else rules))
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def active_activation_mesh() -> tuple[Mesh, Mapping[str, MeshAxes]] | None:
    """The mesh and rules of the enclosing `activation_sharding` context, or None outside one: for an
    operation XLA cannot partition (a Pallas kernel) that must be mapped over the mesh by hand."""
    return _ACTIVATION_MESH.get()


def constrain_activation(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`constrain` on the mesh of the enclosing `activation_sharding` context; unchanged outside one."""
    active = _ACTIVATION_MESH.get()
    if active is None:
        return x
    mesh, rules = active
    return constrain(x, logical_axes, mesh, rules)


def activation_batch_shards(rows: int) -> int:
    """Into how many parts `constrain_activation` splits `rows` along the logical `batch` axis on the mesh of the
    enclosing `activation_sharding` context (1 outside one, or where the batch axes do not divide `rows`)."""
    active = _ACTIVATION_MESH.get()
    if active is None:
        return 1
    mesh, rules = active
    (axes,) = logical_to_spec(("batch",), (rows,), mesh, rules)
    return math.prod(mesh.shape[axis] for axis in mesh_axes(axes))


def activation_axis_parts(logical: str) -> int:
    """Into how many parts the enclosing `activation_sharding` context's mesh splits the logical activation axis
    `logical` at most (the product of its mesh axes' sizes; 1 outside a context)."""
    active = _ACTIVATION_MESH.get()
    if active is None:
        return 1
    mesh, rules = active
    return math.prod(mesh.shape[axis] for axis in mesh_axes(rules[logical]))


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Any:
    """A tree like `state` (of `nnx.Variable`s) holding the NamedSharding of each variable under `rules`
    (a resolved table, `resolve_rules`; default: the default table).

    Variables without `logical_axes` metadata are replicated.
    """
    rules = resolve_rules() if rules is None else rules

    def sharding_of(variable: nnx.Variable) -> nnx.Variable:
        axes = getattr(variable, "logical_axes", None)
        shape = variable.get_value().shape
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> None:
    """Places every variable of `module` on `mesh` in place, by its logical axes."""
    state = nnx.state(module)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> dict[str, Any]:
    """Puts each array of `batch` on the mesh with its leading axis over the batch mesh axes.

    Arrays whose leading axis the batch axes do not divide are replicated (for example packed media
    patches, whose leading axis counts patches, not rows). With several processes, every process
    passes the same global batch (see `opsd_jax.train.gather_global_batch`).
    """
    rules = resolve_rules() if rules is None else rules
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if not hasattr(value, "shape") or value.ndim == 0:
            out[name] = value
            continue
        spec = logical_to_spec(("batch",) + (None,) * (value.ndim - 1), value.shape, mesh, rules)
        out[name] = jax.device_put(value, NamedSharding(mesh, spec))
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
