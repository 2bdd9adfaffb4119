"""The distillation loss from final hidden states, one completion chunk at a time: no `[B, T, V]` float32 tensor.

The logits forms (`opsd_jax.opsd.losses.per_token_divergence`) build `[batch, completion, vocab]` float32 tensors
(2.5 GB each for Qwen2.5-Omni's 151,936-token vocabulary at 4 x 1,024 tokens). These never do:
`chunked_per_token_divergence` (and its GJSD shorthand `chunked_generalized_jsd`) maps over completion chunks
under `jax.checkpoint`, recomputing each chunk's logits in the backward pass; `fused_distillation_loss`
computes the scalar loss and its gradient in a single scan (a custom VJP), without the recomputation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from opsd_jax.models.scoring import TeacherSignal, check_hidden, from_chunks, head_logits, to_chunks
from opsd_jax.opsd.divergences import check_beta, check_same_shape
from opsd_jax.opsd.losses import LossConfig, PerTokenLoss, per_token_loss


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


def _chunk_per_token(
    config: LossConfig, student_logits: jax.Array, teacher_head_kernel: jax.Array, chunk: dict
) -> PerTokenLoss:
    """One chunk's per-token loss: the teacher's logits formed here from its hidden states, when it sent them."""
    teacher = chunk["teacher"]
    if teacher.hidden is not None:
        teacher = teacher.replace(hidden=None, logits=head_logits(teacher.hidden, teacher_head_kernel))
    return per_token_loss(
        config,
        student_logits,
        teacher,
        completion_ids=chunk["completion_ids"],
        sampler_logprobs=chunk["sampler_logprobs"],
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
        return _chunk_per_token(config, student_logits, teacher_head_kernel, chunk)

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
) -> tuple[jax.Array, PerTokenLoss]:
    """Scalar loss `sum(token_weights * per_token.loss)` and its gradient in one pass over completion chunks.

    Inputs as in `chunked_per_token_divergence`, plus `token_weights [B, T]` from `reduction_weights` (a
    constant). Because the output is a scalar, each chunk's gradient w.r.t. `student_hidden` and `head_kernel`
    is formed in the forward scan (value_and_grad per chunk, the `[H, V]` gradient accumulated in float32) and
    the backward pass only scales it: the head matmuls run once, as in the naive form, and memory stays at a
    few `[B, chunk_size, V]` buffers. The returned per-token values are metrics and carry no gradient.
    """
    teacher_head_kernel = _check_inputs(student_hidden, head_kernel, teacher)
    check_same_shape("token_weights", token_weights, "student_hidden[..., 0]", student_hidden[..., 0])
    inputs = _constant_inputs(teacher=teacher, completion_ids=completion_ids, sampler_logprobs=sampler_logprobs)
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
        lambda x: to_chunks(x, min(config.chunk_size, length)), dict(inputs, student_hidden=student_hidden)
    )

    def objective(student_logits: jax.Array, chunk: dict) -> tuple[jax.Array, PerTokenLoss]:
        per_token = _chunk_per_token(config, student_logits, teacher_head_kernel, chunk)
        return jnp.sum(chunk["token_weights"] * per_token.loss), per_token

    def step(d_kernel, chunk):
        hidden = chunk["student_hidden"]
        student_logits = head_logits(hidden, head_kernel)
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
    per_token = jax.tree.map(lambda x: from_chunks(x, length), per_token)
    grads = (from_chunks(d_hidden, length), d_kernel) if with_grad else None
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
