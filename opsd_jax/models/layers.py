"""Building blocks shared by the thinker's text decoder and its two encoders.

Attribute and parameter names follow the PyTorch reference (`weight`, `bias`) except where Flax has its
own convention for a layout difference: a `kernel` is stored `[in, out]` (the transpose of
`torch.nn.Linear.weight`) and an `embedding` is stored `[num, dim]`. `opsd_jax.models.weights` maps
checkpoint tensors onto these names generically, so a module whose attribute path mirrors the
reference's needs no per-module loading code.

Every parameter carries `logical_axes` metadata (names from `opsd_jax.sharding.rules`); the sharding
package turns them into mesh placements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from flax.nnx.nn.dtypes import promote_dtype

from opsd_jax.sharding import constrain_activation

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (_INIT_STD * jax.random.normal(rngs.params(), shape)).astype(dtype)


class Linear(nnx.Module):
    """`y = x @ kernel + bias` over the trailing axes of `x`, computed in `dtype`.

    `in_features` and `out_features` are each a size or a shape: the kernel is `[*in_shape, *out_shape]` and maps
    `x [..., *in_shape]` to `[..., *out_shape]` (the bias is `out_shape`). The text decoder's attention
    projections keep their heads as an axis (`[hidden, heads, head_dim]`, `[heads, head_dim, hidden]`): the
    matmul then writes its output in whatever layout the attention kernel reads, where a `[..., heads *
    head_dim]` output would be copied into it (`opsd_jax.models.text.Qwen2Attention`). The checkpoint keeps
    these weights as matrices; `opsd_jax.models.weights` and `opsd_jax.models.export` reshape them.
    """

    def __init__(
        self,
        in_features: int | tuple[int, ...],
        out_features: int | tuple[int, ...],
        *,
        use_bias: bool,
        axes: tuple[str | None, ...],
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.in_shape = _as_shape(in_features)
        self.out_shape = _as_shape(out_features)
        if len(axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"Linear: {len(axes)} logical axes for a kernel of shape {self.in_shape + self.out_shape}")
        self.axes = tuple(axes)  # the kernel's logical axes (also kept here: QLoRA replaces the kernel's Param)
        self.kernel = nnx.Param(_normal(rngs, self.in_shape + self.out_shape, dtype), logical_axes=self.axes)
        out_axes = tuple(axes[len(self.in_shape) :])
        self.bias = nnx.Param(jnp.zeros(self.out_shape, dtype), logical_axes=out_axes) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # flax's promote_dtype (an astype for arrays) is what qwix intercepts to leave a QLoRA-quantized kernel
        # as it is (opsd_jax.models.lora).
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        # `lax.dot_general` is also what qwix intercepts to add the adapters (`opsd_jax.models.lora`). In `dtype`
        # even in an adapted layer, whose float32 adapters would make it float32 (qwix adds their delta inside the
        # matmul): the activations after it stay in the compute dtype, and a zero delta adds nothing.
        contracted = len(self.in_shape)
        dims = ((tuple(range(x.ndim - contracted, x.ndim)), tuple(range(contracted))), ((), ()))
        y = jax.lax.dot_general(x, kernel, dims).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _as_shape(features: int | tuple[int, ...]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


class Embed(nnx.Module):
    """Token embedding table `[num_embeddings, features]`; `attend` gives tied-output logits."""

    def __init__(self, num_embeddings: int, features: int, *, axes: tuple[str, str], dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), dtype), logical_axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids `[...]` -> rows `[..., features]`.

        Under a mesh the rows come out laid like the table: width split as the table's ("embed"), rows over the
        batch axes the width does not use ("lookup_batch"). The gradient's scatter-add then runs on each chip's
        slice of the table, summed over "lookup_batch" alone; with the rows laid as the layers want them (width
        whole, rows over every batch axis) XLA scattered every chip's rows into a whole float32 table and
        all-reduced it (2.2 GB per chip at 7B). The layer boundary that follows re-lays the rows (an all-to-all).
        """
        rows = jnp.take(self.embedding[...], ids, axis=0)
        batch_axes = ("lookup_batch",) + (None,) * (ids.ndim - 1) if ids.ndim else ()
        rows = constrain_activation(rows, (*batch_axes, "embed"))
        return rows.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """`[..., features] -> [..., num_embeddings]` with the table as output projection."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (`weight * x.to(input_dtype)`)."""

    def __init__(self, features: int, *, eps: float, axis: str | None, dtype: jnp.dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), dtype), logical_axes=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # The weight may be kept in float32 (master weights) while activations run in bfloat16.
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with torch's default eps 1e-5 (Flax's default is 1e-6), statistics in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, axis: str | None, dtype: jnp.dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), dtype), logical_axes=(axis,))
        self.bias = nnx.Param(jnp.zeros((features,), dtype), logical_axes=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU of `torch.nn.functional.gelu`; `jax.nn.gelu` defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up`, element-wise, whose output and whose backward gradients are each materialised once.

    Left to itself XLA fuses this element-wise work into the matmuls beside it as a prologue that the TPU
    recomputes for every output tile (the down projection's input; the gate and up projections' backward
    inputs): compiled for v5p, 1.5-2.2x those matmuls' FLOP time. Optimisation barriers keep the output and
    the pair of gradients tensors written once (`[tokens, intermediate]` each) that the matmuls read. The
    arithmetic, and so every value and gradient, is autodiff's of `silu(gate) * up`.

    Barriers on the inputs and on the output's gradient as well (every element-wise boundary of the MLP) price
    worse on v5p: the element-wise work then runs as passes of its own instead of in the matmuls' epilogues.
    """
    return jax.lax.optimization_barrier(_swiglu(gate, up))


def _swiglu_forward(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(inputs: tuple[jax.Array, jax.Array], d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    _, vjp = jax.vjp(_swiglu, *inputs)
    return jax.lax.optimization_barrier(vjp(d_out))


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def rotate_half(x: jax.Array) -> jax.Array:
    """`[..., d] -> [..., d]`: (x1, x2) -> (-x2, x1) on the two halves, the reference's rotary convention."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x [..., seq, heads, head_dim]`, `cos`/`sin` `[..., seq, head_dim]` broadcast over heads."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


@struct.dataclass
class CausalSegments:
    """A causal mask between segments: query i sees key j iff `j <= i + offset` and both carry the same
    segment id (ids >= 0). The form the fused attention kernel (`opsd_jax.models.splash`) takes; `dense`
    gives the boolean mask of `dot_product_attention`.

    Attributes:
      query_segments: int32 `[batch, q_len]`.
      key_segments: int32 `[batch, kv_len]`.
      offset: static; the key column of query 0's diagonal (the number of keys before the queries' own).
    """

    query_segments: jax.Array
    key_segments: jax.Array
    offset: int = struct.field(pytree_node=False)

    def dense(self) -> jax.Array:
        """Boolean `[batch, q_len, kv_len]`, True where attention is allowed."""
        q_len, kv_len = self.query_segments.shape[1], self.key_segments.shape[1]
        causal = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + self.offset
        return causal[None] & (self.query_segments[:, :, None] == self.key_segments[:, None, :])


# Queries per block of `dot_product_attention`. Whole, a long prompt's float32 scores and their bfloat16
# probabilities are `[batch, heads, q_len, kv_len]` per layer (1.1 GB for one 2,048-token prompt of the
# 7B against its 2,560 keys), and the train step keeps several layers' of them alive at once (measured
# in the 7B's compiled TPU step); in blocks, each checkpointed, only one block's exist at a time. Each
# query row's softmax runs over all keys either way: the result is the same.
QUERY_BLOCK = 256


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float,
    query_block: int = QUERY_BLOCK,
) -> jax.Array:
    """Grouped-query attention with a float32 softmax, `query_block` queries at a time when `q_len` is a
    multiple of it above it (rematerialised block by block in the backward pass).

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key, value: `[batch, kv_len, kv_heads, head_dim]`; `heads` must be a multiple of `kv_heads`.
      mask: boolean, broadcastable to `[batch, q_len, kv_len]`; True where attention is allowed.
        A row with no allowed key yields zeros, not NaN.
      scale: multiplier of `q . k` (usually `head_dim ** -0.5`).

    Returns:
      `[batch, q_len, heads, head_dim]` in the query's dtype.
    """
    batch, q_len, heads, head_dim = query.shape
    if q_len <= query_block or q_len % query_block:
        return _attention(query, key, value, mask, scale=scale)
    blocks = q_len // query_block
    by_block = lambda x: jnp.swapaxes(x.reshape(batch, blocks, query_block, *x.shape[2:]), 0, 1)  # noqa: E731
    masks = None if mask is None else by_block(jnp.broadcast_to(mask, (batch, q_len, key.shape[1])))

    @jax.checkpoint
    def one_block(block):
        return _attention(block[0], key, value, block[1], scale=scale)

    out = jax.lax.map(one_block, (by_block(query), masks))  # [blocks, batch, query_block, heads, head_dim]
    return jnp.swapaxes(out, 0, 1).reshape(batch, q_len, heads, head_dim)


def _attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None, *, scale: float
) -> jax.Array:
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    # [batch, q_len, kv_heads, groups, head_dim]: query heads h = kv * groups + g, as repeat_kv in the reference.
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, q_len, key.shape[1]))[:, None, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(value.dtype), value)
    return out.reshape(batch, q_len, heads, head_dim)
