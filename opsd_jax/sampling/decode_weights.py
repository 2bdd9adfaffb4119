"""The weights generation decodes from: a compute-dtype copy of the decoder laid out for decoding, and a LoRA
thinker's adapters merged into it when that copy is made anyway (`generation_model`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from opsd_jax.models import lora
from opsd_jax.models.precision import is_decoder_param, param_names
from opsd_jax.sharding import move_split

# Generation reads every decoder weight once per token. The decoder's layers (Linear, Embed, RMSNorm)
# cast each weight to the compute dtype where they use it (`opsd_jax.models.precision`), so a copy already
# in that dtype gives the same outputs from half the bytes of float32 master weights, and no per-token
# conversion. The encoders' LayerNorms compute from float32 weights: they keep theirs (they run once, in
# the prefill). Generation's output head casts too (`logits`), so the copy covers it as well.

# The copy is also laid out for decoding. Training splits each matrix's model width (`embed`) over the
# FSDP axes, so that a many-token pass gathers whole weights; a decode step has one token per row and
# leaves the weights in place, so with that layout every MLP and output-head matmul makes partial sums
# as wide as its output ([rows, 18944] per MLP projection, [rows, 152064] logits at 7B) that are written
# to HBM and all-reduced, every token. In the copy, those matrices' `embed` split moves onto their
# output (MLP, vocabulary) dimension: each chip computes whole values of its slice of the MLP and of the
# logits, and only [rows, hidden]-sized activations move. Attention keeps its layout (its head
# dimensions do not split evenly over the FSDP axes).  {path suffix: the `embed` dimension}
_DECODE_SPLIT = {
    ("mlp", "gate_proj", "kernel"): 0,
    ("mlp", "up_proj", "kernel"): 0,
    ("mlp", "down_proj", "kernel"): 1,
    ("lm_head", "kernel"): 0,
}


def _is_decoder_weight(path: tuple, leaf: Any, dtype: jnp.dtype) -> bool:
    return is_decoder_param(path) and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype


def _decode_sharding(path: tuple, leaf: Any) -> Any:
    """The sharding of `leaf`'s decode copy: `_DECODE_SPLIT`'s matrices with their `embed` split moved
    onto their other dimension (where it divides evenly); every other leaf's unchanged."""
    sharding = getattr(leaf, "sharding", None)
    names = param_names(path)
    for suffix, embed in _DECODE_SPLIT.items():
        if names[-len(suffix) :] == suffix and leaf.ndim == 2:
            return move_split(sharding, leaf.shape, source=embed, target=1 - embed)
    return sharding


@functools.partial(jax.jit, static_argnames=("scale", "layout"))
def _decoder_copy(sources: list, scale: float, layout: tuple) -> list:
    """The decode copies of `sources`: each an array, or a LoRA layer's `(stored kernel, a, b)` (merged:
    `lora.merge_kernel` with `scale`), cast and placed as `layout` says (per source, a static argument: a traced
    array has no sharding to read) `(dtype or None, sharding or None)`. Only what changes goes through: jit
    would return a copy even of an argument it returns untouched."""
    copies = []
    for source, (cast, sharding) in zip(sources, layout):
        x = lora.merge_kernel(*source, scale) if isinstance(source, tuple) else source
        x = x if cast is None else x.astype(cast)
        copies.append(x if sharding is None else jax.lax.with_sharding_constraint(x, sharding))
    return copies


def generation_model(
    graphdef: nnx.GraphDef, params: nnx.State, dtype: Any, *, merge_adapters: bool | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and parameters generation runs on: the text decoder's and output head's weights in the compute
    `dtype`, as a copy laid out for decoding (`_DECODE_SPLIT`), every other array as it is (not copied).
    Unchanged, and no copy at all, when the weights are already in `dtype`.

    A LoRA thinker (`lora.apply_lora`) decodes its merged copy (a plain thinker whose kernels are `kernel +
    a @ b * alpha / rank`, `lora.merged_thinker`), which spares every token the adapters' two extra matmuls,
    when `merge_adapters` says so; by default (None) as its `model.lora.decode` says, and under "auto" exactly
    when every adapted kernel gets a decode copy anyway (master weights wider than `dtype`, in the decoder): the
    merge then costs one `a @ b` per layer and no memory. With the base stored in `dtype` or quantized (QLoRA),
    a merged copy would be a second copy of the adapted kernels (QLoRA's in bfloat16, two to four times its
    base): "auto" runs the adapters there (`benchmarks/lora.py` times both). Abstract parameters (`jax.ShapeDtypeStruct`s, as `compile_generation`
    takes) give abstract ones with the copy's shardings.
    """
    dtype = jnp.dtype(dtype)
    model = nnx.merge(graphdef, params)  # shares the arrays; reads the structure
    if merge_adapters is None:
        merge_adapters = lora.is_adapted(model) and _merges_by_default(model, dtype)
    elif merge_adapters and not lora.is_adapted(model):
        raise ValueError("merge_adapters: the model has no LoRA adapters to merge")
    out_graphdef, out, merged = graphdef, params, {}
    if merge_adapters:
        flat, treedef = jax.tree_util.tree_flatten(params)
        out_graphdef, out = _merged_structure(
            graphdef, treedef, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat)
        )
        merged = {(*path, "kernel"): layer for path, layer in lora.adapted_layers(model)}
    stored = {param_names(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}

    leaves = []  # per leaf of `out`: the stored array, or the index of its copy in `sources`
    sources, like, layout = [], [], []
    for path, _ in jax.tree_util.tree_leaves_with_path(out):
        names = param_names(path)
        layer = merged.get(names)
        if layer is not None:
            a, b = layer.kernel_lora_a.get_value(), layer.kernel_lora_b.get_value()
            kernel = lora.stored_kernel(layer)
            source, target = (kernel, a, b), _merged_kernel_like(layer, kernel, a, b)
        elif _is_decoder_weight(path, stored[names], dtype):
            source = target = stored[names]
        else:
            leaves.append(stored[names])
            continue
        decoder = is_decoder_param(path)  # an encoder's adapted kernel (merge_adapters=True) keeps dtype and layout
        leaves.append(len(sources))
        sources.append(source)
        like.append(target)
        layout.append(
            (dtype if decoder and target.dtype != dtype else None, _decode_sharding(path, target) if decoder else None)
        )
    if not sources and out is params:
        return graphdef, params
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        copies = [
            jax.ShapeDtypeStruct(x.shape, cast or x.dtype, sharding=sharding or getattr(x, "sharding", None))
            for x, (cast, sharding) in zip(like, layout)
        ]
    else:
        rank, alpha = lora.lora_settings(model) if merged else (1, 1.0)
        copies = _decoder_copy(sources, alpha / rank, tuple(layout))
    leaves = [copies[leaf] if isinstance(leaf, int) else leaf for leaf in leaves]
    return out_graphdef, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out), leaves)


def _merges_by_default(model: nnx.Module, dtype: jnp.dtype) -> bool:
    """An adapted thinker's `model.lora.decode`: "merged", "adapted", or under "auto" whether every adapted kernel
    gets a decode copy anyway (stored unquantized, wider than `dtype`, in the decoder)."""
    setting = lora.decode_setting(model)
    if setting != "auto":
        return setting == "merged"
    return all(
        not lora.is_quantized(layer) and _is_decoder_weight(path, layer.kernel.get_value(), dtype)
        for path, layer in lora.adapted_layers(model)
    )


@functools.lru_cache(maxsize=8)
def _merged_structure(
    graphdef: nnx.GraphDef, treedef: Any, leaves: tuple[jax.ShapeDtypeStruct, ...]
) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and abstract state of `lora.merged_thinker` of the adapted thinker `graphdef` with parameters of
    these shapes. Cached: tracing the merge for every rollout would cost more than the merge (0.3 s at 28 layers)."""
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return nnx.split(nnx.eval_shape(lambda state: lora.merged_thinker(nnx.merge(graphdef, state)), params))


def _merged_kernel_like(layer: Any, kernel: Any, a: Any, b: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of `lora.merge_kernel(kernel, a, b, ...)`: the stored kernel's, or for a quantized
    one (QLoRA) the layer's kernel shape, the adapters' dtype and the sharding their input and output axes give
    (on the kernel's first input and first output axis)."""
    if lora.is_quantized_kernel(kernel):
        sharding = None
        if isinstance(getattr(a, "sharding", None), NamedSharding):
            spec_a = tuple(a.sharding.spec) + (None,) * (2 - len(a.sharding.spec))
            spec_b = tuple(b.sharding.spec) + (None,) * (2 - len(b.sharding.spec))
            spec = [None] * (len(layer.in_shape) + len(layer.out_shape))
            spec[0], spec[len(layer.in_shape)] = spec_a[0], spec_b[1]
            sharding = NamedSharding(a.sharding.mesh, PartitionSpec(*spec))
        return jax.ShapeDtypeStruct(layer.in_shape + layer.out_shape, a.dtype, sharding=sharding)
    return kernel
