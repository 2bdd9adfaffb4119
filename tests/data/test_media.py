"""PyAV decoding of real clips written here: frame sampling (qwen-omni-utils' 2 fps rules), sizes, audio
length and pitch, determinism, and errors naming the clip and the path."""

from pathlib import Path

import numpy as np
import pytest

from opsd_jax.data import media
from opsd_jax.data import vision_inputs as vi
from opsd_jax.data.manifest import Clip

VIDEO_FPS = 10
RED_STEP = 8  # frame t is filled with red = 8 t, so a decoded frame tells its index
TONE_HZ = 440.0
WAV_TONE_HZ = 1000.0


def moving_colour(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """`[count, H, W, 3]` uint8: red encodes the frame index, a green bar moves right."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    frames[..., 0] = (np.arange(count) * RED_STEP)[:, None, None]
    for index in range(count):
        frames[index, :, 2 * index % width : 2 * index % width + 4, 1] = 255
    return frames


def tone(seconds: float, rate: int, hz: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def frame_indices(frames: np.ndarray) -> list[int]:
    """The source index of each decoded frame, read off its red level (codec error is < 4 levels)."""
    return [int(round(float(frame[..., 0].mean()) / RED_STEP)) for frame in frames]


def peak_hz(waveform: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.argmax(spectrum) * rate / len(waveform))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    stereo = np.stack([tone(3.0, 22050, TONE_HZ), tone(3.0, 22050, TONE_HZ)])
    left_loud = np.stack([tone(1.5, 44100, WAV_TONE_HZ, 0.6), tone(1.5, 44100, WAV_TONE_HZ, 0.2)])
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths = {
        "av": media.write_video(root / "av.mp4", moving_colour(30), VIDEO_FPS, audio=stereo, sampling_rate=22050),
        "short": media.write_video(root / "short.mp4", moving_colour(8), VIDEO_FPS),
        "silent": media.write_video(root / "silent.avi", moving_colour(12), VIDEO_FPS),
        "wav": media.write_wav(root / "tone.wav", left_loud, 44100),
        "corrupt": corrupt,
        "empty": root / "empty.mp4",
    }
    paths["empty"].write_bytes(b"")
    truncated = root / "truncated.mp4"
    truncated.write_bytes(paths["av"].read_bytes()[: paths["av"].stat().st_size // 2])
    paths["truncated"] = truncated
    return paths


def test_two_frames_per_second_at_linspace_indices(clips):
    video = media.read_video(clips["av"])
    # 30 frames at 10 fps = 3 s -> 6 frames at 2 fps; sample_fps = 6 / 30 * 10.
    assert video.frames.shape[0] == 6 and video.total_frames == 30 and video.video_fps == VIDEO_FPS
    assert video.sample_fps == pytest.approx(2.0)
    assert frame_indices(video.frames) == [0, 6, 12, 17, 23, 29]
    assert frame_indices(video.frames) == vi.sample_frame_indices(30, 6).tolist()
    faster = media.read_video(clips["av"], fps=4.0)
    assert faster.frames.shape[0] == 12 and faster.sample_fps == pytest.approx(4.0)
    assert frame_indices(faster.frames) == vi.sample_frame_indices(30, 12).tolist()


def test_frame_bounds_keep_counts_even(clips):
    # 0.8 s at 2 fps is 1.6 frames: raised to the minimum of 4.
    short = media.read_video(clips["short"])
    assert short.frames.shape[0] == 4 and frame_indices(short.frames) == [0, 2, 5, 7]
    assert short.sample_fps == pytest.approx(4 / 8 * VIDEO_FPS)
    # 3 s at 3 fps is 9 frames: floored to an even 8.
    assert media.read_video(clips["av"], fps=3.0).frames.shape[0] == 8
    assert media.read_video(clips["av"], max_frames=4).frames.shape[0] == 4


def test_frame_size_follows_qwen_rules_or_a_fixed_size(clips):
    video = media.read_video(clips["av"])
    assert video.frames.shape[1:] == (*vi.video_frame_size(48, 64, 6), 3)
    assert video.frames.shape[1] % 28 == 0 and video.frames.shape[2] % 28 == 0
    fixed = media.read_video(clips["av"], size=(56, 84), num_frames=8)
    assert fixed.frames.shape == (8, 56, 84, 3) and fixed.frames.dtype == np.uint8
    assert frame_indices(fixed.frames) == vi.sample_frame_indices(30, 8).tolist()
    assert fixed.sample_fps == pytest.approx(8 / 30 * VIDEO_FPS)


def test_a_fixed_frame_count_repeats_frames_of_short_videos(clips):
    video = media.read_video(clips["short"], num_frames=12, size=(28, 28))
    assert video.frames.shape == (12, 28, 28, 3)
    assert frame_indices(video.frames) == vi.sample_frame_indices(8, 12).tolist()
    assert video.sample_fps == pytest.approx(12 / 8 * VIDEO_FPS)


def test_audio_track_of_the_video_is_16k_mono_with_its_pitch(clips):
    audio = media.read_audio(clips["av"])
    assert audio.dtype == np.float32 and audio.ndim == 1
    # 3 s; AAC adds its encoder delay and pads the last frame (at most 2 x 1024 samples at 22.05 kHz).
    assert 48000 <= len(audio) <= 48000 + 2 * 1024 * 16000 // 22050 + 1
    assert peak_hz(audio) == pytest.approx(TONE_HZ, abs=1.0)


def test_wav_is_resampled_to_16k_and_channels_are_averaged(clips):
    audio = media.read_audio(clips["wav"])
    assert len(audio) == pytest.approx(1.5 * 16000, abs=2)
    assert peak_hz(audio) == pytest.approx(WAV_TONE_HZ, abs=1.0)
    # mean of amplitudes 0.6 and 0.2 (in phase) = 0.4; int16 quantisation and the resampler's ripple are tiny
    middle = audio[4000:-4000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.4 / np.sqrt(2), rel=1e-3)


def test_decoding_is_deterministic(clips):
    first, second = media.read_video(clips["av"], fps=4.0), media.read_video(clips["av"], fps=4.0)
    np.testing.assert_array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(media.read_audio(clips["av"]), media.read_audio(clips["av"]))


@pytest.mark.parametrize(
    "name, reader, reason",
    [
        ("corrupt", media.read_video, "not a readable media file"),
        ("truncated", media.read_video, "not a readable media file"),
        ("empty", media.read_audio, "not a readable media file"),
        ("missing", media.read_video, "no such file"),
        ("silent", media.read_audio, "no audio track"),
        ("wav", media.read_video, "no video stream"),
    ],
)
def test_errors_name_the_clip_and_the_path(clips, tmp_path, name, reader, reason):
    path = clips.get(name, tmp_path / "missing.mp4")
    with pytest.raises(media.MediaError) as error:
        reader(path, record_id="clip_007")
    assert str(error.value).startswith(f"clip 'clip_007': cannot read {path}: {reason}")


def test_clip_media_from_the_audio_file_or_the_video_track_and_skipping(clips):
    separate = Clip(id="a", video=clips["silent"], audio=clips["wav"], task="basic", label="happy")
    loaded = media.load_clip_media(separate, num_frames=4, size=(28, 28))
    assert loaded.frames.shape == (4, 28, 28, 3) and len(loaded.audio) == pytest.approx(24000, abs=2)
    own_track = media.load_clip_media(Clip(id="b", video=clips["av"], task="basic", label="sad"))
    assert peak_hz(own_track.audio) == pytest.approx(TONE_HZ, abs=1.0)

    broken = [
        Clip(id="c", video=clips["corrupt"], task="basic", label="sad"),
        Clip(id="d", video=clips["silent"], task="basic", label="sad"),
    ]
    with pytest.raises(media.MediaError, match="clip 'c': cannot read"):
        media.load_clip_media(broken[0])
    skipped = media.SkipCounter()
    assert [media.load_clip_media(clip, on_error="skip", skipped=skipped) for clip in broken] == [None, None]
    assert skipped.count == 2 and "no audio track" in skipped.reasons["d"]


def test_a_directory_is_named_as_a_directory(tmp_path):
    with pytest.raises(media.MediaError, match=rf"clip 'x': cannot read {tmp_path}: it is a directory"):
        media.read_video(tmp_path, record_id="x")
