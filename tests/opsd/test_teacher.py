"""Teacher scoring: the prefix-shared completion forward equals one forward over [prompt | completion]."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opsd_jax.models.qwen2_5_omni import append_completion, from_pretrained
from opsd_jax.opsd.teacher import ema_update
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
