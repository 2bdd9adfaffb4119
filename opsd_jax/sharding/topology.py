"""TPU chips by generation and the devices of a named slice topology (`mesh.topology`), without a TPU.

Figures per chip (one JAX device; v4 and v5p chips run their two TensorCores as one megacore device):
HBM capacity, dense bfloat16 matmul peak and HBM bandwidth, from Google Cloud's TPU system
architecture pages.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax


class TopologyError(ValueError):
    """A topology name is malformed, of an unknown generation, or cannot be compiled for here."""


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_bytes: int
    bf16_flops: float  # per second, dense matmul peak
    hbm_bandwidth: float  # bytes per second
    megacore: bool  # two TensorCores driven as one device

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / 2**30


GIB = 2**30
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9, megacore=True),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, megacore=False),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, megacore=True),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, megacore=False),
}


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """`"v5p:4x4x2"` -> (the chip, the chip grid `(4, 4, 2)`)."""
    generation, sep, dims = name.partition(":")
    if not sep or generation not in CHIPS:
        raise TopologyError(
            f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of {sorted(CHIPS)} (e.g. v5p:4x4x2)"
        )
    try:
        grid = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        grid = ()
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise TopologyError(f"topology {name!r}: expected a chip grid such as 2x2, 4x4 or 4x4x2 after the colon")
    return CHIPS[generation], grid


def topology_chips(name: str) -> int:
    """Chips (= JAX devices) of a named topology."""
    return math.prod(parse_topology(name)[1])


def topology_devices(name: str) -> tuple[Chip, list[jax.Device]]:
    """The chip and the compile-only devices of a slice, ordered by device id as `jax.devices()` is.

    Needs libtpu (`pip install 'opsd-jax[tpu]'`, which brings `jax[tpu]`); no TPU is needed.
    """
    chip, grid = parse_topology(name)
    return chip, list(_described_devices(name, chip.megacore, math.prod(grid)))


@functools.cache
def _described_devices(name: str, megacore: bool, chips: int) -> tuple[jax.Device, ...]:
    """libtpu's devices of a slice, described once per process: jitted functions traced for one compile keep
    their sharding constraints' devices in JAX's trace caches, and a second description's devices, equal in id
    but not the same objects, would then be refused as incompatible by the next compile of the same shapes."""
    # Compiling needs no TPU, so several processes may load libtpu at once (a test run beside a long
    # compile); without this libtpu takes a machine-wide lock and refuses the second process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies  # needs libtpu (the tpu extra): its absence is named below

        description = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name="megacore" if megacore else "default"
        )
    except (ImportError, RuntimeError) as err:
        raise TopologyError(
            f"topology {name!r}: cannot describe the slice ({str(err).splitlines()[0][:200]}); compile-check needs "
            "libtpu: pip install 'opsd-jax[tpu]' (or pip install 'jax[tpu]')"
        ) from err
    devices = sorted(description.devices, key=lambda device: device.id)
    if len(devices) != chips:
        raise TopologyError(f"topology {name!r}: libtpu describes {len(devices)} devices for {chips} chips")
    return tuple(devices)
