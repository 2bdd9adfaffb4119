"""The thinker's vision encoder: the Qwen2.5-VL ViT with windowed attention and a 2x2 patch merger.

The encoder splits in two halves:

* `vision_plan` (host, numpy) turns `grid_thw` into every data-dependent array the reference computes
  with Python loops: the window permutation of the patches, their rotary (h, w) positions, and the
  segment ids that say which patches attend to each other. It pads all of them to a static patch
  bucket, so one compiled encoder serves every grid of that bucket.
* `VisionEncoder.__call__` (jittable) runs patch embedding, the blocks and the merger on static shapes.
  Block-diagonal attention (one segment per frame pair in the full-attention blocks, one per window
  elsewhere) is a segment-id equality mask. Segments are contiguous runs in window order, so when the
  plan's static bound on their length is short next to the bucket, each block of queries only looks at
  a band of nearby keys (`banded_segment_attention`); otherwise attention is dense over the bucket.
  Where every segment lies within one block of queries (same-sized clips whose frame pairs and windows
  fill whole blocks, as fixed-resolution training clips do), the band is the block itself.

Attribute paths mirror the checkpoint (`visual.blocks.0.attn.q.weight` <-> `blocks.0.attn.q.kernel`),
so `opsd_jax.models.weights` loads every tensor, the Conv3d patch embedding folded into a dense kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opsd_jax.models.layers import Linear, RMSNorm, apply_rotary, dot_product_attention, gelu
from opsd_jax.sharding import constrain_activation

# Hard-coded in the reference (`Qwen2_5OmniVisionBlock`, `Qwen2_5OmniPatchMerger`), not read from the config.
_NORM_EPS = 1e-6
# Segment id of bucket padding: no real patch carries it, so padding only ever attends to padding.
PAD_SEGMENT = -1
# Segment id of the rows `banded_segment_attention` adds past either end of the patches: no patch carries it.
_OUTSIDE_SEGMENT = PAD_SEGMENT - 1
# Shortest band the plan asks for, in patches (16 merged tokens, one full 112-pixel window): shorter
# query blocks make matmuls too small to pay for the band's copies, and a floor keeps small grids of one
# bucket on one program.
_MIN_SPAN = 64

# `Qwen2_5OmniVisionEncoderConfig` defaults, used for keys a config.json leaves out (as transformers does).
_HF_DEFAULTS: dict[str, Any] = dict(
    depth=32,
    hidden_size=3584,
    hidden_act="silu",
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=(7, 15, 23, 31),
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "window_size",
            "out_hidden_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"vision_config.{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"vision_config: head_dim = hidden_size / num_heads = {self.head_dim} must be a multiple of 4 "
                "(the 2-D rotary embedding gives a quarter of it to each of h and w, then duplicates)"
            )
        if self.window_tokens < 1:
            raise ValueError(
                f"vision_config.window_size ({self.window_size}) must be at least spatial_merge_size x patch_size "
                f"= {self.spatial_merge_size * self.patch_size} pixels"
            )
        bad = [index for index in self.fullatt_block_indexes if not 0 <= index < self.depth]
        if bad:
            raise ValueError(f"vision_config.fullatt_block_indexes: {bad} outside the blocks 0..{self.depth - 1}")
        if self.hidden_act != "silu":
            raise ValueError(
                f"vision_config.hidden_act: only 'silu' (Qwen2.5-Omni) is supported, got {self.hidden_act!r}"
            )

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> VisionConfig:
        """From the `vision_config` block of a transformers config.json (4.x or 5.x spelling).

        Keys it leaves out take the reference config class's defaults, as transformers does; note that
        its `hidden_size` default is 3584 while real checkpoints say 1280.
        """
        values = {**_HF_DEFAULTS, **{key: cfg[key] for key in _HF_DEFAULTS if key in cfg}}
        rope = cfg.get("rope_parameters") or {}
        return cls(
            **{key: value for key, value in values.items() if key != "fullatt_block_indexes"},
            fullatt_block_indexes=tuple(int(index) for index in values["fullatt_block_indexes"]),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token (a `spatial_merge_size` x `spatial_merge_size` block)."""
        return self.spatial_merge_size**2

    @property
    def window_tokens(self) -> int:
        """Side of an attention window in merged tokens (112 px / 2 / 14 px = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch `(channels, t, ph, pw)`: 3 * 2 * 14 * 14 = 1176."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


# --------------------------------------------------------------------------------------------------
# Host-side plan
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class VisionPlan:
    """The data-dependent layout of one encoder call, padded to a bucket of `P` patches (`P / 4` tokens).

    "Window order" is the order in which the blocks see the patches: grouped by attention window,
    each window's merge blocks in row-major order, each block's 4 patches together.

    Attributes:
      patch_order: `[P]` int32; window-order slot i holds input patch `patch_order[i]`.
      token_restore: `[P / 4]` int32; output token j is window-order token `token_restore[j]`
        (the inverse permutation, over merge blocks).
      positions: `[P, 2]` int32 (h, w) patch coordinates within the frame, in window order.
      full_segments: `[P]` int32 segment ids of the full-attention blocks (one per frame pair), window order.
      window_segments: `[P]` int32 segment ids of the windowed blocks (one per window), window order.
      num_tokens: `[]` int32, the number of real output tokens (`total_patches / 4`): the valid rows of
        the encoder's output are the first `num_tokens`.
      max_full_segment, max_window_segment: static ints (pytree metadata, so part of a jitted call's
        cache key), an upper bound in patches on the length of every real (non-padding) segment of
        `full_segments` / `window_segments`: the longest rounded up to a power of two of at least 64, so
        that batches of same-sized clips share one program; or `P` itself where a band of three times
        that bound would not be shorter than `P` (dense attention is then the cheaper path, and every such
        plan of a bucket compiles once). See `attention_span`. Plans stacked into one pytree (say,
        micro-batches) must agree on them.
      full_reach, window_reach: static ints, the blocks (of `max_*_segment` rows, in window order) on
        each side of its own that a real segment's rows reach (`band_reach`): 0 where every real segment
        lies within one block, so the band shrinks to the block (a third of the keys); else 1. Always 0
        where attention is dense.
    """

    patch_order: np.ndarray
    token_restore: np.ndarray
    positions: np.ndarray
    full_segments: np.ndarray
    window_segments: np.ndarray
    num_tokens: np.ndarray
    max_full_segment: int = flax.struct.field(pytree_node=False)
    max_window_segment: int = flax.struct.field(pytree_node=False)
    full_reach: int = flax.struct.field(pytree_node=False)
    window_reach: int = flax.struct.field(pytree_node=False)


def uses_band(span: int, patches: int) -> bool:
    """Whether `patches` rows whose segments are at most `span` long attend through a band.

    With query blocks of `span` rows, the band costs `3 * span` scores per query against `patches`
    for dense attention.
    """
    return 3 * span < patches


def attention_span(longest: int, patches: int) -> int:
    """The plan's static bound for segments of at most `longest` patches in a bucket of `patches`.

    `longest` rounded up to a power of two of at least `_MIN_SPAN`, or `patches` when that band would not
    pay (`uses_band`): every bound past the break-even point means "dense", so it collapses to one value.
    """
    span = max(_MIN_SPAN, 1 << (int(longest) - 1).bit_length())
    return span if uses_band(span, patches) else int(patches)


def band_reach(segments: np.ndarray, span: int, patches: int) -> int:
    """The band a plan needs: the most blocks of `span` rows that a segment of `segments` reaches past the
    block of its first row (0 if attention over the `patches`-row bucket is dense).

    `segments`: the `[real patches]` ids in window order, each segment one contiguous run. For runs of at
    most `span` rows this is 1, or 0 where every run stays in one block (it starts at a multiple of `span`,
    say, or several short runs share a block).
    """
    if not uses_band(span, patches):
        return 0
    starts = np.flatnonzero(np.diff(segments, prepend=segments[0] - 1))
    ends = np.append(starts[1:], len(segments)) - 1
    return int(np.max(ends // span - starts // span))


def _check_grid(grid_thw: Any, config: VisionConfig) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw: expected an [n >= 1, 3] array of (t, h, w), got shape {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw: expected integers, got dtype {grid.dtype}")
    merge = config.spatial_merge_size
    for item, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) <= 0:
            raise ValueError(f"grid_thw[{item}] = {[t, h, w]}: t, h and w must be positive")
        for axis, size in (("h", h), ("w", w)):
            if size % merge:
                raise ValueError(
                    f"grid_thw[{item}] = {[t, h, w]}: {axis} = {size} is not divisible by spatial_merge_size {merge}"
                )
    return grid.astype(np.int64)


def vision_plan(grid_thw: Any, config: VisionConfig, patch_bucket: int | None = None) -> VisionPlan:
    """Plans one encoder call over the images / videos of `grid_thw`, their patches concatenated.

    Args:
      grid_thw: `[n, 3]` ints, (frame pairs, patch rows, patch columns) of each item, as the processor's
        `image_grid_thw` / `video_grid_thw`.
      config: the encoder's configuration.
      patch_bucket: static patch count to pad to (a multiple of `merge_unit`, at least the real total);
        None means no padding.

    Returns:
      The plan; see `VisionPlan`. Equivalent to the reference's `get_vision_window_index`,
      `get_vision_position_ids` and `get_vision_cu_seqlens` (frame pairs stay contiguous under the window
      permutation, so the per-frame `cu_seqlens` boundaries become per-frame segment ids).
    """
    grid = _check_grid(grid_thw, config)
    merge, unit, win = config.spatial_merge_size, config.merge_unit, config.window_tokens
    token_rows, token_cols, frame_ids, window_ids = [], [], [], []
    frames_before = windows_before = 0
    for t, h, w in grid.tolist():
        rows, cols = h // merge, w // merge
        frame, row, col = np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols), indexing="ij")
        windows_h, windows_w = -(-rows // win), -(-cols // win)  # edge windows may be partial
        window = (frame * windows_h + row // win) * windows_w + col // win
        token_rows.append(row.ravel())
        token_cols.append(col.ravel())
        frame_ids.append(frames_before + frame.ravel())
        window_ids.append(windows_before + window.ravel())
        frames_before += t
        windows_before += t * windows_h * windows_w
    token_rows, token_cols = np.concatenate(token_rows), np.concatenate(token_cols)
    frame_ids, window_ids = np.concatenate(frame_ids), np.concatenate(window_ids)

    # Window ids grow with item, frame and window; a stable sort keeps each window's blocks row-major.
    window_index = np.argsort(window_ids, kind="stable")  # [tokens], the reference's window_index
    num_tokens = window_index.size
    num_patches = num_tokens * unit
    bucket = num_patches if patch_bucket is None else patch_bucket
    if not isinstance(bucket, (int, np.integer)) or bucket % unit or bucket < num_patches:
        raise ValueError(
            f"patch_bucket: expected a multiple of {unit} (patches per merged token) of at least the "
            f"{num_patches} patches of grid_thw {grid.tolist()}, got {patch_bucket!r}"
        )
    pad_tokens = (bucket - num_patches) // unit

    # Patches within a merge block are (dh, dw) row-major: the processor's merge-block-major layout.
    sub_h, sub_w = np.divmod(np.arange(unit), merge)
    patch_order = (window_index[:, None] * unit + np.arange(unit)).ravel()
    patch_h = (token_rows[window_index, None] * merge + sub_h).ravel()
    patch_w = (token_cols[window_index, None] * merge + sub_w).ravel()
    full_segments = np.repeat(frame_ids[window_index], unit)
    window_segments = np.repeat(window_ids[window_index], unit)

    pad = bucket - num_patches
    # Only real segments bound the band: the padding tail may be longer, but its rows are dropped and no
    # real row attends to it (see `banded_segment_attention`).
    longest_frame, longest_window = np.bincount(full_segments).max(), np.bincount(window_segments).max()
    full_span, window_span = attention_span(longest_frame, bucket), attention_span(longest_window, bucket)
    return VisionPlan(
        patch_order=np.concatenate([patch_order, np.arange(num_patches, bucket)]).astype(np.int32),
        token_restore=np.concatenate([np.argsort(window_index), np.arange(num_tokens, num_tokens + pad_tokens)]).astype(
            np.int32
        ),
        positions=np.pad(np.stack([patch_h, patch_w], axis=-1), ((0, pad), (0, 0))).astype(np.int32),
        full_segments=np.pad(full_segments, (0, pad), constant_values=PAD_SEGMENT).astype(np.int32),
        window_segments=np.pad(window_segments, (0, pad), constant_values=PAD_SEGMENT).astype(np.int32),
        num_tokens=np.asarray(num_tokens, dtype=np.int32),
        max_full_segment=full_span,
        max_window_segment=window_span,
        full_reach=band_reach(full_segments, full_span, bucket),
        window_reach=band_reach(window_segments, window_span, bucket),
    )


def pad_patches(pixel_values: np.ndarray, patch_bucket: int) -> np.ndarray:
    """`[num_patches, patch_dim] -> [patch_bucket, patch_dim]`, zero rows appended (host side)."""
    pixel_values = np.asarray(pixel_values)
    if pixel_values.ndim != 2 or pixel_values.shape[0] > patch_bucket:
        raise ValueError(
            f"pixel_values: expected [num_patches <= {patch_bucket}, patch_dim], got shape {pixel_values.shape}"
        )
    return np.pad(pixel_values, ((0, patch_bucket - pixel_values.shape[0]), (0, 0)))


# --------------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------------


def vision_rotary(positions: jax.Array, *, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D axial rotary tables, float32.

    Args:
      positions: `[P, 2]` (h, w) patch coordinates.

    Returns:
      cos, sin: `[P, head_dim]`; slots are `[h angles, w angles]` (head_dim / 4 frequencies each),
      repeated twice for the rotate-half convention.
    """
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, head_dim / 4]
    angles = angles.reshape(positions.shape[0], spatial_dim)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def segment_mask(segments: jax.Array) -> jax.Array:
    """`[P]` segment ids -> `[1, P, P]` bool, True where query and key share a segment."""
    return (segments[:, None] == segments[None, :])[None]


def banded_segment_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segments: jax.Array,
    *,
    block: int,
    reach: int,
    scale: float,
) -> jax.Array:
    """Attention within contiguous segments, in `O(P * (2 * reach + 1) * block)` instead of `O(P^2)`.

    The queries are cut into blocks of `block` rows (the last one padded), and block `b` attends to the
    key rows `[(b - r) * block, (b + 1 + r) * block)`, `r = reach`, with the segment-id equality mask
    restricted to that band, gathered as `2r + 1` shifted views of the keys cut into chunks of `block`
    rows (no index arrays). It holds every key a query needs when no segment reaches more than `reach`
    blocks past the block of any of its rows: `reach = ceil(L / block)` for segments of at most `L`
    rows; 0 when each segment lies within one block. Rows of the band outside `[0, P)` carry a segment
    id no row has.

    Args:
      q: `[P, heads, head_dim]`.
      k, v: `[P, kv_heads, head_dim]`, `heads` a multiple of `kv_heads`.
      segments: `[P]` int32 ids; a query attends to the keys with its id. Every segment whose rows are
        used must be one contiguous run within `reach` blocks of each of its rows. A longer run (bucket
        padding) gives finite rows that saw only part of their segment: fine for rows that are dropped.
      block: static number of query rows per block.
      reach: static number of key blocks on each side of a query block's own.
      scale: multiplier of `q . k`.

    Returns:
      `[P, heads, head_dim]` in the query's dtype: on the rows of segments within `reach` blocks, the
      result of `dot_product_attention` with `segment_mask(segments)` (a float32 softmax over the same
      keys, summed in another order).
    """
    patches = q.shape[0]
    blocks = -(-patches // block)
    tail = blocks * block - patches

    def chunked(x: jax.Array, fill: int, side: int) -> jax.Array:
        """`[P, ...]` -> `[blocks + 2 * side, block, ...]`, `side` chunks of `fill` before and after."""
        widths = [(side * block, side * block + tail)] + [(0, 0)] * (x.ndim - 1)
        x = jnp.pad(x, widths, constant_values=fill)
        return x.reshape(-1, block, *x.shape[1:])

    def band(chunks: jax.Array) -> jax.Array:
        """`[blocks + 2r, block, ...]` -> `[blocks, (2r + 1) * block, ...]`: chunks b .. b + 2r for block b."""
        views = [chunks[offset : offset + blocks] for offset in range(2 * reach + 1)]
        return jnp.concatenate(views, axis=1)

    q_segments = chunked(segments, _OUTSIDE_SEGMENT, 0)  # [blocks, block]
    k_segments = band(chunked(segments, _OUTSIDE_SEGMENT, reach))  # [blocks, band]
    mask = q_segments[:, :, None] == k_segments[:, None, :]  # [blocks, block, band]
    out = dot_product_attention(
        chunked(q, 0, 0), band(chunked(k, 0, reach)), band(chunked(v, 0, reach)), mask, scale=scale
    )  # [blocks, block, heads, head_dim]
    return out.reshape(blocks * block, *q.shape[1:])[:patches]


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """The reference's Conv3d with kernel = stride = patch, as a dense layer on flattened patches."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.proj = Linear(
            cfg.patch_dim,
            cfg.hidden_size,
            use_bias=False,
            axes=("encoder_patch", "encoder_embed"),
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        dim = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, rngs=rngs)
        self.q = Linear(dim, dim, axes=("encoder_embed", "encoder_heads"), **kw)
        self.k = Linear(dim, dim, axes=("encoder_embed", "encoder_heads"), **kw)
        self.v = Linear(dim, dim, axes=("encoder_embed", "encoder_heads"), **kw)
        self.proj = Linear(dim, dim, axes=("encoder_heads", "encoder_embed"), **kw)

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array, span: int, reach: int
    ) -> jax.Array:
        """`x [P, hidden]`, float32 `cos`/`sin` `[P, head_dim]`, `segments [P]` -> `[P, hidden]`.

        `span` and `reach` (static) are the plan's `max_*_segment` and `*_reach`: each block of `span`
        queries attends to a band of `2 reach + 1` blocks of keys where that is cheaper (`uses_band`), else
        to a dense `[P, P]` mask.
        """
        patches = x.shape[0]

        def split(y):
            return y.reshape(patches, self.num_heads, self.head_dim)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # The reference rotates in float32 whatever the compute dtype, then casts back.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(q.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(k.dtype)
        scale = self.head_dim**-0.5
        if uses_band(span, patches):
            out = banded_segment_attention(q, k, v, segments, block=span, reach=reach, scale=scale)
        else:
            out = dot_product_attention(q[None], k[None], v[None], segment_mask(segments), scale=scale)[0]
        return self.proj(out.reshape(patches, self.num_heads * self.head_dim))


class VisionMLP(nnx.Module):
    """SwiGLU with biases: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("encoder_embed", "encoder_mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("encoder_embed", "encoder_mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("encoder_mlp", "encoder_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=_NORM_EPS, axis="encoder_norm", dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=_NORM_EPS, axis="encoder_norm", dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array, span: int, reach: int
    ) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segments, span, reach)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm per patch, then each merge block's 4 patches concatenated -> Linear -> GELU -> Linear.

    `mlp` mirrors the reference's `nn.Sequential` (indices 0 and 2 hold the weights), so the checkpoint
    names `merger.mlp.0.weight` / `merger.mlp.2.weight` map directly.
    """

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.merged_dim = cfg.hidden_size * cfg.merge_unit
        kw = dict(use_bias=True, dtype=dtype, rngs=rngs)
        self.ln_q = RMSNorm(cfg.hidden_size, eps=_NORM_EPS, axis="encoder_norm", dtype=dtype)
        self.mlp = nnx.List(
            [
                Linear(self.merged_dim, self.merged_dim, axes=("encoder_embed", "encoder_mlp"), **kw),
                gelu,
                Linear(self.merged_dim, cfg.out_hidden_size, axes=("encoder_mlp", "embed"), **kw),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[P, hidden]` (merge blocks contiguous) -> `[P / 4, out_hidden]`."""
        x = self.ln_q(x).reshape(-1, self.merged_dim)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionEncoder(nnx.Module):
    """Patch embedding, `depth` blocks of full or windowed attention, and the 2x2 merger.

    Attention is segment-local. Where the plan's static bound `L` on a kind of segment (frame pairs for
    the full-attention blocks, windows for the others) is short next to the bucket (`3 L < P`), the
    queries go in blocks of `L` rows, each against a band of `B = (2 r + 1) L` keys, `r` the plan's `*_reach`
    (1, or 0 where every segment lies in one block): `[P / L, heads, L, B]` float32 scores, work and memory
    `O(P * L)`, so a micro-batch of many clips costs in proportion to its patches.
    Otherwise (one long frame, small buckets) the mask is a dense `[P, P]` one, `O(P^2)`. Either way the
    real rows equal the reference's per-segment (`cu_seqlens`) attention.
    """

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, plan: VisionPlan) -> jax.Array:
        """Encodes the patches of a plan's bucket.

        Args:
          pixel_values: `[P, patch_dim]`, the processor's patches (merge-block-major per frame pair,
            items concatenated) followed by any padding rows, `P` being the plan's bucket.
          plan: from `vision_plan` for the same `grid_thw` and bucket.

        Returns:
          `[P / 4, out_hidden_size]` merged tokens in the processor's (un-windowed) order. Rows
          `[0, plan.num_tokens)` are the real tokens, equal to the reference's `pooler_output`; the rest
          come from padding and must be dropped.
        """
        cfg = self.config
        bucket = plan.patch_order.shape[0]
        if pixel_values.shape != (bucket, cfg.patch_dim):
            raise ValueError(
                f"pixel_values: expected shape ({bucket}, {cfg.patch_dim}) for the plan's patch bucket, "
                f"got {tuple(pixel_values.shape)}"
            )
        # Patch rows over the chips (segments are contiguous in window order: the band attention's shifted
        # views only reach neighbours), so each chip encodes its share of the clips.
        rows = functools.partial(constrain_activation, logical_axes=("media", None))
        x = rows(jnp.take(self.patch_embed(pixel_values), plan.patch_order, axis=0))  # window order
        cos, sin = vision_rotary(plan.positions, head_dim=cfg.head_dim, theta=cfg.rope_theta)
        full = (plan.full_segments, plan.max_full_segment, plan.full_reach)
        window = (plan.window_segments, plan.max_window_segment, plan.window_reach)
        for index, block in enumerate(self.blocks):
            x = rows(block(x, cos, sin, *(full if index in cfg.fullatt_block_indexes else window)))
        return jnp.take(rows(self.merger(x)), plan.token_restore, axis=0)

    def encode(self, pixel_values: Any, grid_thw: Any) -> jax.Array:
        """Plans without a bucket and runs: `[num_patches, patch_dim]`, `[n, 3]` -> `[num_patches / 4, out_hidden]`.

        For tests and one-off use: it compiles once per distinct patch count (a bucketed plan and a
        caller-held jit avoid that), which is still cheaper than op-by-op eager dispatch.
        """
        return _jitted_call(self, jnp.asarray(pixel_values), vision_plan(grid_thw, self.config))


_jitted_call = nnx.jit(VisionEncoder.__call__)
