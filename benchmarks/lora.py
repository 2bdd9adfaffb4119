"""State memory and step time of the OmniOPSD train step: full fine-tuning vs LoRA vs QLoRA, side by side.

One small text-only thinker (the tiny test thinker widened: `--hidden`, `--layers`, `--intermediate`, `--vocab`),
one micro-batch of `--prompts` prompts x `--samples` completions, computed in `--dtype` over parameters stored in
`--param-dtype`, a frozen teacher in every arm but full_ema:

- full:  every weight trained (AdamW moments for all; the encoders' updates are zero, `train_encoders: false`)
  and the frozen teacher a copy of the trained weights (decoder and head) with the decoder's in `--dtype`;
- full_ema: the same with an EMA teacher, whose copy of the trained weights stays in `--param-dtype`;
- lora:  adapters of `--rank` on the decoder's projections; the base weights once, the teacher is the base;
- lora_dtype_base: the same with the decoder's base weights stored in `--dtype` (`model.lora.base_dtype: dtype`);
- qlora_int8 / qlora_nf4: the same with the adapted kernels stored quantized by qwix.

State bytes are the train state's arrays (parameters, optimizer moments, teacher copy, frozen base); XLA's memory
analysis of the compiled step gives its arguments (state + batch), outputs and temporaries. Time is the median
wall time of `--runs` steps. Ratios are against the full fine-tune.

    python benchmarks/lora.py                     # the default small config, on the default backend
    python benchmarks/lora.py --runs 0            # memory only
    python -m benchmarks.lora --dtype bfloat16 --runs 0 --out benchmarks/results/lora_bfloat16.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import format_table, median_seconds, write_results
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig
from opsd_jax.opsd import step
from opsd_jax.opsd.losses import LossConfig
from opsd_jax.settings import LoraConfig, TeacherConfig, TrainConfig
from opsd_jax.testing.reference import tiny_thinker_config_dict

ARMS = ("full", "full_ema", "lora", "lora_dtype_base", "qlora_int8", "qlora_nf4")
BASE_DTYPES = {"lora": "param_dtype", "lora_dtype_base": "dtype", "qlora_int8": "int8", "qlora_nf4": "nf4"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32", help="stored weights")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen2.5-Omni's split of the rotary frequencies over (time, height, width), 16:24:24 at head_dim 128."""
    half = head_dim // 2
    return half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8


def build(args: argparse.Namespace, arm: str):
    """(settings, state, batches) of one arm."""
    dtype = jnp.dtype(args.dtype)
    config = ThinkerConfig.from_hf(
        tiny_thinker_config_dict(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.heads // 4,
            intermediate_size=args.intermediate,
            vocab_size=args.vocab,
            mrope_section=mrope_section(args.hidden // args.heads),
        )
    )
    model = Qwen2_5OmniThinker(config, dtype=dtype, rngs=nnx.Rngs(0), remat=True)
    param_dtype = jnp.dtype(args.param_dtype)  # as from_pretrained stores them
    nnx.update(model, jax.tree.map(lambda x: x.astype(param_dtype), nnx.state(model, nnx.Param)))
    if arm in BASE_DTYPES:
        config = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, base_dtype=BASE_DTYPES[arm])
        model = lora.apply_lora(model, config)
    ids = np.random.default_rng(0).integers(0, 200, (args.prompts, args.prompt_length)).astype(np.int32)
    prompt = model.prepare_inputs(ids, attention_mask=np.ones_like(ids))
    rows, length = args.prompts * args.samples, args.completion_length
    completion = np.random.default_rng(1).integers(0, 200, (rows, length)).astype(np.int32)
    batch = step.StepBatch(
        student=prompt,
        teacher=prompt,
        completion=jnp.asarray(completion),
        completion_mask=jnp.ones((rows, length), bool),
        sampler_logprobs=jnp.full((rows, length), -1.0),
        rewards=jnp.zeros(rows),
        label_ids=jnp.ones((args.prompts, 4), jnp.int32),
        label_mask=jnp.ones((args.prompts, 4), bool),
    )
    train = TrainConfig(lr=1e-4, total_steps=100)
    teacher = TeacherConfig(mode="ema" if arm == "full_ema" else "frozen")
    tx = step.make_optimizer(train, nnx.state(model, lora.trainable_filter(model)))
    settings = step.StepSettings(
        graphdef=nnx.graphdef(model), tx=tx, loss=LossConfig(), teacher=teacher, train_encoders=False
    )
    return settings, step.init_state(model, tx, teacher, train_encoders=False), jax.tree.map(lambda x: x[None], batch)


def nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def measure(args: argparse.Namespace, arm: str) -> dict[str, float]:
    settings, state, batches = build(args, arm)
    step_fn = step.make_train_step(settings)
    stats = step_fn.lower(state, batches).compile().memory_analysis()
    result = {
        "state_bytes": nbytes(state),
        "trained_bytes": nbytes(state.params),
        "optimizer_bytes": nbytes(state.opt_state),
        "teacher_copy_bytes": nbytes(state.teacher_params),
        "frozen_base_bytes": nbytes(state.frozen),
        "xla_argument_bytes": int(stats.argument_size_in_bytes),
        "xla_output_bytes": int(stats.output_size_in_bytes),
        "xla_temp_bytes": int(stats.temp_size_in_bytes),
    }
    if args.runs:
        holder = {"state": state}

        def run():
            holder["state"], metrics = step_fn(holder["state"], batches)
            jax.block_until_ready(metrics)

        result["step_seconds"] = median_seconds(run, repeats=args.runs)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    results = {arm: measure(args, arm) for arm in ARMS}
    full = results["full"]
    headers = ["arm", "state MB", "x full", "trained MB", "optimizer MB", "teacher copy MB", "XLA temp MB"]
    if args.runs:
        headers += ["step s", "x full"]
    rows = []
    for arm, r in results.items():
        row = [
            arm,
            r["state_bytes"] / 1e6,
            r["state_bytes"] / full["state_bytes"],
            r["trained_bytes"] / 1e6,
            r["optimizer_bytes"] / 1e6,
            r["teacher_copy_bytes"] / 1e6,
            r["xla_temp_bytes"] / 1e6,
        ]
        if args.runs:
            row += [r["step_seconds"], r["step_seconds"] / full["step_seconds"]]
        rows.append(row)
    print(format_table(headers, rows))
    out = write_results(
        "lora", {"config": vars(args), "results": results}, None if args.out is None else Path(args.out)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
