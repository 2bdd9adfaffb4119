"""TMRoPE position ids against the reference's `get_rope_index` on the tiny thinker (exact integers).

Position ids depend only on token ids, masks, grids and audio lengths, so the inputs are built by hand
with the processor's placeholder layouts (reference doc §1.4); no media is decoded.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniProcessor

from opsd_jax.models.positions import PositionConfig, decode_position_ids, rope_index
from opsd_jax.testing.reference import TINY_TOKEN_IDS

AUDIO, IMAGE, VIDEO = 200, 201, 202
AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 203, 204, 205, 206
PAD = 0


def text(*ids: int) -> list[int]:
    assert all(0 < i < 200 for i in ids)
    return list(ids)


def num_audio_tokens(mel_frames: int) -> int:
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def image(grid) -> list[int]:
    return [VISION_BOS] + [IMAGE] * (int(np.prod(grid)) // 4) + [VISION_EOS]


def video(grid) -> list[int]:
    return [VISION_BOS] + [VIDEO] * (int(np.prod(grid)) // 4) + [VISION_EOS]


def audio(mel_frames: int) -> list[int]:
    return [AUDIO_BOS] + [AUDIO] * num_audio_tokens(mel_frames) + [AUDIO_EOS]


def video_with_audio(grid, seconds_per_grid: float, mel_frames: int) -> list[int]:
    """The processor's layout (`replace_video_with_audio_token`), chunked by the processor's own code."""
    t, h, w = grid
    video_times = np.repeat(np.arange(t), h * w // 4) * seconds_per_grid * 25
    audio_times = np.arange(num_audio_tokens(mel_frames))
    chunk = Qwen2_5OmniProcessor.get_chunked_index
    video_chunks, audio_chunks = chunk(None, video_times, 50), chunk(None, audio_times, 50)
    tokens = [VISION_BOS, AUDIO_BOS]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        if j < len(video_chunks):
            tokens += [VIDEO] * (video_chunks[j][1] - video_chunks[j][0])
        if j < len(audio_chunks):
            tokens += [AUDIO] * (audio_chunks[j][1] - audio_chunks[j][0])
    return tokens + [AUDIO_EOS, VISION_EOS]


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, rows))
    ids = np.array([[PAD] * (length - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


@pytest.fixture(scope="module")
def reference(tiny_untied):
    return tiny_untied[0]


@pytest.fixture(scope="module")
def config(tiny_untied):
    return PositionConfig.from_hf(json.loads((tiny_untied[1] / "config.json").read_text()))


def media_kwargs(image_grids=None, video_grids=None, seconds_per_grid=None, mel_frames=None):
    return dict(
        image_grid_thw=None if image_grids is None else np.array(image_grids, np.int64),
        video_grid_thw=None if video_grids is None else np.array(video_grids, np.int64),
        # float64, as a user may pass it: the reference rounds it to float32 and so must the port.
        video_second_per_grid=None if seconds_per_grid is None else np.array(seconds_per_grid, np.float64),
        audio_seqlens=None if mel_frames is None else np.array(mel_frames, np.int64),
    )


def reference_rope_index(reference, ids, mask, use_audio_in_video, media):
    tensor = lambda v: None if v is None else torch.from_numpy(np.asarray(v))  # noqa: E731
    positions, deltas = reference.model.get_rope_index(
        torch.from_numpy(ids),
        image_grid_thw=tensor(media["image_grid_thw"]),
        video_grid_thw=tensor(media["video_grid_thw"]),
        attention_mask=torch.from_numpy(mask),
        use_audio_in_video=use_audio_in_video,
        audio_seqlens=tensor(media["audio_seqlens"]),
        second_per_grids=tensor(media["video_second_per_grid"]),
    )
    return positions.numpy(), deltas.numpy().reshape(-1)


def assert_matches_reference(reference, config, rows, *, use_audio_in_video=False, **media_args):
    ids, mask = left_pad(rows)
    media = media_kwargs(**media_args)
    positions, deltas = rope_index(ids, mask, use_audio_in_video=use_audio_in_video, config=config, **media)
    expected_positions, expected_deltas = reference_rope_index(reference, ids, mask, use_audio_in_video, media)
    assert positions.dtype == np.int32 and deltas.dtype == np.int32
    assert positions.shape == (3,) + ids.shape and deltas.shape == (ids.shape[0],)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_array_equal(deltas, expected_deltas)
    return positions, deltas


def test_config_from_thinker_and_full_omni_config(tiny_untied, config):
    raw = json.loads((tiny_untied[1] / "config.json").read_text())
    assert config.image_token_id == TINY_TOKEN_IDS["image_token_index"]
    assert config.video_token_id == TINY_TOKEN_IDS["video_token_index"]
    assert config.audio_token_id == TINY_TOKEN_IDS["audio_token_index"]
    assert config.vision_start_token_id == TINY_TOKEN_IDS["vision_start_token_id"]
    assert config.audio_start_token_id == TINY_TOKEN_IDS["audio_start_token_id"]
    assert (config.spatial_merge_size, config.position_id_per_seconds, config.seconds_per_chunk) == (2, 25, 2)
    assert PositionConfig.from_hf({"thinker_config": raw}) == config
    with pytest.raises(ValueError, match="seconds_per_chunk"):
        PositionConfig.from_hf({**raw, "seconds_per_chunk": 0})


def test_worked_example_of_the_reference_doc(reference, config):
    """§2.2: video (2, 4, 4) at 1 s per grid with its 350-frame audio; the video runs out of chunks first."""
    row = text(1, 2) + video_with_audio((2, 4, 4), 1.0, 350) + text(3, 4)
    layout = [VISION_BOS, AUDIO_BOS] + [VIDEO] * 8 + [AUDIO] * 87 + [AUDIO_EOS, VISION_EOS]
    assert row == text(1, 2) + layout + text(3, 4)
    positions, deltas = assert_matches_reference(
        reference,
        config,
        [row],
        use_audio_in_video=True,
        video_grids=[(2, 4, 4)],
        seconds_per_grid=[1.0],
        mel_frames=[350],
    )
    expected_t = [0, 1, 2, 2, 3, 3, 3, 3, 28, 28, 28, 28, *range(3, 53), *range(53, 90), 90, 90, 91, 92]
    np.testing.assert_array_equal(positions[0, 0], expected_t)
    np.testing.assert_array_equal(positions[1, 0, 4:12], [3, 3, 4, 4, 3, 3, 4, 4])
    np.testing.assert_array_equal(positions[2, 0, 4:12], [3, 4, 3, 4, 3, 4, 3, 4])
    assert deltas.tolist() == [-10]


def test_images(reference, config):
    rows = [text(1) + image((1, 4, 6)) + text(2, 3) + image((1, 8, 2)) + text(4)]
    assert_matches_reference(reference, config, rows, image_grids=[(1, 4, 6), (1, 8, 2)])


@pytest.mark.parametrize("seconds_per_grid", [1.0, 2 / 2.9, 0.3])
def test_video(reference, config, seconds_per_grid):
    # 2 / 2.9 and 0.3 put k * seconds * 25 next to integers: the port must round in float32 as the reference.
    rows = [text(1, 2) + video((7, 4, 2)) + text(3)]
    assert_matches_reference(reference, config, rows, video_grids=[(7, 4, 2)], seconds_per_grid=[seconds_per_grid])


def test_two_videos_in_one_row(reference, config):
    rows = [text(1) + video((2, 4, 4)) + text(2) + video((3, 2, 6)) + text(3, 4)]
    assert_matches_reference(reference, config, rows, video_grids=[(2, 4, 4), (3, 2, 6)], seconds_per_grid=[1.0, 0.5])


def test_audio_only_batch_is_sequential(reference, config):
    rows = [text(1) + audio(350) + text(2), audio(120) + text(3)]
    positions, deltas = assert_matches_reference(reference, config, rows, mel_frames=[350, 120])
    assert deltas.tolist() == [0, 0]


@pytest.mark.parametrize(
    "grid, seconds_per_grid, mel_frames",
    [
        ((6, 4, 4), 1.0, 100),  # audio (25 tokens, one chunk) runs out first: V A V V
        ((4, 2, 2), 3.0, 700),  # frames 75 ids apart: gaps wider than a chunk, chunk count by token not time
        ((8, 2, 4), 0.3, 777),  # 0.3 s per grid: frame 6 lands on 45 in float32, 44 in float64
    ],
)
def test_video_with_its_audio(reference, config, grid, seconds_per_grid, mel_frames):
    rows = [text(1) + video_with_audio(grid, seconds_per_grid, mel_frames) + text(2, 3)]
    assert_matches_reference(
        reference,
        config,
        rows,
        use_audio_in_video=True,
        video_grids=[grid],
        seconds_per_grid=[seconds_per_grid],
        mel_frames=[mel_frames],
    )


def test_two_videos_with_audio_in_one_row(reference, config):
    rows = [text(1) + video_with_audio((2, 4, 4), 1.0, 350) + text(2) + video_with_audio((6, 2, 2), 0.5, 240) + text(3)]
    assert_matches_reference(
        reference,
        config,
        rows,
        use_audio_in_video=True,
        video_grids=[(2, 4, 4), (6, 2, 2)],
        seconds_per_grid=[1.0, 0.5],
        mel_frames=[350, 240],
    )


def test_left_padded_batch_mixing_modalities(reference, config):
    """Images, a video and audio over two rows: each modality is consumed row-major across the batch."""
    rows = [
        text(1) + image((1, 4, 4)) + text(2) + audio(350) + text(3, 4) + image((1, 2, 4)) + text(5),
        text(6) + image((1, 2, 6)) + video((2, 4, 4)) + text(7),
    ]
    assert_matches_reference(
        reference,
        config,
        rows,
        image_grids=[(1, 4, 4), (1, 2, 4), (1, 2, 6)],
        video_grids=[(2, 4, 4)],
        seconds_per_grid=[1.0],
        mel_frames=[350],
    )


def test_left_padded_batch_with_audio_in_video(reference, config):
    rows = [
        text(1) + audio(90) + text(2) + video_with_audio((2, 4, 4), 1.0, 350) + text(3),
        text(4) + image((1, 2, 2)) + video_with_audio((4, 2, 2), 1.0, 150) + text(5),
        text(6, 7),  # no media at all in a batch that has some
    ]
    assert_matches_reference(
        reference,
        config,
        rows,
        use_audio_in_video=True,
        image_grids=[(1, 2, 2)],
        video_grids=[(2, 4, 4), (4, 2, 2)],
        seconds_per_grid=[1.0, 1.0],
        mel_frames=[90, 350, 150],  # row 0's audio, row 0's video track, then row 1's video track
    )


def test_text_only_left_padded(reference, config):
    rows = [text(1, 2, 3, 4, 5), text(6, 7), text(8)]  # one real token: the reference's delta counts the padded 1s
    positions, deltas = assert_matches_reference(reference, config, rows)
    np.testing.assert_array_equal(positions[0, 2], [1, 1, 1, 1, 0])


def test_layout_errors_name_the_problem(config):
    ids, mask = left_pad([text(1) + image((1, 4, 4))[:-2] + [VISION_EOS] + text(2)])  # one image token short
    with pytest.raises(ValueError, match=r"image #0 .*needs 4 .*found 3"):
        rope_index(ids, mask, config=config, **media_kwargs(image_grids=[(1, 4, 4)]))
    ids, mask = left_pad([text(1) + video((2, 4, 4)) + text(2)])
    with pytest.raises(ValueError, match="video_second_per_grid"):
        rope_index(ids, mask, config=config, **media_kwargs(video_grids=[(2, 4, 4)]))
    ids, mask = left_pad([text(1) + image((1, 2, 2)) + text(2) + image((1, 2, 2))])
    with pytest.raises(ValueError, match="image_grid_thw: row 0 holds image #1 but only 1 grids"):
        rope_index(ids, mask, config=config, **media_kwargs(image_grids=[(1, 2, 2)]))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        rope_index(ids, mask[:, 1:], config=config)


def test_decode_positions_match_reference_generate(reference, config):
    """Positions the reference feeds its decoder while generating after a left-padded multimodal prompt."""
    rows = [
        text(1) + image((1, 4, 4)) + text(2, 3, 4, 5),
        text(6) + video_with_audio((2, 4, 4), 1.0, 150) + text(7),
    ]
    ids, mask = left_pad(rows)
    media = media_kwargs(image_grids=[(1, 4, 4)], video_grids=[(2, 4, 4)], seconds_per_grid=[1.0], mel_frames=[150])
    feature_mask = np.zeros((1, 160), np.int64)
    feature_mask[0, :150] = 1
    seen = []
    hook = reference.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"][-3:].numpy().copy()), with_kwargs=True
    )
    num_new = 4
    try:
        reference.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            image_grid_thw=torch.from_numpy(media["image_grid_thw"]),
            video_grid_thw=torch.from_numpy(media["video_grid_thw"]),
            video_second_per_grid=torch.from_numpy(media["video_second_per_grid"]),
            feature_attention_mask=torch.from_numpy(feature_mask),
            use_audio_in_video=True,
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            do_sample=False,
            pad_token_id=PAD,
        )
    finally:
        hook.remove()
    assert len(seen) == num_new and seen[0].shape == (3,) + ids.shape

    positions, deltas = rope_index(ids, mask, use_audio_in_video=True, config=config, **media)
    np.testing.assert_array_equal(positions, seen[0])
    prompt_length = ids.shape[1]
    n_left_pad = prompt_length - mask.sum(-1)
    # Call k > 0 of the decoder reads generated token k - 1.
    expected = np.concatenate(seen[1:], axis=-1)
    step_positions = jax.jit(decode_position_ids, static_argnums=0, static_argnames="num_tokens")
    got = np.concatenate([step_positions(prompt_length, i, deltas, n_left_pad) for i in range(num_new - 1)], axis=-1)
    np.testing.assert_array_equal(got, expected)
    all_steps = decode_position_ids(prompt_length, 0, deltas, n_left_pad, num_tokens=num_new - 1)
    np.testing.assert_array_equal(all_steps, expected)
