"""LoRA and QLoRA adapters on the thinker's frozen base weights, built with qwix.

`apply_lora(model, config)` returns the thinker with qwix's `kernel_lora_a [in, rank]` / `kernel_lora_b
[rank, out]` (`nnx.LoRAParam`) beside the `kernel` of every linear layer whose path matches
`config.target_modules`; the layer computes `x @ kernel + (x @ a @ b) * alpha / rank`. With
`base_dtype` int8 / nf4 qwix stores those kernels quantized (QLoRA) and computes with them as they are.
With `base_dtype` dtype the text decoder's base kernels, biases and embedding table are stored in the compute
dtype (`model.dtype`), but the step's output head (`opsd_jax.models.precision`): its layers cast those weights to
the compute dtype where they use them, so the outputs are the same. Whatever the base, the adapters are kept in
the dtype of the kernels as loaded (`model.param_dtype`, float32 masters: qwix would give QLoRA's the quantization
scale's), and an adapted layer's output is in the compute dtype (`Linear`), as a plain layer's: under bfloat16
compute a fresh adapter (`b` zero) leaves every activation as the base model's, bit for bit.

How qwix is used here, and why not exactly as its README does:
* qwix adds the adapters inside the matmuls it intercepts while a wrapped method runs, creating the
  parameters on the first run. The thinker's decoder splits and merges each layer inside the forward
  (`TextModel.__call__`, under `jax.checkpoint` with remat), so parameters created there would land on
  temporary copies: the first run calls each target layer directly instead (any input creates them).
* For NNX, qwix wraps one method of the module it is given. The thinker has many entry points (the
  sampler's `prefill` / `extend`, the step's `completion_hidden`, `score_completions`, ...), so qwix wraps the
  call of a tiny `_AdapterScope` module, and the adapted thinker's class runs each of its public methods
  through that scope (`ADAPTED_METHODS`). Every forward of an adapted thinker runs with the adapters: a
  forward outside the scope would not only drop them (and fail on QLoRA's quantized kernels), its
  `jax.checkpoint` traces are cached per graph and shapes, so it could also reuse an adapted trace.
* The teacher's forward without adapters (the base model) is therefore not a switched-off scope but the
  same parameters with every `lora_b` zero (`without_adapters`): `x @ a @ 0` adds exact zeros, so the
  logits equal the base model's, and no base weight is copied (the zeros are `[rank, out]` per layer).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import Mesh

from opsd_jax.models.layers import Linear
from opsd_jax.models.precision import in_compute_dtype, param_names
from opsd_jax.settings import LoraConfig
from opsd_jax.sharding import AxisRules, param_shardings

T = TypeVar("T")

# The thinker's methods that run the model; each runs inside the adapter scope on an adapted thinker.
ADAPTED_METHODS = (
    "__call__",
    "forward",
    "encode_media",
    "embed_inputs",
    "hidden_states",
    "logits",
    "extend",
    "prefill",
    "completion_hidden",
    "score_completions",
)
_SCOPE_ROOT = "thinker"  # the adapted thinker's attribute in `_AdapterScope`: qwix's module paths start with it
LORA_SUFFIXES = ("_lora_a", "_lora_b")
QUANTIZED = ("int8", "nf4")  # `LoraConfig.base_dtype`s of QLoRA


class _AdapterScope(nnx.Module):
    """The one module whose call qwix intercepts: `scope(run)` is `run(scope)` with the adapters active."""

    def __init__(self, thinker: nnx.Module | None):
        self.thinker = thinker

    def __call__(self, run: Callable[[_AdapterScope], T]) -> T:
        return run(self)


def is_adapted(model: nnx.Module) -> bool:
    """Whether `model` carries LoRA adapters (`apply_lora`'s output, or a merge of its graph)."""
    return hasattr(type(model), "_adapter_scope")


def target_layers(model: nnx.Module, pattern: str) -> list[tuple[str, Linear]]:
    """The linear layers of `model` whose '/'-joined path fully matches `pattern`, with their paths."""
    return [
        ("/".join(map(str, path)), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Linear) and re.fullmatch(pattern, "/".join(map(str, path)))
    ]


def apply_lora(
    model: nnx.Module,
    config: LoraConfig,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: AxisRules | None = None,
) -> nnx.Module:
    """The thinker `model` with adapters on its `config.target_modules` layers; `model` itself is left as it was
    (its base weights are shared, not copied, except those QLoRA quantizes and those `base_dtype` dtype casts).

    `a` starts He-uniform from `seed`, `b` at zero (the adapted model starts equal to the base). Adapters carry
    `logical_axes` (`a [in, rank]`: the kernel's (first) input axis and an unsharded rank, `b [rank, out]`: rank and
    the (first) output axis; qwix flattens a kernel's input and output axes into these matrices), and with
    a `mesh` they are placed by them under `rules`, as the base weights are.

    Raises ValueError naming the pattern when it matches no linear layer.
    """
    targets = target_layers(model, config.target_modules)
    if not targets:
        raise ValueError(
            f"model.lora.target_modules: {config.target_modules!r} matches no linear layer of the model "
            "(paths look like model/layers/0/self_attn/q_proj)"
        )
    kernel_dtypes = {path: layer.kernel.get_value().dtype for path, layer in targets}
    quantized = config.base_dtype in QUANTIZED
    # qwix adapts every matmul or convolution it intercepts inside a matching module: name the target linear
    # layers themselves, so that a broad pattern (".*") leaves the audio encoder's convolutions alone. One rule per
    # quantization tiling (`quantization_tiles`), for the layers that share it.
    tile = config.quantization_tile if config.base_dtype == "nf4" else None
    by_tiling: dict[Any, list[str]] = {}
    for path, layer in targets:
        tiles = quantization_tiles(layer, tile)
        by_tiling.setdefault(tuple(sorted(tiles.items())) if isinstance(tiles, dict) else tiles, []).append(path)
    lora_rules = [
        qwix.LoraRule(
            module_path=f"{_SCOPE_ROOT}/({'|'.join(re.escape(path) for path in paths)})",
            rank=config.rank,
            alpha=config.alpha,
            weight_qtype=config.base_dtype if quantized else None,
            tile_size=dict(tiles) if isinstance(tiles, tuple) else tiles,
        )
        for tiles, paths in by_tiling.items()
    ]
    provider = qwix.LoraProvider(rules=lora_rules)

    def create_adapters(scope: _AdapterScope) -> None:
        for _, layer in target_layers(scope.thinker, config.target_modules):
            layer(jnp.zeros((1, *layer.in_shape), layer.dtype))

    scope = qwix.apply_lora_to_model(_AdapterScope(model), provider, create_adapters, rngs=nnx.Rngs(seed))
    adapted = scope.thinker
    scope.thinker = None  # the scope must not keep the weights alive: it only opens qwix's interception
    for path, layer in target_layers(adapted, config.target_modules):
        in_axis, out_axis = layer.axes[0], layer.axes[len(layer.in_shape)]
        for adapter in (layer.kernel_lora_a, layer.kernel_lora_b):
            adapter.set_value(adapter.get_value().astype(kernel_dtypes[path]))
        layer.kernel_lora_a.set_metadata("logical_axes", (in_axis, None))
        layer.kernel_lora_b.set_metadata("logical_axes", (None, out_axis))
    adapted.__class__ = _adapted_class(type(adapted), scope, config)
    if config.base_dtype == "dtype":
        base = nnx.state(adapted, nnx.Not(nnx.LoRAParam))
        nnx.update(adapted, in_compute_dtype(base, adapted.dtype))
    if mesh is not None:
        adapters = nnx.state(adapted, nnx.LoRAParam)
        nnx.update(adapted, jax.device_put(adapters, param_shardings(adapters, mesh, rules)))
    return adapted


def quantization_tiles(layer: Linear, tile: int | None) -> int | dict[int, int] | None:
    """qwix's `tile_size` for `layer`'s kernel quantized with one scale per `tile` input features (nf4), or None.

    qwix tiles the last input (contracting) axis of a kernel and shares each scale over every other input axis. A
    kernel with several input axes (the text decoder's `o_proj`, `[heads, head_dim, hidden]`) gets the tiles its
    flattened `[heads * head_dim, hidden]` matrix would: `tile` consecutive entries of one head, or `tile / head_dim`
    whole heads. Raises ValueError when `tile` is neither a divisor nor a multiple of the last input axis.
    """
    if tile is None or len(layer.in_shape) == 1:
        return tile
    *outer, inner = layer.in_shape
    if inner % tile == 0:
        return {**{axis: 1 for axis in range(len(outer))}, len(outer): tile}
    if tile % inner == 0 and len(outer) == 1 and outer[0] % (tile // inner) == 0:
        return {0: tile // inner, 1: inner}
    raise ValueError(
        f"model.lora.quantization_tile: {tile} must divide, or be a whole number of, the {inner} features of each "
        f"head of an adapted layer with input shape {layer.in_shape}"
    )


def _adapted_class(thinker_class: type, scope: _AdapterScope, config: LoraConfig) -> type:
    """A subclass of `thinker_class` whose `ADAPTED_METHODS` run inside `scope` (qwix's interception); it also
    records the adapters' rank and alpha (for merging and export) and how generation decodes it (`decode`)."""

    def scoped(name: str):
        method = getattr(thinker_class, name)

        @functools.wraps(method)
        def run(self, *args, **kwargs):
            return scope(lambda _: method(self, *args, **kwargs))

        return run

    fields = {name: scoped(name) for name in ADAPTED_METHODS}
    return type(
        f"Lora{thinker_class.__name__}",
        (thinker_class,),
        {
            **fields,
            "_adapter_scope": scope,
            "_lora_rank": config.rank,
            "_lora_alpha": config.alpha,
            "_lora_decode": config.decode,
        },
    )


def trainable_filter(model: nnx.Module) -> Any:
    """What an update trains: the adapters of an adapted thinker, else every parameter."""
    return nnx.LoRAParam if is_adapted(model) else nnx.Param


def frozen_filter() -> Any:
    """The state an adapted thinker does not train: its base weights, QLoRA's quantized kernels among them
    (qwix stores those as its own arrays, not as `nnx.Param`)."""
    return nnx.Not(nnx.LoRAParam)


def is_adapter(path: tuple) -> bool:
    """Whether a tree path (of `jax.tree_util`, into an `nnx.State`) leads into a `*_lora_a` / `*_lora_b` adapter."""
    return any(str(name).endswith(LORA_SUFFIXES) for name in param_names(path))


def is_lora_b(path: tuple) -> bool:
    """Whether a tree path (of `jax.tree_util`, into an `nnx.State`) leads into a `*_lora_b` adapter."""
    return any(str(name).endswith("_lora_b") for name in param_names(path))


def without_adapters(adapters: nnx.State) -> nnx.State:
    """`adapters` with every `lora_b` zero: merged with the base weights, the base model's forward (exactly:
    each adapted layer adds `x @ a @ 0`)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: jnp.zeros_like(x) if is_lora_b(path) else x, adapters)


def merged_kernels(model: nnx.Module) -> dict[tuple, jax.Array]:
    """`{kernel path: merge_kernel(...)}` for every adapted layer of `model` (paths are `nnx` state paths)."""
    rank, alpha = lora_settings(model)
    return {
        (*path, "kernel"): merge_kernel(
            stored_kernel(module), module.kernel_lora_a[...], module.kernel_lora_b[...], alpha / rank
        )
        for path, module in adapted_layers(model)
    }


def merge_kernel(kernel: Any, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`kernel + a @ b * scale` (`scale` = alpha / rank), summed in float32, in the kernel's dtype. `kernel [*in, *out]`
    as `stored_kernel` gives it: QLoRA's quantized form is dequantized first (into the adapters' dtype)."""
    kernel = dequantize(kernel, a.dtype)
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)).reshape(kernel.shape)  # qwix's a, b flatten its axes
    return (kernel.astype(jnp.float32) + delta * scale).astype(kernel.dtype)


def adapted_layers(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """`(module path, layer)` of every linear layer of `model` that carries adapters, in module order."""
    return [
        (tuple(path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, Linear) and hasattr(module, "kernel_lora_a")
    ]


def stored_kernel(layer: Linear) -> Any:
    """A layer's base kernel as stored: an array, or for QLoRA qwix's quantized form (a pytree, not an array)."""
    return layer.kernel.get_value() if isinstance(layer.kernel, nnx.Variable) else layer.kernel


def is_quantized_kernel(kernel: Any) -> bool:
    """Whether a kernel as `stored_kernel` gives it is quantized (QLoRA: qwix's form, not an array; abstract
    weights, as compile-check traces them, are `jax.ShapeDtypeStruct`s)."""
    return not isinstance(kernel, jax.Array | jax.ShapeDtypeStruct)


def is_quantized(layer: Linear) -> bool:
    """Whether an adapted layer's base kernel is stored quantized (`is_quantized_kernel`)."""
    return is_quantized_kernel(stored_kernel(layer))


def dequantize(kernel: Any, dtype: Any) -> jax.Array:
    """A kernel as `stored_kernel` gives it, as an array: itself, or QLoRA's quantized form dequantized into `dtype`."""
    if not is_quantized_kernel(kernel):
        return kernel
    return qwix.dequantize(kernel.array).astype(dtype)  # qwix's WithAux


def decode_setting(model: nnx.Module) -> str:
    """`LoraConfig.decode` of an adapted thinker: "auto", "merged" or "adapted"."""
    return type(model)._lora_decode


def lora_settings(model: nnx.Module) -> tuple[int, float]:
    """`(rank, alpha)` of an adapted thinker."""
    return type(model)._lora_rank, type(model)._lora_alpha


def merged_thinker(adapted: nnx.Module) -> nnx.Module:
    """A plain thinker (the class `apply_lora` adapted) whose adapted kernels are `merged_kernels`: what exports and
    a decode copy without adapter matmuls run. Every other weight is `adapted`'s own array (not copied)."""
    kernels = merged_kernels(adapted)
    merged = nnx.clone(adapted)
    for path, module in adapted_layers(merged):
        module.kernel = nnx.Param(kernels[(*path, "kernel")], logical_axes=module.axes)
        del module.kernel_lora_a, module.kernel_lora_b
    merged.__class__ = type(adapted).__mro__[1]
    return merged
