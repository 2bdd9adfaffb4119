"""Images and video frames -> the vision encoder's patch rows, in numpy and Pillow (no torch, no torchvision).

Two sets of rules meet here:
* the sampling and sizing rules of `qwen-omni-utils` (frame counts at 2 fps, frame sizes in multiples of 28
  within pixel bounds), which pick WHICH frames at WHAT size reach the processor;
* the transformers Qwen2-VL processors, which rescale, normalise and cut frames into 14x14x2 patches.

Patch rows are merge-block-major: for every temporal patch, the (H/28, W/28) grid of 2x2 merge blocks in
row-major order, and within a block its four 14x14 patches in row-major order. Each row holds the patch
in (channel, time, y, x) order: 3 * 2 * 14 * 14 = 1176 values. The encoder's merger relies on this order
(it views four consecutive rows as one merged token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: sides must be multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176

# OpenAI CLIP statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# qwen-omni-utils 0.0.9, qwen_omni_utils/v2_5/vision_process.py.
MAX_ASPECT_RATIO = 200
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 16384 * 28 * 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # a 128k-token context, 90% of it for video
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

# transformers `Qwen2VLImageProcessor(Pil)` defaults (size shortest_edge / longest_edge, in pixels).
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 28 * 28 * 1280


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio of height={height}, width={width} is {max(height, width) / min(height, width):.1f}; "
            f"expected at most {MAX_ASPECT_RATIO}"
        )


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """qwen-omni-utils' target size: sides rounded to multiples of `factor` (Python's half-to-even round),
    then scaled down (floor) into `max_pixels` or up (ceil) into `min_pixels`, keeping the aspect ratio."""
    _check_size(height, width)
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = math.floor(height / beta / factor) * factor
        new_width = math.floor(width / beta / factor) * factor
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    if new_height <= 0 or new_width <= 0:
        raise ValueError(f"height={height}, width={width} cannot fit max_pixels={max_pixels} in multiples of {factor}")
    return new_height, new_width


def image_processor_smart_resize(
    height: int,
    width: int,
    *,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = PROCESSOR_MIN_PIXELS,
    max_pixels: int = PROCESSOR_MAX_PIXELS,
) -> tuple[int, int]:
    """The transformers Qwen2-VL image processor's variant of `smart_resize`: the first rounding may reach 0
    (the min-pixels branch then fixes it) and the max-pixels branch keeps at least `factor`. It differs from
    qwen-omni-utils' only for sides below 14 pixels or extreme aspect ratios."""
    _check_size(height, width)
    new_height = round(height / factor) * factor
    new_width = round(width / factor) * factor
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    nframes: int | None = None,
) -> int:
    """How many frames qwen-omni-utils samples from a video of `total_frames` at `video_fps`: `fps` frames per
    second, clamped to [min_frames, max_frames] (max_frames defaults to min(768, total_frames)) and to the
    video, floored to an even count. An explicit `nframes` is rounded to even and capped by the video."""
    if total_frames <= 0 or video_fps <= 0:
        raise ValueError(f"expected a positive total_frames and video_fps, got {total_frames} and {video_fps}")
    if nframes is not None:
        count = min(round(nframes / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE, total_frames)
    else:
        lowest = math.ceil(min_frames / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
        highest = min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames
        highest = math.floor(highest / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
        count = total_frames / video_fps * fps
        count = min(min(max(count, lowest), highest), total_frames)
        count = math.floor(count / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE
    if not TEMPORAL_PATCH_SIZE <= count <= total_frames:
        raise ValueError(
            f"a video of total_frames={total_frames} yields nframes={count}; expected {TEMPORAL_PATCH_SIZE} <= "
            f"nframes <= total_frames (a video needs at least {TEMPORAL_PATCH_SIZE} frames)"
        )
    return int(count)


def sample_frame_indices(total_frames: int, nframes: int) -> np.ndarray:
    """`[nframes]` int64 indices spread evenly over the video, ends included (`linspace(...).round()`)."""
    return np.round(np.linspace(0, total_frames - 1, nframes)).astype(np.int64)


def video_frame_size(
    height: int,
    width: int,
    nframes: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> tuple[int, int]:
    """Per-frame target size of qwen-omni-utils: at least `min_pixels`; at most 768 * 28^2 and an even share
    of `total_pixels` per pair of frames (that cap never below 1.05 * min_pixels); a given `max_pixels`
    can only lower the cap."""
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * TEMPORAL_PATCH_SIZE), int(min_pixels * 1.05))
    if max_pixels is not None:
        cap = min(max_pixels, cap)
    return smart_resize(height, width, min_pixels=min_pixels, max_pixels=cap)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[T, H, W, 3]` uint8 -> `[T, height, width, 3]` uint8 with Pillow's bicubic filter.

    qwen-omni-utils resizes decoded videos with torchvision's antialiased bicubic; Pillow's bicubic (also
    antialiased when shrinking) differs from it by a few grey levels on some pixels.
    """
    frames = _check_frames(frames, "frames")
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack(
        [np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)) for frame in frames]
    )


def sample_video(
    frames: np.ndarray,
    video_fps: float,
    *,
    fps: float = FPS,
    nframes: int | None = None,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> tuple[np.ndarray, float]:
    """All decoded frames `[T_total, H, W, 3]` uint8 -> (sampled and resized frames `[T, h, w, 3]`, sample_fps).

    qwen-omni-utils' recipe: `smart_nframes` frames at `linspace` indices, then one `video_frame_size` for
    all of them. `sample_fps = T / T_total * video_fps` is what `video_to_inputs` needs.
    """
    frames = _check_frames(frames, "frames")
    total = frames.shape[0]
    count = smart_nframes(total, video_fps, fps=fps, nframes=nframes)
    sampled = frames[sample_frame_indices(total, count)]
    height, width = video_frame_size(
        frames.shape[1], frames.shape[2], count, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
    )
    return resize_frames(sampled, height, width), count / total * video_fps


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB of shape [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name} holds no frames")
    return frames


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, 3]` -> float32 `[..., 3, H, W]`: x / 255, then CLIP mean/std per channel."""
    scaled = frames.astype(np.float32) * np.float32(1 / 255)
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return np.moveaxis((scaled - mean) / std, -1, -3)


def patchify(pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`[T, 3, H, W]` float32 (T even; H, W multiples of 28) -> (rows `[T/2 * H/14 * W/14, 1176]`, grid_thw)."""
    frames, channels, height, width = pixels.shape
    grid_t, grid_h, grid_w = frames // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE
    blocks = pixels.reshape(
        grid_t,
        TEMPORAL_PATCH_SIZE,
        channels,
        grid_h // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
        grid_w // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
    )
    # -> (t, block_y, block_x, y_in_block, x_in_block | channel, time, patch_y, patch_x)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return blocks.reshape(grid_t * grid_h * grid_w, -1), (grid_t, grid_h, grid_w)


def video_to_inputs(frames: np.ndarray, sample_fps: float) -> dict[str, np.ndarray]:
    """Sampled, resized frames `[T, H, W, 3]` uint8 (H, W multiples of 28) -> the video arrays of the processor.

    Returns `pixel_values_videos [T'/2 * H/14 * W/14, 1176]` float32, `video_grid_thw [1, 3]` int64 and
    `video_second_per_grid [1]` float32 (`2 / sample_fps`: seconds covered by one temporal patch). An odd
    frame count T is padded to T' = T + 1 by repeating the last frame, as the processor does.
    """
    frames = _check_frames(frames, "frames")
    _check_multiple_of_factor(frames.shape[1], frames.shape[2])
    if not sample_fps > 0:
        raise ValueError(f"sample_fps must be positive, got {sample_fps}")
    pixels = normalize(frames)
    if pad := -len(pixels) % TEMPORAL_PATCH_SIZE:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    rows, grid = patchify(pixels)
    return dict(
        pixel_values_videos=rows,
        video_grid_thw=np.asarray([grid], np.int64),
        video_second_per_grid=np.asarray([TEMPORAL_PATCH_SIZE / sample_fps], np.float32),
    )


def _check_multiple_of_factor(height: int, width: int) -> None:
    if height % IMAGE_FACTOR or width % IMAGE_FACTOR:
        raise ValueError(
            f"frame size height={height}, width={width} must be multiples of {IMAGE_FACTOR}; resize with "
            f"resize_frames(frames, *video_frame_size(...)) first"
        )


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """An image as uint8 `[H, W, 3]`; transparent PIL images are composited over white (as transformers and
    qwen-omni-utils do)."""
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or uint8 RGB of shape [H, W, 3], got {image.dtype} {image.shape}")
    return image


def image_to_inputs(
    image: np.ndarray | Image.Image, *, min_pixels: int = PROCESSOR_MIN_PIXELS, max_pixels: int = PROCESSOR_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """One image -> `pixel_values [h/14 * w/14, 1176]` float32 and `image_grid_thw [1, 3]` int64, as
    transformers' `Qwen2VLImageProcessorPil` computes them: bicubic resize to its `smart_resize` size,
    rescale, CLIP-normalise, and patchify with the image repeated for both temporal slots."""
    pixels = to_rgb_array(image)
    height, width = image_processor_smart_resize(
        pixels.shape[0], pixels.shape[1], min_pixels=min_pixels, max_pixels=max_pixels
    )
    # Pillow returns a copy for an unchanged size, so resizing unconditionally matches the processor.
    pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
    normalized = normalize(pixels)
    rows, grid = patchify(np.stack([normalized] * TEMPORAL_PATCH_SIZE))
    return dict(pixel_values=rows, image_grid_thw=np.asarray([grid], np.int64))


def concatenate_inputs(inputs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several images' (or videos') arrays -> one set: patch rows concatenated, grids stacked, in order."""
    if not inputs:
        raise ValueError("concatenate_inputs needs at least one set of inputs")
    keys = set(inputs[0])
    for index, item in enumerate(inputs):
        if set(item) != keys:
            raise ValueError(f"inputs[{index}] has keys {sorted(item)}, expected {sorted(keys)}")
    return {key: np.concatenate([item[key] for item in inputs], axis=0) for key in inputs[0]}
