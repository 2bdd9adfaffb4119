"""State memory and step time of the OmniOPSD train step (full fine-tuning vs LoRA vs QLoRA), and the decode time
of the LoRA arms' adapted thinker vs its merged copy, side by side.

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

Decoding (`--decode-tokens N`, with `--runs`; 0 skips it), for the `--decode-arms` (LoRA arms): the sampler's
jitted prefill and decode loop (the programs `opsd_jax.sampling.generate` runs, on what
`decode_weights.generation_model` gives), greedy, N new tokens (no EOS: every row decodes all N) for the step's prompts,
`--samples` rollouts each, run on the adapted thinker with non-zero adapters (`lora_b` drawn with standard
deviation `--adapter-scale`, as training would leave them) two ways, side by side:

- adapted (`merge_adapters=False`): every adapted matmul adding `x @ a @ b * alpha / rank` (QLoRA: from the
  quantized kernels); `model.lora.decode: auto`'s choice when the base is stored in the compute dtype or quantized;
- merged (`merge_adapters=True`): a plain thinker whose kernels are `kernel + a @ b * alpha / rank` (QLoRA:
  dequantized) in the decode copy; `auto`'s choice when generation makes that copy anyway (float32 masters).

`ms/token` is the median (over `--runs` rounds after a warm-up one, each round running the adapted and the merged
programs in turn) time of the decode loop divided by its N - 1 steps (the prefill samples token 0), each step one
token for every row; `merged / adapted` is their ratio (below 1: the merged copy decodes faster), `fastest runs`
the ratio of the two programs' fastest runs (on a shared machine, the runs least slowed by other work; the JSON
keeps every run's time). `prefill ms` is the prefill's median time. `merge ms` is the median time of the merged decode
copy less that of the copy without the merge (`generation_model`, jitted), paid again whenever the adapters change (every
train step), and `break-even tokens` the number of decode steps after which merging has paid for itself at the
median times (none: it never does). `equal tokens` is the fraction of the greedy tokens on which the two agree
(rounding differs between the two computations, and a greedy rollout that diverges once stays diverged).

    python benchmarks/lora.py                     # the default small config, on the default backend
    python benchmarks/lora.py --runs 0            # memory only
    python -m benchmarks.lora --dtype bfloat16 --runs 0 --out benchmarks/results/lora_bfloat16.json
    python -m benchmarks.lora --dtype bfloat16 --runs 3 --arms lora --decode-tokens 32   # decoding, LoRA only
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import format_table, median_seconds, write_results
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig
from opsd_jax.opsd import step
from opsd_jax.opsd.losses import LossConfig
from opsd_jax.sampling import decode_weights, sampler
from opsd_jax.settings import LoraConfig, TeacherConfig, TrainConfig
from opsd_jax.testing.reference import tiny_thinker_config_dict

ARMS = ("full", "full_ema", "lora", "lora_dtype_base", "qlora_int8", "qlora_nf4")
BASE_DTYPES = {"lora": "param_dtype", "lora_dtype_base": "dtype", "qlora_int8": "int8", "qlora_nf4": "nf4"}
DECODE_ARMS = ("lora", "qlora_int8", "qlora_nf4")  # lora_dtype_base decodes from the same copy as lora


def arm_list(text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated subset of `allowed`, in `allowed`'s order; an error names the unknown ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arms {unknown}: expected a subset of {', '.join(allowed)}")
    return tuple(arm for arm in allowed if arm in names)


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
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (0: memory only)")
    parser.add_argument(
        "--arms",
        type=lambda text: arm_list(text, ARMS),
        default=ARMS,
        help=f"comma-separated subset of: {', '.join(ARMS)} (default all; the 'x full' columns need full)",
    )
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="greedy tokens generated per rollout to time adapted vs merged decoding (0 skips; else >= 2)",
    )
    parser.add_argument(
        "--decode-arms",
        type=lambda text: arm_list(text, DECODE_ARMS),
        default=DECODE_ARMS,
        help=f"arms whose decoding is timed, those of --arms among: {', '.join(DECODE_ARMS)}",
    )
    parser.add_argument(
        "--adapter-scale", type=float, default=0.01, help="standard deviation of the lora_b drawn for decoding"
    )
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/lora.json)")
    args = parser.parse_args(argv)
    if args.decode_tokens == 1 or args.decode_tokens < 0:
        parser.error(
            f"--decode-tokens: expected 0 or >= 2 (the decode loop runs N - 1 steps), got {args.decode_tokens}"
        )
    return args


def mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Qwen2.5-Omni's split of the rotary frequencies over (time, height, width), 16:24:24 at head_dim 128."""
    half = head_dim // 2
    return half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8


def thinker(args: argparse.Namespace, arm: str) -> Qwen2_5OmniThinker:
    """The arm's thinker: weights stored in `--param-dtype`, adapted (LoRA / QLoRA arms) or not."""
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
    return model


def prompt_ids(args: argparse.Namespace) -> np.ndarray:
    """The `[prompts, prompt_length]` token ids every arm's step and decoding use."""
    return np.random.default_rng(0).integers(0, 200, (args.prompts, args.prompt_length)).astype(np.int32)


def build(args: argparse.Namespace, arm: str):
    """(settings, state, batches) of one arm."""
    model = thinker(args, arm)
    ids = prompt_ids(args)
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


def randomize_adapters(model: nnx.Module, scale: float, seed: int = 0) -> None:
    """`lora_b` drawn from N(0, scale^2) (a fresh adapter's is zero: the adapted model would equal its base), as
    training would leave them; `lora_a` keeps its initialisation."""
    adapters = nnx.state(model, nnx.LoRAParam)
    paths_leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(paths_leaves))
    leaves = [
        (scale * jax.random.normal(key, x.shape)).astype(x.dtype) if lora.is_lora_b(path) else x
        for key, (path, x) in zip(keys, paths_leaves)
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(tree, leaves))


def interleaved_times(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each of `runs` over `repeats` rounds after one untimed warm-up round. Each round calls every
    one once, in turn, so that a change in the machine's load weighs on all of them alike (measured one after the
    other, two runs of the same program on a shared CPU came out up to 1.7x apart)."""
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):
        for name, run in runs.items():
            times[name].append(median_seconds(run, repeats=1, warmup=0))
    return {name: samples[1:] for name, samples in times.items()}


def generation_runs(args: argparse.Namespace, model: nnx.Module, merge: bool, inputs, key: jax.Array):
    """(prefill, decode, tokens): blocking calls of the sampler's two programs on `model` (`--runs` + 1 calls of
    decode at most), and the greedy tokens of the last decode."""
    settings = sampler.sampling_settings(
        max_new_tokens=args.decode_tokens,
        temperature=0.0,
        eos_token_id=-1,  # never emitted: every row decodes all the tokens
        pad_token_id=0,
        num_samples=args.samples,
    )
    graphdef, params = decode_weights.generation_model(*nnx.split(model), model.dtype, merge_adapters=merge)
    # The jitted programs `generate` runs (its prefill, then its decode loop), called as it calls them; not
    # `compile_generation`'s ahead-of-time executables, which refuse QLoRA nf4's packed uint4 kernels on CPU.
    static = dict(sampling=settings, mesh=None)

    def prefill():
        return jax.block_until_ready(sampler._prefill(graphdef, params, inputs, key, **static))

    # The decode loop donates its state: one copy per call, made before any clock starts.
    start = prefill()
    states = jax.block_until_ready([jax.tree.map(jnp.copy, start) for _ in range(args.runs + 1)])
    last = {}

    def decode():
        last["state"] = jax.block_until_ready(sampler._decode(graphdef, params, states.pop(), **static))

    return prefill, decode, lambda: np.asarray(last["state"].tokens)


def measure_decode(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """Adapted vs merged greedy decoding of the arm's thinker with non-zero adapters (the module docstring)."""
    adapted = thinker(args, arm)
    randomize_adapters(adapted, args.adapter_scale)
    graphdef, state = nnx.split(adapted)
    # The merge's own work: the decode copy with the adapters merged in, less the copy without (none when the
    # base is stored in the compute dtype or quantized), paid again whenever the adapters change (every step).
    copy_seconds = {
        name: median_seconds(
            lambda merge=merge: jax.block_until_ready(
                decode_weights.generation_model(graphdef, state, adapted.dtype, merge_adapters=merge)[1]
            ),
            repeats=args.runs,
        )
        for name, merge in (("adapted", False), ("merged", True))
    }
    merge_seconds = copy_seconds["merged"] - copy_seconds["adapted"]
    ids = prompt_ids(args)
    inputs = adapted.prepare_inputs(ids, attention_mask=np.ones_like(ids))
    key = jax.random.key(0)
    programs = {
        name: generation_runs(args, adapted, merge, inputs, key)
        for name, merge in (("adapted", False), ("merged", True))
    }
    runs = {
        f"{name}_{program}": calls[index]
        for name, calls in programs.items()
        for index, program in enumerate(("prefill", "decode"))
    }
    samples = interleaved_times(runs, args.runs)
    timed = {name: statistics.median(times) for name, times in samples.items()}
    steps = args.decode_tokens - 1
    adapted_token, merged_token = (timed[f"{name}_decode"] / steps for name in ("adapted", "merged"))
    saved = adapted_token - merged_token
    equal = programs["adapted"][2]() == programs["merged"][2]()
    return {
        "decode_tokens": args.decode_tokens,
        "decode_rows": int(equal.shape[0]),
        **{f"{name}_seconds": seconds for name, seconds in timed.items()},
        "adapted_seconds_per_token": adapted_token,
        "merged_seconds_per_token": merged_token,
        "merged_over_adapted": merged_token / adapted_token,
        # On a shared machine the runs a burst of other work slows are the noise; the fastest are the least.
        "merged_over_adapted_fastest": min(samples["merged_decode"]) / min(samples["adapted_decode"]),
        "copy_seconds": copy_seconds,  # generation_model's decode copy, without and with the merge
        "merge_seconds": merge_seconds,
        "break_even_tokens": merge_seconds / saved if saved > 0 else None,
        "equal_token_fraction": float(equal.mean()),
        "equal_row_fraction": float(equal.all(axis=1).mean()),
        "samples_seconds": samples,  # every timed run, in order (the medians above are theirs)
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = {arm: measure(args, arm) for arm in args.arms}
    full = results.get("full")
    headers = ["arm", "state MB", "x full", "trained MB", "optimizer MB", "teacher copy MB", "XLA temp MB"]
    if args.runs:
        headers += ["step s", "x full"]
    rows = []
    for arm, r in results.items():
        row = [
            arm,
            r["state_bytes"] / 1e6,
            r["state_bytes"] / full["state_bytes"] if full else "-",
            r["trained_bytes"] / 1e6,
            r["optimizer_bytes"] / 1e6,
            r["teacher_copy_bytes"] / 1e6,
            r["xla_temp_bytes"] / 1e6,
        ]
        if args.runs:
            row += [r["step_seconds"], r["step_seconds"] / full["step_seconds"] if full else "-"]
        rows.append(row)
    print(format_table(headers, rows))

    decode_arms = [arm for arm in args.decode_arms if arm in results] if args.runs and args.decode_tokens else []
    for arm in decode_arms:
        results[arm]["decode"] = measure_decode(args, arm)
    if decode_arms:
        print()
        headers = [
            "arm",
            "adapted ms/token",
            "merged ms/token",
            "merged / adapted",
            "fastest runs",
            "adapted prefill ms",
        ]
        headers += ["merged prefill ms", "merge ms", "break-even tokens", "equal tokens"]
        rows = []
        for arm in decode_arms:
            d = results[arm]["decode"]
            rows.append(
                [
                    arm,
                    1e3 * d["adapted_seconds_per_token"],
                    1e3 * d["merged_seconds_per_token"],
                    d["merged_over_adapted"],
                    d["merged_over_adapted_fastest"],
                    1e3 * d["adapted_prefill_seconds"],
                    1e3 * d["merged_prefill_seconds"],
                    1e3 * d["merge_seconds"],
                    "none" if d["break_even_tokens"] is None else d["break_even_tokens"],
                    d["equal_token_fraction"],
                ]
            )
        print(format_table(headers, rows))

    payload = {"config": vars(args), "results": results}
    out = write_results("lora", payload, None if args.out is None else Path(args.out))
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
