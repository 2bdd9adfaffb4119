"""What XLA's TPU cost model charges for one decoder layer's operations, each compiled alone for one chip of a
config's slice, against its FLOPs at the chip's bf16 peak and its bytes at the chip's HBM bandwidth. Compiles only:
no TPU needed (libtpu).

`opsd-jax compile-check` rates a train step by its cost-model time over its pure compute. That ratio has a floor
that no layout or fusion reaches under: the price the cost model puts on a matmul by itself. This script measures
it for the shapes a chip of the config runs (its tokens per micro-batch: its prompts and their completions; the
decoder's widths, split over `mesh.tensor` where the config's tensor parallelism splits them): the forward
projections and MLP, their input and weight gradients, and the element-wise passes between them.

    python -m benchmarks.cost_model_floor --config configs/qwen2_5_omni_7b_v5p64.yaml
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks.collectives import slice_share
from benchmarks.common import format_table, write_results
from opsd_jax.models.architectures import thinker_config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a shipped TPU config (its mesh.topology names the chip)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/cost_model_floor_CONFIG.json)"
    )
    return parser.parse_args(argv)


def layer_operations(tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int) -> list[tuple]:
    """`(name, function, argument shapes, matmul)` for one decoder layer's operations on one chip (bf16)."""
    q, kv = (tokens, heads, head_dim), (tokens, kv_heads, head_dim)
    project = lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())))  # noqa: E731
    weight_gradient = lambda x, dy: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))  # noqa: E731
    output = lambda x, w: jax.lax.dot_general(x, w, (((1, 2), (0, 1)), ((), ())))  # noqa: E731
    rms = lambda x: (x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)).astype(  # noqa: E731
        x.dtype
    )
    return [
        ("q_proj", project, [(tokens, hidden), (hidden, heads, head_dim)], True),
        ("k_proj (v_proj alike)", project, [(tokens, hidden), (hidden, kv_heads, head_dim)], True),
        ("o_proj", output, [q, (heads, head_dim, hidden)], True),
        ("gate_proj (up_proj alike)", project, [(tokens, hidden), (hidden, mlp)], True),
        ("down_proj", project, [(tokens, mlp), (mlp, hidden)], True),
        ("up_proj input gradient", lambda dy, w: dy @ w.T, [(tokens, mlp), (hidden, mlp)], True),
        ("up_proj weight gradient", weight_gradient, [(tokens, hidden), (tokens, mlp)], True),
        ("q_proj weight gradient", weight_gradient, [(tokens, hidden), q], True),
        ("k_proj weight gradient", weight_gradient, [(tokens, hidden), kv], True),
        ("rms norm", rms, [(tokens, hidden)], False),
        ("residual add", jnp.add, [(tokens, hidden), (tokens, hidden)], False),
        ("silu(gate) * up", lambda g, u: jax.nn.silu(g) * u, [(tokens, mlp), (tokens, mlp)], False),
        ("query layout copy (token- to head-major)", lambda x: jnp.swapaxes(x, 0, 1) + 0, [q], False),
    ]


def price(function: Callable, shapes: list[tuple[int, ...]], device: jax.Device) -> dict:
    """The cost model's time, FLOPs and bytes of `function` compiled for `device` on bf16 arguments of `shapes`."""
    sharding = NamedSharding(Mesh(np.array([device]), ("chip",)), PartitionSpec())
    arguments = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
    costs = jax.jit(function).lower(*arguments).compile().cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    return {"cost_model_seconds": float(costs["optimal_seconds"]), "flops": float(costs.get("flops", 0.0))}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    share = slice_share(args.config, "cost_model_floor")
    config, chip, devices = share.config, share.chip, share.devices
    topology, tensor = config.mesh.topology, share.mesh[2]
    tokens = share.prompts_per_chip * (
        config.data.prompt_length + config.sampling.num_samples * config.sampling.max_new_tokens
    )
    text = thinker_config(config.model.checkpoint)[0].text
    split = lambda n: n // tensor if n % tensor == 0 else n  # noqa: E731  (what tensor parallelism splits)
    operations = layer_operations(
        tokens,
        text.hidden_size,
        split(text.num_attention_heads),
        split(text.num_key_value_heads),
        text.head_dim,
        split(text.intermediate_size),
    )
    print(f"{args.config}: one chip of {topology} ({chip.generation}), {tokens} tokens per micro-batch")
    began = time.perf_counter()
    rows = []
    for name, function, shapes, matmul in operations:
        priced = price(function, shapes, devices[0])
        bytes_moved = sum(2 * int(np.prod(s)) for s in shapes) + 2 * int(
            np.prod(jax.eval_shape(function, *[jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]).shape)
        )
        flops_seconds = priced["flops"] / chip.bf16_flops
        bytes_seconds = bytes_moved / chip.hbm_bandwidth
        rows.append(
            {
                "operation": name,
                "shapes": [list(s) for s in shapes],
                "matmul": matmul,
                "cost_model_seconds": priced["cost_model_seconds"],
                "flops_seconds": flops_seconds,
                "bytes_seconds": bytes_seconds,
                "over_floor": priced["cost_model_seconds"] / max(flops_seconds, bytes_seconds),
            }
        )
    matmuls = [r for r in rows if r["matmul"]]
    # The listed matmuls (each projection's forward, and a sample of input and weight gradients), their prices summed
    # over their FLOPs: a FLOP-weighted ratio that the MLP's matmuls, most of the FLOPs, dominate.
    weighted = sum(r["cost_model_seconds"] for r in matmuls) / sum(r["flops_seconds"] for r in matmuls)
    headers = ["operation", "cost model ms", "FLOPs at peak ms", "bytes at HBM ms", "cost / max(FLOPs, bytes)"]
    table = [
        [
            r["operation"],
            r["cost_model_seconds"] * 1e3,
            r["flops_seconds"] * 1e3,
            r["bytes_seconds"] * 1e3,
            r["over_floor"],
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    print(
        f"\nthese matmuls together (by their FLOPs): cost model {weighted:.3f}x their FLOPs at the bf16 peak, the most "
        "of a train step's work, which its cost model / compute cannot go under"
    )
    out = write_results(
        f"cost_model_floor_{Path(args.config).stem}",
        {
            "config": {"config": args.config, "topology": topology, "tokens_per_chip": tokens, "tensor": tensor},
            "results": rows,
            "matmuls_cost_over_flops": weighted,
            "seconds": time.perf_counter() - began,
        },
        None if args.out is None else Path(args.out),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
