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

import jax
from flax import nnx

from opsd_jax.models.qwen2_5_omni import MediaFeatures, Qwen2_5OmniThinker, ThinkerInputs
from opsd_jax.models.scoring import TeacherSignal
from opsd_jax.opsd.losses import LossConfig, divergence_form


def teacher_signal(
    teacher: Qwen2_5OmniThinker,
    prompt: ThinkerInputs,
    completion: jax.Array,
    completion_mask: jax.Array,
    config: LossConfig,
    features: MediaFeatures | None = None,
) -> TeacherSignal:
    """Scores the completions with the teacher and keeps what the configured divergence asks for
    (`Divergence.signal_request`): the hidden states and output head (full-vocabulary divergences, top-K on the
    student's support), the teacher's top-K with the sampled tokens' log-probabilities (top-K on the teacher's
    support), or the sampled tokens' log-probabilities alone ("sampled_rkl"). Everything is under `stop_gradient`.
    """
    request = divergence_form(config).signal_request(config)
    return teacher.score_completions(prompt, completion, completion_mask, request, features)


def ema_update(teacher_params: nnx.State, params: nnx.State, rate: float) -> nnx.State:
    """`(1 - rate) * teacher + rate * params`, leaf by leaf, in the teacher's dtype."""
    return jax.tree.map(lambda t, p: (t + rate * (p.astype(t.dtype) - t)).astype(t.dtype), teacher_params, params)
