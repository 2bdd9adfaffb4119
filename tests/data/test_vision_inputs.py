"""Image / video preprocessing against the transformers Qwen2-VL processors and qwen-omni-utils' rules."""

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opsd_jax.data import vision_inputs as vi

ATOL = 1e-5  # float32 rescale / normalise; observed max |diff| 4.8e-7


@pytest.fixture(scope="module")
def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


@pytest.fixture(scope="module")
def reference_video_patchify():
    """`Qwen2VLVideoProcessor.patchify`, the installed transformers source, run without its module.

    The video processor module needs torchvision to import; its `patchify` is plain torch, so its source
    is compiled on its own and run with torch.
    """
    import torch
    import transformers.models.qwen2_vl as package

    path = Path(package.__file__).parent / "video_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    owner = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Qwen2VLVideoProcessor")
    function = next(node for node in owner.body if isinstance(node, ast.FunctionDef) and node.name == "patchify")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["patchify"]


# Hand-derived: 100/28 = 3.57 -> 4; 70/28 = 2.5 and 98/28 = 3.5 round half to even (2 and 4);
# 10x10 is below 4*28^2 so it is scaled up by sqrt(3136/100) = 5.6 -> 56; 1080x1920 rounds to
# 1092x1932 > 768*28^2, beta = sqrt(1080*1920/602112) = 1.856 -> floor(20.8)*28, floor(36.9)*28.
@pytest.mark.parametrize(
    "size, kwargs, expected",
    [
        ((100, 100), {}, (112, 112)),
        ((70, 70), {}, (56, 56)),
        ((98, 98), {}, (112, 112)),
        ((10, 10), {}, (56, 56)),
        ((1080, 1920), dict(max_pixels=768 * 28 * 28), (560, 1008)),
        ((10, 1000), {}, (28, 1008)),
    ],
)
def test_smart_resize_known_values(size, kwargs, expected):
    assert vi.smart_resize(*size, **kwargs) == expected


def test_smart_resize_agrees_with_transformers_where_the_rules_coincide():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for height in range(28, 2000, 97):
        for width in range(28, 2000, 89):
            for bounds in [
                dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
                dict(min_pixels=128 * 784, max_pixels=768 * 784),
            ]:
                expected = reference(height, width, factor=28, **bounds)
                assert vi.smart_resize(height, width, **bounds) == expected
                assert vi.image_processor_smart_resize(height, width, **bounds) == expected


def test_the_two_smart_resize_variants_differ_below_one_factor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    # A 10-pixel side rounds to 0 in transformers (then the min-pixels branch rescales both sides) but to
    # 28 in qwen-omni-utils.
    assert vi.image_processor_smart_resize(10, 1000) == reference(10, 1000) == (28, 560)
    assert vi.smart_resize(10, 1000) == (28, 1008)


def test_smart_resize_rejects_extreme_aspect_ratios():
    with pytest.raises(ValueError, match="aspect ratio of height=10, width=2500"):
        vi.smart_resize(10, 2500)


# total_frames, video_fps, kwargs -> frames: 10 s at 2 fps; at least 4; no more than the video (floored
# to even); at most 768; floored to even; an explicit count rounded half to even and capped.
@pytest.mark.parametrize(
    "total, fps, kwargs, expected",
    [
        (250, 25.0, {}, 20),
        (30, 30.0, {}, 4),
        (5, 25.0, {}, 4),
        (3, 25.0, {}, 2),
        (30000, 30.0, {}, 768),
        (183, 25.0, {}, 14),
        (100, 25.0, dict(nframes=7), 8),
        (100, 25.0, dict(nframes=5), 4),
        (6, 25.0, dict(nframes=9), 6),
        (100, 25.0, dict(fps=1.0, max_frames=3), 2),
    ],
)
def test_smart_nframes_known_values(total, fps, kwargs, expected):
    assert vi.smart_nframes(total, fps, **kwargs) == expected


def test_smart_nframes_rejects_a_single_frame():
    with pytest.raises(ValueError, match="total_frames=1 yields nframes=0"):
        vi.smart_nframes(1, 25.0)


def test_frame_indices_match_torch_linspace_round():
    import torch

    for total in range(2, 300, 7):
        for count in range(2, total + 1, 2):
            expected = torch.linspace(0, total - 1, count).round().long().numpy()
            np.testing.assert_array_equal(vi.sample_frame_indices(total, count), expected)


def test_sample_video_picks_frames_and_size_by_the_rules():
    from transformers.image_transforms import resize as reference_resize
    from transformers.image_utils import PILImageResampling

    frames = np.random.default_rng(0).integers(0, 256, (30, 90, 120, 3), dtype=np.uint8)
    sampled, sample_fps = vi.sample_video(frames, video_fps=10.0)
    # 3 s at 2 fps -> 6 frames; 90x120 is below 128*28^2 pixels: scaled up by sqrt(100352 / 10800).
    assert sampled.shape == (6, 280, 392, 3) and sample_fps == pytest.approx(2.0)
    indices = vi.sample_frame_indices(30, 6)
    for got, index in zip(sampled, indices):
        expected = reference_resize(frames[index], (280, 392), resample=PILImageResampling.BICUBIC)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("height, width", [(140, 168), (100, 150), (20, 30), (1200, 1000)])
def test_image_to_inputs_matches_image_processor(image_processor, height, width):
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = image_processor(image, return_tensors="np")
    got = vi.image_to_inputs(image)
    np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(got["pixel_values"], expected["pixel_values"], rtol=0, atol=ATOL)


def test_transparent_pil_image_and_batches_match_image_processor(image_processor):
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (60, 90, 4), dtype=np.uint8), mode="RGBA")
    rgb = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    expected = image_processor([rgba, rgb], return_tensors="np")
    got = vi.concatenate_inputs([vi.image_to_inputs(rgba), vi.image_to_inputs(rgb)])
    np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], expected["pixel_values"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("num_frames", [4, 5])
def test_video_rows_equal_the_reference_video_patchify(reference_video_patchify, num_frames):
    import torch

    frames = np.random.default_rng(num_frames).integers(0, 256, (num_frames, 56, 84, 3), dtype=np.uint8)
    got = vi.video_to_inputs(frames, sample_fps=2.0)
    normalized = torch.from_numpy(vi.normalize(frames))[None]  # [1, T, C, H, W]; odd T padded by the reference
    rows, grid_t, grid_h, grid_w = reference_video_patchify(
        None, normalized, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    np.testing.assert_array_equal(got["pixel_values_videos"], rows[0].numpy())
    np.testing.assert_array_equal(got["video_grid_thw"], [[grid_t, grid_h, grid_w]])
    assert got["video_grid_thw"].tolist() == [[(num_frames + 1) // 2, 4, 6]]
    np.testing.assert_array_equal(got["video_second_per_grid"], np.float32([1.0]))


def test_video_rows_hold_each_frame_as_the_image_processor_patchifies_it(image_processor):
    """Each temporal slot of a video row is the image processor's row of that frame (the image processor
    fills both slots with the same frame): checks normalisation, row order and column order against
    independent reference code."""
    frames = np.random.default_rng(7).integers(0, 256, (5, 56, 84, 3), dtype=np.uint8)
    got = vi.video_to_inputs(frames, sample_fps=4.0)
    assert got["video_second_per_grid"].tolist() == [0.5]
    video = got["pixel_values_videos"].reshape(3, 24, 3, 2, 14, 14)
    for index in range(6):
        frame = frames[min(index, 4)]  # frame 5 is the repeated last frame
        expected = image_processor(frame, do_resize=False, return_tensors="np")["pixel_values"]
        expected = expected.reshape(24, 3, 2, 14, 14)[:, :, index % 2]
        np.testing.assert_allclose(video[index // 2, :, :, index % 2], expected, rtol=0, atol=ATOL)


def test_video_to_inputs_rejects_bad_frames():
    with pytest.raises(ValueError, match="height=50, width=84 must be multiples of 28"):
        vi.video_to_inputs(np.zeros((2, 50, 84, 3), np.uint8), sample_fps=2.0)
    with pytest.raises(ValueError, match=r"uint8 RGB of shape \[T, H, W, 3\], got float32"):
        vi.video_to_inputs(np.zeros((2, 56, 56, 3), np.float32), sample_fps=2.0)
