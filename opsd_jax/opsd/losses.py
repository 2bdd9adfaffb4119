"""The distillation objective a run configures: `LossConfig`, the table of divergence forms, and the per-token loss.

Each value of `loss.divergence` names one form (`DIVERGENCE_FORMS`): a small object that says which teacher
signal it needs (`signal_request`, asked by `opsd_jax.opsd.teacher`) and computes the per-token loss from the
student's logits `[B, T, V]` and a `TeacherSignal`. The math is `opsd_jax.opsd.divergences`' pure functions;
the forms are the thin table around them. `per_token_divergence` is the dispatch on logits (`per_token_loss` with
the teacher's side as a `TeacherSignal`, which the hidden-state forms in `opsd_jax.opsd.chunked_losses` call one
completion chunk at a time). A reduction
(`reduction_weights`) turns the per-token values into the scalar loss.
"""

from __future__ import annotations

import abc
import dataclasses
import types
from typing import ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from opsd_jax.models.scoring import SignalRequest, TeacherSignal, token_logprobs
from opsd_jax.opsd.divergences import (
    TOP_K_SUPPORTS,
    bias_corrected_top_k_reverse_kl,
    generalized_jsd,
    sampled_token_reverse_kl,
    top_k_divergence_on_support,
    top_k_support,
    truncated_importance_ratio,
)
from opsd_jax.opsd.reductions import (
    REDUCTIONS,
    clip_per_token,
    positive_evidence_mask,
    sequence_mean_weights,
    token_mean_weights,
)

# The values `LossConfig.divergence` accepts; each must have an entry in `DIVERGENCE_FORMS` (a test checks).
DIVERGENCES = ("gjsd", "topk", "topk_rkl", "sampled_rkl")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which per-token divergence the trainer minimises, and how it is shaped and reduced.

    divergence: "gjsd" (full vocabulary), "topk" (GJSD on a top-K support), "topk_rkl" (bias-corrected top-K
        reverse KL, RP-OPSD) or "sampled_rkl" (sampled-token reverse KL, REINFORCE form).
    beta: GJSD interpolation (0 forward KL, 1 reverse KL; TRL's convention). temperature: applied to both sides.
    top_k / top_k_support / tail_bucket: the top-K support (divergences "topk" and "topk_rkl"; with them the step
        also logs `top_k_mass`, the student's mass on its top_k tokens).
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
        if self.token_clip is not None and not divergence_form(self).is_divergence:
            fail("token_clip", f"None with divergence={self.divergence!r} (its per-token value is not a divergence)")
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


# --------------------------------------------------------------------------------------------------
# The divergence forms
# --------------------------------------------------------------------------------------------------


class Divergence(abc.ABC):
    """One form of the per-token loss: which teacher signal it needs, and its value from the student's logits."""

    # False for an estimator whose per-token value is a surrogate of a divergence, not one: `token_clip` does not
    # apply to it, and it is computed from the sampled tokens' log-probabilities alone.
    is_divergence: ClassVar[bool] = True
    # True for a form summed over a top-`config.top_k` support: the step then logs the student's top-K mass
    # (how much of its distribution the support can hold). The other forms never sort the vocabulary, and the
    # metric alone would: a sort of every completion position's logits (~7 ms of a 7B step on v5p).
    uses_top_k: ClassVar[bool] = False

    @abc.abstractmethod
    def signal_request(self, config: LossConfig) -> SignalRequest:
        """What the teacher's pass over the completions keeps for this form under `config`."""

    @abc.abstractmethod
    def per_token(
        self,
        config: LossConfig,
        student_logits: jax.Array,
        teacher: TeacherSignal,
        student_token: jax.Array | None,
        teacher_token: jax.Array | None,
        sampler_logprobs: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(loss, divergence, importance ratio), each `[B, T]`, before the positive-evidence mask.

        student_logits `[B, T, V]`; student_token / teacher_token `[B, T]`: the sampled tokens' log-probabilities
        (None when neither the form, `is_clip` nor `positive_evidence` needs them; the teacher's is a constant);
        sampler_logprobs `[B, T]`: the behaviour distribution's, for the importance ratio.
        """


class _SupportDivergence(Divergence):
    """A divergence summed over a support of the vocabulary: `loss = ratio * min(D, token_clip)`."""

    @abc.abstractmethod
    def divergence(self, config: LossConfig, student_logits: jax.Array, teacher: TeacherSignal) -> jax.Array:
        """D_t `[B, T]` from student logits `[B, T, V]` and the teacher's signal."""

    def per_token(self, config, student_logits, teacher, student_token, teacher_token, sampler_logprobs):
        divergence = self.divergence(config, student_logits, teacher)
        if config.is_clip is None:
            ratio = jnp.ones_like(divergence)
        else:
            sampler_logprobs = _require(sampler_logprobs, "sampler_logprobs", f"when is_clip={config.is_clip} is set")
            ratio = truncated_importance_ratio(student_token, sampler_logprobs, is_clip=config.is_clip)
        return ratio * clip_per_token(divergence, config.token_clip), divergence, ratio


class GeneralizedJSD(_SupportDivergence):
    """ "gjsd": GJSD_beta over the full vocabulary, from the teacher's logits (formed chunk by chunk from its hidden
    states)."""

    def signal_request(self, config: LossConfig) -> SignalRequest:
        return SignalRequest(hidden=True, temperature=config.temperature, chunk_size=config.chunk_size)

    def divergence(self, config, student_logits, teacher):
        teacher_logits = _require(teacher.logits, "teacher_logits", f"by divergence={config.divergence!r}")
        return generalized_jsd(student_logits, teacher_logits, beta=config.beta, temperature=config.temperature)


class _TopKDivergence(_SupportDivergence):
    """A divergence on a top-K support: the student's K most likely tokens (from the teacher's full logits) or the
    teacher's (its stored top-K, so the teacher's pass keeps `[B, T, K]` instead of hidden states)."""

    uses_top_k = True

    def signal_request(self, config: LossConfig) -> SignalRequest:
        if config.top_k_support == "teacher":
            return SignalRequest(
                hidden=False, top_k=config.top_k, temperature=config.temperature, chunk_size=config.chunk_size
            )
        return SignalRequest(hidden=True, temperature=config.temperature, chunk_size=config.chunk_size)

    @abc.abstractmethod
    def on_support(
        self, config: LossConfig, student_logits: jax.Array, support_logprobs: jax.Array, support_indices: jax.Array
    ) -> jax.Array:
        """D_t `[B, T]` from student logits `[B, T, V]`, the teacher's log-probs on the support and its ids
        `[B, T, K]`."""

    def divergence(self, config, student_logits, teacher):
        if teacher.top_k_logprobs is not None and teacher.top_k_indices is not None:
            if config.top_k_support != "teacher":
                raise ValueError(
                    "teacher_top_k_logprobs: a stored teacher top-K only serves top_k_support='teacher' "
                    "(the teacher's values on the student's support are unknown); pass teacher_logits instead"
                )
            support_logprobs, support_indices = teacher.top_k_logprobs, teacher.top_k_indices
        else:
            why = f"by divergence={config.divergence!r} unless a stored teacher top-K is given"
            support_logprobs, support_indices = top_k_support(
                student_logits,
                _require(teacher.logits, "teacher_logits", why),
                k=config.top_k,
                support=config.top_k_support,
                temperature=config.temperature,
            )
        return self.on_support(config, student_logits, support_logprobs, support_indices)


class TopKGeneralizedJSD(_TopKDivergence):
    """ "topk": GJSD_beta on the support, with a tail bucket or renormalised (`tail_bucket`)."""

    def on_support(self, config, student_logits, support_logprobs, support_indices):
        return top_k_divergence_on_support(
            student_logits,
            support_logprobs,
            support_indices,
            tail_bucket=config.tail_bucket,
            beta=config.beta,
            temperature=config.temperature,
        )


class TopKReverseKL(_TopKDivergence):
    """ "topk_rkl": RP-OPSD's bias-corrected reverse KL on the support."""

    def on_support(self, config, student_logits, support_logprobs, support_indices):
        return bias_corrected_top_k_reverse_kl(
            student_logits, support_logprobs, support_indices, temperature=config.temperature
        )


class SampledReverseKL(Divergence):
    """ "sampled_rkl": the reverse KL estimated from the sampled token alone (REINFORCE form); the teacher's pass
    keeps only the sampled tokens' log-probabilities. Its divergence metric is `s(y) - T(y)`."""

    is_divergence = False

    def signal_request(self, config: LossConfig) -> SignalRequest:
        return SignalRequest(hidden=False, temperature=config.temperature, chunk_size=config.chunk_size)

    def per_token(self, config, student_logits, teacher, student_token, teacher_token, sampler_logprobs):
        if config.is_clip is not None:
            _require(sampler_logprobs, "sampler_logprobs", f"when is_clip={config.is_clip} is set")
        sampled = sampled_token_reverse_kl(student_token, teacher_token, sampler_logprobs, is_clip=config.is_clip)
        return sampled.loss, -sampled.advantage, sampled.ratio


# `loss.divergence` -> its form: the one place a divergence's name is read.
DIVERGENCE_FORMS: Mapping[str, Divergence] = types.MappingProxyType(
    {
        "gjsd": GeneralizedJSD(),
        "topk": TopKGeneralizedJSD(),
        "topk_rkl": TopKReverseKL(),
        "sampled_rkl": SampledReverseKL(),
    }
)


def divergence_form(config: LossConfig) -> Divergence:
    """The form `config.divergence` names."""
    return DIVERGENCE_FORMS[config.divergence]


# --------------------------------------------------------------------------------------------------
# The per-token dispatch and the reduction
# --------------------------------------------------------------------------------------------------


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
    teacher = TeacherSignal(
        logits=teacher_logits,
        token_logprobs=teacher_token_logprobs,
        top_k_logprobs=teacher_top_k_logprobs,
        top_k_indices=teacher_top_k_indices,
    )
    return per_token_loss(
        config, student_logits, teacher, completion_ids=completion_ids, sampler_logprobs=sampler_logprobs
    )


def per_token_loss(
    config: LossConfig,
    student_logits: jax.Array,
    teacher: TeacherSignal,
    *,
    completion_ids: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> PerTokenLoss:
    """`per_token_divergence` with the teacher's side as a `TeacherSignal` (its `logits`, `token_logprobs`,
    `top_k_logprobs` / `top_k_indices`; its `hidden` is not read: the hidden-state forms turn it into logits)."""
    form = divergence_form(config)
    temperature = config.temperature
    samples = not form.is_divergence
    uses_tokens = samples or config.is_clip is not None or config.positive_evidence
    student_token = teacher_token = None
    if uses_tokens:
        why = (
            f"by divergence={config.divergence!r}, is_clip={config.is_clip}, "
            f"positive_evidence={config.positive_evidence}"
        )
        completion_ids = _require(completion_ids, "completion_ids", why)
        student_token = token_logprobs(student_logits, completion_ids, temperature=temperature)
        teacher_token_logprobs = teacher.token_logprobs
        if teacher_token_logprobs is None and teacher.logits is not None:
            teacher_token_logprobs = token_logprobs(teacher.logits, completion_ids, temperature=temperature)
        if samples or config.positive_evidence:
            teacher_token = jax.lax.stop_gradient(
                _require(teacher_token_logprobs, "teacher_token_logprobs (or teacher_logits)", why)
            )

    loss, divergence, ratio = form.per_token(
        config, student_logits, teacher, student_token, teacher_token, sampler_logprobs
    )
    if config.positive_evidence:
        evidence = positive_evidence_mask(student_token, teacher_token)
        loss = jnp.where(evidence, loss, 0.0)
    else:
        evidence = jnp.ones(loss.shape, dtype=bool)
    return PerTokenLoss(loss=loss, divergence=divergence, is_ratio=ratio, evidence=evidence)


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
