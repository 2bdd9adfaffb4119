"""Fused (flash) attention for the scoring forward on TPU: JAX's Pallas splash-attention kernel.

XLA's attention writes each block's float32 scores to HBM and reads them back for the softmax and the
value product, so on a TPU it runs at memory speed (compiled for v5p: 2.70 ms for one 7B layer's
completions against 0.33 ms of FLOPs). The kernel keeps the scores of a tile in VMEM, skips tiles the
causal mask hides and has Pallas backward kernels under a custom VJP.

A Pallas call is not partitioned by XLA: inside a sharded program it would gather its operands whole.
`splash_attention` maps it over the mesh of the enclosing `activation_sharding` context with
`jax.shard_map` (rows over the batch axes, heads over the axes of `activation_kv_heads`), so that each chip
runs it on the rows and heads it holds. On a device other than a TPU the kernel runs in Pallas's
interpreter (`interpret=True`): the same arithmetic, slowly, for tests on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from opsd_jax.models.layers import CausalSegments
from opsd_jax.sharding import active_activation_mesh, logical_to_spec

# The kernel tiles queries and keys by multiples of the TPU's 128 lanes (its segment-id masking needs it).
LANES = 128
# Largest tile of queries or keys: large tiles cut the kernel's grid steps; at 512 a tile's float32 scores
# (512 x 512 x 4 B = 1 MiB) and its q/k/v blocks stay well within VMEM.
MAX_BLOCK = 512
# Longest run of keys one step of the fused backward kernel holds (it computes them MAX_BLOCK at a time). That
# kernel writes a partial query gradient per block of keys, `[kv_len / block, heads, q_len, head_dim]`, which
# XLA then sums: where the queries are one tile (the completions), every key block is computed anyway (the
# tile's last row sees every key), so one block of all the keys writes the query gradient once and no key
# block is skipped. Keys and values of 4,096 (bf16) and their float32 gradients take 6 MiB of VMEM. Compiled for
# the 7B on v5p at a quarter of its depth, the completions' sums (1.1 ms per layer by the HLO's per-instruction
# estimates) are gone; the cost model, which prices them by their bytes, moves 0.5354 -> 0.5348 s.
MAX_DKV_KEYS = 4096
# The segment of the rows and columns added to reach a multiple of the tile: no caller's segment (ids >= 0).
PADDING_SEGMENT = -1


def splash_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: CausalSegments, *, scale: float
) -> jax.Array:
    """Grouped-query attention under a causal segment mask, with the splash kernel.

    The same as `dot_product_attention(query, key, value, mask.dense(), scale=scale)` on every query row
    that sees at least one key (a float32 softmax over the allowed keys), to float32 rounding; a row that
    sees no key is the caller's error (the kernel would divide by zero), as the mask's padded prompt rows
    see at least their own padded key.

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key, value: `[batch, kv_len, kv_heads, head_dim]`; `heads` a multiple of `kv_heads` (query head h
        reads key head `h // (heads // kv_heads)`, as `dot_product_attention`).
      mask: `[batch, q_len]` and `[batch, kv_len]` segments, causal with its `offset`.
      scale: multiplier of `q . k`; applied to the queries before the kernel (which has no scale), in the
        query dtype.

    Returns:
      `[batch, q_len, heads, head_dim]` in the query's dtype.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    offset = mask.offset
    # Keys past the last query's diagonal are never seen (e.g. the prompt's rows of a cache that has room for
    # the completions after it): cut them rather than tile over them.
    kv_len = min(key.shape[1], q_len + offset)
    key, value, key_segments = key[:, :kv_len], value[:, :kv_len], mask.key_segments[:, :kv_len]
    # Pad to whole tiles. An added query row must see some key (or the kernel's softmax divides by zero):
    # it carries PADDING_SEGMENT, and so does at least one added key column, at kv_len <= its own diagonal.
    # Real rows never see added columns: those sit past their diagonal or in another segment.
    q_padded = _round_up(q_len, LANES)
    kv_padded = _round_up(kv_len + (q_padded > q_len), LANES)
    query_segments = _pad(mask.query_segments.astype(jnp.int32), 1, q_padded, PADDING_SEGMENT)
    key_segments = _pad(key_segments.astype(jnp.int32), 1, kv_padded, PADDING_SEGMENT)
    # Head-major `[batch, heads, length, head_dim]`, the kernel's layout.
    q = jnp.swapaxes(_pad((query.astype(jnp.float32) * scale).astype(query.dtype), 1, q_padded, 0), 1, 2)
    k = jnp.swapaxes(_pad(key.astype(query.dtype), 1, kv_padded, 0), 1, 2)
    v = jnp.swapaxes(_pad(value.astype(query.dtype), 1, kv_padded, 0), 1, 2)
    block_q, block_kv = _block(q_padded), _block(kv_padded)
    block_kv_dkv = kv_padded if q_padded == block_q and kv_padded <= MAX_DKV_KEYS else block_kv
    active = active_activation_mesh()
    platform = jax.default_backend() if active is None else active[0].devices.flat[0].platform

    def attend(q, k, v, query_segments, key_segments):
        """The kernel on one shard: `q [rows, local_heads, q_padded, d]`, `k`, `v [rows, local_kv_heads, ...]`."""
        local_heads = q.shape[1]
        kernel = kernels.make_splash_mha(
            masks.MultiHeadMask([masks.CausalMask((q_padded, kv_padded), offset=offset)] * local_heads),
            block_sizes=kernels.BlockSizes(
                block_q=block_q,
                block_kv=block_kv,
                block_kv_compute=block_kv,
                block_q_dkv=block_q,
                block_kv_dkv=block_kv_dkv,
                block_kv_dkv_compute=block_kv,
                use_fused_bwd_kernel=True,
            ),
            head_shards=1,
            q_seq_shards=1,
            interpret=platform != "tpu",
        )
        return jax.vmap(kernel)(q, k, v, kernels.SegmentIds(q=query_segments, kv=key_segments))

    if active is None:
        out = attend(q, k, v, query_segments, key_segments)
    else:
        mesh, rules = active
        # Query heads split as the key heads do: a shard's query heads then read exactly its key heads. Where
        # the key heads do not divide over the tensor axes (replicated there), the query heads stay whole too.
        rows, head_axes = logical_to_spec(("batch", "activation_kv_heads"), (batch, kv_heads), mesh, rules)
        heads_spec = PartitionSpec(rows, head_axes, None, None)
        segments_spec = PartitionSpec(rows, None)
        out = jax.shard_map(
            attend,
            mesh=mesh,
            in_specs=(heads_spec, heads_spec, heads_spec, segments_spec, segments_spec),
            out_specs=heads_spec,
            check_vma=False,
        )(q, k, v, query_segments, key_segments)
    return jnp.swapaxes(out, 1, 2)[:, :q_len]


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _block(padded_length: int) -> int:
    """The largest multiple of `LANES` up to `MAX_BLOCK` that divides `padded_length` (itself a multiple of it)."""
    return max(b for b in range(LANES, MAX_BLOCK + 1, LANES) if padded_length % b == 0)


def _pad(x: jax.Array, axis: int, length: int, value: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)
