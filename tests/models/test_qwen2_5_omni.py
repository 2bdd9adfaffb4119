"""`from_pretrained`: every checkpoint layout real checkpoints use, the errors, and the sharded forward."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opsd_jax.config import MeshConfig
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.models.weights import CheckpointError
from opsd_jax.sharding import make_mesh, shard_batch
from opsd_jax.testing.reference import rewrite_checkpoint, torch_inputs

IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [0, 0, 0, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)


def forward(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


@pytest.fixture(scope="module")
def baseline(tiny_untied):
    _, checkpoint = tiny_untied
    return forward(from_pretrained(checkpoint))


def test_full_omni_checkpoint_with_thinker_prefix_and_talker(tiny_untied, baseline, tmp_path, caplog):
    _, checkpoint = tiny_untied
    talker = {"talker.model.norm.weight": np.ones(8, np.float32), "token2wav.code.weight": np.ones((2, 2), np.float32)}
    full = rewrite_checkpoint(checkpoint, tmp_path / "full", rename=lambda n: "thinker." + n, extra=talker, shards=3)
    with caplog.at_level(logging.INFO, logger="opsd_jax.models.weights"):
        model = from_pretrained(full)
    assert "skipped 2 talker/token2wav tensors" in caplog.text
    np.testing.assert_array_equal(forward(model), baseline)


def test_transformers5_in_memory_names(tiny_untied, baseline, tmp_path):
    _, checkpoint = tiny_untied

    def in_memory(name: str) -> str:
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        if name.startswith(("audio_tower.", "visual.")):
            return "model." + name
        return name

    model = from_pretrained(rewrite_checkpoint(checkpoint, tmp_path / "v5", rename=in_memory))
    np.testing.assert_array_equal(forward(model), baseline)


def test_missing_lm_head_means_tied_embeddings(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    model = from_pretrained(rewrite_checkpoint(checkpoint, tmp_path / "tied", drop=("lm_head.weight",)))
    assert model.lm_head is None
    hidden = jnp.ones((1, 1, 64))
    np.testing.assert_allclose(
        np.asarray(model.logits(hidden)), np.asarray(hidden @ model.model.embed_tokens.embedding[...].T), atol=1e-6
    )


def test_missing_tensor_names_it(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    broken = rewrite_checkpoint(checkpoint, tmp_path / "missing", drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(128, 64\)|model shape \(64, 128\)"
    ):
        from_pretrained(broken)


def test_unexpected_tensor_names_it(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    extra = {"model.layers.9.self_attn.q_proj.weight": np.zeros((64, 64), np.float32)}
    with pytest.raises(CheckpointError, match=r"model\.layers\.9\.self_attn\.q_proj\.weight.*\(64, 64\)"):
        from_pretrained(rewrite_checkpoint(checkpoint, tmp_path / "extra", extra=extra))


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    bad = {"model.norm.weight": np.ones(65, np.float32)}
    broken = rewrite_checkpoint(checkpoint, tmp_path / "shape", drop=("model.norm.weight",), extra=bad)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight: checkpoint shape \(65,\).*shape \(64,\)"):
        from_pretrained(broken)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 8}}')
    with pytest.raises(CheckpointError, match="missing field 'text_config.num_attention_heads'"):
        from_pretrained(tmp_path)


def test_no_safetensors_files(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no \\*.safetensors files"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied"])
def test_sharded_forward_on_eight_devices_equals_one_device(fixture, request):
    assert jax.device_count() == 8
    _, checkpoint = request.getfixturevalue(fixture)
    single = forward(from_pretrained(checkpoint))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = from_pretrained(checkpoint, mesh=mesh)
    q_kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    batch = shard_batch({"ids": jnp.asarray(IDS), "mask": jnp.asarray(MASK)}, mesh)
    sharded = jax.jit(lambda ids, mask: model(ids, attention_mask=mask))(batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)


# ------------------------------------------------------------------------------ the multimodal forward

from opsd_jax.data import chat_template as ct  # noqa: E402
from opsd_jax.data.audio_features import audio_to_inputs  # noqa: E402
from opsd_jax.data.vision_inputs import image_to_inputs, video_to_inputs  # noqa: E402


def multimodal_case(builder, case: str) -> dict[str, np.ndarray]:
    """The processor's arrays for one test case (tiny media, random content, fixed seeds)."""
    rng = np.random.default_rng(7)
    image = image_to_inputs(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    video = video_to_inputs(rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), sample_fps=2.0)
    audio = audio_to_inputs(
        [0.1 * rng.standard_normal(35000), 0.1 * rng.standard_normal(16000 * 2 + 800)], max_samples=48000
    )
    lengths = audio["feature_attention_mask"].sum(-1).tolist()
    question = "How does the speaker feel?"
    image_part = ct.ImagePart(image["image_grid_thw"][0])
    video_part = ct.VideoPart(video["video_grid_thw"][0], 1.0)
    video_with_audio = ct.VideoPart(video["video_grid_thw"][0], 1.0, lengths[1])
    arrays: dict[str, np.ndarray] = {}
    if case == "image":
        conversations, arrays = [[image_part, question]], dict(image)
    elif case == "video":
        conversations, arrays = [[video_part, question]], dict(video)
    elif case == "audio":
        conversations = [[ct.AudioPart(lengths[0]), question]]
        arrays = {k: v[:1] for k, v in audio.items()}
    elif case == "video_with_audio":
        conversations = [[video_with_audio, question]]
        arrays = {**video, **{k: v[1:] for k, v in audio.items()}, "use_audio_in_video": True}
    elif case == "mixed_batch":  # row 0: image + audio + video with its track; row 1: text only (left-padded)
        conversations = [[image_part, ct.AudioPart(lengths[0]), video_with_audio, question], ["Hello there."]]
        arrays = {**image, **video, **audio, "use_audio_in_video": True}
    else:
        raise ValueError(case)
    batch = builder([ct.user_prompt(parts) for parts in conversations], length=None)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **arrays}


def reference_multimodal_logits(reference, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return reference(**torch_inputs(inputs)).logits.numpy()


import torch  # noqa: E402

CASES = ["image", "video", "audio", "video_with_audio", "mixed_batch"]


@pytest.fixture(scope="module")
def multimodal_model(tiny_untied):
    return from_pretrained(tiny_untied[1])


@pytest.mark.parametrize("case", CASES)
def test_multimodal_logits_match_reference(case, tiny_untied, tiny_prompt_builder, multimodal_model):
    reference, _ = tiny_untied
    inputs = multimodal_case(tiny_prompt_builder, case)
    expected = reference_multimodal_logits(reference, inputs)
    got = np.asarray(multimodal_model(**inputs))
    real = inputs["attention_mask"].astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-4


def test_prepared_inputs_jit_with_buckets_and_shard_on_eight_devices(
    tiny_untied, tiny_prompt_builder, multimodal_model
):
    from opsd_jax.models.qwen2_5_omni import MediaBuckets, place_inputs

    _, checkpoint = tiny_untied
    inputs = multimodal_case(tiny_prompt_builder, "mixed_batch")
    single = np.asarray(multimodal_model(**inputs))
    buckets = MediaBuckets(image_patches=64, video_patches=128, audio_chunks=4, audio_tokens=160)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = from_pretrained(checkpoint, mesh=mesh)
    ids = inputs.pop("input_ids")
    prepared = model.prepare_inputs(ids, buckets=buckets, **inputs)
    assert prepared.video_pixels.shape == (128, 1176) and prepared.audio_chunks.shape[0] == 4
    placed = place_inputs(prepared, mesh)
    # Each chip holds its share of the patch and chunk rows (data x fsdp = 4), not every clip's media.
    for media in (placed.image_pixels, placed.video_pixels, placed.audio_chunks):
        assert media.sharding.spec[0] == ("data", "fsdp"), media.sharding
    assert placed.video_plan.patch_order.sharding.is_fully_replicated
    sharded = np.asarray(jax.jit(lambda m, x: m.forward(x))(model, placed))
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(sharded[real], single[real], atol=1e-5)


def test_placeholder_mismatch_names_both_counts(tiny_prompt_builder, multimodal_model):
    inputs = multimodal_case(tiny_prompt_builder, "image")
    inputs["input_ids"] = np.where(inputs["input_ids"] == 201, 5, inputs["input_ids"])
    inputs["input_ids"][0, -3] = 201
    with pytest.raises(ValueError, match=r"image: input_ids hold 1 placeholder tokens .* gave 6 features"):
        multimodal_model(**inputs)


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied"])
def test_a_cached_prefill_then_one_token_at_a_time_gives_the_full_forwards_logits(fixture, request):
    """`init_cache` + `prefill` (embeddings) of the first tokens, then `extend` with one token id at a time,
    reproduces one cache-free forward over the whole left-padded batch at every real position."""
    from flax import nnx

    model = from_pretrained(request.getfixturevalue(fixture)[1])
    inputs = model.prepare_inputs(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
    graphdef, params = nnx.split(model)
    batch, length = IDS.shape
    first = 5  # row 1 has 3 pad tokens then 2 real ones in the prefill; the rest arrive one by one

    @jax.jit
    def cached_logits(params):
        model = nnx.merge(graphdef, params)
        head = inputs.replace(
            input_ids=inputs.input_ids[:, :first],
            attention_mask=inputs.attention_mask[:, :first],
            position_ids=inputs.position_ids[:, :, :first],
        )
        hidden, cache = model.prefill(head, model.init_cache(batch, length))
        logits = [model.logits(hidden)]
        valid = jnp.asarray(MASK, bool)
        for t in range(first, length):
            # Token t sees the real tokens up to itself.
            mask = (valid & (jnp.arange(length) <= t))[:, None, :]
            hidden, cache = model.extend(
                inputs.input_ids[:, t : t + 1], inputs.position_ids[:, :, t : t + 1], cache, mask, jnp.int32(t)
            )
            logits.append(model.logits(hidden))
        return jnp.concatenate(logits, axis=1)

    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(cached_logits(params))[real], forward(model)[real], atol=2e-5, rtol=1e-5)


def test_init_cache_is_one_zero_cache_per_layer_in_the_compute_dtype(tiny_tied):
    model = from_pretrained(tiny_tied[1], dtype=jnp.bfloat16)
    cache = model.init_cache(3, 11)
    text = model.config.text
    assert len(cache) == text.num_hidden_layers
    for layer in cache:
        for x in (layer.key, layer.value):
            assert x.shape == (3, 11, text.num_key_value_heads, text.head_dim) and x.dtype == jnp.bfloat16
            assert not np.any(np.asarray(x, np.float32))
