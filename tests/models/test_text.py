"""Text decoder parity with `Qwen2_5OmniThinkerForConditionalGeneration` on text-only input (float32)."""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from opsd_jax.models.qwen2_5_omni import from_pretrained, input_shardings, read_config
from opsd_jax.models.text import REMAT_POLICIES, JointTokens, mrope_cos_sin
from opsd_jax.sharding import MeshConfig, activation_sharding, make_mesh, shard_module

# Float32 on the CPU: the two implementations differ only in summation order (observed ~2e-7).
LOGIT_ATOL = 1e-4


def left_padded_batch(vocab_limit: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 12 tokens; row 1 has 4 pad slots on the left."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_limit, (2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


def reference_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied"])
def test_logits_match_reference_on_left_padded_batch(fixture, request):
    reference, checkpoint = request.getfixturevalue(fixture)
    model = from_pretrained(checkpoint)
    assert (model.lm_head is None) == (fixture == "tiny_tied")
    ids, mask = left_padded_batch(vocab_limit=200)
    expected = reference_logits(reference, ids, mask)
    got = np.asarray(jax.jit(lambda i, m: model(i, attention_mask=m))(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)  # padded slots carry no prediction in either implementation
    assert np.abs(got - expected)[real].max() <= LOGIT_ATOL


def test_unpadded_row_is_independent_of_the_padded_neighbour(tiny_untied):
    """Left padding must not change a row's logits: row 1 alone equals row 1 in the padded batch."""
    _, checkpoint = tiny_untied
    model = from_pretrained(checkpoint)
    ids, mask = left_padded_batch(vocab_limit=200, seed=3)
    batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    alone = np.asarray(model(jnp.asarray(ids[1:, 4:]), attention_mask=jnp.asarray(mask[1:, 4:])))
    np.testing.assert_allclose(batch[1, 4:], alone[0], atol=1e-5)


def test_mrope_reduces_to_plain_rope_for_equal_axes():
    positions = jnp.arange(7)[None].repeat(2, 0)
    cos, sin = mrope_cos_sin(
        jnp.stack([positions] * 3), head_dim=16, theta=1e4, mrope_section=(2, 3, 3), dtype=jnp.float32
    )
    inv_freq = 1.0 / (1e4 ** (np.arange(0, 16, 2) / 16))
    angles = np.arange(7)[:, None] * inv_freq
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(np.concatenate([angles, angles], -1)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[1]), np.sin(np.concatenate([angles, angles], -1)), atol=1e-6)


def test_mrope_takes_each_frequency_slot_from_its_axis():
    """Slots 0-1 follow axis t, 2-4 axis h, 5-7 axis w (mrope_section (2, 3, 3), head_dim 16)."""
    t, h, w = (jnp.full((1, 1), v) for v in (1.0, 2.0, 3.0))
    cos, _ = mrope_cos_sin(jnp.stack([t, h, w]), head_dim=16, theta=1e4, mrope_section=(2, 3, 3), dtype=jnp.float32)
    inv_freq = 1.0 / (1e4 ** (np.arange(0, 16, 2) / 16))
    axis_value = np.array([1, 1, 2, 2, 2, 3, 3, 3], np.float64)
    expected = np.cos(np.tile(axis_value * inv_freq, 2))
    np.testing.assert_allclose(np.asarray(cos[0, 0]), expected, atol=1e-6)


def test_bfloat16_forward_stays_close_to_float32(tiny_untied):
    _, checkpoint = tiny_untied
    ids, mask = left_padded_batch(vocab_limit=200)
    f32 = np.asarray(from_pretrained(checkpoint)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    model16 = from_pretrained(checkpoint, dtype=jnp.bfloat16)
    assert model16.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    bf16 = np.asarray(model16(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).astype(jnp.float32))
    real = mask.astype(bool)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op, compounding over layers): a relative
    # error of a few percent of the logit scale is expected, a wrong cast would be far larger.
    scale = np.abs(f32[real]).max()
    assert np.abs(bf16 - f32)[real].max() < 0.03 * scale


def test_remat_and_float32_master_weights(tiny_untied):
    """Rematerialised layers give the same logits and gradients; float32 weights with bfloat16 compute
    run in bfloat16 and stay close to float32."""
    from flax import nnx

    _, checkpoint = tiny_untied
    ids, mask = left_padded_batch(vocab_limit=200)
    plain = from_pretrained(checkpoint)

    def loss(model):
        return jnp.sum(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)) ** 2)

    g_plain = nnx.grad(loss)(plain)
    for policy in REMAT_POLICIES:
        remat = from_pretrained(checkpoint, remat=True, remat_policy=policy)
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(nnx.grad(loss)(remat))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    mixed = from_pretrained(checkpoint, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    logits = mixed(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.bfloat16
    reference = np.asarray(plain(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits.astype(jnp.float32)) - reference)[real].max() < 0.03 * np.abs(reference[real]).max()


def test_the_remat_policy_decides_what_a_layer_keeps_for_its_backward(tiny_untied):
    """Full remat keeps a layer's input alone; save_dots also its projections' and MLP's outputs (the widest of
    them `[batch, seq, intermediate]`), plain autodiff everything."""
    from flax import nnx

    _, checkpoint = tiny_untied
    ids, mask = left_padded_batch(vocab_limit=200)

    def widths(**kw):
        graphdef, params = nnx.split(from_pretrained(checkpoint, **kw))

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)) ** 2)

        # The residuals of the shape [batch, seq, features], counted by their features (JAX's public API prints
        # them, one `dtype[shape] from ...` line each).
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            jax.ad_checkpoint.print_saved_residuals(loss, params)
        shapes = [tuple(map(int, s.split(","))) for s in re.findall(r"^\w+\[([\d,]+)\]", printed.getvalue(), re.M)]
        return collections.Counter(shape[-1] for shape in shapes if shape[:2] == ids.shape)

    text = read_config(checkpoint).text
    layers, intermediate = text.num_hidden_layers, text.intermediate_size
    full, dots, plain = widths(remat=True), widths(remat=True, remat_policy="save_dots"), widths()
    assert full[intermediate] == 0
    assert dots[intermediate] == 2 * layers  # gate and up, per layer
    assert plain[intermediate] >= 2 * layers
    assert sum(full.values()) < sum(dots.values())


def test_attention_in_query_blocks_equals_whole_attention_and_its_gradient():
    """Long prompts attend `QUERY_BLOCK` queries at a time (checkpointed blocks bound the float32 scores);
    each query's softmax still runs over every key, so values and gradients are the whole computation's."""
    from opsd_jax.models.layers import _attention, dot_product_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 512, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 600, 2, 16)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 512, 600)) > 0.3)
    blocked = functools.partial(dot_product_attention, mask=mask, scale=0.25, query_block=128)
    whole = functools.partial(_attention, mask=mask, scale=0.25)
    np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(whole(q, k, v)), atol=1e-6)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v) for f in (blocked, whole)]
    for got, expected in zip(*grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_each_layer_prefetches_its_weights_no_earlier_than_the_layer_before_starts(tiny_untied, remat):
    """The decoder ties layer i+1's parameters to layer i's input with an optimization barrier, so XLA
    cannot gather every layer's FSDP-sharded weights at once (the compiled figures are in the README).
    Each barrier holds the hidden states and exactly one later layer's parameters."""
    _, checkpoint = tiny_untied
    model = from_pretrained(checkpoint)
    model.model.remat = remat
    text = model.model
    sizes = [len(jax.tree.leaves(nnx.state(layer))) for layer in text.layers]
    embeds = jnp.zeros((1, 8, text.config.hidden_size), jnp.float32)
    positions = jnp.zeros((3, 1, 8), jnp.int32)
    mask = jnp.ones((1, 8, 8), bool)
    jaxpr = jax.make_jaxpr(lambda e: text(e, positions, mask)[0])(embeds)
    barriers = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "optimization_barrier"]
    assert len(barriers) == text.config.num_hidden_layers - 1
    for i, barrier in enumerate(barriers):
        # the hidden states [batch, seq, hidden] first, then the parameters of layer i + 1, nothing else
        assert barrier.invars[0].aval.shape == embeds.shape
        assert len(barrier.invars) == 1 + sizes[i + 1]


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_joint_tokens_scoring_equals_the_forward_by_parts_on_a_mesh(tiny_untied, remat):
    """On a mesh whose batch axes split the prompts and the continuations alike (data 2 x fsdp 4: 8 parts), the
    scoring forward runs them through each weight as one token matrix (`JointTokens`): the same hidden states
    and gradients as the layer-by-layer forward over each part (float32; only summation order differs)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (8, 8)).astype(np.int32)
    mask = np.ones((8, 8), np.int32)
    mask[1, :3] = 0
    completion = jnp.asarray(rng.integers(1, 200, (16, 5)).astype(np.int32))
    completion_mask = jnp.ones((16, 5), bool)

    def hidden_and_grads(joint: bool):
        model = from_pretrained(tiny_untied[1])
        model.model.remat = remat
        shard_module(model, mesh)
        prompt = model.prepare_inputs(ids, attention_mask=mask)
        prompt = jax.device_put(prompt, input_shardings(prompt, mesh))
        graphdef, params = nnx.split(model)

        def hidden(p):
            with activation_sharding(mesh):
                if joint:
                    # The joint path is the one taken: the batch axes split 8 prompts and 16 rows alike.
                    embeds = jnp.zeros((8, 8, 1)), jnp.zeros((16, 5, 1))
                    assert JointTokens.of(*embeds) == JointTokens(8, 8, 16, 5, shards=8)
                    return nnx.merge(graphdef, p).completion_hidden(prompt, completion, completion_mask)
                with mock.patch.object(JointTokens, "of", return_value=None):
                    return nnx.merge(graphdef, p).completion_hidden(prompt, completion, completion_mask)

        def loss(p):
            return jnp.sum(hidden(p) ** 2)

        return jax.jit(hidden)(params), jax.jit(jax.grad(loss))(params)

    hidden_joint, grads_joint = hidden_and_grads(True)
    hidden_parts, grads_parts = hidden_and_grads(False)
    np.testing.assert_allclose(np.asarray(hidden_joint), np.asarray(hidden_parts), atol=1e-5)
    for got, expected in zip(jax.tree.leaves(grads_joint), jax.tree.leaves(grads_parts)):
        got, expected = np.asarray(got), np.asarray(expected)
        assert np.abs(got - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0)


def test_joint_tokens_keep_each_shards_rows_and_fall_back_where_prompts_are_fewer_or_tensors_split():
    tokens = JointTokens(batch=4, prompt_len=3, rows=8, length=2, shards=2)
    x = jnp.arange(4 * 3).reshape(4, 3)
    y = 100 + jnp.arange(8 * 2).reshape(8, 2)
    h = tokens.join(x, y)
    # Shard 0 holds prompts 0-1 then their continuations (rows 0-3), shard 1 the rest: no row changes chips.
    np.testing.assert_array_equal(h[0], jnp.concatenate([x[:2].ravel(), y[:4].ravel()]))
    np.testing.assert_array_equal(h[1], jnp.concatenate([x[2:].ravel(), y[4:].ravel()]))
    back_x, back_y = tokens.split(h)
    np.testing.assert_array_equal(back_x, x)
    np.testing.assert_array_equal(back_y, y)
    # Outside a mesh: one part. Two prompts over 8 batch shards are replicated while their 8 rows are split: no join.
    assert JointTokens.of(jnp.zeros((2, 3, 1)), jnp.zeros((8, 2, 1))).shards == 1
    with activation_sharding(make_mesh(MeshConfig(fsdp=8))):
        assert JointTokens.of(jnp.zeros((2, 3, 1)), jnp.zeros((8, 2, 1))) is None
        assert JointTokens.of(jnp.zeros((8, 3, 1)), jnp.zeros((16, 2, 1))).shards == 8
    # Under tensor parallelism XLA windows the joined matmuls over the tensor axis (see `JointTokens.of`): by parts.
    with activation_sharding(make_mesh(MeshConfig(fsdp=4, tensor=2))):
        assert JointTokens.of(jnp.zeros((8, 3, 1)), jnp.zeros((16, 2, 1))) is None
