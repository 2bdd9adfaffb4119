"""The paper's ablation terms (weight 0 by default), added to the distillation loss by `opsd_jax.opsd.step`:
a label-reward policy gradient (GRPO-style advantages) and the label cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from opsd_jax.models.scoring import token_logprobs


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
