"""Distillation losses of on-policy self-distillation as pure, stateless JAX functions.

Notation (reference/on_policy_self_distillation.md §4): per completion token t, `s_t = log p_student(. | x, y<t)`
(gradients flow), `T_t = log p_teacher(. | x, rationale, y<t)` (always under `stop_gradient`: no function here
lets a gradient reach the teacher), `q_t` = the sampler's log-probability of the sampled token y_t.

Conventions:
- logits are `[batch, completion, vocab]`, masks and per-token values `[batch, completion]`; the logits are already
  aligned with the completion (position t predicts y_t, i.e. the caller sliced `logits[:, -C-1:-1]`).
- All math is float32 whatever the input dtype (bfloat16 logits are upcast before any softmax).
- `beta` follows TRL: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), in between the
  generalized Jensen-Shannon divergence with the mixture `(1 - beta) * student + beta * teacher`.
- Per-token functions return unreduced `[batch, completion]` values; a reduction (`global_token_mean`,
  `sequence_mean`) turns them into the scalar loss.

Memory: the full-vocabulary forms on logits build `[batch, completion, vocab]` float32 tensors (2.5 GB each for
Qwen2.5-Omni's 151,936-token vocabulary at 4 x 1,024 tokens). The forms on hidden states never do:
`chunked_per_token_divergence` (and its GJSD shorthand `chunked_generalized_jsd`) scans over completion chunks
under `jax.checkpoint`, recomputing each chunk's logits in the backward pass; `fused_distillation_loss`
computes the scalar loss and its gradient in a single scan, without the recomputation.

A trainer builds one `LossConfig` and only dispatches: `per_token_divergence` (from logits) or
`fused_distillation_loss` (from hidden states), then `reduction_weights` / `global_token_mean`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Log of the total mass captured by a top-K support is clamped just below 0 so that the tail bucket
# log(1 - captured) stays finite when the support holds (numerically) all of the mass. TRL uses the same bound.
_MAX_CAPTURED_LOG_MASS = -1e-7
# The log importance ratio is clamped before exp so that a stale sampler logprob cannot overflow.
_MAX_ABS_LOG_RATIO = 20.0

DIVERGENCES = ("gjsd", "topk", "topk_rkl", "sampled_rkl")
TOP_K_SUPPORTS = ("student", "teacher")
REDUCTIONS = ("token_mean", "sequence_mean")


# --------------------------------------------------------------------------------------------------
# Log-probabilities and metric helpers
# --------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")


def _check_beta(beta: float) -> None:
    if isinstance(beta, jax.Array) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta: expected a Python number in [0, 1] (the endpoints are special-cased), got {beta!r}")


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape}: expected the same shape")


def _check_top_k(k: int, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"top_k: expected an integer in [1, vocab={vocab}], got {k!r}")


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis, exactly, in two stages over vocabulary blocks.

    The top-K of the whole axis is the top-K of the blocks' top-Ks. Under a mesh the vocabulary of the
    loss's logits is split over the chips (`opsd_jax.opsd.step`); a one-stage top-K sorts whole rows,
    which XLA gets by re-laying the `[B, C, V]` logits out by row (an all-to-all and a float32 plus an
    int32 copy of them). Blocks that the chips hold whole keep the first stage local; only `[.., blocks, K]`
    candidates move. Equal values come out lowest index first, as from `jax.lax.top_k`.
    """
    vocab = x.shape[-1]
    blocks = next((b for b in (256, 128, 64, 32, 16, 8, 4, 2) if vocab % b == 0 and vocab // b >= k), 1)
    if blocks == 1:
        return jax.lax.top_k(x, k)
    width = vocab // blocks
    values, indices = jax.lax.top_k(x.reshape(*x.shape[:-1], blocks, width), k)  # [..., blocks, k]
    indices = indices + (jnp.arange(blocks, dtype=indices.dtype) * width)[:, None]
    values, order = jax.lax.top_k(values.reshape(*x.shape[:-1], blocks * k), k)
    return values, jnp.take_along_axis(indices.reshape(*x.shape[:-1], blocks * k), order, axis=-1)


def logprobs_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Float32 log-softmax of `logits / temperature` over the last axis: `[..., vocab] -> [..., vocab]`."""
    _check_temperature(temperature)
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def token_logprobs(logits: jax.Array, token_ids: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Log-probability of each given token: logits `[B, T, V]`, token_ids `[B, T]` -> `[B, T]`."""
    logprobs = logprobs_from_logits(logits, temperature)
    return jnp.take_along_axis(logprobs, token_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def top_k_logprobs(logits: jax.Array, k: int, *, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The K most likely tokens with their log-probabilities normalised over the FULL vocabulary.

    logits `[B, T, V]` -> (logprobs `[B, T, K]` float32, indices `[B, T, K]` int32), in decreasing order.
    This is what a teacher scoring pass stores instead of its `[B, T, V]` logits.
    """
    _check_top_k(k, logits.shape[-1])
    logprobs = logprobs_from_logits(logits, temperature)
    values, indices = _top_k(logprobs, k)
    return values, indices.astype(jnp.int32)


def entropy(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of `softmax(logits / temperature)`: `[B, T, V] -> [B, T]` (nats)."""
    logprobs = logprobs_from_logits(logits, temperature)
    return -jnp.sum(jnp.exp(logprobs) * logprobs, axis=-1)


def top_k_mass(logits: jax.Array, k: int, *, temperature: float = 1.0) -> jax.Array:
    """Probability mass held by the K most likely tokens: `[B, T, V] -> [B, T]`, in (0, 1]."""
    values, _ = top_k_logprobs(logits, k, temperature=temperature)
    return jnp.sum(jnp.exp(values), axis=-1)


# --------------------------------------------------------------------------------------------------
# Full-vocabulary and top-K divergences
# --------------------------------------------------------------------------------------------------


def generalized_jsd_from_logprobs(student_logprobs: jax.Array, teacher_logprobs: jax.Array, beta: float) -> jax.Array:
    """GJSD_beta between two normalised distributions given as log-probs `[..., N]`, summed over N: `[...]`.

    The mixture is formed in log space. The terms are summed over the categories before any per-token clip,
    because individual terms can be negative and cancel (reference §4.1).
    """
    _check_beta(beta)
    s = student_logprobs.astype(jnp.float32)
    t = teacher_logprobs.astype(jnp.float32)
    if beta == 0.0:
        return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(s) * (s - t), axis=-1)
    mixture = jnp.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    terms = beta * jnp.exp(t) * (t - mixture) + (1.0 - beta) * jnp.exp(s) * (s - mixture)
    return jnp.sum(terms, axis=-1)


def generalized_jsd(
    student_logits: jax.Array, teacher_logits: jax.Array, *, beta: float, temperature: float = 1.0
) -> jax.Array:
    """Per-token generalized JSD over the full vocabulary: logits `[B, T, V]` each -> `[B, T]`.

    beta 0 = KL(teacher || student), beta 1 = KL(student || teacher) (TRL's convention); equal to TRL's
    `GKDTrainer.generalized_jsd_loss(..., reduction="none")` summed over the vocabulary.
    """
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    student = logprobs_from_logits(student_logits, temperature)
    teacher = logprobs_from_logits(jax.lax.stop_gradient(teacher_logits), temperature)
    return generalized_jsd_from_logprobs(student, teacher, beta)


def add_tail_bucket(logprobs: jax.Array) -> jax.Array:
    """Append the left-over mass `log(1 - sum p)` to a top-K support: `[..., K] -> [..., K + 1]`.

    `logprobs` are normalised over the full vocabulary, so they sum to the captured mass <= 1; with the tail
    category the K + 1 entries form a distribution again.
    """
    captured = jnp.minimum(jax.nn.logsumexp(logprobs, axis=-1, keepdims=True), _MAX_CAPTURED_LOG_MASS)
    return jnp.concatenate([logprobs, jnp.log(-jnp.expm1(captured))], axis=-1)


def _top_k_gjsd(student_top: jax.Array, teacher_top: jax.Array, *, tail_bucket: bool, beta: float) -> jax.Array:
    if tail_bucket:
        student_top, teacher_top = add_tail_bucket(student_top), add_tail_bucket(teacher_top)
    else:  # the divergence of the top-K conditional distributions
        student_top = student_top - jax.nn.logsumexp(student_top, axis=-1, keepdims=True)
        teacher_top = teacher_top - jax.nn.logsumexp(teacher_top, axis=-1, keepdims=True)
    return generalized_jsd_from_logprobs(student_top, teacher_top, beta)


def _check_support(support: str) -> None:
    if support not in TOP_K_SUPPORTS:
        raise ValueError(f"support: expected one of {TOP_K_SUPPORTS}, got {support!r}")


def _top_k_support(
    student_logits: jax.Array, teacher_logits: jax.Array, *, k: int, support: str, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """The K most likely tokens of `support`'s side and the teacher's log-probs on them, `[B, T, K]` each."""
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_support(support)
    _check_top_k(k, student_logits.shape[-1])
    teacher = logprobs_from_logits(jax.lax.stop_gradient(teacher_logits), temperature)
    # Dividing by a positive temperature keeps the order, so the raw student logits rank the same way.
    ranked = jax.lax.stop_gradient(student_logits) if support == "student" else teacher
    _, indices = _top_k(ranked, k)
    return jnp.take_along_axis(teacher, indices, axis=-1), indices.astype(jnp.int32)


def top_k_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    k: int,
    support: str = "student",
    tail_bucket: bool = True,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """GJSD_beta on a top-K support (reference §4.3): logits `[B, T, V]` each -> `[B, T]`.

    support: whose K most likely tokens form the support ("student", SDPO's default, or "teacher"). See
    `top_k_divergence_on_support` for the tail bucket.
    """
    support_logprobs, indices = _top_k_support(
        student_logits, teacher_logits, k=k, support=support, temperature=temperature
    )
    return top_k_divergence_on_support(
        student_logits, support_logprobs, indices, tail_bucket=tail_bucket, beta=beta, temperature=temperature
    )


def top_k_divergence_on_support(
    student_logits: jax.Array,
    support_teacher_logprobs: jax.Array,
    support_indices: jax.Array,
    *,
    tail_bucket: bool = True,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """GJSD_beta on a given support, e.g. the teacher's stored top-K from `top_k_logprobs` (so the teacher's
    logits need not be kept).

    student_logits `[B, T, V]`; the teacher's log-probs on the support, normalised over the full vocabulary at
    the same `temperature`, and the support's token ids, `[B, T, K]` each -> `[B, T]`. The student's
    full-vocabulary log-probs are gathered on the support; then either a tail bucket holds each side's left-over
    mass (`tail_bucket=True`: approximates the full-vocabulary divergence) or both sides are renormalised over
    the K entries (the divergence of the top-K conditionals).
    """
    _check_same_shape("support_teacher_logprobs", support_teacher_logprobs, "support_indices", support_indices)
    student = logprobs_from_logits(student_logits, temperature)
    student_top = jnp.take_along_axis(student, support_indices.astype(jnp.int32), axis=-1)
    teacher_top = jax.lax.stop_gradient(support_teacher_logprobs.astype(jnp.float32))
    return _top_k_gjsd(student_top, teacher_top, tail_bucket=tail_bucket, beta=beta)


def bias_corrected_top_k_reverse_kl(
    student_logits: jax.Array,
    support_teacher_logprobs: jax.Array,
    support_indices: jax.Array,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """RP-OPSD's top-K reverse KL (reference §4.4): `sum_k S (log S - log P_T) - S + P_T` on a partial support.

    student_logits `[B, T, V]`; the teacher's full-vocabulary log-probs on the support and the support's token
    ids, `[B, T, K]` each (usually the teacher's top-K from `top_k_logprobs`) -> `[B, T]`. No renormalisation:
    the `- S + P_T` terms make every term non-negative (x log(x/y) - x + y >= 0), so the partial sum is too.
    """
    _check_same_shape("support_teacher_logprobs", support_teacher_logprobs, "support_indices", support_indices)
    student = logprobs_from_logits(student_logits, temperature)
    s = jnp.take_along_axis(student, support_indices.astype(jnp.int32), axis=-1)
    t = jax.lax.stop_gradient(support_teacher_logprobs.astype(jnp.float32))
    student_p, teacher_p = jnp.exp(s), jnp.exp(t)
    return jnp.sum(student_p * (s - t) - student_p + teacher_p, axis=-1)


# --------------------------------------------------------------------------------------------------
# Sampled-token estimator, per-token clip and positive-evidence mask
# --------------------------------------------------------------------------------------------------


def truncated_importance_ratio(
    student_logprobs: jax.Array, sampler_logprobs: jax.Array, *, is_clip: float
) -> jax.Array:
    """`min(exp(clamp(s(y) - q(y), -20, 20)), is_clip)`, detached: `[B, T]` each -> `[B, T]`.

    `q(y)` is the token's log-probability under the distribution it was drawn from (tempered, top-k /
    top-p filtered: the sampler's `logprobs`) and `s(y)` the student's at the loss temperature, which must be
    the sampling temperature (`Config.validate`). Then `E_q[ratio * f(y)] = sum_{y in q's support} pi(y) f(y)`
    (below the clip): it corrects for the sampler's truncation and numerics (reference §8).
    """
    log_ratio = jax.lax.stop_gradient(student_logprobs.astype(jnp.float32) - sampler_logprobs.astype(jnp.float32))
    log_ratio = jnp.clip(log_ratio, -_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    return jnp.minimum(jnp.exp(log_ratio), is_clip)


class SampledTokenLoss(NamedTuple):
    """Outputs of `sampled_token_reverse_kl`, each `[B, T]`."""

    loss: jax.Array  # what the reduction averages; its gradient estimates that of the reverse KL
    advantage: jax.Array  # teacher minus student logprob of the sampled token (detached)
    ratio: jax.Array  # the truncated importance ratio (detached; ones without correction)


def sampled_token_reverse_kl(
    student_logprobs: jax.Array,
    teacher_logprobs: jax.Array,
    sampler_logprobs: jax.Array | None,
    *,
    is_clip: float | None = 2.0,
) -> SampledTokenLoss:
    """Sampled-token reverse KL as REINFORCE (reference §4.6), from logprobs of the sampled tokens `[B, T]`.

    `loss = -stopgrad(T(y) - s(y)) * rho * s(y)` with `rho = min(exp(clamp(s(y) - q(y), -20, 20)), is_clip)`
    detached. The gradient `(s(y) - T(y)) * rho * grad s(y)` is a one-sample estimate of grad KL(student || teacher).
    `is_clip=None` switches the correction off (then `sampler_logprobs` may be None).
    """
    student = student_logprobs.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32))
    _check_same_shape("student_logprobs", student, "teacher_logprobs", teacher)
    advantage = jax.lax.stop_gradient(teacher - student)
    if is_clip is None:
        ratio = jnp.ones_like(student)
    else:
        if sampler_logprobs is None:
            raise ValueError("sampler_logprobs: required when is_clip is set (is_clip=None skips the correction)")
        ratio = truncated_importance_ratio(student, sampler_logprobs, is_clip=is_clip)
    return SampledTokenLoss(loss=-advantage * ratio * student, advantage=advantage, ratio=ratio)


def clip_per_token(per_token: jax.Array, clip: float | None) -> jax.Array:
    """`min(D_t, clip)` on vocabulary-summed divergences `[B, T]` (no gradient where clipped); None = no clip."""
    return per_token if clip is None else jnp.minimum(per_token, clip)


def positive_evidence_mask(student_token_logprobs: jax.Array, teacher_token_logprobs: jax.Array) -> jax.Array:
    """True where the teacher gives the sampled token a higher logprob than the student: `[B, T]` -> bool `[B, T]`."""
    return jax.lax.stop_gradient(teacher_token_logprobs > student_token_logprobs)


# --------------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------------


def token_mean_weights(mask: jax.Array, num_tokens_global: jax.Array | int | None = None) -> jax.Array:
    """Weights `[B, T]` with `sum(weights * per_token) == global_token_mean(per_token, mask, num_tokens_global)`."""
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask) if num_tokens_global is None else jnp.asarray(num_tokens_global, jnp.float32)
    return mask / jnp.maximum(count, 1.0)


def global_token_mean(
    per_token: jax.Array, mask: jax.Array, num_tokens_global: jax.Array | int | None = None
) -> jax.Array:
    """Sum of the masked per-token values `[B, T]` divided by the global completion-token count: a scalar.

    Under gradient accumulation (and data parallelism) pass as `num_tokens_global` the number of completion
    tokens in the WHOLE optimizer step: the sum of the masks of every micro-batch on every host, computed once
    before the micro-batch loop (`jnp.sum(step_mask)` on the global array, or a `psum` under `shard_map`). Then
    SUM, not average, the micro-batch losses: the total equals the mean over the full batch, whatever the split.
    `None` uses this batch's own count (correct only without accumulation). A count of 0 is treated as 1.
    """
    return jnp.sum(per_token.astype(jnp.float32) * token_mean_weights(mask, num_tokens_global))


def sequence_mean_weights(mask: jax.Array, num_sequences_global: jax.Array | int | None = None) -> jax.Array:
    """Weights `[B, T]` with `sum(weights * per_token) == sequence_mean(per_token, mask, num_sequences_global)`."""
    mask = mask.astype(jnp.float32)
    lengths = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    count = mask.shape[0] if num_sequences_global is None else jnp.asarray(num_sequences_global, jnp.float32)
    return mask / lengths / jnp.maximum(count, 1.0)


def sequence_mean(
    per_token: jax.Array, mask: jax.Array, num_sequences_global: jax.Array | int | None = None
) -> jax.Array:
    """Mean over each sequence's masked tokens, then over sequences (TRL SDPO): `[B, T]` -> scalar.

    Weighs short completions more than `global_token_mean`. Under gradient accumulation pass the number of
    sequences in the whole optimizer step as `num_sequences_global` and sum the micro-batch losses.
    """
    return jnp.sum(per_token.astype(jnp.float32) * sequence_mean_weights(mask, num_sequences_global))


# --------------------------------------------------------------------------------------------------
# Ablation terms (weight 0 by default)
# --------------------------------------------------------------------------------------------------


def group_normalized_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6) -> jax.Array:
    """GRPO advantages `(r - mean_group) / (std_group + eps)`: rewards `[N]` -> `[N]`.

    Rows are prompt-major (the layout of `opsd_jax.sampling.generate`): rows `i*G ... i*G + G - 1` are the samples
    of prompt i. The standard deviation is the unbiased one, as in TRL's GRPO.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: expected an integer >= 2 (a group's std needs two samples), got {group_size!r}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: expected shape [N], N divisible by group_size={group_size}, got {rewards.shape}")
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = jnp.mean(grouped, axis=-1, keepdims=True)
    std = jnp.std(grouped, axis=-1, keepdims=True, ddof=1)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def policy_gradient_loss(logprobs: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """REINFORCE term `-stopgrad(A) * log pi(y_t)`, masked.

    logprobs `[B, T]` (of the sampled tokens), advantages `[B]` or `[B, T]`, mask `[B, T]` -> `[B, T]`.
    """
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    return -advantages * logprobs.astype(jnp.float32) * mask.astype(jnp.float32)


def label_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Token negative log-likelihood of `labels`, masked: logits `[B, T, V]`, labels / mask `[B, T]` -> `[B, T]`."""
    return -token_logprobs(logits, labels) * mask.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Configuration and dispatch
# --------------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which per-token divergence the trainer minimises, and how it is shaped and reduced.

    divergence: "gjsd" (full vocabulary), "topk" (GJSD on a top-K support), "topk_rkl" (bias-corrected top-K
        reverse KL, RP-OPSD) or "sampled_rkl" (sampled-token reverse KL, REINFORCE form).
    beta: GJSD interpolation (0 forward KL, 1 reverse KL; TRL's convention). temperature: applied to both sides.
    top_k / top_k_support / tail_bucket: the top-K support (divergences "topk" and "topk_rkl").
    is_clip: cap of the truncated importance ratio against the sampler's logprobs; None = no correction.
    token_clip: `min(D_t, token_clip)` after the vocabulary sum; None = no clip (not for "sampled_rkl").
    positive_evidence: keep only tokens where the teacher's logprob of the sampled token exceeds the student's.
    reduction: "token_mean" (sum / global token count) or "sequence_mean".
    chunk_size: completion positions per chunk in the hidden-state forms (memory ~ batch * chunk_size * vocab).
    """

    divergence: str = "gjsd"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int = 100
    top_k_support: str = "student"
    tail_bucket: bool = True
    is_clip: float | None = 2.0
    token_clip: float | None = None
    positive_evidence: bool = False
    reduction: str = "token_mean"
    chunk_size: int = 128

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ValueError(f"LossConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        if self.divergence not in DIVERGENCES:
            fail("divergence", f"one of {DIVERGENCES}")
        if not _is_number(self.beta) or not 0.0 <= self.beta <= 1.0:
            fail("beta", "a number in [0, 1]")
        if not _is_number(self.temperature) or not self.temperature > 0:
            fail("temperature", "a positive number")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            fail("top_k", "an integer >= 1")
        if self.top_k_support not in TOP_K_SUPPORTS:
            fail("top_k_support", f"one of {TOP_K_SUPPORTS}")
        if not isinstance(self.tail_bucket, bool):
            fail("tail_bucket", "a bool")
        if self.is_clip is not None and (not _is_number(self.is_clip) or not self.is_clip > 0):
            fail("is_clip", "a positive number or None")
        if self.token_clip is not None and (not _is_number(self.token_clip) or not self.token_clip > 0):
            fail("token_clip", "a positive number or None")
        if self.token_clip is not None and self.divergence == "sampled_rkl":
            fail("token_clip", "None with divergence='sampled_rkl' (its per-token value is not a divergence)")
        if not isinstance(self.positive_evidence, bool):
            fail("positive_evidence", "a bool")
        if self.reduction not in REDUCTIONS:
            fail("reduction", f"one of {REDUCTIONS}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            fail("chunk_size", "an integer >= 1")


class PerTokenLoss(NamedTuple):
    """Per-token outputs of the dispatch, each `[B, T]`."""

    loss: jax.Array  # what the reduction averages: ratio * min(D, token_clip), zeroed off positive evidence
    divergence: jax.Array  # D_t before clip, ratio and evidence mask (sampled_rkl: s(y) - T(y), detached)
    is_ratio: jax.Array  # truncated importance ratio (ones when is_clip is None)
    evidence: jax.Array  # bool, the positive-evidence mask (all True when it is off)


def _require(value: jax.Array | None, name: str, why: str) -> jax.Array:
    if value is None:
        raise ValueError(f"{name}: required {why}")
    return value


def per_token_divergence(
    config: LossConfig,
    student_logits: jax.Array,
    *,
    completion_ids: jax.Array | None = None,
    teacher_logits: jax.Array | None = None,
    teacher_top_k_logprobs: jax.Array | None = None,
    teacher_top_k_indices: jax.Array | None = None,
    teacher_token_logprobs: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> PerTokenLoss:
    """The configured per-token loss from student logits `[B, T, V]`.

    Teacher signal: `teacher_logits [B, T, V]`, or (top-K divergences with the teacher's support) the teacher's
    stored `teacher_top_k_logprobs` / `teacher_top_k_indices [B, T, K]`, plus `teacher_token_logprobs [B, T]`
    where the sampled tokens' teacher logprobs are needed and no teacher logits are given. `completion_ids [B, T]`
    (the sampled tokens) are needed by "sampled_rkl", `is_clip` and `positive_evidence`; `sampler_logprobs [B, T]`
    by `is_clip`.
    """
    temperature = config.temperature
    uses_tokens = config.divergence == "sampled_rkl" or config.is_clip is not None or config.positive_evidence
    student_token = teacher_token = None
    if uses_tokens:
        why = (
            f"by divergence={config.divergence!r}, is_clip={config.is_clip}, "
            f"positive_evidence={config.positive_evidence}"
        )
        completion_ids = _require(completion_ids, "completion_ids", why)
        student_token = token_logprobs(student_logits, completion_ids, temperature=temperature)
        if teacher_token_logprobs is None and teacher_logits is not None:
            teacher_token_logprobs = token_logprobs(teacher_logits, completion_ids, temperature=temperature)
        if config.divergence == "sampled_rkl" or config.positive_evidence:
            teacher_token = jax.lax.stop_gradient(
                _require(teacher_token_logprobs, "teacher_token_logprobs (or teacher_logits)", why)
            )

    if config.divergence == "sampled_rkl":
        if config.is_clip is not None:
            _require(sampler_logprobs, "sampler_logprobs", f"when is_clip={config.is_clip} is set")
        sampled = sampled_token_reverse_kl(student_token, teacher_token, sampler_logprobs, is_clip=config.is_clip)
        loss, divergence, ratio = sampled.loss, -sampled.advantage, sampled.ratio
    else:
        divergence = _vocabulary_divergence(
            config, student_logits, teacher_logits, teacher_top_k_logprobs, teacher_top_k_indices
        )
        if config.is_clip is None:
            ratio = jnp.ones_like(divergence)
        else:
            sampler_logprobs = _require(sampler_logprobs, "sampler_logprobs", f"when is_clip={config.is_clip} is set")
            ratio = truncated_importance_ratio(student_token, sampler_logprobs, is_clip=config.is_clip)
        loss = ratio * clip_per_token(divergence, config.token_clip)

    if config.positive_evidence:
        evidence = positive_evidence_mask(student_token, teacher_token)
        loss = jnp.where(evidence, loss, 0.0)
    else:
        evidence = jnp.ones(loss.shape, dtype=bool)
    return PerTokenLoss(loss=loss, divergence=divergence, is_ratio=ratio, evidence=evidence)


def _vocabulary_divergence(
    config: LossConfig,
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    teacher_top_k_logprobs: jax.Array | None,
    teacher_top_k_indices: jax.Array | None,
) -> jax.Array:
    if config.divergence == "gjsd":
        teacher_logits = _require(teacher_logits, "teacher_logits", "by divergence='gjsd'")
        return generalized_jsd(student_logits, teacher_logits, beta=config.beta, temperature=config.temperature)
    if teacher_top_k_logprobs is not None and teacher_top_k_indices is not None:
        if config.top_k_support != "teacher":
            raise ValueError(
                "teacher_top_k_logprobs: a stored teacher top-K only serves top_k_support='teacher' "
                "(the teacher's values on the student's support are unknown); pass teacher_logits instead"
            )
        support_logprobs, support_indices = teacher_top_k_logprobs, teacher_top_k_indices
    else:
        why = f"by divergence={config.divergence!r} unless a stored teacher top-K is given"
        support_logprobs, support_indices = _top_k_support(
            student_logits,
            _require(teacher_logits, "teacher_logits", why),
            k=config.top_k,
            support=config.top_k_support,
            temperature=config.temperature,
        )
    if config.divergence == "topk":
        return top_k_divergence_on_support(
            student_logits,
            support_logprobs,
            support_indices,
            tail_bucket=config.tail_bucket,
            beta=config.beta,
            temperature=config.temperature,
        )
    return bias_corrected_top_k_reverse_kl(
        student_logits, support_logprobs, support_indices, temperature=config.temperature
    )


def reduction_weights(
    config: LossConfig,
    mask: jax.Array,
    *,
    num_tokens_global: jax.Array | int | None = None,
    num_sequences_global: jax.Array | int | None = None,
) -> jax.Array:
    """Per-token weights `[B, T]` of the configured reduction: the scalar loss is `sum(weights * per_token.loss)`.

    Tokens dropped by the positive-evidence mask still count in the denominator (their loss is 0), so the
    loss scale does not depend on how many tokens the teacher endorses.
    """
    if config.reduction == "token_mean":
        return token_mean_weights(mask, num_tokens_global)
    return sequence_mean_weights(mask, num_sequences_global)


# --------------------------------------------------------------------------------------------------
# Memory-bounded forms on hidden states: no [B, T, V] float32 tensor is built
# --------------------------------------------------------------------------------------------------


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`[B, T, ...] -> [T / chunk, B, chunk, ...]`, zero-padding T. Chunks split the completion axis, never the
    batch axis, so a batch sharded over data-parallel devices stays sharded inside every chunk."""
    batch, length = x.shape[:2]
    pad = -length % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, (length + pad) // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `_to_chunks`: `[n, B, chunk, ...] -> [B, length, ...]`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _head_logits(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    """Output head in the parameters' dtype with float32 accumulation: `[B, C, H] x [H, V] -> [B, C, V]` float32."""
    return jnp.einsum("bch,hv->bcv", hidden, kernel, preferred_element_type=jnp.float32)


def _constant_inputs(**arrays: jax.Array | None) -> dict[str, jax.Array | None]:
    """The per-token side inputs of the hidden-state forms (teacher signal, sampled tokens): all constants."""
    return {name: None if x is None else jax.lax.stop_gradient(x) for name, x in arrays.items()}


def _check_hidden(student_hidden: jax.Array, head_kernel: jax.Array, teacher_hidden: jax.Array | None) -> None:
    if student_hidden.ndim != 3 or head_kernel.ndim != 2 or student_hidden.shape[-1] != head_kernel.shape[0]:
        raise ValueError(
            f"student_hidden {student_hidden.shape} and head_kernel {head_kernel.shape}: expected [B, T, H] and [H, V]"
        )
    if teacher_hidden is not None:
        _check_same_shape("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)


def _chunk_per_token(
    config: LossConfig, student_logits: jax.Array, teacher_head_kernel: jax.Array, chunk: dict
) -> PerTokenLoss:
    teacher_hidden = chunk["teacher_hidden"]
    return per_token_divergence(
        config,
        student_logits,
        completion_ids=chunk["completion_ids"],
        teacher_logits=None if teacher_hidden is None else _head_logits(teacher_hidden, teacher_head_kernel),
        teacher_top_k_logprobs=chunk["teacher_top_k_logprobs"],
        teacher_top_k_indices=chunk["teacher_top_k_indices"],
        teacher_token_logprobs=chunk["teacher_token_logprobs"],
        sampler_logprobs=chunk["sampler_logprobs"],
    )


def chunked_per_token_divergence(
    config: LossConfig,
    student_hidden: jax.Array,
    head_kernel: jax.Array,
    *,
    completion_ids: jax.Array | None = None,
    teacher_hidden: jax.Array | None = None,
    teacher_head_kernel: jax.Array | None = None,
    teacher_top_k_logprobs: jax.Array | None = None,
    teacher_top_k_indices: jax.Array | None = None,
    teacher_token_logprobs: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> PerTokenLoss:
    """`per_token_divergence` from final hidden states, one completion chunk at a time.

    student_hidden / teacher_hidden `[B, T, H]` (after the final norm), head_kernel `[H, V]` (the teacher's
    defaults to the student's; both teacher inputs are constants). Fully differentiable per token, like the
    logits form. Each chunk runs under `jax.checkpoint`, so the backward pass recomputes the chunk's logits
    instead of keeping them: peak memory ~ a few `[B, chunk_size, V]` float32 buffers plus the `[H, V]` gradient,
    at the price of the head matmuls running twice.
    """
    _check_hidden(student_hidden, head_kernel, teacher_hidden)
    teacher_head_kernel = jax.lax.stop_gradient(head_kernel if teacher_head_kernel is None else teacher_head_kernel)
    inputs = _constant_inputs(
        completion_ids=completion_ids,
        teacher_hidden=teacher_hidden,
        teacher_top_k_logprobs=teacher_top_k_logprobs,
        teacher_top_k_indices=teacher_top_k_indices,
        teacher_token_logprobs=teacher_token_logprobs,
        sampler_logprobs=sampler_logprobs,
    )
    inputs["student_hidden"] = student_hidden
    length = student_hidden.shape[1]
    chunks = jax.tree.map(lambda x: _to_chunks(x, min(config.chunk_size, length)), inputs)

    @jax.checkpoint
    def one_chunk(chunk: dict) -> PerTokenLoss:
        student_logits = _head_logits(chunk["student_hidden"], head_kernel)
        return _chunk_per_token(config, student_logits, teacher_head_kernel, chunk)

    return jax.tree.map(lambda x: _from_chunks(x, length), jax.lax.map(one_chunk, chunks))


def chunked_generalized_jsd(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    head_kernel: jax.Array,
    *,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int = 128,
    teacher_head_kernel: jax.Array | None = None,
) -> jax.Array:
    """`generalized_jsd(student_hidden @ head_kernel, teacher_hidden @ teacher_head_kernel)` without the logits.

    student_hidden / teacher_hidden `[B, T, H]`, head_kernel `[H, V]` -> `[B, T]`; see
    `chunked_per_token_divergence` for the memory bound. The teacher side is a constant.
    """
    _check_beta(beta)
    config = LossConfig(divergence="gjsd", beta=beta, temperature=temperature, is_clip=None, chunk_size=chunk_size)
    return chunked_per_token_divergence(
        config, student_hidden, head_kernel, teacher_hidden=teacher_hidden, teacher_head_kernel=teacher_head_kernel
    ).loss


def fused_distillation_loss(
    config: LossConfig,
    student_hidden: jax.Array,
    head_kernel: jax.Array,
    token_weights: jax.Array,
    *,
    completion_ids: jax.Array | None = None,
    teacher_hidden: jax.Array | None = None,
    teacher_head_kernel: jax.Array | None = None,
    teacher_top_k_logprobs: jax.Array | None = None,
    teacher_top_k_indices: jax.Array | None = None,
    teacher_token_logprobs: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> tuple[jax.Array, PerTokenLoss]:
    """Scalar loss `sum(token_weights * per_token.loss)` and its gradient in one pass over completion chunks.

    Inputs as in `chunked_per_token_divergence`, plus `token_weights [B, T]` from `reduction_weights` (a
    constant). Because the output is a scalar, each chunk's gradient w.r.t. `student_hidden` and `head_kernel`
    is formed in the forward scan (value_and_grad per chunk, the `[H, V]` gradient accumulated in float32) and
    the backward pass only scales it: the head matmuls run once, as in the naive form, and memory stays at a
    few `[B, chunk_size, V]` buffers. The returned per-token values are metrics and carry no gradient.
    """
    _check_hidden(student_hidden, head_kernel, teacher_hidden)
    _check_same_shape("token_weights", token_weights, "student_hidden[..., 0]", student_hidden[..., 0])
    teacher_head_kernel = head_kernel if teacher_head_kernel is None else teacher_head_kernel
    inputs = _constant_inputs(
        completion_ids=completion_ids,
        teacher_hidden=teacher_hidden,
        teacher_top_k_logprobs=teacher_top_k_logprobs,
        teacher_top_k_indices=teacher_top_k_indices,
        teacher_token_logprobs=teacher_token_logprobs,
        sampler_logprobs=sampler_logprobs,
    )
    inputs["token_weights"] = jax.lax.stop_gradient(token_weights.astype(jnp.float32))
    loss, per_token = _fused_loss(config, student_hidden, head_kernel, teacher_head_kernel, inputs)
    return loss, jax.tree.map(jax.lax.stop_gradient, per_token)


def _fused_scan(
    config: LossConfig,
    student_hidden: jax.Array,
    head_kernel: jax.Array,
    teacher_head_kernel: jax.Array,
    inputs: dict,
    *,
    with_grad: bool,
) -> tuple[jax.Array, PerTokenLoss, tuple[jax.Array, jax.Array] | None]:
    """Returns (loss, per-token outputs [B, T], (d_hidden [B, T, H] f32, d_kernel [H, V] f32) or None)."""
    teacher_head_kernel = jax.lax.stop_gradient(teacher_head_kernel)
    length = student_hidden.shape[1]
    chunks = jax.tree.map(
        lambda x: _to_chunks(x, min(config.chunk_size, length)), dict(inputs, student_hidden=student_hidden)
    )

    def objective(student_logits: jax.Array, chunk: dict) -> tuple[jax.Array, PerTokenLoss]:
        per_token = _chunk_per_token(config, student_logits, teacher_head_kernel, chunk)
        return jnp.sum(chunk["token_weights"] * per_token.loss), per_token

    def step(d_kernel, chunk):
        hidden = chunk["student_hidden"]
        student_logits = _head_logits(hidden, head_kernel)
        if not with_grad:
            return d_kernel, objective(student_logits, chunk)
        (value, per_token), d_logits = jax.value_and_grad(objective, has_aux=True)(student_logits, chunk)
        # The head's backward matmuls in the parameters' dtype with float32 accumulation, like autodiff would.
        d_hidden = jnp.einsum(
            "bcv,hv->bch", d_logits.astype(head_kernel.dtype), head_kernel, preferred_element_type=jnp.float32
        )
        d_kernel = d_kernel + jnp.einsum(
            "bch,bcv->hv", hidden, d_logits.astype(hidden.dtype), preferred_element_type=jnp.float32
        )
        return d_kernel, ((value, per_token), d_hidden)

    init = jnp.zeros(head_kernel.shape, jnp.float32) if with_grad else None
    d_kernel, outputs = jax.lax.scan(step, init, chunks)
    if with_grad:
        outputs, d_hidden = outputs
    values, per_token = outputs
    per_token = jax.tree.map(lambda x: _from_chunks(x, length), per_token)
    grads = (_from_chunks(d_hidden, length), d_kernel) if with_grad else None
    return jnp.sum(values), per_token, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(config, student_hidden, head_kernel, teacher_head_kernel, inputs):
    loss, per_token, _ = _fused_scan(config, student_hidden, head_kernel, teacher_head_kernel, inputs, with_grad=False)
    return loss, per_token


def _fused_loss_fwd(config, student_hidden, head_kernel, teacher_head_kernel, inputs):
    loss, per_token, (d_hidden, d_kernel) = _fused_scan(
        config, student_hidden, head_kernel, teacher_head_kernel, inputs, with_grad=True
    )
    grads = (d_hidden.astype(student_hidden.dtype), d_kernel.astype(head_kernel.dtype))
    no_gradient = jax.tree.map(lambda _: None, inputs)
    return (loss, per_token), (grads, no_gradient)


def _fused_loss_bwd(config, residuals, cotangents):
    (d_hidden, d_kernel), no_gradient = residuals
    d_loss = cotangents[0]  # the per-token outputs are metrics: `fused_distillation_loss` stops their gradient
    scale = lambda grad: (grad * d_loss).astype(grad.dtype)  # noqa: E731
    return scale(d_hidden), scale(d_kernel), None, no_gradient


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


class TeacherScores(NamedTuple):
    """What a teacher scoring pass keeps instead of `[B, T, V]` logits."""

    token_logprobs: jax.Array  # [B, T] the sampled tokens' teacher logprobs
    top_k_logprobs: jax.Array  # [B, T, K] normalised over the full vocabulary
    top_k_indices: jax.Array  # [B, T, K] int32
    entropy: jax.Array  # [B, T] of the (tempered) distribution, in nats


def chunked_teacher_scores(
    teacher_hidden: jax.Array,
    head_kernel: jax.Array,
    completion_ids: jax.Array,
    *,
    top_k: int,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> TeacherScores:
    """Logprobs of the sampled tokens, the top-K and the entropy, from hidden states `[B, T, H]` and `[H, V]`, by
    chunks (the teacher's scores; on the student's states, its metrics).

    No gradient flows; memory ~ one `[B, chunk_size, V]` float32 buffer.
    """
    _check_hidden(teacher_hidden, head_kernel, None)
    _check_top_k(top_k, head_kernel.shape[-1])
    head_kernel = jax.lax.stop_gradient(head_kernel)
    length = teacher_hidden.shape[1]
    chunk = min(chunk_size, length)
    chunks = (_to_chunks(jax.lax.stop_gradient(teacher_hidden), chunk), _to_chunks(completion_ids, chunk))

    def one_chunk(hidden_and_ids: tuple[jax.Array, jax.Array]) -> TeacherScores:
        hidden, ids = hidden_and_ids
        logits = _head_logits(hidden, head_kernel)
        values, indices = top_k_logprobs(logits, top_k, temperature=temperature)
        return TeacherScores(
            token_logprobs(logits, ids, temperature=temperature),
            values,
            indices,
            entropy(logits, temperature=temperature),
        )

    return jax.tree.map(lambda x: _from_chunks(x, length), jax.lax.map(one_chunk, chunks))
