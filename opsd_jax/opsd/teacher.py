"""The teacher: which parameters score the student's completions, and the one batched scoring forward.

Modes (on_policy_self_distillation.md §5):
* `live`: the current parameters under `stop_gradient`; no extra memory, and the media features are
  the student's, encoded once;
* `frozen`: the initial parameters, kept as a second copy;
* `ema`: `teacher <- (1 - rate) * teacher + rate * student` after every update.

Whatever the mode, the teacher sees `[teacher prompt | completion]` (the same completion tokens the
student sampled, at the same positions relative to the prompt) in one forward, and no gradient flows
into it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opsd_jax.models.qwen2_5_omni import MediaFeatures, Qwen2_5OmniThinker, ThinkerInputs
from opsd_jax.models.text import causal_padding_mask
from opsd_jax.opsd.losses import LossConfig, chunked_teacher_scores


def completion_hidden(
    model: Qwen2_5OmniThinker,
    prompt: ThinkerInputs,
    completion: jax.Array,
    completion_mask: jax.Array,
    features: MediaFeatures | None = None,
) -> jax.Array:
    """Hidden states that predict each completion token: `[B * G, C, hidden]`.

    Equal to one forward over `[prompt | completion]` sliced at columns `P - 1 ... P + C - 2`, but
    the G rollouts of a prompt share its prefix: the prompt runs once per prompt (B rows) into a KV
    cache, which is repeated for the completions (B * G rows of C tokens). For a long multimodal
    prompt and short answers this divides the forward (and, for the student, the backward) by ~G.
    """
    batch, prompt_len = prompt.input_ids.shape
    rows, length = completion.shape
    # A static repeat count lowers to a broadcast; `total_repeat_length` would make it a gather, which
    # libtpu's all-reduce-scatter fusion fails on under FSDP (RET_CHECK in hlo_instruction.cc).
    repeat = functools.partial(jnp.repeat, repeats=rows // batch, axis=0)
    prompt_mask = causal_padding_mask(prompt.attention_mask)
    n_left_pad = prompt_len - jnp.sum(prompt.attention_mask, axis=-1, dtype=jnp.int32)
    start = repeat(prompt_len + prompt.rope_deltas - n_left_pad)
    positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
    positions = jnp.broadcast_to(positions[None], (3, rows, length))
    # Completion token i sees the prompt's real tokens and completion tokens 0..i.
    sees_prompt = jnp.broadcast_to(repeat(prompt.attention_mask.astype(bool))[:, None, :], (rows, length, prompt_len))
    sees_completion = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool))[None], (rows, length, length))
    mask = jnp.concatenate([sees_prompt, sees_completion], axis=2)
    del completion_mask  # tokens after EOS only feed predictions that are masked out of every loss
    prefix, hidden = model.model.prefix_and_continuations(
        model.embed_inputs(prompt, features),
        prompt.position_ids,
        prompt_mask,
        model.model.embed_tokens(completion),
        positions,
        mask,
    )
    return jnp.concatenate([repeat(prefix[:, -1:]), hidden[:, :-1]], axis=1)


def teacher_signal(
    teacher: Qwen2_5OmniThinker,
    prompt: ThinkerInputs,
    completion: jax.Array,
    completion_mask: jax.Array,
    config: LossConfig,
    features: MediaFeatures | None = None,
) -> dict[str, Any]:
    """Scores the completions with the teacher and returns what the configured loss needs.

    Returns keyword arguments of `losses.fused_distillation_loss`:
    * full-vocabulary divergences ("gjsd", "topk" / "topk_rkl" on the student's support): the
      teacher's hidden states and output head, from which the loss forms teacher logits one
      completion chunk at a time (no `[B, C, V]` tensor is kept);
    * top-K divergences on the teacher's support: its top-K logprobs and indices, plus the sampled
      tokens' logprobs;
    * "sampled_rkl": only the sampled tokens' logprobs.
    Everything is under `stop_gradient`.
    """
    hidden = completion_hidden(teacher, prompt, completion, completion_mask, features)
    return signal_from_hidden(hidden, teacher.head_kernel(), completion, config)


def signal_from_hidden(
    hidden: jax.Array, kernel: jax.Array, completion: jax.Array, config: LossConfig
) -> dict[str, Any]:
    """`teacher_signal` from the teacher's hidden states `[B * G, C, hidden]` and output head `[hidden, V]`."""
    hidden, kernel = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(kernel)
    teacher_support = config.divergence in ("topk", "topk_rkl") and config.top_k_support == "teacher"
    if config.divergence != "sampled_rkl" and not teacher_support:
        return {"teacher_hidden": hidden, "teacher_head_kernel": kernel}
    scores = chunked_teacher_scores(
        hidden,
        kernel,
        completion,
        top_k=config.top_k if teacher_support else 1,
        temperature=config.temperature,
        chunk_size=config.chunk_size,
    )
    signal = {"teacher_token_logprobs": scores.token_logprobs}
    if teacher_support:
        signal.update(teacher_top_k_logprobs=scores.top_k_logprobs, teacher_top_k_indices=scores.top_k_indices)
    return signal


def ema_update(teacher_params: nnx.State, params: nnx.State, rate: float) -> nnx.State:
    """`(1 - rate) * teacher + rate * params`, leaf by leaf, in the teacher's dtype."""
    return jax.tree.map(lambda t, p: (t + rate * (p.astype(t.dtype) - t)).astype(t.dtype), teacher_params, params)
