"""From per-token values to the scalar loss: the per-token clip, the positive-evidence mask and the reductions.

Per-token values and masks are `[batch, completion]`. A reduction's weights are formed once per step (from the
whole step's token or sequence count), so that summing the micro-batches' `sum(weights * per_token)` gives the
mean over the full batch, whatever the split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("token_mean", "sequence_mean")


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
