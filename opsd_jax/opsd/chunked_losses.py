"""The distillation loss from final hidden states, one completion chunk at a time: no `[B, T, V]` float32 tensor.

The logits forms (`opsd_jax.opsd.losses.per_token_divergence`) build `[batch, completion, vocab]` float32 tensors
(2.5 GB each for Qwen2.5-Omni's 151,936-token vocabulary at 4 x 1,024 tokens). These never do:
`chunked_per_token_divergence` (and its GJSD shorthand `chunked_generalized_jsd`) maps over completion chunks
under `jax.checkpoint`, recomputing each chunk's logits in the backward pass; `fused_distillation_loss`
computes the scalar loss and its gradient in a single scan (a custom VJP), without the recomputation, and scores
the sampled tokens for the step's metrics on the same logits (`SampledScores`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from opsd_jax.models.scoring import (
    TeacherSignal,
    check_hidden,
    check_top_k,
    entropy,
    from_chunks,
    head_logits,
    to_chunks,
    token_logprobs,
    top_k_mass,
)
from opsd_jax.opsd.divergences import check_beta, check_same_shape
from opsd_jax.opsd.losses import LossConfig, PerTokenLoss, per_token_loss
from opsd_jax.sharding import constrain_activation


def _constant_inputs(
    *, teacher: TeacherSignal, completion_ids: jax.Array | None, sampler_logprobs: jax.Array | None
) -> dict:
    """The per-token side inputs of the hidden-state forms (the teacher's per-token signal, the sampled tokens and
    their sampler log-probabilities), all constants: `{"completion_ids", "sampler_logprobs", "teacher"}`. The
    teacher's head kernel is not per token: it is passed beside the chunks."""
    constant = lambda x: None if x is None else jax.lax.stop_gradient(x)  # noqa: E731
    return {
        "completion_ids": constant(completion_ids),
        "sampler_logprobs": constant(sampler_logprobs),
        "teacher": jax.tree.map(constant, teacher.replace(head_kernel=None)),
    }


def _check_inputs(student_hidden: jax.Array, head_kernel: jax.Array, teacher: TeacherSignal) -> jax.Array:
    """Checks the shapes; returns the teacher's head kernel (the student's when the signal carries none)."""
    check_hidden(student_hidden, head_kernel)
    if teacher.logits is not None:
        raise ValueError("teacher.logits: the hidden-state forms take the teacher's hidden states, not its logits")
    if teacher.hidden is not None:
        check_same_shape("student_hidden", student_hidden, "teacher.hidden", teacher.hidden)
    return head_kernel if teacher.head_kernel is None else teacher.head_kernel


class SampledScores(NamedTuple):
    """What the fused loss also reports about the sampled tokens, each `[B, T]` and without gradient (metrics).

    The loss's chunks already hold the student's and the teacher's logits; scoring the tokens there spares the
    head matmuls of separate passes over the completions (two `[B, T, H] x [H, V]` products per micro-batch).
    """

    student_token: jax.Array | None  # the sampled tokens' student log-probabilities (None without completion_ids)
    teacher_token: jax.Array | None  # the teacher's (None when its signal carries neither logits nor them)
    entropy: jax.Array  # of the student's tempered distribution, in nats
    top_k_mass: jax.Array | None  # the mass of the student's `top_k_mass` most likely tokens (None when 0)


def _teacher_logits(teacher: TeacherSignal, teacher_head_kernel: jax.Array) -> TeacherSignal:
    """The chunk's teacher signal with its logits formed from its hidden states, when it sent them."""
    if teacher.hidden is None:
        return teacher
    return teacher.replace(hidden=None, logits=head_logits(teacher.hidden, teacher_head_kernel))


def _chunk_per_token(config: LossConfig, student_logits: jax.Array, chunk: dict) -> PerTokenLoss:
    """One chunk's per-token loss; its teacher signal carries logits or per-token scores, not hidden states."""
    return per_token_loss(
        config,
        student_logits,
        chunk["teacher"],
        completion_ids=chunk["completion_ids"],
        sampler_logprobs=chunk["sampler_logprobs"],
    )


def _sampled_scores(config: LossConfig, student_logits: jax.Array, chunk: dict, top_k: int) -> SampledScores:
    """`SampledScores` of one chunk from its student logits `[B, C, V]` and its teacher signal."""
    logits, teacher, ids = jax.lax.stop_gradient(student_logits), chunk["teacher"], chunk["completion_ids"]
    temperature = config.temperature
    teacher_token = teacher.token_logprobs
    if teacher_token is None and teacher.logits is not None and ids is not None:
        teacher_token = token_logprobs(teacher.logits, ids, temperature=temperature)
    return SampledScores(
        student_token=None if ids is None else token_logprobs(logits, ids, temperature=temperature),
        teacher_token=teacher_token,
        entropy=entropy(logits, temperature=temperature),
        top_k_mass=top_k_mass(logits, top_k, temperature=temperature) if top_k else None,
    )


def chunked_per_token_divergence(
    config: LossConfig,
    student_hidden: jax.Array,
    head_kernel: jax.Array,
    teacher: TeacherSignal,
    *,
    completion_ids: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
) -> PerTokenLoss:
    """`per_token_divergence` from final hidden states, one completion chunk at a time.

    student_hidden `[B, T, H]` (after the final norm), head_kernel `[H, V]`; `teacher`: what the divergence form
    asks of the teacher (`signal_from_hidden`): its hidden states `[B, T, H]` with its head kernel (None: the
    student's), or its per-token scores; all of it a constant. Fully differentiable per token, like the
    logits form. Each chunk runs under `jax.checkpoint`, so the backward pass recomputes the chunk's logits
    instead of keeping them: peak memory ~ a few `[B, chunk_size, V]` float32 buffers plus the `[H, V]` gradient,
    at the price of the head matmuls running twice.
    """
    teacher_head_kernel = jax.lax.stop_gradient(_check_inputs(student_hidden, head_kernel, teacher))
    inputs = _constant_inputs(teacher=teacher, completion_ids=completion_ids, sampler_logprobs=sampler_logprobs)
    inputs["student_hidden"] = student_hidden
    length = student_hidden.shape[1]
    chunks = jax.tree.map(lambda x: to_chunks(x, min(config.chunk_size, length)), inputs)

    @jax.checkpoint
    def one_chunk(chunk: dict) -> PerTokenLoss:
        student_logits = head_logits(chunk["student_hidden"], head_kernel)
        chunk = dict(chunk, teacher=_teacher_logits(chunk["teacher"], teacher_head_kernel))
        return _chunk_per_token(config, student_logits, chunk)

    return jax.tree.map(lambda x: from_chunks(x, length), jax.lax.map(one_chunk, chunks))


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
    check_beta(beta)
    config = LossConfig(divergence="gjsd", beta=beta, temperature=temperature, is_clip=None, chunk_size=chunk_size)
    teacher = TeacherSignal(hidden=teacher_hidden, head_kernel=teacher_head_kernel)
    return chunked_per_token_divergence(config, student_hidden, head_kernel, teacher).loss


def fused_distillation_loss(
    config: LossConfig,
    student_hidden: jax.Array,
    head_kernel: jax.Array,
    token_weights: jax.Array,
    teacher: TeacherSignal,
    *,
    completion_ids: jax.Array | None = None,
    sampler_logprobs: jax.Array | None = None,
    top_k_mass: int = 0,
) -> tuple[jax.Array, PerTokenLoss, SampledScores]:
    """Scalar loss `sum(token_weights * per_token.loss)` and its gradient in one pass over completion chunks.

    Inputs as in `chunked_per_token_divergence`, plus `token_weights [B, T]` from `reduction_weights` (a
    constant). Because the output is a scalar, each chunk's gradient w.r.t. `student_hidden` and `head_kernel`
    is formed in the forward scan (value_and_grad per chunk, the `[H, V]` gradient accumulated in float32) and
    the backward pass only scales it: the head matmuls run once, as in the naive form, and memory stays at a
    few `[B, chunk_size, V]` buffers. Returns the loss, the per-token values and the `SampledScores` of the same
    logits (`top_k_mass`: the K of its top-K mass, 0 for none); both are metrics and carry no gradient.
    """
    teacher_head_kernel = _check_inputs(student_hidden, head_kernel, teacher)
    check_same_shape("token_weights", token_weights, "student_hidden[..., 0]", student_hidden[..., 0])
    if top_k_mass:
        check_top_k(top_k_mass, head_kernel.shape[-1])
    inputs = _constant_inputs(teacher=teacher, completion_ids=completion_ids, sampler_logprobs=sampler_logprobs)
    inputs["token_weights"] = jax.lax.stop_gradient(token_weights.astype(jnp.float32))
    loss, per_token, scores = _fused_loss(config, top_k_mass, student_hidden, head_kernel, teacher_head_kernel, inputs)
    return loss, *jax.tree.map(jax.lax.stop_gradient, (per_token, scores))


def _fused_scan(
    config: LossConfig,
    top_k: int,
    student_hidden: jax.Array,
    head_kernel: jax.Array,
    teacher_head_kernel: jax.Array,
    inputs: dict,
    *,
    with_grad: bool,
) -> tuple[jax.Array, PerTokenLoss, SampledScores, tuple[jax.Array, jax.Array] | None]:
    """Returns (loss, per-token outputs [B, T], their `SampledScores` (with a top-`top_k` mass),
    (d_hidden [B, T, H] f32, d_kernel [H, V] f32) or None)."""
    teacher_head_kernel = jax.lax.stop_gradient(teacher_head_kernel)
    length = student_hidden.shape[1]
    chunks = jax.tree.map(
        lambda x: to_chunks(x, min(config.chunk_size, length)), dict(inputs, student_hidden=student_hidden)
    )

    def objective(student_logits: jax.Array, chunk: dict) -> tuple[jax.Array, PerTokenLoss]:
        per_token = _chunk_per_token(config, student_logits, chunk)
        return jnp.sum(chunk["token_weights"] * per_token.loss), per_token

    def step(d_kernel, chunk):
        hidden = chunk["student_hidden"]
        student_logits = head_logits(hidden, head_kernel)
        chunk = dict(chunk, teacher=_teacher_logits(chunk["teacher"], teacher_head_kernel))
        scores = _sampled_scores(config, student_logits, chunk, top_k)
        if not with_grad:
            return d_kernel, (objective(student_logits, chunk), scores)
        (value, per_token), d_logits = jax.value_and_grad(objective, has_aux=True)(student_logits, chunk)
        # The head's backward matmuls in the parameters' dtype with float32 accumulation, like autodiff would.
        # The barrier keeps the cast logits' gradient one tensor that both matmuls read: fused into each as a
        # prologue, its element-wise work is redone per matmul tile (on v5p 2.2x the weight gradient's FLOP time).
        d_logits = jax.lax.optimization_barrier(d_logits.astype(head_kernel.dtype))
        d_hidden = jnp.einsum("bcv,hv->bch", d_logits, head_kernel, preferred_element_type=jnp.float32)
        # Under a mesh each chip holds every row's logits for its slice of the vocabulary (`opsd_jax.opsd.step`), so
        # this is a partial sum over the chips. Laid out by rows, as the layers' gradient needs it, the sum is a
        # reduce-scatter and the chunks' stacked gradients a chip's own rows; left alone XLA all-reduced every
        # row's and stacked them whole on every chip (7B on v5p: [4, 512, 128, 3584], 4.3 GB more at the peak).
        d_hidden = constrain_activation(d_hidden, ("batch", "length", "activation_embed"))
        d_kernel = d_kernel + jnp.einsum(
            "bch,bcv->hv", hidden, d_logits.astype(hidden.dtype), preferred_element_type=jnp.float32
        )
        return d_kernel, ((value, per_token), scores, d_hidden)

    init = jnp.zeros(head_kernel.shape, jnp.float32) if with_grad else None
    d_kernel, outputs = jax.lax.scan(step, init, chunks)
    if with_grad:
        outputs, scores, d_hidden = outputs
    else:
        outputs, scores = outputs
    values, per_token = outputs
    per_token, scores = jax.tree.map(lambda x: from_chunks(x, length), (per_token, scores))
    grads = (from_chunks(d_hidden, length), d_kernel) if with_grad else None
    return jnp.sum(values), per_token, scores, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_loss(config, top_k, student_hidden, head_kernel, teacher_head_kernel, inputs):
    loss, per_token, scores, _ = _fused_scan(
        config, top_k, student_hidden, head_kernel, teacher_head_kernel, inputs, with_grad=False
    )
    return loss, per_token, scores


def _fused_loss_fwd(config, top_k, student_hidden, head_kernel, teacher_head_kernel, inputs):
    loss, per_token, scores, (d_hidden, d_kernel) = _fused_scan(
        config, top_k, student_hidden, head_kernel, teacher_head_kernel, inputs, with_grad=True
    )
    grads = (d_hidden.astype(student_hidden.dtype), d_kernel.astype(head_kernel.dtype))
    no_gradient = jax.tree.map(lambda _: None, inputs)
    return (loss, per_token, scores), (grads, no_gradient)


def _fused_loss_bwd(config, top_k, residuals, cotangents):
    (d_hidden, d_kernel), no_gradient = residuals
    d_loss = cotangents[0]  # per-token outputs and scores are metrics: `fused_distillation_loss` stops their gradient
    scale = lambda grad: (grad * d_loss).astype(grad.dtype)  # noqa: E731
    return scale(d_hidden), scale(d_kernel), None, no_gradient


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
