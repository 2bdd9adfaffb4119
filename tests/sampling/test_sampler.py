"""The jitted sampler: greedy equals transformers' `generate`, sampling is right in distribution,
seeds, logprobs, EOS handling, compile reuse and the 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

from opsd_jax.config import MeshConfig
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.sampling import generate
from opsd_jax.sampling import sampler as sampler_module
from opsd_jax.sampling.filters import sampling_logits
from opsd_jax.sharding import make_mesh
from opsd_jax.testing.reference import torch_inputs

PAD = 0
IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [PAD, PAD, PAD, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)
NEW = 20


@pytest.fixture(scope="module")
def setup(tiny_untied):
    reference, checkpoint = tiny_untied
    return reference, from_pretrained(checkpoint)


def reference_greedy(reference, eos: int | None) -> np.ndarray:
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(IDS, dtype=torch.long),
            attention_mask=torch.tensor(MASK),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    new = out[:, IDS.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)  # all rows may stop early


def test_greedy_equals_transformers_generate_with_eos_inside_the_window(setup):
    reference, model = setup
    free = reference_greedy(reference, eos=None)
    eos = int(free[0, 6])  # a token row 0 emits at step 6 and row 1 never emits before it
    assert eos not in free[1, :6]
    expected = reference_greedy(reference, eos=eos)
    out = generate(
        model,
        {"input_ids": IDS, "attention_mask": MASK},
        max_new_tokens=NEW,
        temperature=0,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    first_eos = int(np.argmax(expected[0] == eos))
    np.testing.assert_array_equal(np.asarray(out.mask[0]), np.arange(NEW) <= first_eos)
    assert np.asarray(out.tokens[0, first_eos + 1 :] == PAD).all()


def test_rematerialised_model_samples_what_the_plain_one_does(tiny_untied, setup):
    """`model.remat` (every shipped slice config sets it) must not break the decode loop: its layers are
    checkpointed functions of their parameters, so they trace inside `lax.while_loop` like plain ones."""
    _, model = setup
    remat = from_pretrained(tiny_untied[1], remat=True)
    kwargs = dict(
        max_new_tokens=6, temperature=0.7, top_k=50, eos_token_id=10**6, pad_token_id=PAD, num_samples=2, seed=3
    )
    plain = generate(model, {"input_ids": IDS, "attention_mask": MASK}, **kwargs)
    checkpointed = generate(remat, {"input_ids": IDS, "attention_mask": MASK}, **kwargs)
    np.testing.assert_array_equal(np.asarray(checkpointed.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(checkpointed.logprobs), np.asarray(plain.logprobs), atol=1e-5)


def test_logprobs_equal_a_teacher_forced_forward(setup):
    """The cached decode must see exactly what one forward over [prompt | completion] sees."""
    _, model = setup
    out = generate(
        model,
        {"input_ids": IDS, "attention_mask": MASK},
        max_new_tokens=12,
        temperature=1.0,
        eos_token_id=255,
        pad_token_id=PAD,
        seed=3,
    )
    full_ids = jnp.concatenate([IDS, out.tokens], axis=1)
    full_mask = jnp.concatenate([MASK, jnp.ones_like(out.tokens)], axis=1)
    logits = model(full_ids, attention_mask=full_mask)[:, IDS.shape[1] - 1 : -1]
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.model_logprobs), np.asarray(expected), atol=1e-5)
    # Temperature 1 with no filter: the sampled distribution is the model's.
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected), atol=1e-5)


def test_first_tokens_follow_the_filtered_softmax(setup):
    """8,000 first tokens from one prompt; chi-square goodness of fit to the tempered, filtered softmax.

    The seed is fixed, so the test is deterministic; p > 1e-3 is the acceptance bound, and no token
    outside the filtered support may ever appear.
    """
    _, model = setup
    settings = dict(temperature=0.8, top_k=40, top_p=0.9)
    out = generate(
        model,
        {"input_ids": IDS[:1], "attention_mask": MASK[:1]},
        max_new_tokens=1,
        eos_token_id=255,
        pad_token_id=PAD,
        num_samples=8000,
        seed=11,
        **settings,
    )
    logits = model(jnp.asarray(IDS[:1]), attention_mask=jnp.asarray(MASK[:1]))[:, -1]
    filtered = np.asarray(sampling_logits(logits, **settings), np.float64)[0]
    support = np.isfinite(filtered)
    probs = np.exp(filtered[support] - np.logaddexp.reduce(filtered[support]))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=filtered.size)
    assert counts[~support].sum() == 0
    assert 5 <= support.sum() <= 40
    chi2 = stats.chisquare(counts[support], probs * counts.sum())
    assert chi2.pvalue > 1e-3, chi2
    total_variation = 0.5 * np.abs(counts[support] / counts.sum() - probs).sum()
    assert total_variation < 0.05


def test_seeds(setup):
    _, model = setup
    kwargs = dict(max_new_tokens=8, temperature=1.0, eos_token_id=255, pad_token_id=PAD, num_samples=2)
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    a = np.asarray(generate(model, inputs, seed=1, **kwargs).tokens)
    b = np.asarray(generate(model, inputs, seed=1, **kwargs).tokens)
    c = np.asarray(generate(model, inputs, seed=2, **kwargs).tokens)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a[0] != a[1]).any(), "two samples of one prompt must differ"


def test_prompt_buckets_reuse_one_compiled_decode(setup):
    _, model = setup
    kwargs = dict(max_new_tokens=6, temperature=0, eos_token_id=255, pad_token_id=PAD, prompt_buckets=(16, 32))
    before = sampler_module._decode._cache_size()
    short = generate(model, {"input_ids": IDS[:, 2:], "attention_mask": MASK[:, 2:]}, **kwargs)
    long = generate(model, {"input_ids": IDS, "attention_mask": MASK}, **kwargs)
    assert sampler_module._decode._cache_size() - before == 1
    unbucketed = generate(
        model,
        {"input_ids": IDS, "attention_mask": MASK},
        max_new_tokens=6,
        temperature=0,
        eos_token_id=255,
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(long.tokens), np.asarray(unbucketed.tokens))
    assert short.tokens.shape == (2, 6)
    with pytest.raises(ValueError, match="length 8 exceeds the largest bucket 4"):
        generate(
            model,
            {"input_ids": IDS, "attention_mask": MASK},
            max_new_tokens=2,
            temperature=0,
            eos_token_id=255,
            pad_token_id=PAD,
            prompt_buckets=(4,),
        )


def test_all_rows_stopping_ends_the_loop_early(setup):
    _, model = setup
    first = np.asarray(
        generate(
            model,
            {"input_ids": IDS, "attention_mask": MASK},
            max_new_tokens=1,
            temperature=0,
            eos_token_id=255,
            pad_token_id=PAD,
        ).tokens[:, 0]
    )
    out = generate(
        model,
        {"input_ids": IDS, "attention_mask": MASK},
        max_new_tokens=NEW,
        temperature=0,
        eos_token_id=[int(t) for t in first],
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(out.mask), np.arange(NEW)[None].repeat(2, 0) == 0)
    assert (np.asarray(out.tokens[:, 1:]) == PAD).all()


def test_bad_arguments_name_the_value(setup):
    _, model = setup
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    for kwargs, message in [
        (dict(max_new_tokens=0), "max_new_tokens: expected >= 1, got 0"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p: expected a value in \(0, 1\], got 1.5"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature: expected >= 0"),
        (dict(max_new_tokens=2, num_samples=0), "num_samples: expected >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(model, inputs, eos_token_id=255, pad_token_id=PAD, **kwargs)


def test_sharded_sampler_on_eight_devices_equals_one_device(tiny_untied, setup):
    _, model = setup
    _, checkpoint = tiny_untied
    kwargs = dict(max_new_tokens=16, temperature=0, eos_token_id=255, pad_token_id=PAD, num_samples=4)
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    single = np.asarray(generate(model, inputs, **kwargs).tokens)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_model = from_pretrained(checkpoint, mesh=mesh)
    sharded = generate(sharded_model, inputs, mesh=mesh, **kwargs)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), single)
    assert sharded.tokens.shape == (8, 16)


def test_the_runs_axis_rules_place_the_prompts_and_the_kv_cache(tiny_untied):
    """`mesh.logical_axis_rules` reaches generation: an override that keeps the KV heads off `tensor` and
    the rows off `fsdp` moves the compiled decode loop's cache, and the prompts' placement, accordingly."""
    from opsd_jax.models.qwen2_5_omni import input_shardings
    from opsd_jax.sharding import resolve_rules

    _, checkpoint = tiny_untied
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = from_pretrained(checkpoint, mesh=mesh)
    # four prompts: rows divisible by data x fsdp (an indivisible axis is replicated)
    prepared = model.prepare_inputs(
        jnp.asarray(np.tile(IDS, (2, 1))), attention_mask=jnp.asarray(np.tile(MASK, (2, 1)))
    )
    settings = sampler_module.sampling_settings(
        max_new_tokens=4, temperature=0.0, top_k=None, top_p=None, eos_token_id=255, pad_token_id=PAD, num_samples=2
    )
    graphdef, params = nnx.split(model)
    key = jax.random.key(0)

    def cache_spec(rules):
        inputs = jax.device_put(prepared, input_shardings(prepared, mesh, rules=rules))
        prefill, _ = sampler_module.compile_generation(
            graphdef, params, inputs, key, settings=settings, mesh=mesh, rules=rules
        )
        cache, ids = prefill.output_shardings.cache[0].key.spec, inputs.input_ids.sharding.spec
        return tuple(cache) + (None,) * (4 - len(cache)), tuple(ids) + (None,) * (2 - len(ids))

    assert cache_spec(None) == ((("data", "fsdp"), None, "tensor", None), (("data", "fsdp"), None))
    moved = resolve_rules({"kv_heads": None, "batch": "data"})
    assert cache_spec(moved) == (("data", None, None, None), ("data", None))


def test_greedy_video_with_audio_prompt_equals_transformers(tiny_untied, tiny_prompt_builder, setup):
    """A left-padded batch of two video + audio-track prompts; TMRoPE deltas carry into decoding."""
    from opsd_jax.data import chat_template as ct
    from opsd_jax.data.audio_features import audio_to_inputs
    from opsd_jax.data.vision_inputs import concatenate_inputs, video_to_inputs

    reference, _ = tiny_untied
    _, model = setup
    rng = np.random.default_rng(5)
    videos = [video_to_inputs(rng.integers(0, 256, (n, 56, 56, 3), dtype=np.uint8), sample_fps=2.0) for n in (4, 2)]
    video = concatenate_inputs(videos)
    audio = audio_to_inputs(
        [0.1 * rng.standard_normal(16000 * 2 + 500), 0.1 * rng.standard_normal(16000)], max_samples=48000
    )
    lengths = audio["feature_attention_mask"].sum(-1).tolist()
    prompts = [
        ct.user_prompt([ct.VideoPart(v["video_grid_thw"][0], 1.0, n), text])
        for v, n, text in zip(videos, lengths, ["How does she feel?", "Which emotion?"])
    ]
    batch = tiny_prompt_builder(prompts, length=None)
    assert batch["attention_mask"][1, 0] == 0, "the second prompt must be left-padded"
    inputs = {**batch, **video, **audio, "use_audio_in_video": True}

    tensors = torch_inputs(inputs)

    def reference_generate(eos):
        with torch.no_grad():
            out = reference.generate(**tensors, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
        new = out[:, batch["input_ids"].shape[1] :].numpy()
        return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)

    free = reference_generate(None)
    eos = int(free[1, 9])  # row 1 stops at step 9 at the latest: EOS inside the 20-token window
    expected = reference_generate(eos)
    assert (expected[1] == eos).any() and (expected[1, -1] == PAD)
    out = generate(model, inputs, max_new_tokens=NEW, temperature=0, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_per_prompt_keys_make_rollouts_independent_of_row_order(setup):
    _, model = setup
    keys = jnp.stack([jax.random.key(7), jax.random.key(8)])
    kwargs = dict(max_new_tokens=6, temperature=1.0, eos_token_id=255, pad_token_id=PAD, num_samples=3)
    forward = generate(model, {"input_ids": IDS, "attention_mask": MASK}, seed=keys, **kwargs)
    swapped = generate(model, {"input_ids": IDS[::-1], "attention_mask": MASK[::-1]}, seed=keys[::-1], **kwargs)
    np.testing.assert_array_equal(np.asarray(forward.tokens[:3]), np.asarray(swapped.tokens[3:]))
    np.testing.assert_array_equal(np.asarray(forward.tokens[3:]), np.asarray(swapped.tokens[:3]))
    assert (np.asarray(forward.tokens[0]) != np.asarray(forward.tokens[1])).any()
