"""Log-mel features against transformers' `WhisperFeatureExtractor(feature_size=128)`, called with the
arguments the Qwen2.5-Omni processor passes (padding="max_length", return_attention_mask=True,
truncation=True, 16 kHz)."""

import numpy as np
import pytest

from opsd_jax.data import audio_features as af

# With torch installed the extractor runs a float32 (MKL) STFT. Its own distance to the extractor's float64
# numpy path reaches 1.0e-5 on tonal signals (low-energy mel bins four decades under a sine), so against
# it the tolerance is 2e-5 (observed up to 1.23e-5); against the float64 numpy path it is 1e-6 (observed 1.2e-7).
ATOL_TORCH_PATH = 2e-5
ATOL_NUMPY_PATH = 1e-6


@pytest.fixture(scope="module")
def extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128)


@pytest.fixture(scope="module")
def waveforms():
    rng = np.random.default_rng(0)
    seconds = np.arange(16000 * 5) / 16000
    # 5 s: a 440 Hz tone in noise, with a loudness envelope; 0.70 s of quiet noise (not a multiple of 160).
    tonal = 0.3 * np.sin(2 * np.pi * 440 * seconds) * (
        1 + 0.5 * np.sin(2 * np.pi * 0.7 * seconds)
    ) + 0.05 * rng.standard_normal(seconds.shape)
    short = 0.1 * rng.standard_normal(11234)
    return [short.astype(np.float32), tonal.astype(np.float32)]


def processor_call(extractor, waveforms, max_samples, **kwargs):
    return extractor(
        waveforms,
        sampling_rate=16000,
        return_attention_mask=True,
        padding="max_length",
        max_length=max_samples,
        truncation=True,
        return_tensors="np",
        **kwargs,
    )


def test_mel_filter_bank_equals_whisper(extractor):
    np.testing.assert_allclose(af.mel_filter_bank(), extractor.mel_filters, rtol=0, atol=1e-12)


def test_short_and_truncated_long_audio_match_extractor(extractor, waveforms):
    max_samples = 3 * 16000  # the 5 s audio is cut to 3 s, the 0.7 s one padded
    expected = processor_call(extractor, waveforms, max_samples)
    got = af.audio_to_inputs(waveforms, max_samples=max_samples)
    assert got["input_features"].shape == (2, 128, 300) and got["input_features"].dtype == np.float32
    np.testing.assert_array_equal(got["feature_attention_mask"], expected["attention_mask"])
    assert got["feature_attention_mask"].sum(-1).tolist() == [71, 300]  # ceil(11234 / 160), all
    np.testing.assert_allclose(got["input_features"], expected["input_features"], rtol=0, atol=ATOL_TORCH_PATH)

    padded = np.stack([np.pad(waveforms[0], (0, max_samples - len(waveforms[0]))), waveforms[1][:max_samples]])
    exact = extractor._np_extract_fbank_features(padded, "cpu")
    np.testing.assert_allclose(got["input_features"], exact, rtol=0, atol=ATOL_NUMPY_PATH)


def test_default_pads_to_the_real_config_300_seconds(waveforms):
    from transformers import WhisperFeatureExtractor

    # The Qwen2.5-Omni preprocessor config: chunk_length 300 -> n_samples 4,800,000 -> 30,000 frames.
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=300)
    expected = processor_call(extractor, waveforms[1:], None)
    got = af.audio_to_inputs(waveforms[1])
    assert got["input_features"].shape == (1, 128, 30000)
    np.testing.assert_array_equal(got["feature_attention_mask"], expected["attention_mask"])
    assert got["feature_attention_mask"].sum() == 500
    np.testing.assert_allclose(got["input_features"], expected["input_features"], rtol=0, atol=ATOL_TORCH_PATH)


def test_silence_and_exact_hop_multiples(extractor):
    waveforms = [np.zeros(3200, np.float32), np.full(1600, 0.25, np.float32)]
    expected = processor_call(extractor, waveforms, 8000)
    got = af.audio_to_inputs(waveforms, max_samples=8000)
    assert got["feature_attention_mask"].sum(-1).tolist() == [20, 10]
    np.testing.assert_array_equal(got["feature_attention_mask"], expected["attention_mask"])
    np.testing.assert_allclose(got["input_features"], expected["input_features"], rtol=0, atol=ATOL_TORCH_PATH)


def test_bad_audio_is_rejected():
    with pytest.raises(ValueError, match="sampling_rate must be 16000 Hz"):
        af.audio_to_inputs(np.zeros(1600, np.float32), sampling_rate=44100)
    with pytest.raises(ValueError, match=r"waveforms\[0\] must be mono \(1-D\), got shape \(2, 1600\)"):
        af.audio_to_inputs([np.zeros((2, 1600), np.float32)], max_samples=16000)
    with pytest.raises(ValueError, match=r"waveforms\[1\] has 20000 samples, more than max_samples=16000"):
        af.audio_to_inputs(
            [np.zeros(100, np.float32), np.zeros(20000, np.float32)], max_samples=16000, truncation=False
        )
