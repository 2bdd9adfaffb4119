"""The rollout view: the configured divergence and the teacher's top tokens against a float64 reference, and
the records written to rollouts.jsonl."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opsd_jax.config import TeacherConfig
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.opsd.diagnostics import TOP_TOKENS, inspect_rollouts, markdown, rollout_records
from opsd_jax.opsd.losses import LossConfig
from opsd_jax.opsd.step import StepBatch, StepSettings


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_divergence_and_teacher_top_tokens_match_a_float64_reference(tiny_untied, beta):
    model = from_pretrained(tiny_untied[1])
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    teacher_params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
    vocab = model.config.text.vocab_size
    prompt, G, C = rng.integers(10, 200, (1, 5)), 2, 4
    teacher_prompt = np.concatenate([rng.integers(10, 200, (1, 3)), prompt], axis=1)  # the "rationale" first
    completion = rng.integers(10, 200, (G, C)).astype(np.int32)
    mask = np.ones((G, C), bool)
    mask[1, 3] = False
    batch = StepBatch(
        student=model.prepare_inputs(jnp.asarray(prompt)),
        teacher=model.prepare_inputs(jnp.asarray(teacher_prompt)),
        completion=jnp.asarray(completion),
        completion_mask=jnp.asarray(mask),
        sampler_logprobs=jnp.zeros((G, C), jnp.float32),
        rewards=jnp.zeros(G),
        label_ids=jnp.zeros((1, 1), jnp.int32),
        label_mask=jnp.zeros((1, 1), bool),
    )
    settings = StepSettings(
        graphdef=graphdef,
        tx=optax.sgd(0.1),
        loss=LossConfig(beta=beta, chunk_size=2),
        teacher=TeacherConfig(mode="frozen"),
        train_encoders=False,
    )
    scored = jax.tree.map(np.asarray, inspect_rollouts(params, teacher_params, batch, settings=settings, rows=G))

    teacher = nnx.merge(graphdef, teacher_params)
    for row in range(G):
        # One full forward over [prompt | completion]; the logits at P - 1 ... P + C - 2 predict the completion.
        s = log_softmax64(model(jnp.asarray(np.concatenate([prompt[0], completion[row]])[None]))[0, 4:-1])
        t = log_softmax64(teacher(jnp.asarray(np.concatenate([teacher_prompt[0], completion[row]])[None]))[0, 7:-1])
        if beta == 1.0:
            expected = (np.exp(s) * (s - t)).sum(-1)
        else:
            m = np.logaddexp(s + np.log(1 - beta), t + np.log(beta))
            expected = (beta * np.exp(t) * (t - m) + (1 - beta) * np.exp(s) * (s - m)).sum(-1)
        valid = mask[row]
        np.testing.assert_allclose(scored["divergence"][row][valid], expected[valid], atol=2e-6, rtol=1e-4)
        assert (scored["divergence"][row][~valid] == 0).all()
        picked = np.arange(C), completion[row]
        np.testing.assert_allclose(scored["student_logprob"][row][valid], s[picked][valid], atol=1e-5)
        np.testing.assert_allclose(scored["teacher_logprob"][row][valid], t[picked][valid], atol=1e-5)
        top = np.argsort(-t, axis=-1)[:, :TOP_TOKENS]
        np.testing.assert_array_equal(scored["teacher_top_ids"][row], top)
        np.testing.assert_allclose(scored["teacher_top_logprobs"][row], np.take_along_axis(t, top, -1), atol=1e-5)
    assert vocab > TOP_TOKENS


def test_records_name_the_largest_divergence_and_what_the_teacher_preferred():
    tokens = np.array([[5, 6, 7], [8, 9, 0]])
    mask = np.array([[True, True, True], [False, False, False]])
    scored = {
        "divergence": np.array([[0.1, 0.7, 0.4], [0.0, 0.0, 0.0]]),
        "student_logprob": np.array([[-1.0, -2.0, -3.0], [0, 0, 0]]),
        "teacher_logprob": np.array([[-1.5, -0.5, -3.5], [0, 0, 0]]),
        "teacher_top_logprobs": np.log(np.array([[[0.5, 0.3]] * 3] * 2)),
        "teacher_top_ids": np.array([[[1, 2], [3, 4], [5, 6]]] * 2),
    }
    decode = lambda ids: "".join(f"<{i}>" for i in ids)  # noqa: E731
    first, empty = rollout_records(7, "clip9", tokens, mask, scored, decode)
    assert first == {
        "step": 7,
        "prompt_id": "clip9",
        "sample": 0,
        "tokens": 3,
        "text": "<5><6><7>",
        "divergence": {"mean": pytest.approx(0.4), "max": 0.7, "max_position": 1, "max_token": "<6>"},
        "at_max": {
            "student_logprob": -2.0,
            "teacher_logprob": -0.5,
            "teacher_top": [{"token": "<3>", "prob": pytest.approx(0.5)}, {"token": "<4>", "prob": pytest.approx(0.3)}],
        },
    }
    assert empty == {"step": 7, "prompt_id": "clip9", "sample": 1, "tokens": 0, "text": ""}
    table = markdown([first, empty]).splitlines()
    assert len(table) == 4 and "0.4000 / 0.7000" in table[2] and "'<3>' 0.50" in table[2] and "(no tokens)" in table[3]
