"""What the collectives cost in XLA's TPU cost model: a config's micro-batch compiled for its slice, and the same
per-chip work compiled for one chip (no collectives at all), side by side. Compiles only: no TPU needed (libtpu).

`opsd-jax compile-check` reports a train step's cost-model time against its pure compute (its FLOPs at the chip's
bf16 peak); that ratio mixes what the slice adds (collectives, the layouts they force) with what the chip's own
work costs beyond its FLOPs (matmul efficiency, memory-bound element-wise work, the optimizer update). This script
separates them. Both programs are the config's train step over one micro-batch (`train.grad_accum_steps` 1; the
cost model counts a loop body once) of a thinker cut to `--depth` of its layers in the text decoder and both
encoders (a one-chip copy of the whole 7B state does not fit a chip); the one-chip program takes one chip's share
of the micro-batch: its prompts divided by the mesh's batch shards (data x fsdp), with the whole model width (a
tensor-parallel config's chip then does `mesh.tensor` times the work, which the ratios absorb).

    python -m benchmarks.collectives --config configs/qwen2_5_omni_7b_v5p64.yaml
    python -m benchmarks.collectives --config configs/qwen2_5_omni_3b_v5e16.yaml --depth 0.125
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import format_table, write_results
from opsd_jax.compile_check.programs import ProgramReport, check_config
from opsd_jax.config import Config, load_config
from opsd_jax.models.architectures import thinker_config
from opsd_jax.models.qwen2_5_omni import ThinkerConfig
from opsd_jax.sharding.mesh import resolve_mesh_shape
from opsd_jax.sharding.topology import Chip, topology_chips, topology_devices


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a shipped TPU config (its mesh.topology is the slice)")
    parser.add_argument(
        "--depth", type=float, default=0.25, help="fraction of the layers kept in each stack (default 0.25)"
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/collectives_CONFIG.json)")
    return parser.parse_args(argv)


def shallower(thinker: ThinkerConfig, depth: float) -> ThinkerConfig:
    """`thinker` with `depth` of the layers of its text decoder, vision and audio encoders (at least one each); the
    vision encoder's full-attention blocks thinned alike (every one past the new depth dropped, the last kept)."""

    def keep(layers: int) -> int:
        return max(1, round(layers * depth))

    vision_depth = keep(thinker.vision.depth)
    full_attention = tuple(i for i in thinker.vision.fullatt_block_indexes if i < vision_depth) or (vision_depth - 1,)
    return dataclasses.replace(
        thinker,
        text=dataclasses.replace(thinker.text, num_hidden_layers=keep(thinker.text.num_hidden_layers)),
        vision=dataclasses.replace(thinker.vision, depth=vision_depth, fullatt_block_indexes=full_attention),
        audio=dataclasses.replace(thinker.audio, encoder_layers=keep(thinker.audio.encoder_layers)),
    )


def one_micro_batch(config: Config, prompts: int, **mesh: int) -> Config:
    """`config` training `prompts` prompts in one micro-batch, on a mesh with `mesh`'s axis sizes."""
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, batch_size=prompts, grad_accum_steps=1),
        mesh=dataclasses.replace(config.mesh, **mesh),
    )


def compile_step(config: Config, thinker: ThinkerConfig, chip, devices) -> ProgramReport:
    (report,) = check_config(config, thinker, chip, devices, programs=["train_step"])
    if not report.compiled:
        raise SystemExit(
            f"benchmarks.collectives: the train step on {len(devices)} chip(s) did not compile: {report.error}"
        )
    print(f"  {len(devices)} chip(s): compiled in {report.compile_seconds:.0f} s", flush=True)
    return report


def row(name: str, report: ProgramReport) -> dict:
    return {
        "program": name,
        "description": report.description,
        "peak_gb": report.peak / 1e9,
        "compute_seconds": report.compute_seconds,
        "cost_model_seconds": report.cost_model_seconds,
        "cost_over_compute": report.cost_model_seconds / report.compute_seconds,
        "collective_gb": sum(kind["bytes"] for kind in report.collectives.values()) / 1e9,
        "compile_seconds": report.compile_seconds,
    }


@dataclasses.dataclass(frozen=True)
class SliceShare:
    """A TPU config, its slice and what one chip of it takes of a micro-batch."""

    config: Config
    chip: Chip
    devices: list
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    prompts: int  # per micro-batch, on the whole slice
    prompts_per_chip: int  # a chip's share: the prompts over the batch shards (data x fsdp)


def slice_share(path: str, script: str) -> SliceShare:
    """`path`'s config on its `mesh.topology`; exits naming `script` when it has no topology or when a micro-batch's
    prompts do not split over the batch shards into a whole number per chip."""
    config = load_config(path, num_devices=None)
    topology = config.mesh.topology
    if not topology:
        raise SystemExit(f"benchmarks.{script}: {path}: mesh.topology is not set (a TPU config is needed)")
    chip, devices = topology_devices(topology)
    data, fsdp, tensor = resolve_mesh_shape(config.mesh, topology_chips(topology))
    prompts = config.train.batch_size // config.train.grad_accum_steps
    if prompts % (data * fsdp):
        raise SystemExit(
            f"benchmarks.{script}: {path}: {prompts} prompts per micro-batch do not split over the "
            f"{data * fsdp} batch shards (data x fsdp): a chip's share is not a whole number of prompts"
        )
    return SliceShare(config, chip, devices, (data, fsdp, tensor), prompts, prompts // (data * fsdp))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    share = slice_share(args.config, "collectives")
    config, chip, devices, prompts = share.config, share.chip, share.devices, share.prompts
    topology = config.mesh.topology
    data, fsdp, tensor = share.mesh
    thinker = shallower(thinker_config(config.model.checkpoint)[0], args.depth)
    print(
        f"{args.config} at depth {args.depth:g} ({thinker.text.num_hidden_layers} decoder layers), chip {chip.generation}"
    )
    began = time.perf_counter()
    on_slice = compile_step(one_micro_batch(config, prompts), thinker, chip, devices)
    alone = compile_step(
        one_micro_batch(config, share.prompts_per_chip, data=1, fsdp=1, tensor=1), thinker, chip, devices[:1]
    )
    rows = [row(f"{topology} (mesh {data} x {fsdp} x {tensor})", on_slice), row("one chip, its share", alone)]
    added = rows[0]["cost_over_compute"] / rows[1]["cost_over_compute"]
    headers = ["program", "micro-batch", "peak GB", "compute s", "cost model s", "cost / compute", "collectives GB"]
    table = [
        [
            r["program"],
            r["description"],
            r["peak_gb"],
            r["compute_seconds"],
            r["cost_model_seconds"],
            r["cost_over_compute"],
            r["collective_gb"],
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    print(f"\nthe slice's cost / compute over the one chip's: {added:.3f}x (what the slice adds in XLA's cost model)")
    out = write_results(
        f"collectives_{Path(args.config).stem}",
        {
            "config": {"config": args.config, "depth": args.depth, "decoder_layers": thinker.text.num_hidden_layers},
            "results": rows,
            "slice_over_one_chip": added,
            "seconds": time.perf_counter() - began,
        },
        None if args.out is None else Path(args.out),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
