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

from typing import Any

import jax
from flax import nnx

from opsd_jax.models.qwen2_5_omni import MediaFeatures, Qwen2_5OmniThinker, ThinkerInputs, append_completion
from opsd_jax.opsd.losses import LossConfig, chunked_teacher_scores

TEACHER_MODES = ("live", "frozen", "ema")


def completion_hidden(
    model: Qwen2_5OmniThinker,
    prompt: ThinkerInputs,
    completion: jax.Array,
    completion_mask: jax.Array,
    features: MediaFeatures | None = None,
) -> jax.Array:
    """Hidden states that predict each completion token: `[B * G, C, hidden]`.

    One forward over `[prompt | completion]`; the state at column `P - 1 + i` predicts token i.
    """
    prompt_len = prompt.input_ids.shape[1]
    repeats = completion.shape[0] // prompt.input_ids.shape[0]
    inputs = append_completion(prompt, completion, completion_mask)
    hidden = model.hidden_states(inputs, features, repeats=repeats)
    return hidden[:, prompt_len - 1 : prompt_len - 1 + completion.shape[1]]


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
    hidden = jax.lax.stop_gradient(completion_hidden(teacher, prompt, completion, completion_mask, features))
    kernel = jax.lax.stop_gradient(teacher.head_kernel())
    teacher_support = config.divergence in ("topk", "topk_rkl") and config.top_k_support == "teacher"
    if config.divergence != "sampled_rkl" and not teacher_support:
        return {"teacher_hidden": hidden, "teacher_head_kernel": kernel}
    scores = chunked_teacher_scores(
        hidden, kernel, completion, top_k=config.top_k if teacher_support else 1,
        temperature=config.temperature, chunk_size=config.chunk_size,
    )
    signal = {"teacher_token_logprobs": scores.token_logprobs}
    if teacher_support:
        signal.update(teacher_top_k_logprobs=scores.top_k_logprobs, teacher_top_k_indices=scores.top_k_indices)
    return signal


def ema_update(teacher_params: nnx.State, params: nnx.State, rate: float) -> nnx.State:
    """`(1 - rate) * teacher + rate * params`, leaf by leaf, in the teacher's dtype."""
    return jax.tree.map(lambda t, p: (t + rate * (p.astype(t.dtype) - t)).astype(t.dtype), teacher_params, params)
