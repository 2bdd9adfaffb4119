"""The fused splash-attention kernel (run by Pallas's interpreter on the CPU) against XLA's attention, in float32:
the kernel alone under causal segment masks, and the thinker's scoring forward (`completion_hidden`) with
either kernel, on one device and sharded over eight, forward and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from opsd_jax.models.layers import CausalSegments, dot_product_attention
from opsd_jax.models.qwen2_5_omni import from_pretrained, input_shardings
from opsd_jax.models.splash import splash_attention
from opsd_jax.sampling import generate
from opsd_jax.sharding import MeshConfig, activation_sharding, make_mesh, shard_module

# Measured in float32 on the CPU: the kernel's online softmax sums in another order than XLA's, at most 2.0e-6
# of the largest value (outputs and gradients, every case below); the bound leaves an order of magnitude.
RELATIVE_TOLERANCE = 2e-5

IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [0, 0, 0, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got), np.asarray(expected)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.mark.parametrize(
    "q_len, kv_len, offset",
    [
        (200, 200, 0),  # a prompt over its own keys: queries and keys padded to whole tiles
        (40, 240, 200),  # completions over a prompt's keys then their own (offset P)
        (256, 384, 0),  # keys past the last diagonal (a cache with the completions' room): cut
    ],
)
def test_kernel_equals_xla_attention_and_its_gradient_on_real_rows(q_len, kv_len, offset):
    batch, heads, kv_heads, head_dim = 2, 4, 2, 64
    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    key = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
    value = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim))
    # Row 1 left-padded by 7 prompt columns (segment 0); queries of the padding see only padding.
    key_segments = np.ones((batch, kv_len), np.int32)
    key_segments[1, :7] = 0
    query_segments = key_segments[:, offset : offset + q_len] if offset == 0 else np.ones((batch, q_len), np.int32)
    mask = CausalSegments(jnp.asarray(query_segments), jnp.asarray(key_segments), offset=offset)
    real = np.broadcast_to(query_segments.astype(bool)[:, :, None, None], (batch, q_len, heads, head_dim))
    cotangent = jax.random.normal(keys[3], query.shape) * real  # padded rows feed nothing downstream

    def run(attention, q, k, v):
        return jnp.sum(attention(q, k, v) * cotangent)

    xla = functools.partial(dot_product_attention, mask=mask.dense(), scale=head_dim**-0.5)
    fused = functools.partial(splash_attention, mask=mask, scale=head_dim**-0.5)
    out_xla, out_fused = jax.jit(xla)(query, key, value), jax.jit(fused)(query, key, value)
    assert relative_error(np.asarray(out_fused)[real], np.asarray(out_xla)[real]) <= RELATIVE_TOLERANCE
    grads_xla = jax.jit(jax.grad(functools.partial(run, xla), argnums=(0, 1, 2)))(query, key, value)
    grads_fused = jax.jit(jax.grad(functools.partial(run, fused), argnums=(0, 1, 2)))(query, key, value)
    for got, expected in zip(grads_fused, grads_xla):
        assert relative_error(got, expected) <= RELATIVE_TOLERANCE


@pytest.fixture(scope="module")
def rollouts(tiny_untied):
    model = from_pretrained(tiny_untied[1])
    prompt = model.prepare_inputs(IDS, attention_mask=MASK)
    out = generate(
        model, prompt, max_new_tokens=6, temperature=1.0, eos_token_id=150, pad_token_id=0, num_samples=4, seed=2
    )
    return prompt, out.tokens, out.mask


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "fsdp4_tensor2"])
def test_scoring_forward_with_the_kernel_equals_xla_forward_and_gradient(tiny_untied, rollouts, sharded):
    prompt, tokens, completion_mask = rollouts
    real = np.asarray(completion_mask).astype(bool)
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2)) if sharded else None

    def hidden_and_grads(attention: str):
        model = from_pretrained(tiny_untied[1], attention=attention)
        inputs, rows = prompt, (tokens, completion_mask)
        if mesh is not None:
            shard_module(model, mesh)
            inputs = jax.device_put(prompt, input_shardings(prompt, mesh))
            rows = jax.device_put(rows, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        graphdef, params = nnx.split(model)

        def hidden(p):
            with activation_sharding(mesh):
                return nnx.merge(graphdef, p).completion_hidden(inputs, *rows)

        def loss(p):
            return jnp.sum(jnp.where(rows[1][..., None], hidden(p), 0.0) ** 2)

        return jax.jit(hidden)(params), jax.jit(jax.grad(loss))(params)

    hidden_xla, grads_xla = hidden_and_grads("xla")
    hidden_fused, grads_fused = hidden_and_grads("splash")
    assert relative_error(np.asarray(hidden_fused)[real], np.asarray(hidden_xla)[real]) <= RELATIVE_TOLERANCE
    for got, expected in zip(jax.tree.leaves(grads_fused), jax.tree.leaves(grads_xla)):
        assert relative_error(got, expected) <= RELATIVE_TOLERANCE
