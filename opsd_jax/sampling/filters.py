"""Pure sampling filters: temperature, top-k, top-p, and the draw with its log-probabilities.

The order is that of transformers' logits processors: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """`[..., vocab]`: logits below the k-th largest become -inf (ties at the k-th value are kept)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """`[..., vocab]`: keeps the smallest set of most likely tokens whose probability reaches `top_p`.

    The token that crosses the threshold is kept, and so is the most likely token always, as
    transformers' `TopPLogitsWarper` does.
    """
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, NEG_INF)


def sampling_logits(logits: jax.Array, *, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """The (tempered, filtered) float32 logits of the distribution tokens are drawn from; `temperature > 0`."""
    scaled = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        scaled = top_k_filter(scaled, top_k)
    if top_p is not None:
        scaled = top_p_filter(scaled, top_p)
    return scaled


def sample_tokens(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      key: a PRNG key, or one per row (`[batch]`).
      logits: `[batch, vocab]` raw model logits.
      temperature: 0 means greedy (argmax).

    Returns:
      tokens `[batch]` int32;
      sampled_logprob `[batch]`: log-probability of the token under the distribution actually
        sampled from (tempered and filtered; 0 for greedy, which is deterministic);
      model_logprob `[batch]`: log-probability under the plain model (temperature 1, no filter)
        (importance ratios use `sampled_logprob`, the distribution actually drawn from).
    """
    model_logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampled = jnp.zeros(tokens.shape, jnp.float32)
    else:
        filtered = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        if key.ndim:  # a key per row
            tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, filtered).astype(jnp.int32)
        else:
            tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        sampled = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
    model = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, sampled, model
