"""The weights generation decodes from (`opsd_jax.sampling.decode_weights`): the compute-dtype copy of the decoder,
its decode layout on a mesh, LoRA adapters merged into it when it is made anyway, and what is not copied."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opsd_jax.config import MeshConfig
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.sampling import decode_weights, generate
from opsd_jax.sampling import sampler as sampler_module
from opsd_jax.sharding import make_mesh

PAD = 0
IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [PAD, PAD, PAD, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)


def _generate_on_master_weights(model, inputs, **kwargs):
    """`generate` on the stored weights themselves (no decode copy: each layer casts at use)."""
    original = sampler_module.generation_model
    try:
        sampler_module.generation_model = lambda graphdef, params, dtype, **_: (graphdef, params)
        return generate(model, inputs, **kwargs)
    finally:
        sampler_module.generation_model = original


def test_generation_runs_on_a_compute_dtype_copy_of_the_decoder_with_the_same_tokens(tiny_untied):
    """bfloat16 compute over float32 master weights (the slice configs): generation reads a bfloat16 copy
    of the decoder and head (half the bytes per token), the encoders keep theirs (not copied), and what is sampled
    is what the float32 weights give (the layers cast each weight to bfloat16 where they use it)."""
    from flax import nnx

    model = from_pretrained(tiny_untied[1], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    _, copy = decode_weights.generation_model(graphdef, params, jnp.bfloat16)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(copy)}
    decoder = [dtype for path, dtype in dtypes.items() if path.startswith(("['model']", "['lm_head']"))]
    assert decoder and all(dtype == jnp.bfloat16 for dtype in decoder)
    encoders = [dtype for path, dtype in dtypes.items() if path.startswith(("['visual']", "['audio_tower']"))]
    assert encoders and all(dtype == jnp.float32 for dtype in encoders)
    stored = {path: x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    kept = [(x, stored[path]) for path, x in jax.tree_util.tree_leaves_with_path(copy) if x.dtype == stored[path].dtype]
    assert kept and all(x.unsafe_buffer_pointer() == y.unsafe_buffer_pointer() for x, y in kept)  # not copied
    assert decode_weights.generation_model(graphdef, copy, jnp.bfloat16)[1] is copy  # no second copy

    kwargs = dict(
        max_new_tokens=8, temperature=0.7, top_k=50, eos_token_id=10**6, pad_token_id=PAD, num_samples=2, seed=1
    )
    out = generate(model, {"input_ids": IDS, "attention_mask": MASK}, **kwargs)
    reference = _generate_on_master_weights(model, {"input_ids": IDS, "attention_mask": MASK}, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(reference.logprobs))


def test_the_decode_copy_splits_the_mlp_and_head_over_their_outputs_with_the_same_tokens(tiny_untied):
    """On a mesh the compute-dtype copy moves the MLP's and the output head's `embed` split onto their
    output dimension (so a decode step makes whole values, not partial sums over the FSDP axes), keeps
    attention's layout, and samples what the float32 weights in their training layout sample."""
    _, checkpoint = tiny_untied
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = from_pretrained(checkpoint, mesh=mesh, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    _, copy = decode_weights.generation_model(*nnx.split(model), jnp.bfloat16)
    specs = {
        jax.tree_util.keystr(path).removesuffix(".value"): tuple(leaf.sharding.spec)
        + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        for path, leaf in jax.tree_util.tree_leaves_with_path(copy)
    }
    layer = "['model']['layers'][0]"
    assert specs[f"{layer}['mlp']['gate_proj']['kernel']"] == (None, ("tensor", "fsdp"))
    assert specs[f"{layer}['mlp']['down_proj']['kernel']"] == (("tensor", "fsdp"), None)
    assert specs["['lm_head']['kernel']"] == (None, ("tensor", "fsdp"))
    assert specs[f"{layer}['self_attn']['q_proj']['kernel']"] == ("fsdp", "tensor", None)  # attention as trained

    kwargs = dict(max_new_tokens=8, temperature=0, eos_token_id=10**6, pad_token_id=PAD, num_samples=2)
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    out = generate(model, inputs, mesh=mesh, **kwargs)
    reference = _generate_on_master_weights(model, inputs, mesh=mesh, **kwargs)  # in their training layout
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))


def _adapted(checkpoint, mesh=None, **lora_settings):
    """The tiny thinker, bfloat16 compute over float32 masters, with rank-4 adapters whose `b` is non-zero."""
    from opsd_jax.models import lora
    from opsd_jax.settings import LoraConfig

    model = from_pretrained(checkpoint, mesh=mesh, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    adapted = lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, **lora_settings), mesh=mesh)
    adapters = nnx.state(adapted, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    drawn = [jax.device_put(0.1 * jax.random.normal(k, x.shape, x.dtype), x.sharding) for k, x in zip(keys, leaves)]
    nnx.update(adapted, jax.tree.unflatten(tree, drawn))
    return adapted


def test_a_lora_thinker_decodes_its_merged_kernels_when_the_decode_copy_is_made_anyway(tiny_untied):
    """Float32 masters under bfloat16 compute: the decode copy of each adapted kernel is `kernel + a @ b * alpha /
    rank` (a plain thinker: no adapter matmul per token), sampling what the merged thinker samples; on a mesh the
    merged MLP kernels take the decode layout."""
    from opsd_jax.models import lora

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    adapted = _adapted(tiny_untied[1], mesh=mesh)
    graphdef, params = decode_weights.generation_model(*nnx.split(adapted), jnp.bfloat16)
    decoder = nnx.merge(graphdef, params)
    assert not lora.is_adapted(decoder) and not nnx.state(decoder, nnx.LoRAParam)
    up = decoder.model.layers[0].mlp.up_proj.kernel.get_value()
    expected = lora.merged_kernels(adapted)[("model", "layers", 0, "mlp", "up_proj", "kernel")]
    assert up.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(up, np.float32), np.asarray(expected.astype(jnp.bfloat16), np.float32))
    assert tuple(up.sharding.spec) == (None, ("tensor", "fsdp"))  # the decode layout, as a plain copy's
    encoders = [x.dtype for path, x in nnx.to_flat_state(nnx.state(decoder, nnx.Param)) if path[0] == "visual"]
    assert encoders and all(dtype == jnp.float32 for dtype in encoders)

    kwargs = dict(max_new_tokens=8, temperature=0.7, top_k=50, eos_token_id=10**6, pad_token_id=PAD, num_samples=2)
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    out = generate(adapted, inputs, mesh=mesh, seed=1, **kwargs)
    reference = generate(lora.merged_thinker(adapted), inputs, mesh=mesh, seed=1, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(reference.logprobs), atol=1e-6)
    unmerged = decode_weights.generation_model(*nnx.split(adapted), jnp.bfloat16, merge_adapters=False)
    assert lora.is_adapted(nnx.merge(*unmerged))  # the adapters kept when asked (benchmarks/lora.py times both)


@pytest.mark.parametrize("base_dtype", ["dtype", "int8"])
def test_a_lora_thinker_whose_base_needs_no_decode_copy_runs_its_adapters(tiny_untied, base_dtype):
    """The base stored in the compute dtype, or quantized (QLoRA): merging would make a second copy of the adapted
    kernels, so generation runs the adapters on the base as stored, which it does not copy."""
    from opsd_jax.models import lora

    adapted = _adapted(tiny_untied[1], base_dtype=base_dtype)
    graphdef, params = nnx.split(adapted)
    decode_graphdef, decode_params = decode_weights.generation_model(graphdef, params, jnp.bfloat16)
    assert lora.is_adapted(nnx.merge(decode_graphdef, decode_params))
    stored = {path: x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    kernels = [
        (path, x)
        for path, x in jax.tree_util.tree_leaves_with_path(decode_params)
        if "up_proj" in jax.tree_util.keystr(path) and "lora" not in jax.tree_util.keystr(path)
    ]
    assert kernels and all(x.unsafe_buffer_pointer() == stored[path].unsafe_buffer_pointer() for path, x in kernels)


def test_merge_adapters_refuses_a_thinker_without_adapters(tiny_untied):
    model = from_pretrained(tiny_untied[1])
    with pytest.raises(ValueError, match="merge_adapters"):
        decode_weights.generation_model(*nnx.split(model), jnp.float32, merge_adapters=True)


@pytest.mark.parametrize(
    ("base_dtype", "decode", "merged"), [("dtype", "merged", True), ("param_dtype", "adapted", False)]
)
def test_model_lora_decode_overrides_the_automatic_choice(tiny_untied, base_dtype, decode, merged):
    """`model.lora.decode`: "merged" decodes a merged copy even over a base already in the compute dtype (a copy
    of the adapted kernels), "adapted" runs the adapters even where the copy is made anyway."""
    from opsd_jax.models import lora

    adapted = _adapted(tiny_untied[1], base_dtype=base_dtype, decode=decode)
    graphdef, params = decode_weights.generation_model(*nnx.split(adapted), jnp.bfloat16)
    decoder = nnx.merge(graphdef, params)
    assert lora.is_adapted(decoder) is not merged
    if merged:
        up = decoder.model.layers[0].mlp.up_proj.kernel.get_value()
        expected = lora.merged_kernels(adapted)[("model", "layers", 0, "mlp", "up_proj", "kernel")]
        np.testing.assert_array_equal(np.asarray(up, np.float32), np.asarray(expected, np.float32))


def test_model_lora_decode_takes_one_of_its_choices():
    from opsd_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.lora.decode"):
        load_config(None, ["model.lora.rank=4", "model.lora.decode=fused"], num_devices=None)
