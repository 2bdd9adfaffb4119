"""Shared layer primitives: `swiglu` is autodiff's `silu(gate) * up`, bit for bit, with its tensors materialised."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.models.layers import swiglu


def plain_swiglu(gate, up):
    return jax.nn.silu(gate) * up


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("remat", [False, True])
def test_swiglu_values_and_gradients_are_autodiffs(dtype, remat):
    gate, up, weights = (jax.random.normal(key, (3, 5, 16), dtype) for key in jax.random.split(jax.random.key(0), 3))

    def value_and_grads(activation):
        def loss(gate, up):
            return jnp.sum((activation(gate, up) * weights).astype(jnp.float32))

        if remat:
            loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(gate, up)

    (value, grads), (expected, expected_grads) = value_and_grads(swiglu), value_and_grads(plain_swiglu)
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected))
    for g, e in zip(grads, expected_grads):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(e.astype(jnp.float32)))
    assert float(jnp.max(jnp.abs(grads[0].astype(jnp.float32)))) > 0.1  # not a comparison of zeros


def test_swiglu_materialises_its_output_and_both_gradients():
    """A barrier on the output and one on the pair (d_gate, d_up): what keeps XLA from fusing them into the
    matmuls beside them as recomputed prologues. The plain form has none."""
    gate = up = jnp.ones((4, 8), jnp.bfloat16)
    for activation, expected in ((plain_swiglu, []), (swiglu, [False, True])):
        loss = lambda g, u: jnp.sum(activation(g, u).astype(jnp.float32))  # noqa: E731, B023
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(gate, up).as_text()
        # `%a = optimization_barrier x` (the output) and `%b:2 = optimization_barrier dg, du` (the gradients).
        results = [line.split("=", 1)[0].strip() for line in text.splitlines() if "optimization_barrier" in line]
        assert sorted(r.endswith(":2") for r in results) == expected
