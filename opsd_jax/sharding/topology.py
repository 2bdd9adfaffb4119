"""TPU chips by generation, GPUs by model, and the devices of a named topology (`mesh.topology`), without them.

Figures per chip (one JAX device; v4 and v5p chips run their two TensorCores as one megacore device):
HBM capacity, dense bfloat16 matmul peak and HBM bandwidth, from Google Cloud's TPU system
architecture pages and NVIDIA's data sheets. A TPU slice is described by libtpu (`jax[tpu]`); GPUs by
the CUDA plugin (`jax[cuda12]`) from a description of the card (XLA's GPU target config), on a machine
without a GPU ("deviceless" compilation).
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
    platform: str = "tpu"  # "tpu", or "cuda" for an NVIDIA GPU

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / 2**30


GIB = 2**30
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9, megacore=True),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, megacore=False),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, megacore=True),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, megacore=False),
    # H100 SXM 80 GB: the card has 81,559 MiB; its HBM here is what JAX may take with
    # XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, as the GPU configs launch it (docs/gpu.md): 81.24 GB.
    "h100": Chip("h100", int(0.95 * 81_559 * 2**20), 989e12, 3352e9, megacore=False, platform="cuda"),
}

# XLA's description of each GPU (its GpuTargetConfig proto, as text) for compiling without one: NVIDIA's
# figures for the card; the CUDA runtime and cuDNN versions are those `jax[cuda12]` ships with.
GPU_TARGETS = {
    "h100": """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 85520809984
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """`"v5p:4x4x2"` -> (the chip, the chip grid `(4, 4, 2)`); `"h100:8"` -> (the GPU, `(8,)`: GPUs on one host)."""
    generation, sep, dims = name.partition(":")
    if not sep or generation not in CHIPS:
        raise TopologyError(
            f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of {sorted(CHIPS)} "
            "(e.g. v5p:4x4x2, or h100:1 for GPUs on one host)"
        )
    try:
        grid = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        grid = ()
    gpu = CHIPS[generation].platform != "tpu"
    if len(grid) not in ((1,) if gpu else (2, 3)) or min(grid) < 1:
        expected = "a GPU count such as 1 or 8" if gpu else "a chip grid such as 2x2, 4x4 or 4x4x2"
        raise TopologyError(f"topology {name!r}: expected {expected} after the colon")
    return CHIPS[generation], grid


def topology_chips(name: str) -> int:
    """Chips (= JAX devices) of a named topology."""
    return math.prod(parse_topology(name)[1])


def topology_devices(name: str) -> tuple[Chip, list[jax.Device]]:
    """The chip and the compile-only devices of a slice, ordered by device id as `jax.devices()` is.

    Needs libtpu for a TPU slice (`pip install 'opsd-jax[tpu]'`, which brings `jax[tpu]`), the CUDA plugin for
    GPUs (`pip install 'opsd-jax[cuda]'`); no TPU or GPU is needed.
    """
    chip, grid = parse_topology(name)
    return chip, list(_described_devices(name, chip, math.prod(grid)))


@functools.cache
def _described_devices(name: str, chip: Chip, chips: int) -> tuple[jax.Device, ...]:
    """libtpu's (or the CUDA plugin's) devices of a slice, described once per process: jitted functions traced
    for one compile keep their sharding constraints' devices in JAX's trace caches, and a second description's
    devices, equal in id but not the same objects, would then be refused as incompatible by the next compile of
    the same shapes."""
    gpu = chip.platform == "cuda"
    if gpu:
        # Without a GPU the CUDA plugin's check of the driver's version fails and the plugin would not register:
        # skip it. Nor can XLA autotune its Triton matmuls, some of which then find no tiling at all ("Couldn't
        # find output tile sizes"): compile the matmuls as cuBLAS calls, which need none (XLA reads its flags
        # once, when it starts: the compile-check command describes the devices before anything else runs).
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_triton_gemm=false".strip()
        needs = "the CUDA plugin: pip install 'opsd-jax[cuda]' (or pip install 'jax[cuda12]')"
    else:
        # Compiling needs no TPU, so several processes may load libtpu at once (a test run beside a long
        # compile); without this libtpu takes a machine-wide lock and refuses the second process.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        needs = "libtpu: pip install 'opsd-jax[tpu]' (or pip install 'jax[tpu]')"
    try:
        from jax.experimental import topologies  # needs libtpu / the CUDA plugin: their absence is named below

        if gpu:
            description = topologies.get_topology_desc(
                platform="cuda", target_config=GPU_TARGETS[chip.generation], topology=f"1x1x{chips}"
            )
        else:
            description = topologies.get_topology_desc(
                platform="tpu", topology_name=name, chip_config_name="megacore" if chip.megacore else "default"
            )
    except (ImportError, RuntimeError, NotImplementedError) as err:
        raise TopologyError(
            f"topology {name!r}: cannot describe the {'GPUs' if gpu else 'slice'} "
            f"({str(err).splitlines()[0][:200]}); compile-check needs {needs}"
        ) from err
    devices = sorted(description.devices, key=lambda device: device.id)
    if len(devices) != chips:
        raise TopologyError(
            f"topology {name!r}: {'the plugin' if gpu else 'libtpu'} describes {len(devices)} devices for {chips} chips"
        )
    return tuple(devices)
