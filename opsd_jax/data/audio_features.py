"""16 kHz mono waveforms -> the audio encoder's 128-bin log-mel features, in numpy.

The numbers are those of transformers' `WhisperFeatureExtractor(feature_size=128)` as the Qwen2.5-Omni
processor calls it: every waveform is zero-padded (or truncated) to `max_samples` BEFORE the STFT, so the
features are `[128, max_samples // 160]` with a mask of the frames that hold audio. The padding matters for
the values too: the last frames of an audio see the zeros after it, and the dynamic-range floor
(max - 8) is taken over the padded spectrogram.

Steps per waveform: centred STFT (n_fft 400, hop 160, periodic Hann window, reflect padding) -> power
-> Slaney mel filters (0-8 kHz, area-normalised) -> log10 (floor 1e-10) -> max(x, max(x) - 8) ->
(x + 4) / 4; the STFT's last frame is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
NUM_MEL_BINS = 128
# The real Qwen2.5-Omni preprocessor config: chunk_length 300 s -> n_samples 4,800,000 -> 30,000 frames.
MAX_SAMPLES = 300 * SAMPLING_RATE
_LOG_FLOOR = 1e-10


def _hertz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mels)


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    return np.where(log_region, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


def mel_filter_bank(
    *, num_mel_bins: int = NUM_MEL_BINS, n_fft: int = N_FFT, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """`[n_fft // 2 + 1, num_mel_bins]` float64 triangular filters, Slaney scale and area normalisation, 0 Hz
    to 8 kHz (Whisper's bank; librosa's `filters.mel(norm="slaney")`)."""
    mel_edges = np.linspace(_hertz_to_mel(np.float64(0.0)), _hertz_to_mel(np.float64(8000.0)), num_mel_bins + 2)
    edges = _mel_to_hertz(mel_edges)
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def _hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window's default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


def log_mel_spectrogram(padded: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """A waveform already padded to its final length M -> `[num_mel_bins, M // 160]` float32 log-mel."""
    num_frames = len(padded) // HOP_LENGTH  # the STFT gives one more; Whisper drops the last
    centred = np.pad(padded.astype(np.float64), N_FFT // 2, mode="reflect")
    # Frames that start after the last non-zero sample are silent (mel power exactly 0), which is most of a
    # short clip padded to 300 s; they skip the FFT and take the floor directly.
    is_nonzero = centred[::-1] != 0
    last_nonzero = len(centred) - 1 - int(np.argmax(is_nonzero)) if is_nonzero.any() else -1
    active = min(num_frames, last_nonzero // HOP_LENGTH + 1) if last_nonzero >= 0 else 0
    frames = np.lib.stride_tricks.sliding_window_view(centred, N_FFT)[::HOP_LENGTH][:active]
    power = np.abs(np.fft.rfft(frames * _hann_window(N_FFT), axis=-1)) ** 2
    log_mel = np.full((filters.shape[1], num_frames), np.log10(_LOG_FLOOR))
    log_mel[:, :active] = np.log10(np.maximum(filters.T @ power.T, _LOG_FLOOR))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


def audio_to_inputs(
    waveforms: np.ndarray | Sequence[np.ndarray],
    *,
    sampling_rate: int = SAMPLING_RATE,
    max_samples: int = MAX_SAMPLES,
    truncation: bool = True,
) -> dict[str, np.ndarray]:
    """Mono waveforms -> `input_features [B, 128, max_samples // 160]` float32 and
    `feature_attention_mask [B, max_samples // 160]` int32 (1 on the ceil(len / 160) frames that hold audio).

    `max_samples` is the static length every waveform is padded to (the processor's `padding="max_length"`;
    its default is the real config's 300 s). Longer waveforms are cut to it (`truncation=True`, the
    processor's default) or rejected. A single 1-D waveform is a batch of one.
    """
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(f"sampling_rate must be {SAMPLING_RATE} Hz (resample first), got {sampling_rate}")
    if max_samples < N_FFT:
        raise ValueError(f"max_samples must be at least n_fft ({N_FFT} samples), got {max_samples}")
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        waveforms = [waveforms]
    if len(waveforms) == 0:
        raise ValueError("audio_to_inputs needs at least one waveform")
    filters = mel_filter_bank()
    num_frames = max_samples // HOP_LENGTH
    features = np.empty((len(waveforms), NUM_MEL_BINS, num_frames), np.float32)
    mask = np.zeros((len(waveforms), num_frames), np.int32)
    for index, waveform in enumerate(waveforms):
        # The processor casts to float32 before padding; the STFT itself runs in float64 here.
        waveform = np.asarray(waveform, dtype=np.float32)
        if waveform.ndim != 1:
            raise ValueError(f"waveforms[{index}] must be mono (1-D), got shape {waveform.shape}")
        if len(waveform) > max_samples and not truncation:
            raise ValueError(
                f"waveforms[{index}] has {len(waveform)} samples, more than max_samples={max_samples}; "
                f"pass truncation=True or a larger max_samples"
            )
        padded = np.zeros(max_samples, np.float32)
        padded[: min(len(waveform), max_samples)] = waveform[:max_samples]
        features[index] = log_mel_spectrogram(padded, filters)
        mask[index, : feature_frames(len(waveform), max_samples)] = 1
    return dict(input_features=features, feature_attention_mask=mask)


def feature_frames(num_samples: int, max_samples: int = MAX_SAMPLES) -> int:
    """The mel frames that hold audio for a waveform of `num_samples` padded (or cut) to `max_samples`: the row
    sum of `feature_attention_mask`, without computing the features."""
    return min(-(-int(num_samples) // HOP_LENGTH), max_samples // HOP_LENGTH)
