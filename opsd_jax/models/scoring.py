"""What the output head says about given tokens: log-probabilities, top-K and entropy, and the teacher signal.

Two halves:
* on logits `[B, T, V]`: `logprobs_from_logits`, `token_logprobs`, `top_k_logprobs`, `entropy` (float32 math
  whatever the input dtype);
* on final hidden states `[B, T, H]` and the head kernel `[H, V]`, one completion chunk at a time so that no
  `[B, T, V]` float32 tensor is kept: `chunked_scores`, and `signal_from_hidden`, which keeps what a
  `SignalRequest` asks for in a `TeacherSignal`.

They sit with the model (not with the losses) because scoring completions is part of the thinker's inference
interface (`Qwen2_5OmniThinker.score_completions`), and the model may not import the method's packages.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")


def check_top_k(k: int, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"top_k: expected an integer in [1, vocab={vocab}], got {k!r}")


def check_hidden(hidden: jax.Array, head_kernel: jax.Array) -> None:
    if hidden.ndim != 3 or head_kernel.ndim != 2 or hidden.shape[-1] != head_kernel.shape[0]:
        raise ValueError(
            f"student_hidden {hidden.shape} and head_kernel {head_kernel.shape}: expected [B, T, H] and [H, V]"
        )


def vocab_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
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
    check_temperature(temperature)
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
    check_top_k(k, logits.shape[-1])
    logprobs = logprobs_from_logits(logits, temperature)
    values, indices = vocab_top_k(logprobs, k)
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
# By completion chunks, from hidden states
# --------------------------------------------------------------------------------------------------


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`[B, T, ...] -> [T / chunk, B, chunk, ...]`, zero-padding T. Chunks split the completion axis, never the
    batch axis, so a batch sharded over data-parallel devices stays sharded inside every chunk."""
    batch, length = x.shape[:2]
    pad = -length % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, (length + pad) // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_chunks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `to_chunks`: `[n, B, chunk, ...] -> [B, length, ...]`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def head_logits(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    """Output head in the parameters' dtype with float32 accumulation: `[B, C, H] x [H, V] -> [B, C, V]` float32."""
    return jnp.einsum("bch,hv->bcv", hidden, kernel, preferred_element_type=jnp.float32)


class TokenScores(NamedTuple):
    """What a scoring pass keeps instead of `[B, T, V]` logits."""

    token_logprobs: jax.Array  # [B, T] the given tokens' logprobs
    top_k_logprobs: jax.Array  # [B, T, K] normalised over the full vocabulary
    top_k_indices: jax.Array  # [B, T, K] int32
    entropy: jax.Array  # [B, T] of the (tempered) distribution, in nats


def chunked_scores(
    hidden: jax.Array,
    head_kernel: jax.Array,
    token_ids: jax.Array,
    *,
    top_k: int,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> TokenScores:
    """Logprobs of the given tokens, the top-K and the entropy, from hidden states `[B, T, H]` and `[H, V]`, by
    chunks (the teacher's scores; on the student's states, its metrics).

    No gradient flows; memory ~ one `[B, chunk_size, V]` float32 buffer.
    """
    check_hidden(hidden, head_kernel)
    check_top_k(top_k, head_kernel.shape[-1])
    head_kernel = jax.lax.stop_gradient(head_kernel)
    length = hidden.shape[1]
    chunk = min(chunk_size, length)
    chunks = (to_chunks(jax.lax.stop_gradient(hidden), chunk), to_chunks(token_ids, chunk))

    def one_chunk(hidden_and_ids: tuple[jax.Array, jax.Array]) -> TokenScores:
        hidden, ids = hidden_and_ids
        logits = head_logits(hidden, head_kernel)
        values, indices = top_k_logprobs(logits, top_k, temperature=temperature)
        return TokenScores(
            token_logprobs(logits, ids, temperature=temperature),
            values,
            indices,
            entropy(logits, temperature=temperature),
        )

    return jax.tree.map(lambda x: from_chunks(x, length), jax.lax.map(one_chunk, chunks))


# --------------------------------------------------------------------------------------------------
# The teacher signal
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SignalRequest:
    """What a divergence needs of the teacher's pass over the completions (static, hashable).

    hidden: the final hidden states and the output head, from which the loss forms the teacher's full
      logits one completion chunk at a time (full-vocabulary divergences, or a top-K on the student's support);
      otherwise the sampled tokens' log-probabilities, and with `top_k` > 0 the teacher's top-K of them.
    temperature / chunk_size: of the scoring pass (the loss's).
    """

    hidden: bool
    top_k: int = 0
    temperature: float = 1.0
    chunk_size: int = 128


@struct.dataclass
class TeacherSignal:
    """The teacher's side of a distillation loss over `[B * G, C]` completion tokens; fields it was not asked
    for are None. Every array is under `stop_gradient`.

    hidden: `[B * G, C, hidden]` final-norm states that predict each completion token, with
    head_kernel: `[hidden, V]` the teacher's output head.
    logits: `[rows, C, V]` the teacher's logits (only where a loss is given logits directly, e.g. per chunk).
    token_logprobs: `[B * G, C]` the sampled tokens' log-probabilities (at the loss temperature).
    top_k_logprobs / top_k_indices: `[B * G, C, K]` the teacher's K most likely tokens, normalised over the
      full vocabulary, and their ids (int32).
    """

    hidden: jax.Array | None = None
    head_kernel: jax.Array | None = None
    logits: jax.Array | None = None
    token_logprobs: jax.Array | None = None
    top_k_logprobs: jax.Array | None = None
    top_k_indices: jax.Array | None = None


def signal_from_hidden(
    hidden: jax.Array, head_kernel: jax.Array, completion: jax.Array, request: SignalRequest
) -> TeacherSignal:
    """The teacher signal `request` asks for, from hidden states `[B * G, C, hidden]`, the output head
    `[hidden, V]` and the sampled tokens `completion [B * G, C]`."""
    hidden, head_kernel = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head_kernel)
    if request.hidden:
        return TeacherSignal(hidden=hidden, head_kernel=head_kernel)
    scores = chunked_scores(
        hidden,
        head_kernel,
        completion,
        top_k=max(request.top_k, 1),
        temperature=request.temperature,
        chunk_size=request.chunk_size,
    )
    if not request.top_k:
        return TeacherSignal(token_logprobs=scores.token_logprobs)
    return TeacherSignal(
        token_logprobs=scores.token_logprobs, top_k_logprobs=scores.top_k_logprobs, top_k_indices=scores.top_k_indices
    )
