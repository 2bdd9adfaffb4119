"""One OmniOPSD update: student forward with gradient, teacher forward without, loss, optax update, EMA.

```
y   ~ pi_theta(. | x)                      rollouts (opsd_jax.sampling), recorded in `StepBatch`
s_t = log pi_theta(. | x,   y<t)           one forward over [x   | y], with gradient
q_t = log pi_T    (. | x_r, y<t)           one batched forward over [x_r | y], no gradient
L   = sum_t w_t * D(s_t, q_t)              D and w from opsd_jax/opsd/losses.py
```
`train_step` is one jitted function of the sharded state and batch. Gradient accumulation runs inside
it: the batch carries a leading micro-batch axis, a `lax.scan` sums the micro-batches' gradients,
and the token weights divide by the token count of the whole batch, so the update is the gradient of
the global token mean whatever the split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opsd_jax.models import lora
from opsd_jax.models.precision import TIED_HEAD, in_compute_dtype, param_names
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerInputs, input_shardings
from opsd_jax.models.scoring import token_logprobs
from opsd_jax.opsd import losses
from opsd_jax.opsd.ablations import group_normalized_advantages, label_cross_entropy
from opsd_jax.opsd.chunked_losses import fused_distillation_loss
from opsd_jax.opsd.reductions import token_mean_weights
from opsd_jax.opsd.teacher import ema_update, teacher_signal
from opsd_jax.settings import TeacherConfig, TrainConfig
from opsd_jax.sharding import AxisRules, activation_sharding, constrain, logical_to_spec, resolve_rules

ENCODER_PREFIXES = ("audio_tower", "visual")


@struct.dataclass
class StepBatch:
    """One micro-batch of prompts with their sampled completions (B prompts, G rollouts each).

    student / teacher: prepared prompts `[B, P]` / `[B, P_teacher]` over the same media.
    completion: `[B * G, C]` int32 sampled tokens, prompt-major; completion_mask `[B * G, C]` bool.
    sampler_logprobs: `[B * G, C]` log-probability of each token under the distribution it was drawn from
      (tempered, top-k / top-p filtered: `GenerationOutput.logprobs`), the behaviour side of importance ratios.
    rewards: `[B * G]` label rewards of the rollouts (used by the policy-gradient ablation term only).
    label_ids / label_mask: `[B, L]` the reference answer's tokens (used by the cross-entropy ablation only).
    """

    student: ThinkerInputs
    teacher: ThinkerInputs
    completion: jax.Array
    completion_mask: jax.Array
    sampler_logprobs: jax.Array
    rewards: jax.Array
    label_ids: jax.Array
    label_mask: jax.Array


@struct.dataclass
class TrainState:
    """Everything an update changes: step, trained parameters, optimizer state, the teacher's copy (frozen / EMA).

    The teacher's copy (`teacher_copy`) holds only the weights training changes (`trained_part`: without the
    encoders when they are not trained); the teacher's forward takes the rest from `params` (`student_and_teacher`).
    With LoRA (`opsd_jax.models.lora`) `params` are the adapters only, `frozen` the base weights they adapt
    (never updated, no optimizer state, not donated: the step hands back the same arrays), and the
    teacher's copy, when kept (EMA), is a copy of the adapters. Without LoRA `frozen` is None.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    teacher_params: nnx.State | None
    frozen: nnx.State | None = None

    def saved(self) -> TrainState:
        """What a checkpoint holds: everything but the frozen base weights (the run's `model.checkpoint` has them)."""
        return self.replace(frozen=None)


def step_batch_shardings(batches: StepBatch, mesh: Mesh, rules: AxisRules | None = None) -> StepBatch:
    """The placement of stacked micro-batches `[k, ...]`: rows over (data, fsdp), media replicated.

    A tree like `batches` of `NamedSharding`s (for `jax.device_put`, or an ahead-of-time compile).
    """
    rules = resolve_rules() if rules is None else rules

    def sharding(x):
        axes = [None, "batch"] + [None] * (x.ndim - 2)
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))

    rows = {
        name: sharding(getattr(batches, name))
        for name in ("completion", "completion_mask", "sampler_logprobs", "rewards", "label_ids", "label_mask")
    }
    return batches.replace(
        student=input_shardings(batches.student, mesh, leading_axes=1, rules=rules),
        teacher=input_shardings(batches.teacher, mesh, leading_axes=1, rules=rules),
        **rows,
    )


def place_step_batch(batches: StepBatch, mesh: Mesh, rules: AxisRules | None = None) -> StepBatch:
    """Puts stacked micro-batches `[k, ...]` on the mesh (`step_batch_shardings`)."""
    return jax.device_put(batches, step_batch_shardings(batches, mesh, rules))


def is_encoder_path(path: tuple) -> bool:
    return str(path[0]) in ENCODER_PREFIXES


def trained_part(tree: nnx.State, train_encoders: bool) -> nnx.State:
    """The part of a parameter tree (of arrays, shapes or shardings) that updates change: all of it, or without
    the encoders' when they are not trained (`make_optimizer` zeroes their updates)."""
    if train_encoders:
        return tree
    return nnx.from_flat_state([(path, x) for path, x in nnx.to_flat_state(tree) if not is_encoder_path(path)])


def teacher_copy(
    params: nnx.State, teacher: TeacherConfig, *, train_encoders: bool, dtype: Any, adapted: bool = False
) -> nnx.State | None:
    """The teacher's weights a state keeps, a copy of the initial `params` (no buffer shared with them): None for a
    live teacher and for the frozen teacher of an adapted model (the base: `lora.without_adapters`); else the
    weights training changes (`trained_part`), the others being the student's own, equal to their initial values.

    An EMA teacher keeps them in their own dtype (float32 master weights: the average moves by `rate` times
    small differences). A frozen one keeps the decoder's in the compute `dtype` (`model.dtype`), where the layers
    use them anyway (`opsd_jax.models.precision.in_compute_dtype`: the logits are bit-identical to a float32
    copy's); the step's output head and any trained encoder weight keep their dtype. Works on arrays and on
    `jax.ShapeDtypeStruct`s (`opsd_jax.compile_check`'s abstract state).
    """
    if teacher.mode == "live" or (teacher.mode == "frozen" and adapted):
        return None
    trained = trained_part(params, train_encoders)
    if teacher.mode == "ema":
        return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.copy(x), trained)
    return in_compute_dtype(trained, dtype, copy=True)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Update count (0 for the first update) -> learning rate: linear warm-up, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if config.warmup_steps else config.lr,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.lr * config.min_lr_ratio,
    )


def make_optimizer(config: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr`, after global-norm clipping.

    Weight decay skips vectors (norms and biases). With `train_encoders: false` the encoders' updates
    are zero and they get no optimizer state.
    """
    schedule = learning_rate_schedule(config)
    # A callable mask sees the parameters this transform is given (the trainable ones under multi_transform).
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    adamw = optax.adamw(
        schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay, mask=decay_mask
    )
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    if config.train_encoders:
        return tx
    labels = nnx.from_flat_state(
        [(path, "frozen" if is_encoder_path(path) else "train") for path, _ in nnx.to_flat_state(params)]
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def init_state(
    model: Qwen2_5OmniThinker,
    tx: optax.GradientTransformation,
    teacher: TeacherConfig,
    mesh: Mesh | None = None,
    *,
    train_encoders: bool,
) -> TrainState:
    """The state of step 0; a frozen or EMA teacher starts as a copy of the initial parameters that training
    changes (`teacher_copy`; `train_encoders` as `train.train_encoders`).

    The state owns copies of the model's trained parameters (its buffers are donated to every update); keep
    a model for sampling current with `sync_model(model, state)`. With a `mesh`, optimizer
    moments follow their parameters' shardings and scalars (step, counts) are replicated over it.

    An adapted model (LoRA) trains its adapters only: `frozen` holds its base weights themselves (one copy,
    shared with the model), and a frozen teacher needs no copy at all (it is
    the base: the adapters with `lora_b` zero, `lora.without_adapters`).
    """
    adapted = lora.is_adapted(model)
    params = jax.tree.map(jnp.copy, nnx.state(model, lora.trainable_filter(model)))
    teacher_params = teacher_copy(params, teacher, train_encoders=train_encoders, dtype=model.dtype, adapted=adapted)
    frozen = nnx.state(model, lora.frozen_filter()) if adapted else None
    state = TrainState(
        step=jnp.int32(0), params=params, opt_state=tx.init(params), teacher_params=teacher_params, frozen=frozen
    )
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static half of a step (hashable: it selects a compiled program)."""

    graphdef: Any
    tx: optax.GradientTransformation
    loss: losses.LossConfig
    teacher: TeacherConfig
    train_encoders: bool
    mesh: Mesh | None = None  # pins the loss's layouts (rows sharded, output head gathered) under a mesh
    rules: AxisRules | None = None  # the run's logical-axis table (`MeshConfig.axis_rules`); None: the default


def batch_counts(batches: StepBatch) -> dict[str, jax.Array]:
    """Whole-batch denominators (over all micro-batches, stacked or not): tokens, sequences, label tokens."""
    return {
        "tokens": jnp.sum(batches.completion_mask.astype(jnp.float32)),
        "sequences": jnp.float32(math.prod(batches.completion_mask.shape[:-1])),
        "label_tokens": jnp.sum(batches.label_mask.astype(jnp.float32)),
    }


def sync_model(model: Qwen2_5OmniThinker, state: TrainState) -> None:
    """Points `model` (the one that samples) at `state`'s trained parameters (with LoRA, the adapters: the base
    weights are the model's own, never donated nor changed)."""
    nnx.update(model, state.params)


def _merge(settings: StepSettings, params: nnx.State, frozen: nnx.State | None) -> Qwen2_5OmniThinker:
    return nnx.merge(settings.graphdef, params, *(() if frozen is None else (frozen,)))


def overlay(params: nnx.State, part: nnx.State) -> nnx.State:
    """`params` with the leaves `part` holds (at the same paths) replaced by `part`'s."""
    flat = dict(nnx.to_flat_state(params))
    flat.update(nnx.to_flat_state(part))
    return nnx.from_flat_state(list(flat.items()))


def at_paths_of(params: nnx.State, part: nnx.State) -> nnx.State:
    """The leaves of `params` at the paths `part` holds."""
    flat = dict(nnx.to_flat_state(params))
    return nnx.from_flat_state([(path, flat[path]) for path, _ in nnx.to_flat_state(part)])


def student_and_teacher(
    settings: StepSettings, params: nnx.State, teacher_params: nnx.State | None, frozen: nnx.State | None
) -> tuple[Qwen2_5OmniThinker, Qwen2_5OmniThinker]:
    """The student (`params`, with the base weights `frozen` under LoRA) and the teacher of `settings.teacher.mode`:
    the student itself (live), or `teacher_params` (frozen / EMA) under `stop_gradient`; a frozen teacher of an
    adapted student is the base model, the same weights with the adapters adding zeros (`lora.without_adapters`).
    `teacher_params` may hold part of the parameters (`teacher_copy`: those training changes); the teacher takes
    the others from `params` (under `stop_gradient`: untrained, they still equal the teacher's initial copy)."""
    frozen = None if frozen is None else jax.lax.stop_gradient(frozen)
    model = _merge(settings, params, frozen)
    dtype = model.dtype
    if _casts_once(settings):
        nnx.update(model, _decoder_weights_in(params, dtype))
    if settings.teacher.mode == "live":
        return model, model
    if teacher_params is None:
        teacher_params = lora.without_adapters(params)
    teacher = overlay(jax.lax.stop_gradient(params), jax.lax.stop_gradient(teacher_params))
    if _casts_once(settings):
        teacher = _decoder_weights_in(teacher, dtype)
    return model, _merge(settings, teacher, frozen)


def _casts_once(settings: StepSettings) -> bool:
    """Whether the decoder's weights are cast to the compute dtype once per micro-batch (`_decoder_weights_in`)
    rather than by each layer where it uses them: where FSDP shards them. A layer rematerialised in the backward
    re-ran its casts there (7B on v5p, a quarter of the depth: cost model 0.5212 -> 0.5182 s). Under FSDP the
    copy is a chip's shard (7B on v5p-64: 1.6 GB); unsharded it would be every weight's, alive through the
    micro-batch (3B on one H100: ~5.5 GB), so there the layers cast at use as before."""
    return settings.mesh is not None and settings.mesh.shape.get("fsdp", 1) > 1


def _decoder_weights_in(params: nnx.State, dtype: Any) -> nnx.State:
    """`params` with the weights that the decoder's layers cast where they use them cast to `dtype`: the same
    values and gradients. LoRA's adapters are left as they are (qwix adds them in float32), and so is the
    embedding table, whose gradient is a scatter-add over the batch's tokens: kept in float32 it sums in
    float32."""
    keep = lambda path: lora.is_adapter(path) or param_names(path) == TIED_HEAD  # noqa: E731
    return in_compute_dtype(params, dtype, where=lambda path: not keep(path))


def _micro_batch_loss(
    params,
    teacher_params,
    batch: StepBatch,
    counts: dict[str, jax.Array],
    settings: StepSettings,
    frozen: nnx.State | None = None,
):
    """Scalar loss of one micro-batch (already divided by whole-batch `counts`) and its metrics.

    `frozen`: an adapted model's base weights (None without LoRA); they get no gradient."""
    model, teacher_model = student_and_teacher(settings, params, teacher_params, frozen)
    config = settings.loss
    features = model.encode_media(batch.student)
    if not settings.train_encoders:
        features = jax.lax.stop_gradient(features)
    # The output head runs vocabulary-parallel. Under FSDP the head kernel is sharded over `hidden`:
    # left alone, XLA contracts the sharded hidden dimension locally and all-reduces partial
    # `[rows, C, vocab]` logits; gathering the kernel instead re-gathers all of it (0.6-1.1 GB) at
    # every use inside the chunk loops (30 gathers per micro-batch, measured on the 3B). Gathering the
    # few completion rows (`[rows, C, hidden]`, tens of MB) to every chip and splitting the kernel's
    # vocabulary over all of them moves a small fraction of that: each chip computes every row's
    # logits for its slice of the vocabulary, and the reductions over the vocabulary (log-sum-exp,
    # the divergence's sum) all-reduce `[rows, C]` numbers.
    gather_rows = functools.partial(
        constrain, logical_axes=(None, None, "activation_embed"), mesh=settings.mesh, rules=settings.rules
    )
    gather_kernel = functools.partial(
        constrain, logical_axes=("activation_embed", "activation_vocab"), mesh=settings.mesh, rules=settings.rules
    )
    student_hidden = gather_rows(
        model.completion_hidden(batch.student, batch.completion, batch.completion_mask, features)
    )
    head = gather_kernel(model.head_kernel())

    # The teacher sees the student's media. Its encoders are the student's when they are shared (live)
    # or never trained (a frozen or EMA copy of untouched weights is bit-identical: EMA of equal values
    # is exact), so the features encoded above serve both and the encoders run once per micro-batch.
    shared_encoders = settings.teacher.mode == "live" or not settings.train_encoders
    teacher_features = jax.lax.stop_gradient(features) if shared_encoders else None
    signal = teacher_signal(
        teacher_model, batch.teacher, batch.completion, batch.completion_mask, config, teacher_features
    )
    if signal.hidden is not None:
        signal = signal.replace(hidden=gather_rows(signal.hidden), head_kernel=gather_kernel(signal.head_kernel))

    mask = batch.completion_mask
    weights = losses.reduction_weights(
        config, mask, num_tokens_global=counts["tokens"], num_sequences_global=counts["sequences"]
    )
    # The metrics score the sampled tokens on the loss's own chunks of logits: no second head pass.
    distill, per_token, scores = fused_distillation_loss(
        config,
        student_hidden,
        head,
        weights,
        signal,
        completion_ids=batch.completion,
        sampler_logprobs=batch.sampler_logprobs,
        top_k_mass=min(config.top_k, head.shape[-1]) if losses.divergence_form(config).uses_top_k else 0,
    )
    loss = settings.teacher.distill_weight * distill
    teacher_token = scores.teacher_token
    advantage = teacher_token - scores.student_token

    if settings.teacher.label_pg_weight > 0 or settings.teacher.label_ce_weight > 0:
        loss = loss + _ablation_terms(model, batch, student_hidden, head, features, counts, settings)

    def masked_sum(x):
        return jnp.sum(jnp.where(mask, x, 0.0))

    ratio = per_token.is_ratio
    clipped = (ratio >= (config.is_clip or jnp.inf)) & mask
    metrics = {
        "loss": loss,
        "divergence_sum": masked_sum(per_token.divergence),
        "student_logprob_sum": masked_sum(scores.student_token),
        "teacher_logprob_sum": masked_sum(teacher_token),
        "advantage_sum": masked_sum(advantage),
        "advantage_positive": masked_sum((advantage > 0).astype(jnp.float32)),
        "is_ratio_sum": masked_sum(ratio),
        "is_ratio_max": jnp.max(jnp.where(mask, ratio, 0.0)),
        "is_clipped": masked_sum(clipped.astype(jnp.float32)),
        **({} if scores.top_k_mass is None else {"top_k_mass_sum": masked_sum(scores.top_k_mass)}),
        "entropy_sum": masked_sum(scores.entropy),
        "tokens": jnp.sum(mask.astype(jnp.float32)),
        "sequences": jnp.float32(mask.shape[0]),
    }
    return loss, metrics


def _ablation_terms(model, batch: StepBatch, student_hidden, head, features, counts, settings) -> jax.Array:
    """Label-reward policy gradient (GRPO-style) and label cross-entropy, for the paper's ablations.

    `features`: the micro-batch's media features as the step encoded them (student and teacher prompts share
    the media), so the cross-entropy term does not run the encoders again."""
    total = jnp.float32(0.0)
    mask = batch.completion_mask
    if settings.teacher.label_pg_weight > 0:
        group = batch.completion.shape[0] // batch.student.input_ids.shape[0]
        advantages = group_normalized_advantages(batch.rewards, group)
        logits = jnp.einsum("bch,hv->bcv", student_hidden, head, preferred_element_type=jnp.float32)
        completion_logprobs = token_logprobs(logits, batch.completion)
        weights = token_mean_weights(mask, counts["tokens"])
        total += settings.teacher.label_pg_weight * -jnp.sum(weights * advantages[:, None] * completion_logprobs)
    if settings.teacher.label_ce_weight > 0:
        label_mask = batch.label_mask.astype(bool)
        prompt = batch.teacher if settings.teacher.label_ce_prompt == "teacher" else batch.student
        label_hidden = model.completion_hidden(prompt, batch.label_ids, label_mask, features)
        logits = jnp.einsum("bch,hv->bcv", label_hidden, head, preferred_element_type=jnp.float32)
        per_token = label_cross_entropy(logits, batch.label_ids, label_mask)
        total += settings.teacher.label_ce_weight * jnp.sum(per_token) / jnp.maximum(counts["label_tokens"], 1.0)
    return total


def make_train_step(settings: StepSettings, state: TrainState | None = None):
    """The jitted update `(state, batches) -> (state, metrics)`; the state is donated, except its frozen base
    weights (LoRA), which other holders of them (the sampling model, a reader) keep using after the update.

    With a (sharded) example `state`, its shardings are pinned as the output shardings, so parameters
    and optimizer state stay where they are (FSDP over the mesh) step after step. The returned function has
    `lower(state, batches)` for ahead-of-time compiles (memory analysis, `opsd-jax compile-check`).
    """
    out_shardings = None
    if state is not None:
        out_shardings = (jax.tree.map(lambda x: x.sharding, state.saved()), None)

    def with_frozen(trained: TrainState, frozen: nnx.State | None, batches: StepBatch):
        new_state, metrics = train_step(trained.replace(frozen=frozen), batches, settings=settings)
        return new_state.saved(), metrics

    jitted = jax.jit(with_frozen, donate_argnums=(0,), out_shardings=out_shardings)

    def step(state: TrainState, batches: StepBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        new_state, metrics = jitted(state.saved(), state.frozen, batches)
        return new_state.replace(frozen=state.frozen), metrics

    step.lower = lambda state, batches: _LoweredStep(jitted.lower(state.saved(), state.frozen, batches))
    return step


class _LoweredStep:
    """`make_train_step(...).lower(state, batches)`: XLA's lowering, whose `compile()` is called like the step
    itself, `(state, batches)` (the frozen base travels beside the donated state, as in the step)."""

    def __init__(self, lowered):
        self._lowered = lowered

    def compile(self) -> _CompiledStep:
        return _CompiledStep(self._lowered.compile())

    def __getattr__(self, name: str):
        return getattr(self._lowered, name)


class _CompiledStep:
    """A compiled train step called as `(state, batches) -> (state, metrics)`; XLA's analyses pass through."""

    def __init__(self, compiled):
        self._compiled = compiled

    def __call__(self, state: TrainState, batches: StepBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        new_state, metrics = self._compiled(state.saved(), state.frozen, batches)
        return new_state.replace(frozen=state.frozen), metrics

    def __getattr__(self, name: str):
        return getattr(self._compiled, name)


def train_step(
    state: TrainState, batches: StepBatch, *, settings: StepSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update from `batches`, a `StepBatch` whose every leaf has a leading micro-batch axis.

    Returns the new state and the step's metrics (means over the batch's completion tokens). Pure:
    jit it with `make_train_step`.
    """
    with activation_sharding(
        settings.mesh, settings.rules
    ):  # rows sharded at every layer boundary (FSDP gathers weights)
        return _train_step(state, batches, settings)


def _train_step(
    state: TrainState, batches: StepBatch, settings: StepSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    counts = batch_counts(batches)
    grad_fn = jax.grad(_micro_batch_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, metrics = grad_fn(state.params, state.teacher_params, micro, counts, settings, state.frozen)
        summed = jax.tree.map(jnp.add, carry[0], grads)
        return (summed, carry[1] + 1), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, _), metrics = jax.lax.scan(accumulate, (zeros, 0), batches)
    updates, opt_state = settings.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher_params = state.teacher_params
    if settings.teacher.mode == "ema":
        teacher_params = ema_update(teacher_params, at_paths_of(params, teacher_params), settings.teacher.ema_rate)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, teacher_params=teacher_params, frozen=state.frozen
    )
    return new_state, summarize(metrics, grads)


def summarize(metrics: dict[str, jax.Array], grads: nnx.State) -> dict[str, jax.Array]:
    """Per-micro-batch sums -> the step's metrics (token means, maxima, the gradient norm)."""
    tokens = jnp.maximum(jnp.sum(metrics["tokens"]), 1.0)
    mean = lambda name: jnp.sum(metrics[name]) / tokens  # noqa: E731
    return {
        "loss": jnp.sum(metrics["loss"]),
        "divergence": mean("divergence_sum"),
        "student_logprob": mean("student_logprob_sum"),
        "teacher_logprob": mean("teacher_logprob_sum"),
        "advantage_mean": mean("advantage_sum"),
        "advantage_positive_fraction": mean("advantage_positive"),
        "is_ratio_mean": mean("is_ratio_sum"),
        "is_ratio_max": jnp.max(metrics["is_ratio_max"]),
        "is_clip_fraction": mean("is_clipped"),
        **({"top_k_mass": mean("top_k_mass_sum")} if "top_k_mass_sum" in metrics else {}),
        "entropy": mean("entropy_sum"),
        "completion_length": jnp.sum(metrics["tokens"]) / jnp.sum(metrics["sequences"]),
        "grad_norm": optax.tree.norm(grads),
    }
