"""Placing encoder outputs into the token embeddings at their placeholder tokens.

The reference (`masked_scatter` in `Qwen2_5OmniThinkerModel.forward`) fills the positions holding a
modality's placeholder id with that modality's features, consumed in row-major (batch, seq) order; the
placeholder's own embedding is discarded. Here the same as a gather, so it jits with static shapes:
features arrive padded to a bucket and `num_valid` says how many of them are real.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def merge_modal_embeddings(
    embeds: jax.Array,
    input_ids: jax.Array,
    token_id: int,
    features: jax.Array,
    num_valid: jax.Array | int,
    *,
    repeats: int = 1,
) -> jax.Array:
    """`embeds [batch, seq, hidden]` with placeholder slots replaced by `features [num_padded, hidden]`.

    The k-th placeholder (counting row by row, left to right) of `input_ids [batch, seq]` receives
    `features[k]` for k < `num_valid`; rows of `features` from `num_valid` on are padding and never read.
    With `repeats > 1`, the batch holds each prompt `repeats` times in a row (prompt-major, as rollouts
    are) while `features` are those of the distinct prompts: every copy of a prompt reads its prompt's
    features, which are thus encoded once.
    Call `check_placeholder_count` on the host first: inside jit a mismatch cannot raise, and
    placeholders beyond `num_valid` would silently keep their token embedding.
    """
    mask = input_ids == token_id
    per_row = jnp.sum(mask, axis=1, dtype=jnp.int32)
    per_prompt = per_row[::repeats]
    # Index of each row's first feature: the placeholders of all earlier prompts.
    first = jnp.repeat(jnp.cumsum(per_prompt) - per_prompt, repeats)  # static count: a broadcast, not a gather
    feature_index = first[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    take = mask & (feature_index < num_valid)
    gathered = jnp.take(features, jnp.clip(feature_index, 0, features.shape[0] - 1), axis=0)
    return jnp.where(take[..., None], gathered.astype(embeds.dtype), embeds)


def check_placeholder_count(input_ids: np.ndarray, token_id: int, num_features: int, modality: str) -> None:
    """Host-side check that `input_ids` holds exactly one placeholder per feature row of `modality`."""
    num_placeholders = int(np.sum(np.asarray(input_ids) == token_id))
    if num_placeholders != num_features:
        raise ValueError(
            f"{modality}: input_ids hold {num_placeholders} placeholder tokens (id {token_id}) but the {modality} "
            f"encoder gave {num_features} features; they must be equal"
        )
