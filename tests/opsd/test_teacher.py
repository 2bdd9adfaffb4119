"""Teacher scoring: the prefix-shared completion forward equals one forward over [prompt | completion], and the
signal it keeps is what the configured divergence asks for."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opsd_jax.models.qwen2_5_omni import append_completion, from_pretrained
from opsd_jax.models.scoring import TeacherSignal, chunked_scores
from opsd_jax.opsd.losses import LossConfig
from opsd_jax.opsd.teacher import ema_update, teacher_signal
from opsd_jax.sampling import generate

IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [0, 0, 0, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)


def test_prefix_shared_forward_equals_the_full_forward(tiny_untied, tiny_prompt_builder):
    model = from_pretrained(tiny_untied[1])
    prompt = model.prepare_inputs(IDS, attention_mask=MASK)
    out = generate(
        model, prompt, max_new_tokens=6, temperature=1.0, eos_token_id=150, pad_token_id=0, num_samples=3, seed=2
    )
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)

    # Jitted (one compile each, not op-by-op dispatch); `shared_prefix` is static.
    @functools.partial(jax.jit, static_argnums=1)
    def hidden(p, shared_prefix: bool):
        m = nnx.merge(graphdef, p)
        if shared_prefix:
            return m.completion_hidden(prompt, out.tokens, out.mask)
        return m.hidden_states(append_completion(prompt, out.tokens, out.mask), repeats=3)[:, 7:13]

    mask = np.asarray(out.mask)
    np.testing.assert_allclose(
        np.asarray(hidden(params, True))[mask], np.asarray(hidden(params, False))[mask], atol=1e-5
    )

    # And its gradient: the prompt's activations receive the sum over the rollouts that share them.
    @functools.partial(jax.jit, static_argnums=1)
    @jax.grad
    def loss(p, shared_prefix: bool):
        return jnp.sum(jnp.where(out.mask[..., None], hidden(p, shared_prefix), 0.0) ** 2)

    g1, g2 = loss(params, True), loss(params, False)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        a, b = np.asarray(a), np.asarray(b)
        # Summation order differs (the prefix's gradient is summed over rollouts in one place, not G):
        # float32 rounding relative to the gradient's scale.
        assert np.abs(a - b).max() <= 1e-3 * max(np.abs(b).max(), 1.0)


def test_ema_update_moves_by_the_rate():
    teacher = {"w": jnp.zeros(3)}
    params = {"w": jnp.ones(3)}
    np.testing.assert_allclose(np.asarray(ema_update(teacher, params, 0.1)["w"]), 0.1)


@pytest.mark.parametrize(
    "config",
    [
        LossConfig(divergence="gjsd"),
        LossConfig(divergence="topk", top_k=4),
        LossConfig(divergence="topk", top_k=4, top_k_support="teacher"),
        LossConfig(divergence="topk_rkl", top_k=3, top_k_support="teacher"),
        LossConfig(divergence="sampled_rkl"),
    ],
    ids=lambda c: f"{c.divergence}-{c.top_k_support}",
)
def test_the_teacher_keeps_the_signal_its_divergence_asks_for(tiny_untied, config):
    model = from_pretrained(tiny_untied[1])
    prompt = model.prepare_inputs(IDS, attention_mask=MASK)
    out = generate(model, prompt, max_new_tokens=5, eos_token_id=150, pad_token_id=0, num_samples=2, seed=1)
    config = dataclasses.replace(config, temperature=2.0, chunk_size=2)
    graphdef, params = nnx.split(model)

    @jax.jit
    def score(params):
        teacher = nnx.merge(graphdef, params)
        hidden = teacher.completion_hidden(prompt, out.tokens, out.mask)
        return teacher_signal(teacher, prompt, out.tokens, out.mask, config), hidden, teacher.head_kernel()

    signal, hidden, kernel = score(params)
    assert isinstance(signal, TeacherSignal) and signal.logits is None
    if config.divergence == "sampled_rkl" or config.top_k_support == "teacher":
        expected = chunked_scores(hidden, kernel, out.tokens, top_k=config.top_k, temperature=2.0)
        np.testing.assert_allclose(np.asarray(signal.token_logprobs), np.asarray(expected.token_logprobs), atol=1e-6)
        assert signal.hidden is None and signal.head_kernel is None
        if config.divergence == "sampled_rkl":
            assert signal.top_k_logprobs is None and signal.top_k_indices is None
        else:
            assert signal.top_k_indices.shape == (4, 5, config.top_k)
            np.testing.assert_array_equal(np.asarray(signal.top_k_indices), np.asarray(expected.top_k_indices))
            np.testing.assert_allclose(
                np.asarray(signal.top_k_logprobs), np.asarray(expected.top_k_logprobs), atol=1e-6
            )
    else:
        np.testing.assert_array_equal(np.asarray(signal.hidden), np.asarray(hidden))
        np.testing.assert_array_equal(np.asarray(signal.head_kernel), np.asarray(kernel))
        assert signal.token_logprobs is None and signal.top_k_indices is None
