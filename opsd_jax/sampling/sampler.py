"""The student's sampler: one multimodal prefill, then a jitted `lax.while_loop` decode over a static KV cache.

Shape of the work (Tunix's sampler is the model): parameters enter the jitted functions as arguments
(the NNX graph definition is static), the loop state is a struct dataclass, the decode function
donates it so the cache is updated in place, every counter is int32, rows stop at EOS one by one and
the loop exits as soon as all have stopped. The prompt is prefilled once per prompt; its cache is then
repeated for the `num_samples` rollouts of that prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerInputs, first_new_position, place_inputs
from opsd_jax.models.text import LayerCache, constrain_cache
from opsd_jax.sampling.decode_weights import generation_model
from opsd_jax.sampling.filters import sample_tokens
from opsd_jax.sharding import AxisRules, activation_sharding


@struct.dataclass
class GenerationOutput:
    """Rollouts, prompt-major: rows `i * num_samples ... i * num_samples + num_samples - 1` are prompt i's.

    tokens: `[N, max_new_tokens]` int32; the EOS token itself is kept, pad after it.
    logprobs: `[N, max_new_tokens]` float32 log-probability of each token under the distribution it was
      actually drawn from (tempered, top-k / top-p filtered and renormalised; 0 under greedy).
    model_logprobs: `[N, max_new_tokens]` float32 log-probability of each token under the plain model
      (temperature 1, no filter). Importance ratios use `logprobs`, the behaviour distribution.
    mask: `[N, max_new_tokens]` bool, True up to and including EOS.
    """

    tokens: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    mask: jax.Array


@struct.dataclass
class _LoopState:
    step: jax.Array  # int32 scalar: tokens sampled so far
    last_token: jax.Array  # [N] int32
    first_position: jax.Array  # [N] int32: position of generated token 0 (same on all three axes)
    kv_valid: jax.Array  # [N, prompt + max_new] bool: cache columns a query may attend to
    done: jax.Array  # [N] bool
    tokens: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    mask: jax.Array
    cache: list[LayerCache]
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static sampling settings (hashable: they select a compiled program); build with `sampling_settings`."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_ids: tuple[int, ...]
    pad_id: int
    num_samples: int


def _emit(
    state: _LoopState, step: jax.Array, logits: jax.Array, key: jax.Array, sampling: SamplingSettings
) -> _LoopState:
    """Samples token `step` for every row from `logits [N, vocab]` and records it."""
    tokens, logprob, model_logprob = sample_tokens(
        key, logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
    )
    live = ~state.done
    tokens = jnp.where(live, tokens, sampling.pad_id)
    is_eos = jnp.isin(tokens, jnp.asarray(sampling.eos_ids, jnp.int32))
    return state.replace(
        step=step + 1,
        last_token=tokens,
        done=state.done | (live & is_eos),
        tokens=state.tokens.at[:, step].set(tokens),
        logprobs=state.logprobs.at[:, step].set(jnp.where(live, logprob, 0.0)),
        model_logprobs=state.model_logprobs.at[:, step].set(jnp.where(live, model_logprob, 0.0)),
        mask=state.mask.at[:, step].set(live),
    )


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits one key, or each of a batch of per-row keys `[N]`."""
    if key.ndim == 0:
        return tuple(jax.random.split(key))
    pairs = jax.vmap(jax.random.split)(key)
    return pairs[:, 0], pairs[:, 1]


# XLA:GPU's DotMerger joins matmuls that share an input into one by concatenating their weights. A decode step's
# outputs are small enough to pass its size limit, so every token it copied the weights (q/k/v, gate/up, a kernel
# with its LoRA adapter) before reading them: on the 7B LoRA decode for one H100 (compile-check, deviceless) 36.0 GB
# of HBM traffic per token against 18.6 GB without it, for a 15.9 GB floor. Other backends ignore the option.
_GENERATION_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampling", "mesh", "rules"), compiler_options=_GENERATION_COMPILER_OPTIONS
)
def _prefill(
    graphdef,
    params,
    inputs: ThinkerInputs,
    key: jax.Array,
    *,
    sampling: SamplingSettings,
    mesh: Mesh | None,
    rules: AxisRules | None = None,
) -> _LoopState:
    # Many tokens per row: rows sharded at layer boundaries, FSDP gathers the weights (the decode loop,
    # one token per row, leaves the weights in place instead).
    with activation_sharding(mesh, rules):
        model = nnx.merge(graphdef, params)
        batch, prompt_len = inputs.input_ids.shape
        cache = model.init_cache(batch, prompt_len + sampling.max_new_tokens, mesh=mesh, rules=rules)
        hidden, cache = model.prefill(inputs, cache)
        last_logits = model.logits(hidden[:, -1])
        # Cache columns a generated token may attend to: the prompt's real tokens, then each generated one.
        prompt_valid = inputs.attention_mask.astype(bool)
        kv_valid = jnp.concatenate([prompt_valid, jnp.zeros((batch, sampling.max_new_tokens), bool)], axis=1)

        # The rollouts of one prompt share its prefill: repeat rows prompt-major.
        repeat = functools.partial(jnp.repeat, repeats=sampling.num_samples, axis=0)
        rows = batch * sampling.num_samples
        new = sampling.max_new_tokens
        state = _LoopState(
            step=jnp.int32(0),
            last_token=jnp.zeros((rows,), jnp.int32),
            first_position=repeat(first_new_position(inputs)),
            kv_valid=repeat(kv_valid),
            done=jnp.zeros((rows,), bool),
            tokens=jnp.full((rows, new), sampling.pad_id, jnp.int32),
            logprobs=jnp.zeros((rows, new), jnp.float32),
            model_logprobs=jnp.zeros((rows, new), jnp.float32),
            mask=jnp.zeros((rows, new), bool),
            cache=constrain_cache(jax.tree.map(repeat, cache), mesh, rules),
            key=key,
        )
        if key.ndim:  # one key per prompt: each rollout gets its own stream, whatever its row
            key = jax.vmap(lambda k: jax.random.split(k, sampling.num_samples))(key).reshape(rows)
        key, first_key = _split(key)
        return _emit(state.replace(key=key), jnp.int32(0), repeat(last_logits), first_key, sampling)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "sampling", "mesh", "rules"),
    donate_argnames=("state",),
    compiler_options=_GENERATION_COMPILER_OPTIONS,
)
def _decode(
    graphdef,
    params,
    state: _LoopState,
    *,
    sampling: SamplingSettings,
    mesh: Mesh | None,
    rules: AxisRules | None = None,
) -> _LoopState:
    model = nnx.merge(graphdef, params)
    prompt_len = state.kv_valid.shape[1] - sampling.max_new_tokens

    def keep_going(state: _LoopState) -> jax.Array:
        return (state.step < sampling.max_new_tokens) & ~jnp.all(state.done)

    def step_once(state: _LoopState) -> _LoopState:
        # Feed token step-1 at its cache column and position; its logits give token `step`.
        column = prompt_len + state.step - 1
        kv_valid = jax.lax.dynamic_update_slice(
            state.kv_valid, jnp.ones((state.kv_valid.shape[0], 1), bool), (0, column)
        )
        position = state.first_position + state.step - 1
        position_ids = jnp.broadcast_to(position[None, :, None], (3, position.shape[0], 1))
        hidden, cache = model.extend(state.last_token[:, None], position_ids, state.cache, kv_valid[:, None, :], column)
        key, step_key = _split(state.key)
        state = state.replace(kv_valid=kv_valid, cache=constrain_cache(cache, mesh, rules), key=key)
        return _emit(state, state.step, model.logits(hidden[:, 0]), step_key, sampling)

    return jax.lax.while_loop(keep_going, step_once, state)


def pad_prompts(inputs: ThinkerInputs, length: int, pad_id: int) -> ThinkerInputs:
    """Left-pads a prepared batch to the static prompt `length` (a bucket), as the reference pads.

    Padded slots get token `pad_id`, mask 0 and position 1.
    """
    current = inputs.input_ids.shape[1]
    if current > length:
        raise ValueError(f"prompt length {current} exceeds the prompt bucket {length}")
    extra = length - current
    if extra == 0:
        return inputs
    return inputs.replace(
        input_ids=jnp.pad(inputs.input_ids, ((0, 0), (extra, 0)), constant_values=pad_id),
        attention_mask=jnp.pad(inputs.attention_mask, ((0, 0), (extra, 0))),
        position_ids=jnp.pad(inputs.position_ids, ((0, 0), (0, 0), (extra, 0)), constant_values=1),
    )


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`; an error names both when none does."""
    fitting = [bucket for bucket in sorted(buckets) if bucket >= length]
    if not fitting:
        raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)} (buckets: {sorted(buckets)})")
    return fitting[0]


def sampling_settings(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    num_samples: int = 1,
) -> SamplingSettings:
    """Checked static settings of `generate` (its arguments of the same names)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")

    eos_ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(int(i) for i in eos_token_id)
    return SamplingSettings(max_new_tokens, float(temperature), top_k, top_p, eos_ids, int(pad_token_id), num_samples)


def compile_generation(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    inputs: ThinkerInputs,
    key: jax.Array,
    *,
    settings: SamplingSettings,
    mesh: Mesh | None,
    rules: AxisRules | None = None,
) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
    """Ahead-of-time compiles the two programs `generate` runs: the prefill and the decode loop.

    The arguments may be abstract (`jax.ShapeDtypeStruct`s with shardings, e.g. on the devices of a TPU
    topology that this machine does not have); the decode loop is compiled for the state the prefill
    returns, with the shardings the compiled prefill gives it. `rules`: the run's logical-axis table
    (`MeshConfig.axis_rules`; default: the default table).
    """
    graphdef, params = generation_model(graphdef, params, nnx.merge(graphdef, params).dtype)
    prefill = _prefill.lower(graphdef, params, inputs, key, sampling=settings, mesh=mesh, rules=rules).compile()
    state = jax.tree.map(
        lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
        prefill.out_info,
        prefill.output_shardings,
    )
    decode = _decode.lower(graphdef, params, state, sampling=settings, mesh=mesh, rules=rules).compile()
    return prefill, decode


def generate(
    model: Qwen2_5OmniThinker,
    inputs: Mapping[str, Any] | ThinkerInputs,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    num_samples: int = 1,
    seed: int | jax.Array = 0,
    prompt_buckets: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: AxisRules | None = None,
) -> GenerationOutput:
    """Samples `num_samples` completions per prompt.

    Args:
      model: the thinker (its parameters may already be sharded on `mesh`).
      inputs: the model call's keyword arguments (`input_ids [B, P]`, `attention_mask [B, P]`, the
        processor's media arrays, `use_audio_in_video`), or a batch already prepared with
        `model.prepare_inputs`; prompts are left-padded.
      max_new_tokens: the static generation length.
      temperature: 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) after
        top-k / top-p filtering.
      eos_token_id: one id or several; a row stops after emitting any of them.
      pad_token_id: written after a row's EOS.
      num_samples: rollouts per prompt (rows are prompt-major).
      seed: the PRNG seed, a PRNG key, or one key per prompt (`[B]`): then the rollouts of a prompt
        depend only on its key, not on its row, so a batch split or ordered differently (another
        process layout) samples the same tokens. The same seed gives the same tokens.
      prompt_buckets: static prompt lengths; the batch is left-padded to the smallest that fits, so
        prompts of nearby lengths share one compiled program.
      mesh: when given, prompts are placed with the batch over (data, fsdp) and the KV cache with its
        heads over tensor.
      rules: the run's logical-axis table (`MeshConfig.axis_rules`) for those placements; default: the
        default table.

    Returns:
      A `GenerationOutput` with `[B * num_samples, max_new_tokens]` arrays.
    """
    sampling = sampling_settings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_samples=num_samples,
    )

    if isinstance(inputs, ThinkerInputs):
        prepared = inputs
    else:
        inputs = dict(inputs)
        prepared = model.prepare_inputs(inputs.pop("input_ids"), **inputs)
    if prompt_buckets:
        prepared = pad_prompts(prepared, bucket_length(prepared.input_ids.shape[1], prompt_buckets), pad_token_id)
    if mesh is not None:
        prepared = place_inputs(prepared, mesh, rules=rules)
    graphdef, params = generation_model(*nnx.split(model), model.dtype)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    state = _prefill(graphdef, params, prepared, key, sampling=sampling, mesh=mesh, rules=rules)
    state = _decode(graphdef, params, state, sampling=sampling, mesh=mesh, rules=rules)
    return GenerationOutput(
        tokens=state.tokens, logprobs=state.logprobs, model_logprobs=state.model_logprobs, mask=state.mask
    )
