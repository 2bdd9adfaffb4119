"""LoRA / QLoRA adapters (qwix) on the thinker: zero at the start, the LoRA formula, the base recovered exactly with
`lora_b` zero (remat on: no cached adapted trace leaks into it), QLoRA's quantized kernels, logical axes on a mesh,
sampling the adapted model, and a target pattern that matches nothing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from opsd_jax.config import MeshConfig
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.sampling import generate
from opsd_jax.settings import LoraConfig
from opsd_jax.sharding import make_mesh

IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [0, 0, 0, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)
CONFIG = LoraConfig(rank=4, alpha=8.0)


def randomize_adapters(model, seed: int = 0) -> None:
    """Non-zero `lora_b` (a freshly adapted model equals its base), as training would leave them."""
    adapters = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


@pytest.fixture(scope="module")
def base(tiny_untied):
    return from_pretrained(tiny_untied[1], remat=True)


@pytest.fixture(scope="module")
def inputs(base):
    return base.prepare_inputs(IDS, attention_mask=MASK)


def test_a_fresh_adapter_leaves_the_model_unchanged_and_shares_its_weights(base, inputs):
    adapted = lora.apply_lora(base, CONFIG)
    np.testing.assert_array_equal(adapted.forward(inputs), base.forward(inputs))
    # One copy of the base: the adapted model's kernels are the base's arrays, not copies.
    assert adapted.model.layers[0].mlp.up_proj.kernel.get_value() is base.model.layers[0].mlp.up_proj.kernel.get_value()
    paths = {"/".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))}
    assert paths == {
        f"model/layers/{i}/{name}"
        for i in range(2)
        for name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj")
        + ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
    }
    q = adapted.model.layers[0].self_attn.q_proj
    assert q.kernel_lora_a.get_value().shape == (64, 4) and q.kernel_lora_b.get_value().shape == (4, 64)
    assert np.all(np.asarray(q.kernel_lora_b.get_value()) == 0)


def test_adapted_forward_is_the_merged_kernels_and_zero_b_is_the_base_exactly(base, inputs):
    adapted = lora.apply_lora(base, CONFIG)
    randomize_adapters(adapted)
    adapted_logits = adapted.forward(inputs)
    assert float(jnp.max(jnp.abs(adapted_logits - base.forward(inputs)))) > 1e-2

    merged = lora.merged_thinker(adapted)
    assert not lora.is_adapted(merged) and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(adapted_logits, merged.forward(inputs), atol=1e-5)

    # The teacher's view: the same parameters with lora_b zero, jitted (remat's traces are cached per graph).
    graphdef, adapters, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    teacher = jax.jit(lambda a, r: nnx.merge(graphdef, lora.without_adapters(a), r).forward(inputs))
    student = jax.jit(lambda a, r: nnx.merge(graphdef, a, r).forward(inputs))
    np.testing.assert_allclose(student(adapters, rest), adapted_logits, atol=1e-5)  # jitted vs eager rounding
    base_graphdef, base_params = nnx.split(base)
    original = jax.jit(lambda p: nnx.merge(base_graphdef, p).forward(inputs))(base_params)
    np.testing.assert_array_equal(teacher(adapters, rest), original)


def test_a_base_stored_in_the_compute_dtype_gives_the_same_logits_from_half_the_bytes(tiny_untied):
    # bfloat16 compute over float32 parameters (master weights), as the shipped LoRA configs run.
    base = from_pretrained(tiny_untied[1], dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    inputs = base.prepare_inputs(IDS, attention_mask=MASK)
    stored = lora.apply_lora(base, CONFIG)
    cast = lora.apply_lora(base, dataclasses.replace(CONFIG, base_dtype="dtype"))
    assert base.model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.float32  # the input model is unchanged
    # The adapters keep model.param_dtype (qwix made them on the float32 kernels), the same values.
    adapters, cast_adapters = nnx.state(stored, nnx.LoRAParam), nnx.state(cast, nnx.LoRAParam)
    assert {x.dtype for x in jax.tree.leaves(cast_adapters)} == {jnp.dtype(jnp.float32)}
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(cast_adapters)):
        np.testing.assert_array_equal(a, b)
    # The decoder's weights in bfloat16; the step's output head (used as stored) and the encoders' weights as they are.
    base_state, cast_base = nnx.state(stored, lora.frozen_filter()), nnx.state(cast, lora.frozen_filter())
    halved = 0
    for (path, x), (_, y) in zip(nnx.to_flat_state(base_state), nnx.to_flat_state(cast_base)):
        x, y = x.get_value(), y.get_value()
        down = path[0] == "model"
        assert y.dtype == (jnp.bfloat16 if down else jnp.float32), path
        assert y.nbytes == (x.nbytes // 2 if down else x.nbytes)
        halved += x.nbytes if down else 0
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x).astype(y.dtype))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(cast_base) == nbytes(base_state) - halved // 2
    # Trained adapters (lora_b not zero): the same logits, bit for bit, and the same step head kernel.
    randomize_adapters(stored)
    randomize_adapters(cast)
    np.testing.assert_array_equal(cast.forward(inputs), stored.forward(inputs))
    np.testing.assert_array_equal(cast.head_kernel(), stored.head_kernel())


@pytest.mark.parametrize("base_dtype", ["param_dtype", "dtype", "int8", "nf4"])
def test_under_bfloat16_compute_a_fresh_adapter_is_the_base_bit_for_bit_and_adapters_stay_float32(
    tiny_untied, base_dtype
):
    """bfloat16 compute over float32 masters, as the shipped LoRA configs run: the activations stay bfloat16 after an
    adapted layer (its output is cast as a plain layer's), so with `lora_b` zero (a fresh adapter, the frozen
    teacher's view) the logits are the base model's exactly (before this cast: up to 0.047 apart); the adapters are
    float32 whatever the base's storage (qwix made QLoRA's in the quantization scale's bfloat16)."""
    base = from_pretrained(tiny_untied[1], dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    inputs = base.prepare_inputs(IDS, attention_mask=MASK)
    adapted = lora.apply_lora(base, LoraConfig(rank=4, alpha=8.0, base_dtype=base_dtype, quantization_tile=32))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam))} == {jnp.dtype(jnp.float32)}
    layer = adapted.model.layers[0].mlp.up_proj
    x = jnp.ones((1, 3, layer.kernel_lora_a.get_value().shape[0]), jnp.bfloat16)
    assert adapted._adapter_scope(lambda _: layer(x)).dtype == jnp.bfloat16
    if base_dtype in ("param_dtype", "dtype"):  # QLoRA's base is the quantized model, not this one
        np.testing.assert_array_equal(adapted.forward(inputs), base.forward(inputs))


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_qlora_computes_with_the_quantized_kernels(base, inputs, base_dtype):
    adapted = lora.apply_lora(base, LoraConfig(rank=4, alpha=8.0, base_dtype=base_dtype, quantization_tile=32))
    assert not isinstance(adapted.model.layers[0].mlp.up_proj.kernel, nnx.Param)  # qwix's quantized array
    assert isinstance(adapted.lm_head.kernel, nnx.Param)  # not a target: as it was
    layer = adapted.model.layers[0].mlp.up_proj
    assert lora.is_quantized(layer)
    kernel = lora.dequantize(lora.stored_kernel(layer), layer.kernel_lora_a.get_value().dtype)
    reference = base.model.layers[0].mlp.up_proj.kernel.get_value()
    assert kernel.shape == reference.shape
    assert 0 < float(jnp.max(jnp.abs(kernel - reference))) < float(jnp.max(jnp.abs(reference)))
    randomize_adapters(adapted)
    logits = adapted.forward(inputs)
    # Quantization moves the logits; the forward is the one of the dequantized kernels plus the adapters.
    assert float(jnp.max(jnp.abs(logits - base.forward(inputs)))) > 1e-3
    np.testing.assert_allclose(logits, lora.merged_thinker(adapted).forward(inputs), atol=1e-4)


@pytest.mark.parametrize("tile", [8, 32])
def test_nf4_tiles_a_kernel_with_heads_as_its_flattened_matrix(base, tile):
    """The decoder's o_proj keeps heads as an input axis ([heads, head_dim, hidden]; the tiny model's head_dim is
    16): its nf4 scales are those of the checkpoint's [heads * head_dim, hidden] matrix tiled `tile` features at a
    time, within a head (8) or over whole heads (32), not one scale shared across the heads."""
    adapted = lora.apply_lora(base, LoraConfig(rank=4, alpha=8.0, base_dtype="nf4", quantization_tile=tile))
    layer = adapted.model.layers[0].self_attn.o_proj
    assert layer.in_shape == (4, 16)
    stored = lora.stored_kernel(layer).array  # qwix's quantized array
    kernel = np.asarray(qwix.dequantize(stored), np.float32)
    reference = jnp.asarray(base.model.layers[0].self_attn.o_proj.kernel.get_value()).reshape(64, 64)
    flat = qwix.quantize(reference, "nf4", channelwise_axes=[1], tiled_axes={0: tile}, scale_dtype=stored.scale.dtype)
    np.testing.assert_array_equal(kernel.reshape(64, 64), np.asarray(qwix.dequantize(flat), np.float32))
    with pytest.raises(ValueError, match=r"quantization_tile: 24 must divide, or be a whole number of, the 16"):
        lora.quantization_tiles(layer, 24)


def test_adapters_carry_logical_axes_and_shard_on_the_mesh(tiny_untied):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    adapted = lora.apply_lora(from_pretrained(tiny_untied[1], mesh=mesh), CONFIG, mesh=mesh)
    up = adapted.model.layers[0].mlp.up_proj
    assert up.kernel_lora_a.get_metadata()["logical_axes"] == ("embed", None)
    assert up.kernel_lora_b.get_metadata()["logical_axes"] == (None, "mlp")
    a, b, kernel = up.kernel_lora_a.get_value(), up.kernel_lora_b.get_value(), up.kernel.get_value()
    # a's input axis is split as the kernel's input axis is; b's output axis as the kernel's output axis.
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (2 - len(x.sharding.spec))  # noqa: E731
    assert spec(a) == (spec(kernel)[0], None) and spec(b) == (None, spec(kernel)[1])
    assert spec(kernel) != (None, None)  # the tiny model's up_proj is split on this mesh: the check means something


def test_the_sampler_runs_the_adapted_model(base):
    adapted = lora.apply_lora(base, CONFIG)
    randomize_adapters(adapted, seed=3)
    merged = lora.merged_thinker(adapted)
    prompts = {"input_ids": IDS, "attention_mask": MASK}
    kwargs = dict(max_new_tokens=6, temperature=0.0, eos_token_id=1, pad_token_id=0)
    with_adapters = generate(adapted, prompts, **kwargs)
    np.testing.assert_array_equal(with_adapters.tokens, generate(merged, prompts, **kwargs).tokens)
    assert not np.array_equal(with_adapters.tokens, generate(base, prompts, **kwargs).tokens)


def test_a_target_pattern_that_matches_nothing_is_refused(base):
    with pytest.raises(ValueError, match=r"model.lora.target_modules: 'decoder/.\*' matches no linear layer"):
        lora.apply_lora(base, LoraConfig(target_modules="decoder/.*"))
