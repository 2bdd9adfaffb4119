"""Shared layer primitives: `swiglu` is autodiff's `silu(gate) * up`, bit for bit, with its tensors materialised;
a `Linear` with shaped features is the matrix of its flattened kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opsd_jax.models.layers import Linear, swiglu


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


def test_a_linear_layer_with_shaped_features_is_the_matrix_of_its_flattened_kernel():
    """`[hidden, heads, head_dim]` and `[heads, head_dim, hidden]` kernels (the decoder's attention) compute what the
    checkpoint's matrices do on the flattened features, in float32 to rounding."""
    rngs = nnx.Rngs(0)
    q = Linear(8, (3, 4), use_bias=True, axes=("embed", "heads", None), dtype=jnp.float32, rngs=rngs)
    o = Linear((3, 4), 8, use_bias=False, axes=("heads", None, "embed"), dtype=jnp.float32, rngs=rngs)
    q.bias.set_value(jax.random.normal(jax.random.key(1), (3, 4)))
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    heads = q(x)
    assert heads.shape == (2, 5, 3, 4) and q.kernel.get_value().shape == (8, 3, 4)
    flat = np.asarray(x, np.float64) @ np.asarray(q.kernel.get_value(), np.float64).reshape(8, 12)
    flat += np.asarray(q.bias.get_value(), np.float64).reshape(12)
    np.testing.assert_allclose(np.asarray(heads).reshape(2, 5, 12), flat, rtol=1e-5, atol=1e-6)
    out = o(heads)
    expected = np.asarray(heads, np.float64).reshape(2, 5, 12) @ np.asarray(o.kernel.get_value(), np.float64).reshape(
        12, 8
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"Linear: 2 logical axes for a kernel of shape \(8, 3, 4\)"):
        Linear(8, (3, 4), use_bias=False, axes=("embed", "heads"), dtype=jnp.float32, rngs=rngs)
