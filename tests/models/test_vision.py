"""Parity of the Flax vision encoder with `model.model.visual` of the transformers reference (float32).

Tolerance: max |difference| <= 1e-4 against the reference (measured ~5e-6 on outputs of magnitude ~2);
<= 1e-5 between layouts of the same JAX computation (bucket padding, mesh placement, banded vs dense
attention).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from transformers import vision_utils

from opsd_jax.config import MeshConfig
from opsd_jax.models import weights
from opsd_jax.models.layers import dot_product_attention
from opsd_jax.models.vision import (
    PAD_SEGMENT,
    VisionConfig,
    VisionEncoder,
    band_reach,
    banded_segment_attention,
    pad_patches,
    segment_mask,
    uses_band,
    vision_plan,
)
from opsd_jax.sharding import make_mesh, shard_module

REFERENCE_ATOL = 1e-4
LAYOUT_ATOL = 1e-5

# (1, 10, 12) is a 5 x 6 grid of merged tokens: 2 x 2 windows of 4 x 4, three of them partial.
GRIDS = {
    "image_4x4": [[1, 4, 4]],
    "image_partial_windows": [[1, 10, 12]],
    "video_2_frames": [[2, 4, 4]],
    "image_and_video": [[1, 10, 12], [2, 6, 8]],
}


def _patches(grid, seed: int) -> np.ndarray:
    count = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).standard_normal((count, 1176), dtype=np.float32)


def _reference_tokens(model, pixel_values: np.ndarray, grid) -> np.ndarray:
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor(grid))
    return out.pooler_output.numpy()


@pytest.fixture(scope="module")
def setup(tiny_untied, tmp_path_factory):
    """(reference thinker, vision config, Flax encoder loaded from the reference's saved checkpoint).

    `build_reference_thinker` draws unit-variance weights: with the reference's own init (std 0.02)
    attention is almost uniform, and dropping the rotary embedding entirely would move the outputs
    by only ~1.5e-5, below the tolerance. With these weights a swapped (h, w) rotary or a missing
    window mask moves them by > 1.
    """
    model, ckpt_dir = tiny_untied
    config = VisionConfig.from_hf(json.loads((ckpt_dir / "config.json").read_text())["vision_config"])
    encoder = VisionEncoder(config, rngs=nnx.Rngs(0))
    weights.load_module(encoder, weights.SafetensorsCheckpoint.open(ckpt_dir), prefix="visual.")
    return model, config, encoder


def _counting_jit():
    """A fresh jitted encoder call and the list of shapes it was traced for (one trace = one compilation)."""
    traces = []

    @nnx.jit
    def run(encoder, pixel_values, plan):
        traces.append(tuple(pixel_values.shape))
        return encoder(pixel_values, plan)

    return run, traces


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def test_config_from_checkpoint_matches_reference(setup):
    model, config, _ = setup
    ref = model.model.visual.config
    assert (config.depth, config.hidden_size, config.intermediate_size, config.num_heads) == (
        ref.depth,
        ref.hidden_size,
        ref.intermediate_size,
        ref.num_heads,
    )
    assert (config.patch_size, config.temporal_patch_size, config.spatial_merge_size, config.window_size) == (
        ref.patch_size,
        ref.temporal_patch_size,
        ref.spatial_merge_size,
        ref.window_size,
    )
    assert config.out_hidden_size == ref.out_hidden_size
    assert config.fullatt_block_indexes == tuple(ref.fullatt_block_indexes)
    assert config.rope_theta == ref.rope_parameters["rope_theta"]


def test_config_from_hf_4x_spelling_real_sizes():
    # The 7B checkpoint's vision_config as 4.x wrote it: no rope_parameters.
    cfg = VisionConfig.from_hf(
        dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        )
    )
    assert (cfg.head_dim, cfg.patch_dim, cfg.merge_unit, cfg.window_tokens, cfg.rope_theta) == (80, 1176, 4, 4, 1e4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30), "hidden_size (30) must be a multiple of num_heads (4)"),
        (dict(hidden_size=24, num_heads=4), "head_dim = hidden_size / num_heads = 6"),
        (dict(fullatt_block_indexes=[1, 4]), "fullatt_block_indexes: [4] outside the blocks 0..3"),
        (dict(window_size=14), "window_size (14) must be at least"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    base = dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, fullatt_block_indexes=[1, 3]
    )
    with pytest.raises(ValueError) as err:
        VisionConfig.from_hf({**base, **overrides})
    assert message in str(err.value)


# ----------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", list(GRIDS.values()) + [[[3, 18, 26]]], ids=list(GRIDS) + ["video_3x18x26"])
def test_plan_matches_reference_helpers(setup, grid):
    """The plan equals the reference's window index, rotary positions and cu_seqlens, expressed as segments."""
    _, config, _ = setup
    plan = vision_plan(np.array(grid), config)
    grid_t = torch.tensor(grid)
    window_index, cu_window = vision_utils.get_vision_window_index(grid_t, 2, 112, 14)
    window_index = window_index.numpy()
    patch_index = (window_index[:, None] * 4 + np.arange(4)).ravel()
    np.testing.assert_array_equal(plan.patch_order, patch_index)
    np.testing.assert_array_equal(plan.token_restore, np.argsort(window_index))
    positions = vision_utils.get_vision_position_ids(grid_t, 2).numpy()
    np.testing.assert_array_equal(plan.positions, positions[patch_index])
    window_sizes = np.diff(cu_window.numpy())
    np.testing.assert_array_equal(plan.window_segments, np.repeat(np.arange(window_sizes.size), window_sizes))
    frame_sizes = np.diff(vision_utils.get_vision_cu_seqlens(grid_t).numpy())
    np.testing.assert_array_equal(plan.full_segments, np.repeat(np.arange(frame_sizes.size), frame_sizes))
    assert int(plan.num_tokens) == len(window_index)


def test_plan_pads_to_bucket_with_an_isolated_segment(setup):
    _, config, _ = setup
    plain = vision_plan(np.array([[1, 10, 12]]), config)
    padded = vision_plan(np.array([[1, 10, 12]]), config, patch_bucket=136)
    assert padded.patch_order.shape == (136,) and padded.token_restore.shape == (34,)
    np.testing.assert_array_equal(padded.patch_order[:120], plain.patch_order)
    np.testing.assert_array_equal(padded.patch_order[120:], np.arange(120, 136))
    np.testing.assert_array_equal(padded.token_restore[:30], plain.token_restore)
    for segments in (padded.full_segments, padded.window_segments):
        assert (segments[120:] == PAD_SEGMENT).all() and (segments[:120] != PAD_SEGMENT).all()


# (grid, bucket) -> (max_full_segment, max_window_segment, full_reach, window_reach). Bounds are the longest
# real segment rounded up to a power of two of at least 64, or the bucket P itself where 3 x bound >= P
# (dense attention, reach 0). Reach is 1 where a real segment crosses a block of `bound` rows, else 0.
@pytest.mark.parametrize(
    "grid, bucket, spans",
    [
        # 16 patches; 64 x 3 >= 16: dense.
        ([[1, 4, 4]], None, (16, 16, 0, 0)),
        # The two grids of one bucket in the compile-once test: frames of 120 and 16 patches, windows of
        # <= 64 and 16; all bounds x 3 >= 128, so both plans say (128, 128) and share a program.
        ([[1, 10, 12]], 128, (128, 128, 0, 0)),
        ([[2, 4, 4]], 128, (128, 128, 0, 0)),
        # Frame of 120 -> 128 (x 3 >= 256: dense); windows of <= 64 (x 3 < 256: banded). Windows of 64, 32,
        # 16 and 8 patches fill the first 120 rows, so the second clip's first 48-patch window crosses row 128.
        ([[1, 10, 12], [2, 6, 8]], 256, (256, 64, 0, 1)),
        # 504 patches: frames of 120 and 64 -> 128 (384 < 504), windows <= 64; both cross blocks past row 120.
        ([[1, 10, 12], [6, 8, 8]], None, (128, 64, 1, 1)),
        # Frames of 468 -> 512 (1536 >= 1404: dense); windows of up to 4 x 4 merged tokens = 64 patches, the
        # edge ones partial (9 x 13 merged tokens), so later windows cross blocks.
        ([[3, 18, 26]], None, (1404, 64, 0, 1)),
        # Frames of 16 patches: the floor of 64; four frames fill each block.
        ([[40, 4, 4]], None, (64, 64, 0, 0)),
        # The forward benchmark's 4 clips of 8 frames at 112 px: one 64-patch window per frame pair.
        ([[4, 8, 8]] * 4, None, (64, 64, 0, 0)),
        # Two clips of 448 px frames: 1024-patch frame pairs, 8192 patches, whole windows of 64.
        ([[4, 32, 32]] * 2, None, (1024, 64, 0, 0)),
        # The TPU configs' micro-batch: 32 clips of 16 frames at 224 px in a bucket of 65,600 patches.
        ([[8, 16, 16]] * 32, 65_600, (256, 64, 0, 0)),
    ],
)
def test_plan_static_segment_bounds(setup, grid, bucket, spans):
    _, config, _ = setup
    plan = vision_plan(np.array(grid), config, patch_bucket=bucket)
    static = (plan.max_full_segment, plan.max_window_segment, plan.full_reach, plan.window_reach)
    assert static == spans
    assert all(type(value) is int for value in static)  # hashable metadata, not numpy scalars


@pytest.mark.parametrize(
    "grid, bucket, message",
    [
        ([[1, 5, 4]], None, "grid_thw[0] = [1, 5, 4]: h = 5 is not divisible by spatial_merge_size 2"),
        ([[1, 4, 4], [2, 4, 7]], None, "grid_thw[1] = [2, 4, 7]: w = 7 is not divisible by spatial_merge_size 2"),
        ([[0, 4, 4]], None, "grid_thw[0] = [0, 4, 4]: t, h and w must be positive"),
        ([1, 4, 4], None, "grid_thw: expected an [n >= 1, 3] array of (t, h, w), got shape (3,)"),
        ([[1.0, 4.0, 4.0]], None, "grid_thw: expected integers, got dtype float64"),
        ([[1, 4, 4]], 18, "patch_bucket: expected a multiple of 4"),
        ([[1, 4, 4]], 12, "of at least the 16 patches"),
    ],
)
def test_plan_rejects_bad_input(setup, grid, bucket, message):
    _, config, _ = setup
    with pytest.raises(ValueError) as err:
        vision_plan(np.array(grid), config, patch_bucket=bucket)
    assert message in str(err.value)


def test_call_rejects_pixel_values_not_matching_the_plan(setup):
    _, config, encoder = setup
    plan = vision_plan(np.array([[1, 4, 4]]), config, patch_bucket=20)
    with pytest.raises(ValueError, match=r"pixel_values: expected shape \(20, 1176\).*got \(16, 1176\)"):
        encoder(np.zeros((16, 1176), np.float32), plan)


# ----------------------------------------------------------------------------------------------------
# Banded attention
# ----------------------------------------------------------------------------------------------------


# Uneven segments (longest 17), then a padding tail of 37 rows, longer than any band:
# P = 79 + 37 = 116, not a multiple of any block below.
_SEGMENT_LENGTHS = (3, 17, 1, 16, 9, 17, 4, 12)
# Segments that each lie within one block of 16 rows (16 | 9 + 7 | 16 | 5 + 11), then the same tail.
_ALIGNED_LENGTHS = (16, 9, 7, 16, 5, 11)
_PAD_ROWS = 37


def _attention_case(lengths, seed):
    segments = np.concatenate([np.repeat(np.arange(len(lengths)), lengths), np.full(_PAD_ROWS, PAD_SEGMENT)])
    rng = np.random.default_rng(seed)
    # 4 query heads over 2 key/value heads, as `dot_product_attention` allows.
    q, k, v = (rng.standard_normal((len(segments), heads, 8), dtype=np.float32) for heads in (4, 2, 2))
    dense = dot_product_attention(q[None], k[None], v[None], segment_mask(segments), scale=8**-0.5)[0]
    return segments.astype(np.int32), (q, k, v), np.asarray(dense)


@pytest.mark.parametrize(
    "lengths, block, needed, reach",
    [
        (_SEGMENT_LENGTHS, 17, 1, 1),
        (_SEGMENT_LENGTHS, 8, 2, 2),
        (_SEGMENT_LENGTHS, 32, 1, 1),
        (_SEGMENT_LENGTHS, 16, 1, 2),
        (_ALIGNED_LENGTHS, 16, 0, 0),
    ],
    ids=["block=longest", "block<longest", "block>longest", "wider_than_needed", "aligned"],
)
def test_banded_attention_matches_dense_segment_mask(lengths, block, needed, reach):
    """Real rows equal dense attention under the `[1, P, P]` segment mask (float32, <= 1e-5) for a band of
    at least the reach the plan computes; padding rows, whose segment is longer than the band, stay finite
    (they are dropped). One block less of reach loses keys of a segment that crosses a block."""
    segments, (q, k, v), dense = _attention_case(lengths, seed=block + reach)
    real = sum(lengths)
    assert band_reach(segments[:real], block, len(segments)) == needed
    banded = np.asarray(banded_segment_attention(q, k, v, segments, block=block, reach=reach, scale=8**-0.5))
    assert banded.shape == dense.shape == (len(segments), 4, 8)
    assert np.abs(banded[:real] - dense[:real]).max() <= LAYOUT_ATOL
    assert np.isfinite(banded).all()
    if needed:
        short = banded_segment_attention(q, k, v, segments, block=block, reach=needed - 1, scale=8**-0.5)
        assert np.abs(np.asarray(short)[:real] - dense[:real]).max() > 1e-2


# ----------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GRIDS))
def test_encoder_matches_reference(setup, name):
    model, _, encoder = setup
    grid = GRIDS[name]
    pixel_values = _patches(grid, seed=len(name))
    expected = _reference_tokens(model, pixel_values, grid)
    got = np.asarray(encoder.encode(pixel_values, np.array(grid)))
    assert got.shape == expected.shape == (sum(t * h * w for t, h, w in grid) // 4, 64)
    assert np.abs(got - expected).max() <= REFERENCE_ATOL


def test_banded_encoder_matches_reference_and_dense(setup):
    """A bucket where both kinds of block take the band (frames of 120 and 64 patches, bound 128; windows
    of <= 64), padded by a garbage tail longer than either bound: the real tokens equal the reference,
    and the same plan forced dense."""
    model, config, encoder = setup
    grid, bucket = [[1, 10, 12], [6, 8, 8]], 640
    pixel_values = _patches(grid, seed=11)
    padded = pad_patches(pixel_values, bucket)
    padded[len(pixel_values) :] = 1e3 * np.random.default_rng(2).standard_normal(padded[len(pixel_values) :].shape)
    plan = vision_plan(np.array(grid), config, patch_bucket=bucket)
    assert (plan.max_full_segment, plan.max_window_segment) == (128, 64)
    assert uses_band(plan.max_full_segment, bucket) and uses_band(plan.max_window_segment, bucket)
    run, traces = _counting_jit()
    num_tokens = int(plan.num_tokens)
    banded = np.asarray(run(encoder, padded, plan))[:num_tokens]
    dense = np.asarray(run(encoder, padded, plan.replace(max_full_segment=bucket, max_window_segment=bucket)))
    assert traces == [(bucket, 1176)] * 2  # the static bounds are part of the program
    assert np.abs(banded - dense[:num_tokens]).max() <= LAYOUT_ATOL
    assert np.abs(banded - _reference_tokens(model, pixel_values, grid)).max() <= REFERENCE_ATOL


def test_block_local_band_matches_reference(setup):
    """Three clips whose frame pairs and windows are 64 patches each: every segment lies within one block
    of the 64-row bound, so the plan's band is the block alone (reach 0, a third of the keys). The real
    tokens equal the reference, and the same plan with a band of three blocks."""
    model, config, encoder = setup
    grid = [[2, 8, 8]] * 3
    pixel_values = _patches(grid, seed=5)
    plan = vision_plan(np.array(grid), config)
    assert (plan.max_full_segment, plan.max_window_segment, plan.full_reach, plan.window_reach) == (64, 64, 0, 0)
    assert uses_band(64, len(pixel_values))
    run, _ = _counting_jit()
    narrow = np.asarray(run(encoder, pixel_values, plan))
    wide = np.asarray(run(encoder, pixel_values, plan.replace(full_reach=1, window_reach=1)))
    assert np.abs(narrow - wide).max() <= LAYOUT_ATOL
    assert np.abs(narrow - _reference_tokens(model, pixel_values, grid)).max() <= REFERENCE_ATOL


def test_bucket_padding_keeps_valid_rows_and_compiles_once_per_bucket(setup):
    model, config, encoder = setup
    run, traces = _counting_jit()
    for grid, bucket in (([[1, 10, 12]], 128), ([[2, 4, 4]], 128), ([[1, 10, 12], [2, 6, 8]], 256)):
        pixel_values = _patches(grid, seed=bucket)
        padded = pad_patches(pixel_values, bucket)
        # Garbage in the padding rows must not reach the real ones.
        padded[len(pixel_values) :] = 1e3 * np.random.default_rng(1).standard_normal(padded[len(pixel_values) :].shape)
        plan = vision_plan(np.array(grid), config, patch_bucket=bucket)
        out = np.asarray(run(encoder, padded, plan))
        assert out.shape == (bucket // 4, 64)
        num_tokens = int(plan.num_tokens)
        assert num_tokens == len(pixel_values) // 4
        unpadded = np.asarray(encoder.encode(pixel_values, np.array(grid)))
        assert np.abs(out[:num_tokens] - unpadded).max() <= LAYOUT_ATOL
        assert np.abs(out[:num_tokens] - _reference_tokens(model, pixel_values, grid)).max() <= REFERENCE_ATOL
    assert traces == [(128, 1176), (256, 1176)]


def test_sharded_encoder_matches_single_device(setup):
    _, config, encoder = setup
    grid = [[1, 10, 12], [2, 6, 8]]
    pixel_values = _patches(grid, seed=7)
    single = np.asarray(encoder.encode(pixel_values, np.array(grid)))

    sharded = nnx.clone(encoder)
    shard_module(sharded, make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    kernel = sharded.blocks[0].attn.q.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == PartitionSpec("fsdp", None)
    run, _ = _counting_jit()
    plan = vision_plan(np.array(grid), config, patch_bucket=256)
    out = np.asarray(run(sharded, pad_patches(pixel_values, 256), plan))
    assert np.abs(out[: int(plan.num_tokens)] - single).max() <= LAYOUT_ATOL
