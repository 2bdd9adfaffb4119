"""A look at a step's rollouts: where the student diverged from the teacher, and what the teacher preferred.

`inspect_rollouts` scores the first rollouts of one micro-batch as the update does (the same completion
forward, the same teacher signal, the configured per-token divergence by completion chunks, so no
`[rows, C, V]` logits are kept) and adds the teacher's top tokens at every position. It runs on the
parameters that sampled the rollouts (before the step's update), every `run.log_rollouts_every` steps.
`rollout_records` turns the arrays into the lines of the run's `rollouts.jsonl`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opsd_jax.models.scoring import chunked_scores, signal_from_hidden
from opsd_jax.opsd.chunked_losses import chunked_per_token_divergence
from opsd_jax.opsd.losses import divergence_form
from opsd_jax.opsd.step import StepBatch, StepSettings, student_and_teacher
from opsd_jax.sharding import activation_sharding

TOP_TOKENS = 5  # the teacher's most likely tokens shown where the student diverged most


@functools.partial(jax.jit, static_argnames=("settings", "rows"))
def inspect_rollouts(
    params: nnx.State,
    teacher_params: nnx.State | None,
    batch: StepBatch,
    *,
    settings: StepSettings,
    rows: int,
    frozen: nnx.State | None = None,
) -> dict[str, jax.Array]:
    """The first `rows` rollouts of one micro-batch `batch` (no leading micro-batch axis), scored.

    `teacher_params`, `frozen`: as `TrainState`'s (`student_and_teacher` builds both models).
    Returns `divergence`, `student_logprob`, `teacher_logprob` `[rows, C]` float32 (the configured divergence
    and the sampled tokens' log-probabilities at `loss.temperature`), `teacher_top_logprobs` `[rows, C, K]`
    and `teacher_top_ids` `[rows, C, K]` int32 (K = `TOP_TOKENS`, or the vocabulary when smaller).
    """
    with activation_sharding(settings.mesh, settings.rules):
        config = settings.loss
        model, teacher = student_and_teacher(settings, params, teacher_params, frozen)
        completion, mask = batch.completion[:rows], batch.completion_mask[:rows]
        student_hidden = model.completion_hidden(batch.student, batch.completion, batch.completion_mask)[:rows]
        teacher_hidden = teacher.completion_hidden(batch.teacher, batch.completion, batch.completion_mask)[:rows]
        head, teacher_head = model.head_kernel(), teacher.head_kernel()
        signal = signal_from_hidden(
            teacher_hidden, teacher_head, completion, divergence_form(config).signal_request(config)
        )
        per_token = chunked_per_token_divergence(
            config,
            student_hidden,
            head,
            signal,
            completion_ids=completion,
            sampler_logprobs=batch.sampler_logprobs[:rows],
        )
        scores = functools.partial(chunked_scores, temperature=config.temperature, chunk_size=config.chunk_size)
        student = scores(student_hidden, head, completion, top_k=1)
        teacher_scores = scores(teacher_hidden, teacher_head, completion, top_k=min(TOP_TOKENS, head.shape[-1]))
        zero = functools.partial(jnp.where, mask)
        return {
            "divergence": zero(per_token.divergence, 0.0).astype(jnp.float32),
            "student_logprob": zero(student.token_logprobs, 0.0),
            "teacher_logprob": zero(teacher_scores.token_logprobs, 0.0),
            "teacher_top_logprobs": teacher_scores.top_k_logprobs,
            "teacher_top_ids": teacher_scores.top_k_indices,
        }


def rollout_records(
    step: int, prompt_id: str, tokens: np.ndarray, mask: np.ndarray, scored: dict[str, np.ndarray], decode: Any
) -> list[dict[str, Any]]:
    """One JSON-ready record per rollout: its text, its divergence summary over its tokens (mean, max and
    where), and at the position of the largest divergence the token the student drew, both models'
    log-probabilities of it and the teacher's top tokens.

    tokens / mask: `[rows, C]` of the rollouts `scored` (`inspect_rollouts`, on the host); decode: token ids ->
    text (the tokenizer's `decode`).
    """
    records = []
    for row in range(len(tokens)):
        valid = np.asarray(mask[row], bool)
        divergence = np.asarray(scored["divergence"][row], np.float64)
        count = int(valid.sum())
        record: dict[str, Any] = {
            "step": step,
            "prompt_id": prompt_id,
            "sample": row,
            "tokens": count,
            "text": decode(_ids(tokens[row][valid])),
        }
        if count:
            at = int(np.argmax(np.where(valid, divergence, -np.inf)))
            top = zip(_ids(scored["teacher_top_ids"][row, at]), np.exp(scored["teacher_top_logprobs"][row, at]))
            record["divergence"] = {
                "mean": float(divergence[valid].mean()),
                "max": float(divergence[at]),
                "max_position": at,
                "max_token": decode([int(tokens[row, at])]),
            }
            record["at_max"] = {
                "student_logprob": float(scored["student_logprob"][row, at]),
                "teacher_logprob": float(scored["teacher_logprob"][row, at]),
                "teacher_top": [{"token": decode([token]), "prob": float(prob)} for token, prob in top],
            }
        records.append(record)
    return records


def _ids(values: Sequence[Any]) -> list[int]:
    return [int(value) for value in values]


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The records as a Markdown table (TensorBoard's text panel renders it)."""
    lines = [
        "| prompt | sample | divergence mean / max | at max: drawn -> teacher's top | text |",
        "|---|---|---|---|---|",
    ]
    for record in records:
        summary = record.get("divergence")
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        if summary is None:
            lines.append(f"| {cell(record['prompt_id'])} | {record['sample']} | (no tokens) | | |")
            continue
        top = ", ".join(f"{cell(t['token'])!r} {t['prob']:.2f}" for t in record["at_max"]["teacher_top"])
        lines.append(
            f"| {cell(record['prompt_id'])} | {record['sample']} | {summary['mean']:.4f} / {summary['max']:.4f} "
            f"| {cell(summary['max_token'])!r} -> {top} | {cell(record['text'])} |"
        )
    return "\n".join(lines)
