"""Memory and time of the full-vocabulary GJSD loss + gradient: naive logits vs the chunked forms.

Measures, for `sum(weights * GJSD_beta(student_hidden @ W, teacher_hidden @ W))` and its gradient w.r.t. the
student hidden states and the head kernel W (the teacher side constant):

- naive:   full `[B, T, V]` logits, `opsd_jax.opsd.divergences.generalized_jsd`, plain autodiff;
- chunked: `chunked_generalized_jsd` (completion chunks under `jax.checkpoint`, logits recomputed backward);
- fused:   `fused_distillation_loss` (gradient formed in the forward scan, head matmuls run once).

Memory is XLA's compiled estimate (`jax.jit(f).lower(...).compile().memory_analysis()`), which needs no
allocation; time is the median wall time of `--runs` executions on the default backend (0 skips timing).
Defaults are Qwen2.5-Omni's vocabulary (151,936), batch 4 x 1,024 completion tokens, hidden 2,048.

    python benchmarks/loss_memory.py                        # full size
    python benchmarks/loss_memory.py --runs 0               # memory only (compiles, allocates nothing)
    python benchmarks/loss_memory.py --batch 1 --completion 256 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from opsd_jax.models import scoring
from opsd_jax.opsd import chunked_losses, divergences, losses

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "loss_memory.json"
VARIANTS = ("naive", "chunked", "fused")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--completion", type=int, default=1024, help="completion tokens per sequence")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk-size", type=int, default=128, help="completion positions per chunk")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="hidden / kernel dtype")
    parser.add_argument("--runs", type=int, default=3, help="timed executions per variant (0: memory only)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    for name in ("batch", "completion", "hidden", "vocab", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.runs < 0:
        parser.error(f"--runs: expected >= 0, got {args.runs}")
    return args


def loss_and_grad_fns(args: argparse.Namespace) -> dict[str, Callable]:
    """variant -> jitted `(student_hidden, teacher_hidden, kernel, weights) -> (loss, (d_hidden, d_kernel))`."""
    beta, temperature, chunk = args.beta, args.temperature, args.chunk_size
    config = losses.LossConfig(divergence="gjsd", beta=beta, temperature=temperature, is_clip=None, chunk_size=chunk)

    def naive(student_hidden, teacher_hidden, kernel, weights):
        student_logits = jnp.einsum("bth,hv->btv", student_hidden, kernel, preferred_element_type=jnp.float32)
        teacher_logits = jnp.einsum("bth,hv->btv", teacher_hidden, kernel, preferred_element_type=jnp.float32)
        per_token = divergences.generalized_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)
        return jnp.sum(weights * per_token)

    def chunked(student_hidden, teacher_hidden, kernel, weights):
        per_token = chunked_losses.chunked_generalized_jsd(
            student_hidden, teacher_hidden, kernel, beta=beta, temperature=temperature, chunk_size=chunk
        )
        return jnp.sum(weights * per_token)

    def fused(student_hidden, teacher_hidden, kernel, weights):
        return chunked_losses.fused_distillation_loss(
            config, student_hidden, kernel, weights, scoring.TeacherSignal(hidden=teacher_hidden)
        )[0]

    fns = {"naive": naive, "chunked": chunked, "fused": fused}
    return {name: jax.jit(jax.value_and_grad(fns[name], argnums=(0, 2))) for name in args.variants}


def input_specs(args: argparse.Namespace) -> tuple[jax.ShapeDtypeStruct, ...]:
    dtype = jnp.dtype(args.dtype)
    hidden = jax.ShapeDtypeStruct((args.batch, args.completion, args.hidden), dtype)
    kernel = jax.ShapeDtypeStruct((args.hidden, args.vocab), dtype)
    weights = jax.ShapeDtypeStruct((args.batch, args.completion), jnp.float32)
    return hidden, hidden, kernel, weights


def random_inputs(args: argparse.Namespace) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.completion, args.hidden)
    student = jax.random.normal(keys[0], shape, dtype)
    teacher = jax.random.normal(keys[1], shape, dtype)
    # Scaled like an initialised head so that the logits have unit-order spread.
    kernel = (jax.random.normal(keys[2], (args.hidden, args.vocab), jnp.float32) / args.hidden**0.5).astype(dtype)
    weights = jnp.full((args.batch, args.completion), 1.0 / (args.batch * args.completion), jnp.float32)
    return student, teacher, kernel, weights


def memory_of(compiled: jax.stages.Compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    return {field: int(getattr(analysis, field)) for field in fields}


def median_times(compiled: jax.stages.Compiled, inputs: Sequence[jax.Array], runs: int) -> dict[str, float]:
    """Median wall time and median process CPU time (all threads; less sensitive to other tenants of a shared
    host) of `runs` executions, after one warm-up."""
    jax.block_until_ready(compiled(*inputs))  # warm-up: first-call allocation and thread-pool start-up
    wall, cpu = [], []
    for _ in range(runs):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*inputs))
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return {"median_seconds": statistics.median(wall), "median_cpu_seconds": statistics.median(cpu)}


def format_table(results: dict) -> str:
    gib = 2.0**30
    naive = results["variants"].get("naive")

    def against_naive(row: dict, key: str) -> tuple[str, str]:
        value, reference = row.get(key), naive.get(key) if naive else None
        text = "-" if value is None else f"{value / gib:.3f}" if key.endswith("bytes") else f"{value:.2f}"
        return text, f"{value / reference:.3f}" if value is not None and reference else "-"

    header = ("variant", "temp GiB", "/naive", "out GiB", "wall s", "/naive", "cpu s", "/naive")
    rows = ["{:<8} {:>9} {:>7} {:>8} {:>8} {:>7} {:>8} {:>7}".format(*header)]
    for name, row in results["variants"].items():
        temp, temp_ratio = against_naive(row, "temp_size_in_bytes")
        wall, wall_ratio = against_naive(row, "median_seconds")
        cpu, cpu_ratio = against_naive(row, "median_cpu_seconds")
        out = f"{row['output_size_in_bytes'] / gib:.3f}"
        rows.append(f"{name:<8} {temp:>9} {temp_ratio:>7} {out:>8} {wall:>8} {wall_ratio:>7} {cpu:>8} {cpu_ratio:>7}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    fns = loss_and_grad_fns(args)
    specs = input_specs(args)
    compiled = {name: fn.lower(*specs).compile() for name, fn in fns.items()}
    results = {
        "sizes": {k: getattr(args, k) for k in ("batch", "completion", "hidden", "vocab", "chunk_size", "dtype")},
        "beta": args.beta,
        "temperature": args.temperature,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "runs": args.runs,
        "variants": {name: memory_of(c) for name, c in compiled.items()},
    }
    if args.runs:
        inputs = random_inputs(args)
        for name, c in compiled.items():
            results["variants"][name].update(median_times(c, inputs, args.runs))
            loss, _ = c(*inputs)
            results["variants"][name]["loss"] = float(loss)
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
