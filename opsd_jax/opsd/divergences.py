"""The per-token divergences of on-policy self-distillation as pure, stateless JAX functions.

Notation (reference/on_policy_self_distillation.md §4): per completion token t, `s_t = log p_student(. | x, y<t)`
(gradients flow), `T_t = log p_teacher(. | x, rationale, y<t)` (always under `stop_gradient`: no function here
lets a gradient reach the teacher), `q_t` = the sampler's log-probability of the sampled token y_t.

Conventions:
- logits are `[batch, completion, vocab]`, per-token values `[batch, completion]`; the logits are already aligned
  with the completion (position t predicts y_t, i.e. the caller sliced `logits[:, -C-1:-1]`).
- All math is float32 whatever the input dtype (bfloat16 logits are upcast before any softmax).
- `beta` follows TRL: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), in between the
  generalized Jensen-Shannon divergence with the mixture `(1 - beta) * student + beta * teacher`.

Which of them a run minimises, and with which teacher signal, is `opsd_jax.opsd.losses`' table.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opsd_jax.models.scoring import check_top_k, logprobs_from_logits, vocab_top_k

# Log of the total mass captured by a top-K support is clamped just below 0 so that the tail bucket
# log(1 - captured) stays finite when the support holds (numerically) all of the mass. TRL uses the same bound.
_MAX_CAPTURED_LOG_MASS = -1e-7
# The log importance ratio is clamped before exp so that a stale sampler logprob cannot overflow.
_MAX_ABS_LOG_RATIO = 20.0

TOP_K_SUPPORTS = ("student", "teacher")


def check_beta(beta: float) -> None:
    if isinstance(beta, jax.Array) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta: expected a Python number in [0, 1] (the endpoints are special-cased), got {beta!r}")


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape}: expected the same shape")


# --------------------------------------------------------------------------------------------------
# Full-vocabulary and top-K divergences
# --------------------------------------------------------------------------------------------------


def generalized_jsd_from_logprobs(student_logprobs: jax.Array, teacher_logprobs: jax.Array, beta: float) -> jax.Array:
    """GJSD_beta between two normalised distributions given as log-probs `[..., N]`, summed over N: `[...]`.

    The mixture is formed in log space. The terms are summed over the categories before any per-token clip,
    because individual terms can be negative and cancel (reference §4.1).
    """
    check_beta(beta)
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
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
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


def top_k_support(
    student_logits: jax.Array, teacher_logits: jax.Array, *, k: int, support: str, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """The K most likely tokens of `support`'s side and the teacher's log-probs on them, `[B, T, K]` each."""
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_support(support)
    check_top_k(k, student_logits.shape[-1])
    teacher = logprobs_from_logits(jax.lax.stop_gradient(teacher_logits), temperature)
    # Dividing by a positive temperature keeps the order, so the raw student logits rank the same way.
    ranked = jax.lax.stop_gradient(student_logits) if support == "student" else teacher
    _, indices = vocab_top_k(ranked, k)
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
    support_logprobs, indices = top_k_support(
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
    check_same_shape("support_teacher_logprobs", support_teacher_logprobs, "support_indices", support_indices)
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
    check_same_shape("support_teacher_logprobs", support_teacher_logprobs, "support_indices", support_indices)
    student = logprobs_from_logits(student_logits, temperature)
    s = jnp.take_along_axis(student, support_indices.astype(jnp.int32), axis=-1)
    t = jax.lax.stop_gradient(support_teacher_logprobs.astype(jnp.float32))
    student_p, teacher_p = jnp.exp(s), jnp.exp(t)
    return jnp.sum(student_p * (s - t) - student_p + teacher_p, axis=-1)


# --------------------------------------------------------------------------------------------------
# Sampled-token estimator
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
    check_same_shape("student_logprobs", student, "teacher_logprobs", teacher)
    advantage = jax.lax.stop_gradient(teacher - student)
    if is_clip is None:
        ratio = jnp.ones_like(student)
    else:
        if sampler_logprobs is None:
            raise ValueError("sampler_logprobs: required when is_clip is set (is_clip=None skips the correction)")
        ratio = truncated_importance_ratio(student, sampler_logprobs, is_clip=is_clip)
    return SampledTokenLoss(loss=-advantage * ratio * student, advantage=advantage, ratio=ratio)
