"""Parity of `opsd_jax.models.audio` with the transformers audio tower, float32.

Tolerance: max |ours - reference| <= 1e-4 on the encoder output (measured ~2e-7); a bucketed or
mesh-placed run agrees with the plain run to <= 1e-5.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

from opsd_jax.config import MeshConfig
from opsd_jax.models import weights
from opsd_jax.models.audio import (
    AudioConfig,
    AudioEncoder,
    audio_output_lengths,
    audio_plan,
    pack_audio_chunks,
    prepare_audio,
)
from opsd_jax.sharding import make_mesh, shard_module
from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, tiny_thinker_config_dict

ATOL = 1e-4
BATCH_LENGTHS = (350, 200, 97)
# n_window = 5: 10-frame chunks of 5 token slots, an odd count, so pooled pairs straddle chunk
# boundaries; a 2-frame audio yields no token at all.
SMALL_WINDOW = 5
SMALL_WINDOW_LENGTHS = (37, 9, 2, 10, 11)


def load_encoder(ckpt_dir) -> AudioEncoder:
    config = AudioConfig.from_hf(json.loads((ckpt_dir / "config.json").read_text())["audio_config"])
    encoder = AudioEncoder(config, rngs=nnx.Rngs(0))
    weights.load_module(encoder, weights.SafetensorsCheckpoint.open(ckpt_dir), prefix="audio_tower.")
    return encoder


def processor_batch(lengths, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`input_features [B, 128, max]` + right-padded `feature_attention_mask [B, max]` as the processor
    returns them; padded frames hold non-zero values (log-mel of silence is not zero) that must be ignored."""
    frames = max(lengths)
    features = np.random.default_rng(seed).standard_normal((len(lengths), 128, frames)).astype(np.float32)
    mask = (np.arange(frames)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return features, mask


def reference_features(model, features, mask) -> np.ndarray:
    with torch.no_grad():
        out = model.model.get_audio_features(
            input_features=torch.from_numpy(features), feature_attention_mask=torch.from_numpy(mask)
        )
    return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def untied_encoder(tiny_untied):
    return load_encoder(tiny_untied[1])


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    """(reference thinker, our encoder) with n_window = SMALL_WINDOW.

    `build_reference_thinker` draws unit-variance weights, so activations reach the nonlinear range
    trained weights give: at the reference's own init (std 0.02) the tanh GELU, or a missing frame
    mask after conv1, would move the output by < 1e-5 and pass unnoticed.
    """
    model = build_reference_thinker(tiny_thinker_config_dict(n_window=SMALL_WINDOW), seed=2)
    ckpt = save_reference_thinker(model, tmp_path_factory.mktemp("tiny_small_window"))
    return model, load_encoder(ckpt)


@pytest.fixture(scope="module")
def batch_case(tiny_untied, untied_encoder):
    """(features, mask, reference output, our output) for audios of BATCH_LENGTHS frames."""
    features, mask = processor_batch(BATCH_LENGTHS, seed=1)
    return (
        features,
        mask,
        reference_features(tiny_untied[0], features, mask),
        np.asarray(untied_encoder.encode(features, mask)),
    )


@pytest.mark.parametrize("n_window, lengths", [(100, BATCH_LENGTHS), (SMALL_WINDOW, SMALL_WINDOW_LENGTHS)])
def test_plan_matches_reference_chunking_and_pooling(n_window, lengths):
    config = AudioConfig(
        d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=1, n_window=n_window, output_dim=64
    )
    features, mask = processor_batch(lengths, seed=3)
    lens = torch.from_numpy(mask.sum(-1))
    packed = torch.from_numpy(features).permute(0, 2, 1)[torch.from_numpy(mask).bool()].permute(1, 0)
    ref_chunks, ref_chunk_lengths = hf.chunk_and_pad_features(packed, lens, n_window)
    ref_valid = hf.get_valid_indices(ref_chunk_lengths).numpy()
    ref_pool = hf.get_pool_indices(lens).numpy()

    chunks, plan = prepare_audio(features, mask, config)
    np.testing.assert_array_equal(plan.chunk_lengths, ref_chunk_lengths.numpy())
    width = ref_chunks.shape[2]
    np.testing.assert_array_equal(chunks[:, :, :width], ref_chunks.numpy())
    assert not chunks[:, :, width:].any()
    # The reference pools packed tokens; map its pair starts to slots of our [chunks * n_window] grid.
    ref_grid_width = int(((ref_chunk_lengths - 1) // 2 + 1).max())
    ref_slots = ref_valid[ref_pool]
    ours = (ref_slots // ref_grid_width) * config.tokens_per_chunk + ref_slots % ref_grid_width
    np.testing.assert_array_equal(plan.pool_index, ours)
    np.testing.assert_array_equal(plan.token_audio, np.repeat(np.arange(len(lengths)), audio_output_lengths(lengths)))


def test_one_audio_in_two_chunks_matches_reference(tiny_untied, untied_encoder):
    features, mask = processor_batch((350,), seed=0)  # chunks of 200 + 150 frames, 175 tokens: odd tail
    out = np.asarray(untied_encoder.encode(features, mask))
    expected = reference_features(tiny_untied[0], features, mask)
    assert out.shape == expected.shape == (87, untied_encoder.config.output_dim)
    assert np.abs(out - expected).max() <= ATOL


def test_batch_of_different_lengths_matches_reference(batch_case):
    _, _, expected, out = batch_case
    assert out.shape == expected.shape == (int(audio_output_lengths(BATCH_LENGTHS).sum()), expected.shape[1])
    assert np.abs(out - expected).max() <= ATOL


def test_many_small_chunks_match_reference(small_window):
    model, encoder = small_window
    features, mask = processor_batch(SMALL_WINDOW_LENGTHS, seed=4)
    expected = reference_features(model, features, mask)
    out = np.asarray(encoder.encode(features, mask))
    assert out.shape == expected.shape == (16, encoder.config.output_dim)
    assert np.abs(out - expected).max() <= ATOL


def test_larger_buckets_give_the_same_rows(untied_encoder, batch_case):
    features, mask, _, exact = batch_case
    config = untied_encoder.config
    chunks, plan = prepare_audio(features, mask, config, chunk_bucket=7, token_bucket=exact.shape[0] + 9)
    assert chunks.shape == (7, 128, config.chunk_frames) and plan.token_audio.shape == (exact.shape[0] + 9,)
    out = np.asarray(nnx.jit(lambda encoder, x, p: encoder(x, p))(untied_encoder, jax.numpy.asarray(chunks), plan))
    valid = np.asarray(plan.valid_rows)
    assert valid.sum() == exact.shape[0] and valid[: exact.shape[0]].all()
    assert np.abs(out[valid] - exact).max() <= 1e-5
    assert not out[~valid].any()


def test_audio_output_lengths_match_reference(untied_encoder):
    lengths = np.arange(0, 4000)
    reference = hf.Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, torch.from_numpy(lengths))[1]
    np.testing.assert_array_equal(audio_output_lengths(lengths), reference.numpy())
    assert audio_output_lengths(30000) == 7500  # the processor's 300 s maximum: 25 tokens per second
    with pytest.raises(ValueError, match=r"mel_lengths.*-1"):
        audio_output_lengths([5, -1])


def test_bad_inputs_raise_naming_the_value(untied_encoder):
    config = untied_encoder.config
    features, mask = processor_batch((30, 20), seed=5)
    with pytest.raises(ValueError, match=r"feature_attention_mask.*\(2, 30\).*\(2, 29\)"):
        prepare_audio(features, mask[:, :29], config)
    with pytest.raises(ValueError, match=r"input_features.*128 mel bins.*\(2, 80, 30\)"):
        prepare_audio(features[:, :80], mask, config)
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"audio 1 has 0 mel frames"):
        prepare_audio(features, empty, config)
    with pytest.raises(ValueError, match=r"audio 0 has 0 mel frames"):
        audio_plan(np.array([0, 5]), config)
    with pytest.raises(ValueError, match=r"feature_lens: expected a non-empty 1-D integer array"):
        audio_plan(np.array([], dtype=np.int64), config)
    with pytest.raises(ValueError, match=r"chunk_bucket=1 is smaller than the 2 chunks"):
        pack_audio_chunks(features, mask, config, chunk_bucket=1)
    with pytest.raises(ValueError, match=r"token_bucket=3 is smaller than the 12 output tokens"):
        audio_plan(np.array([30, 20]), config, token_bucket=3)
    chunks, plan = prepare_audio(features, mask, config)
    with pytest.raises(ValueError, match=r"chunks: 1 chunks, but plan.chunk_lengths has 2"):
        untied_encoder(chunks[:1], plan)


def test_config_from_hf_validates():
    base = dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=2, n_window=4, output_dim=64)
    config = AudioConfig.from_hf(base)
    assert (config.num_mel_bins, config.max_source_positions, config.chunk_frames) == (128, 1500, 8)
    with pytest.raises(ValueError, match=r"activation_function.*'gelu_new'"):
        AudioConfig.from_hf({**base, "activation_function": "gelu_new"})
    with pytest.raises(ValueError, match=r"d_model \(32\) must be a multiple of encoder_attention_heads \(5\)"):
        AudioConfig.from_hf({**base, "encoder_attention_heads": 5})
    with pytest.raises(ValueError, match=r"n_window \(2000\).*max_source_positions \(1500\)"):
        AudioConfig.from_hf({**base, "n_window": 2000})


def test_mesh_placement_matches_one_device(tiny_untied, batch_case):
    features, mask, _, single = batch_case
    encoder = load_encoder(tiny_untied[1])
    shard_module(encoder, make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    kernel = encoder.layers[0].fc1.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == PartitionSpec("fsdp", None)
    out = np.asarray(encoder.encode(features, mask))
    assert np.abs(out - single).max() <= 1e-5
