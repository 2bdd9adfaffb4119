"""Video frames and 16 kHz mono audio from media files, decoded with PyAV (no torch, no ffmpeg binary).

Video follows qwen-omni-utils (`vision_inputs` holds its rules): `smart_nframes` frames (2 fps, at least 4,
at most 768, an even count) at `linspace` indices over the decoded frames, resized to `video_frame_size`.
A fixed `num_frames` and `size` replace those rules where every clip must have the same shape (the
TFDS builders). The frame count is the number of non-empty video packets, checked against the decoder's
count (decord's and torchvision's readers both count frames, not seconds).

Audio is the first audio track of a file (a wav, or the video itself), resampled by PyAV's
`AudioResampler` (libswresample) to 16 kHz, then averaged over channels as `librosa.load(mono=True)`
does (qwen-omni-utils loads audio with librosa; its soxr resampler differs by tiny amounts).

Decoding is deterministic. An unreadable, missing or empty file raises `MediaError` naming the clip id
and the path; `load_clip_media(..., on_error="skip")` returns None instead and counts the clip.

`write_video` / `write_wav` encode frames and waveforms (generated datasets, tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av
import numpy as np

from opsd_jax.data.audio_features import SAMPLING_RATE
from opsd_jax.data.manifest import Clip
from opsd_jax.data.vision_inputs import (
    FPS,
    FPS_MIN_FRAMES,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    resize_frames,
    sample_frame_indices,
    smart_nframes,
    video_frame_size,
)

ON_ERROR = ("raise", "skip")


class MediaError(ValueError):
    """A media file that cannot be decoded; the message names the clip id and the path."""


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    sample_fps: float  # T / total_frames * video_fps: what `video_to_inputs` needs
    video_fps: float
    total_frames: int


@dataclasses.dataclass(frozen=True)
class ClipMedia:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    sample_fps: float
    audio: np.ndarray  # [samples] float32, 16 kHz mono


@dataclasses.dataclass
class SkipCounter:
    """Clips left out by `on_error="skip"`: id -> the reason."""

    reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.reasons)


def _error(path: Path, record_id: str, reason: str) -> MediaError:
    owner = f"clip {record_id!r}: " if record_id else ""
    return MediaError(f"{owner}cannot read {path}: {reason}")


def _open(path: Path, record_id: str) -> av.container.InputContainer:
    if path.is_dir():
        raise _error(path, record_id, "it is a directory, not a media file")
    if not path.is_file():
        raise _error(path, record_id, "no such file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise _error(path, record_id, f"not a readable media file ({error})") from None


def _count_video_frames(path: Path, record_id: str) -> tuple[int, float]:
    """(frame count, frame rate) from the container, without decoding."""
    with _open(path, record_id) as container:
        if not container.streams.video:
            raise _error(path, record_id, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        try:
            # Flush packets have size 0; every other video packet holds one frame.
            count = sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as error:
            raise _error(path, record_id, f"demuxing failed ({error})") from None
        return count, float(rate or 0.0)


def _decode_frames(path: Path, record_id: str, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """One decoding pass keeping the frames at `indices` as RGB: ({index: [H, W, 3] uint8}, frames decoded)."""
    wanted = set(indices.tolist())
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    with _open(path, record_id) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    kept[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
        except av.FFmpegError as error:
            raise _error(path, record_id, f"decoding failed after {decoded} frames ({error})") from None
    return kept, decoded


def read_video(
    path: str | Path,
    *,
    record_id: str = "",
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
    nframes: int | None = None,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int | None = None,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> DecodedVideo:
    """Sampled, resized RGB frames of a video file.

    Frame count: `num_frames` exactly when given (short videos repeat frames: every clip gets the same
    static count), else qwen-omni-utils' `smart_nframes(fps, min_frames, max_frames, nframes)`.
    Frame size: `size=(height, width)` when given, else qwen-omni-utils' `video_frame_size` (multiples of
    28 within the pixel bounds). Both paths give frames `video_to_inputs` accepts when the size is a
    multiple of 28.
    """
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    path = Path(path)
    total, video_fps = _count_video_frames(path, record_id)
    if total == 0:
        raise _error(path, record_id, "the video stream holds no frames")
    if video_fps <= 0:
        raise _error(path, record_id, "the video stream has no frame rate")
    for _ in range(2):  # a second pass only when the decoder disagrees with the packet count
        try:
            count = (
                int(num_frames)
                if num_frames is not None
                else smart_nframes(
                    total, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames, nframes=nframes
                )
            )
        except ValueError as error:
            raise _error(path, record_id, str(error)) from None
        indices = sample_frame_indices(total, count)
        kept, decoded = _decode_frames(path, record_id, indices)
        if decoded == 0:
            raise _error(path, record_id, "no video frame could be decoded")
        if decoded == total:
            break
        total = decoded
    else:
        raise _error(path, record_id, "the decoder yields a different frame count on every pass")
    frames = np.stack([kept[int(index)] for index in indices])
    if size is None:
        size = video_frame_size(
            frames.shape[1],
            frames.shape[2],
            count,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            total_pixels=total_pixels,
        )
    frames = resize_frames(frames, int(size[0]), int(size[1]))
    return DecodedVideo(frames=frames, sample_fps=count / total * video_fps, video_fps=video_fps, total_frames=total)


def read_audio(path: str | Path, *, record_id: str = "", sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """The first audio track of a file as `[samples]` float32 mono at `sampling_rate` Hz."""
    path = Path(path)
    with _open(path, record_id) as container:
        if not container.streams.audio:
            raise _error(path, record_id, "no audio track")
        stream = container.streams.audio[0]
        # Keep the channels through resampling and average them after (librosa's mono mix).
        resampler = av.AudioResampler(format="fltp", rate=sampling_rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except av.FFmpegError as error:
            raise _error(path, record_id, f"audio decoding failed ({error})") from None
    chunks = [chunk for chunk in chunks if chunk.size]
    if not chunks:
        raise _error(path, record_id, "the audio track holds no samples")
    return np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)


def load_clip_media(
    clip: Clip,
    *,
    on_error: str = "raise",
    skipped: SkipCounter | None = None,
    sampling_rate: int = SAMPLING_RATE,
    **video_options,
) -> ClipMedia | None:
    """A clip's frames (`read_video(**video_options)`) and audio (its `audio` file, else the video's track).

    `on_error="skip"` returns None for an unreadable clip and records it in `skipped`.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    try:
        video = read_video(clip.video, record_id=clip.id, **video_options)
        audio = read_audio(
            clip.video if clip.audio is None else clip.audio, record_id=clip.id, sampling_rate=sampling_rate
        )
    except MediaError as error:
        if on_error == "raise":
            raise
        if skipped is not None:
            skipped.reasons[clip.id] = str(error)
        return None
    return ClipMedia(frames=video.frames, sample_fps=video.sample_fps, audio=audio)


def _audio_planes(audio: np.ndarray) -> np.ndarray:
    """Mono `[S]` or `[channels, S]` -> `[channels, S]` float32, contiguous (PyAV's planar layout)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] not in (1, 2) or audio.shape[1] == 0:
        raise ValueError(f"audio must be [samples] or [1 | 2, samples] with samples > 0, got shape {audio.shape}")
    return np.ascontiguousarray(audio)


def _encode_audio(container, stream, audio: np.ndarray, sampling_rate: int) -> None:
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    chunk = 1024
    for start in range(0, audio.shape[1], chunk):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio[:, start : start + chunk]), format="fltp", layout=layout
        )
        frame.sample_rate = sampling_rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    *,
    audio: np.ndarray | None = None,
    sampling_rate: int = SAMPLING_RATE,
    codec: str = "mpeg4",
    bit_rate: int = 4_000_000,
    audio_codec: str = "aac",
) -> Path:
    """Encodes RGB frames `[T, H, W, 3]` uint8 (even H and W) at `fps`, with an optional audio track
    (`[samples]` or `[channels, samples]` float32 in [-1, 1]), into `path` (the container from its suffix).
    The default bit rate keeps small test frames within a few grey levels of the input."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T > 0, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even (yuv420p), got {frames.shape[1:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=int(fps))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.bit_rate = bit_rate
        planes = None if audio is None else _audio_planes(audio)
        track = None
        if planes is not None:
            track = container.add_stream(audio_codec, rate=sampling_rate)
            track.layout = "mono" if planes.shape[0] == 1 else "stereo"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if planes is not None:
            _encode_audio(container, track, planes, sampling_rate)
    return path


def write_wav(path: str | Path, audio: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> Path:
    """Writes `[samples]` or `[channels, samples]` float32 audio as 16-bit PCM WAV."""
    planes = _audio_planes(audio)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=sampling_rate)
        stream.layout = "mono" if planes.shape[0] == 1 else "stereo"
        _encode_audio(container, stream, planes, sampling_rate)
    return path
