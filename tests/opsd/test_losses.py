"""Tests of the losses (opsd_jax/opsd/losses.py, divergences.py, reductions.py, chunked_losses.py, ablations.py,
and the head's log-probabilities in opsd_jax/models/scoring.py) against float64 numpy references written here and against TRL.

Tolerances: float32 JAX vs float64 numpy `rtol=1e-5, atol=2e-6`; JAX vs TRL (both float32) `atol=2e-6`;
chunked / fused vs the naive logits form (both float32) `rtol=1e-5, atol=1e-6` on values and gradients.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

from opsd_jax.models import scoring  # noqa: E402
from opsd_jax.opsd import ablations, chunked_losses, divergences, losses, reductions  # noqa: E402

B, T, H, V = 2, 7, 8, 40
REF_TOL = dict(rtol=1e-5, atol=2e-6)
PARITY_TOL = dict(rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# float64 numpy references
# --------------------------------------------------------------------------------------------------


def np_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(a_logprobs, b_logprobs):
    return (np.exp(a_logprobs) * (a_logprobs - b_logprobs)).sum(-1)


def np_gjsd(student_logprobs, teacher_logprobs, beta):
    """Generalized JSD with the mixture formed in probability space (the definition, not the log-space trick)."""
    if beta == 0:
        return np_kl(teacher_logprobs, student_logprobs)
    if beta == 1:
        return np_kl(student_logprobs, teacher_logprobs)
    mixture = np.log((1 - beta) * np.exp(student_logprobs) + beta * np.exp(teacher_logprobs))
    return beta * np_kl(teacher_logprobs, mixture) + (1 - beta) * np_kl(student_logprobs, mixture)


def np_top_k_gjsd(student_logits, teacher_logits, k, support, tail_bucket, beta, temperature):
    s, t = np_log_softmax(student_logits, temperature), np_log_softmax(teacher_logits, temperature)
    indices = np.argsort(-(s if support == "student" else t), axis=-1)[..., :k]
    s, t = np.take_along_axis(s, indices, -1), np.take_along_axis(t, indices, -1)
    if tail_bucket:
        s = np.concatenate([s, np.log1p(-np.exp(s).sum(-1, keepdims=True))], -1)
        t = np.concatenate([t, np.log1p(-np.exp(t).sum(-1, keepdims=True))], -1)
    else:
        s = s - np.log(np.exp(s).sum(-1, keepdims=True))
        t = t - np.log(np.exp(t).sum(-1, keepdims=True))
    return np_gjsd(s, t, beta)


def np_token_logprobs(logits, ids, temperature=1.0):
    return np.take_along_axis(np_log_softmax(logits, temperature), ids[..., None], -1)[..., 0]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    student_hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    teacher_hidden = (student_hidden + 0.7 * rng.normal(size=(B, T, H))).astype(np.float32)
    kernel = rng.normal(size=(H, V)).astype(np.float32)
    teacher_kernel = (kernel + 0.3 * rng.normal(size=(H, V))).astype(np.float32)
    completion_ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    student_logits = student_hidden @ kernel
    teacher_logits = teacher_hidden @ kernel
    # Sampler logprobs around the student's, a few far off so that both the cap and the +-20 clamp engage.
    sampler = np_token_logprobs(student_logits, completion_ids) + rng.normal(scale=1.0, size=(B, T))
    sampler[0, 0] -= 30.0
    sampler[1, 1] += 30.0
    mask = np.ones((B, T), np.float32)
    mask[0, 5:] = 0.0
    return dict(
        student_hidden=jnp.asarray(student_hidden),
        teacher_hidden=jnp.asarray(teacher_hidden),
        kernel=jnp.asarray(kernel),
        teacher_kernel=jnp.asarray(teacher_kernel),
        student_logits=jnp.asarray(student_logits),
        teacher_logits=jnp.asarray(teacher_logits),
        completion_ids=jnp.asarray(completion_ids),
        sampler_logprobs=jnp.asarray(sampler.astype(np.float32)),
        mask=jnp.asarray(mask),
    )


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **tol)


def assert_tree_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert_close(a, e, tol)


# --------------------------------------------------------------------------------------------------
# Full-vocabulary GJSD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_generalized_jsd_matches_numpy(data, beta, temperature):
    s, t = data["student_logits"], data["teacher_logits"]
    actual = divergences.generalized_jsd(s, t, beta=beta, temperature=temperature)
    expected = np_gjsd(np_log_softmax(s, temperature), np_log_softmax(t, temperature), beta)
    assert actual.shape == (B, T) and actual.dtype == jnp.float32
    assert_close(actual, expected, REF_TOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl(data, beta, temperature):
    s, t = data["student_logits"], data["teacher_logits"]
    student, teacher = torch.tensor(np.asarray(s)), torch.tensor(np.asarray(t))
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature, reduction="none")
    actual = divergences.generalized_jsd(s, t, beta=beta, temperature=temperature)
    assert_close(actual, trl.sum(-1).numpy(), dict(rtol=0, atol=2e-6))


def test_beta_endpoints_are_forward_and_reverse_kl(data):
    s, t = data["student_logits"], data["teacher_logits"]
    s_lp, t_lp = np_log_softmax(s), np_log_softmax(t)
    assert_close(divergences.generalized_jsd(s, t, beta=0.0), np_kl(t_lp, s_lp), REF_TOL)  # KL(teacher || student)
    assert_close(divergences.generalized_jsd(s, t, beta=1.0), np_kl(s_lp, t_lp), REF_TOL)  # KL(student || teacher)
    assert not np.allclose(np_kl(t_lp, s_lp), np_kl(s_lp, t_lp), rtol=1e-2)  # the two really differ here


def test_bfloat16_logits_are_upcast(data):
    s, t = data["student_logits"].astype(jnp.bfloat16), data["teacher_logits"].astype(jnp.bfloat16)
    actual = divergences.generalized_jsd(s, t, beta=0.5)
    assert actual.dtype == jnp.float32
    expected = np_gjsd(np_log_softmax(np.asarray(s, np.float32)), np_log_softmax(np.asarray(t, np.float32)), 0.5)
    assert_close(actual, expected, REF_TOL)


@pytest.mark.parametrize("beta", [1.5, -0.1])
def test_generalized_jsd_rejects_bad_beta(data, beta):
    with pytest.raises(ValueError, match="beta"):
        divergences.generalized_jsd(data["student_logits"], data["teacher_logits"], beta=beta)


def test_mismatched_shapes_are_rejected(data):
    with pytest.raises(ValueError, match="teacher_logits"):
        divergences.generalized_jsd(data["student_logits"], data["teacher_logits"][:, :3], beta=0.5)


# --------------------------------------------------------------------------------------------------
# Top-K divergences
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, support, tail_bucket, beta, temperature",
    [
        (5, "student", True, 0.5, 1.0),
        (5, "student", False, 0.0, 2.0),
        (1, "student", True, 1.0, 1.0),
        (20, "teacher", True, 0.5, 2.0),
        (8, "teacher", False, 1.0, 1.0),
    ],
)
def test_top_k_divergence_matches_numpy(data, k, support, tail_bucket, beta, temperature):
    s, t = data["student_logits"], data["teacher_logits"]
    actual = divergences.top_k_divergence(
        s, t, k=k, support=support, tail_bucket=tail_bucket, beta=beta, temperature=temperature
    )
    assert_close(actual, np_top_k_gjsd(s, t, k, support, tail_bucket, beta, temperature), REF_TOL)


@pytest.mark.parametrize("tail_bucket", [True, False])
def test_top_k_from_stored_teacher_top_k_equals_teacher_support(data, tail_bucket):
    s, t = data["student_logits"], data["teacher_logits"]
    values, indices = scoring.top_k_logprobs(t, 6, temperature=2.0)
    stored = divergences.top_k_divergence_on_support(
        s, values, indices, tail_bucket=tail_bucket, beta=0.5, temperature=2.0
    )
    expected = np_top_k_gjsd(s, t, 6, "teacher", tail_bucket, 0.5, 2.0)
    assert_close(stored, expected, REF_TOL)


def test_tail_bucket_with_the_whole_vocabulary_recovers_full_gjsd(data):
    s, t = data["student_logits"], data["teacher_logits"]
    # K = V captures all the mass: the clamped tail holds ~1e-7 and the divergence is the full one.
    top = divergences.top_k_divergence(s, t, k=V, tail_bucket=True, beta=0.5)
    assert_close(top, divergences.generalized_jsd(s, t, beta=0.5), dict(rtol=1e-4, atol=1e-5))


def test_bias_corrected_top_k_reverse_kl(data):
    s, t = data["student_logits"], data["teacher_logits"]
    values, indices = scoring.top_k_logprobs(t, 6)
    actual = divergences.bias_corrected_top_k_reverse_kl(s, values, indices)
    s_lp = np.take_along_axis(np_log_softmax(s), np.asarray(indices), -1)
    t_lp = np.take_along_axis(np_log_softmax(t), np.asarray(indices), -1)
    expected = (np.exp(s_lp) * (s_lp - t_lp) - np.exp(s_lp) + np.exp(t_lp)).sum(-1)
    assert_close(actual, expected, REF_TOL)
    assert np.all(np.asarray(actual) >= 0)
    # On the whole vocabulary the correction terms cancel and it is the reverse KL.
    all_values, all_indices = scoring.top_k_logprobs(t, V)
    full = divergences.bias_corrected_top_k_reverse_kl(s, all_values, all_indices)
    assert_close(full, divergences.generalized_jsd(s, t, beta=1.0), dict(rtol=1e-5, atol=1e-5))


def test_top_k_rejects_bad_k_and_support(data):
    s, t = data["student_logits"], data["teacher_logits"]
    with pytest.raises(ValueError, match="top_k"):
        divergences.top_k_divergence(s, t, k=V + 1)
    with pytest.raises(ValueError, match="support"):
        divergences.top_k_divergence(s, t, k=3, support="mixture")


# --------------------------------------------------------------------------------------------------
# Sampled-token reverse KL, clip, positive evidence
# --------------------------------------------------------------------------------------------------


def test_sampled_token_reverse_kl_values_ratio_and_gradient(data):
    ids = data["completion_ids"]
    student = scoring.token_logprobs(data["student_logits"], ids)
    teacher = scoring.token_logprobs(data["teacher_logits"], ids)
    sampler = data["sampler_logprobs"]
    out = divergences.sampled_token_reverse_kl(student, teacher, sampler, is_clip=2.0)

    s, q, smp = np.asarray(student, np.float64), np.asarray(teacher, np.float64), np.asarray(sampler, np.float64)
    ratio = np.minimum(np.exp(np.clip(s - smp, -20, 20)), 2.0)
    assert_close(out.ratio, ratio, REF_TOL)
    assert_close(out.advantage, q - s, REF_TOL)
    assert_close(out.loss, -(q - s) * ratio * s, REF_TOL)
    assert np.any(np.asarray(out.ratio) == 2.0) and np.any(np.asarray(out.ratio) < 1.0)

    grad = jax.grad(lambda x: jnp.sum(divergences.sampled_token_reverse_kl(x, teacher, sampler, is_clip=2.0).loss))(
        student
    )
    assert_close(grad, (s - q) * ratio, REF_TOL)  # the reverse-KL REINFORCE direction, ratio detached
    grad_teacher = jax.grad(
        lambda x: jnp.sum(divergences.sampled_token_reverse_kl(student, x, sampler, is_clip=2.0).loss)
    )(teacher)
    assert np.all(np.asarray(grad_teacher) == 0)


def test_sampled_token_reverse_kl_without_correction(data):
    student = scoring.token_logprobs(data["student_logits"], data["completion_ids"])
    teacher = scoring.token_logprobs(data["teacher_logits"], data["completion_ids"])
    out = divergences.sampled_token_reverse_kl(student, teacher, None, is_clip=None)
    assert np.all(np.asarray(out.ratio) == 1.0)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        divergences.sampled_token_reverse_kl(student, teacher, None, is_clip=2.0)


def test_per_token_clip_caps_value_and_stops_gradient(data):
    s, t = data["student_logits"], data["teacher_logits"]
    raw = divergences.generalized_jsd(s, t, beta=0.5)
    clip = float(np.median(np.asarray(raw)))
    clipped = reductions.clip_per_token(raw, clip)
    assert_close(clipped, np.minimum(np.asarray(raw), clip), REF_TOL)
    assert reductions.clip_per_token(raw, None) is raw

    def clipped_sum(logits):
        return jnp.sum(reductions.clip_per_token(divergences.generalized_jsd(logits, t, beta=0.5), clip))

    per_token_grad_norm = np.abs(np.asarray(jax.jit(jax.grad(clipped_sum))(s))).sum(-1)
    over = np.asarray(raw) > clip
    assert over.any() and (~over).any()
    assert np.all(per_token_grad_norm[over] == 0) and np.all(per_token_grad_norm[~over] > 0)


def test_positive_evidence_mask_in_dispatch(data):
    ids = data["completion_ids"]
    config = losses.LossConfig(positive_evidence=True, is_clip=None)
    s, t = data["student_logits"], data["teacher_logits"]
    out = losses.per_token_divergence(config, s, completion_ids=ids, teacher_logits=t)
    keep = np_token_logprobs(t, np.asarray(ids)) > np_token_logprobs(s, np.asarray(ids))
    assert keep.any() and (~keep).any()
    np.testing.assert_array_equal(np.asarray(out.evidence), keep)
    expected = np.where(keep, np.asarray(divergences.generalized_jsd(s, t, beta=0.5)), 0.0)
    assert_close(out.loss, expected, REF_TOL)


# --------------------------------------------------------------------------------------------------
# Gradients stop at the teacher; identical student and teacher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        losses.LossConfig(divergence="gjsd", beta=0.0, is_clip=None),
        losses.LossConfig(divergence="gjsd", beta=0.5, temperature=2.0, is_clip=None),
        losses.LossConfig(divergence="gjsd", beta=1.0, is_clip=None),
        losses.LossConfig(divergence="topk", top_k=5, tail_bucket=True, is_clip=None),
        losses.LossConfig(divergence="topk", top_k=5, top_k_support="teacher", tail_bucket=False, is_clip=None),
        losses.LossConfig(divergence="topk_rkl", top_k=5, top_k_support="teacher", is_clip=None),
        losses.LossConfig(divergence="sampled_rkl", is_clip=None),
    ],
    ids=lambda c: f"{c.divergence}-b{c.beta}-{c.top_k_support}-tail{c.tail_bucket}",
)
def test_teacher_gets_no_gradient_and_self_distance_is_zero(data, config):
    s, t, ids = data["student_logits"], data["teacher_logits"], data["completion_ids"]

    def total(student_logits, teacher_logits):
        out = losses.per_token_divergence(config, student_logits, completion_ids=ids, teacher_logits=teacher_logits)
        return jnp.sum(out.loss)

    value_and_grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    _, (_, teacher_grad) = value_and_grad(s, t)
    assert np.all(np.asarray(teacher_grad) == 0)

    value, (student_grad, _) = value_and_grad(s, s)
    assert abs(float(value)) < 1e-5
    assert float(jnp.max(jnp.abs(student_grad))) < 1e-6


# --------------------------------------------------------------------------------------------------
# Reductions and ablation terms
# --------------------------------------------------------------------------------------------------


def test_global_token_mean_is_split_invariant():
    rng = np.random.default_rng(1)
    per_token = jnp.asarray(rng.normal(size=(4, 9)).astype(np.float32) + np.array([[0.0], [3.0], [0.0], [0.0]]))
    lengths = np.array([[9], [1], [5], [9]])
    mask = jnp.asarray((np.arange(9)[None] < lengths).astype(np.float32))
    full = reductions.global_token_mean(per_token, mask)
    expected = float((np.asarray(per_token) * np.asarray(mask)).sum() / np.asarray(mask).sum())
    assert_close(full, expected, REF_TOL)
    total = jnp.sum(mask)  # computed once over the whole optimizer step
    halves = [reductions.global_token_mean(per_token[i : i + 2], mask[i : i + 2], total) for i in (0, 2)]
    assert_close(halves[0] + halves[1], full, REF_TOL)
    # Averaging per-micro-batch means (the bug the global count avoids) gives a different number here.
    local = [reductions.global_token_mean(per_token[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    assert abs(float((local[0] + local[1]) / 2 - full)) > 1e-3
    assert float(reductions.global_token_mean(per_token, jnp.zeros_like(mask))) == 0.0


def test_sequence_mean_and_reduction_weights():
    rng = np.random.default_rng(2)
    per_token = jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32))
    mask = jnp.asarray(np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6], np.float32))
    p, m = np.asarray(per_token, np.float64), np.asarray(mask, np.float64)
    expected = ((p * m).sum(-1) / np.maximum(m.sum(-1), 1)).mean()
    assert_close(reductions.sequence_mean(per_token, mask), expected, REF_TOL)
    halves = [reductions.sequence_mean(per_token[i : i + 2], mask[i : i + 2], 4) for i in (0, 2)]
    assert_close(halves[0] + halves[1], expected, REF_TOL)
    for reduction, reduce in [
        ("token_mean", reductions.global_token_mean),
        ("sequence_mean", reductions.sequence_mean),
    ]:
        weights = losses.reduction_weights(losses.LossConfig(reduction=reduction), mask)
        assert_close(jnp.sum(weights * per_token), reduce(per_token, mask), REF_TOL)


def test_group_normalized_advantages():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 1.0], np.float32)
    grouped = rewards.astype(np.float64).reshape(2, 4)
    expected = (grouped - grouped.mean(-1, keepdims=True)) / (grouped.std(-1, ddof=1, keepdims=True) + 1e-6)
    assert_close(ablations.group_normalized_advantages(jnp.asarray(rewards), 4), expected.reshape(-1), REF_TOL)
    equal = ablations.group_normalized_advantages(jnp.ones(4), 2)  # zero spread: zero advantage, not NaN
    assert np.all(np.asarray(equal) == 0)
    with pytest.raises(ValueError, match="group_size"):
        ablations.group_normalized_advantages(jnp.asarray(rewards), 3)
    with pytest.raises(ValueError, match="group_size"):
        ablations.group_normalized_advantages(jnp.asarray(rewards), 1)


def test_policy_gradient_and_label_cross_entropy(data):
    logits, ids, mask = data["student_logits"], data["completion_ids"], data["mask"]
    advantages = jnp.asarray([0.5, -2.0])
    logprobs = scoring.token_logprobs(logits, ids)
    pg = ablations.policy_gradient_loss(logprobs, advantages, mask)
    assert_close(pg, -np.asarray(advantages)[:, None] * np.asarray(logprobs) * np.asarray(mask), REF_TOL)
    grad = jax.grad(lambda x: jnp.sum(ablations.policy_gradient_loss(x, advantages, mask)))(logprobs)
    assert_close(grad, -np.asarray(advantages)[:, None] * np.asarray(mask), REF_TOL)
    ce = ablations.label_cross_entropy(logits, ids, mask)
    assert_close(ce, -np_token_logprobs(logits, np.asarray(ids)) * np.asarray(mask), REF_TOL)


def test_entropy_and_top_k_mass(data):
    logits = data["student_logits"]
    lp = np_log_softmax(logits, 2.0)
    assert_close(scoring.entropy(logits, temperature=2.0), -(np.exp(lp) * lp).sum(-1), REF_TOL)
    assert_close(scoring.top_k_mass(logits, 3, temperature=2.0), np.sort(np.exp(lp), -1)[..., -3:].sum(-1), REF_TOL)


# --------------------------------------------------------------------------------------------------
# Configuration and dispatch
# --------------------------------------------------------------------------------------------------


def test_every_divergence_the_config_allows_has_a_form():
    # A name added to `DIVERGENCES` (what `LossConfig.divergence` accepts) without a form fails here.
    assert set(losses.DIVERGENCE_FORMS) == set(losses.DIVERGENCES)
    for name in losses.DIVERGENCES:
        config = losses.LossConfig(divergence=name, token_clip=None)
        assert isinstance(losses.divergence_form(config), losses.Divergence)
    # And every form is in the parity test of the chunked and fused forms against the naive one.
    assert {config.divergence for config in FUSED_CONFIGS} == set(losses.DIVERGENCES)


@pytest.mark.parametrize(
    "config, hidden, top_k",
    [
        (losses.LossConfig(divergence="gjsd"), True, 0),
        (losses.LossConfig(divergence="topk", top_k=5), True, 0),
        (losses.LossConfig(divergence="topk", top_k=5, top_k_support="teacher"), False, 5),
        (losses.LossConfig(divergence="topk_rkl", top_k=7, top_k_support="teacher"), False, 7),
        (losses.LossConfig(divergence="topk_rkl", top_k=7), True, 0),
        (losses.LossConfig(divergence="sampled_rkl"), False, 0),
    ],
    ids=lambda x: f"{x.divergence}-{x.top_k_support}" if isinstance(x, losses.LossConfig) else str(x),
)
def test_each_form_asks_the_teacher_for_what_it_reads(data, config, hidden, top_k):
    config = dataclasses.replace(config, temperature=2.0, chunk_size=3)
    request = losses.divergence_form(config).signal_request(config)
    assert (request.hidden, request.top_k, request.temperature, request.chunk_size) == (hidden, top_k, 2.0, 3)
    # The signal it asks for is enough: the hidden-state loss runs from it alone.
    ht, w, ids = data["teacher_hidden"], data["kernel"], data["completion_ids"]
    signal = scoring.signal_from_hidden(ht, w, ids, request)
    assert (signal.hidden is not None, signal.top_k_indices is not None) == (hidden, top_k > 0)
    assert (signal.token_logprobs is None) == hidden
    out = chunked_losses.chunked_per_token_divergence(
        config,
        data["student_hidden"],
        w,
        signal,
        completion_ids=ids,
        sampler_logprobs=data["sampler_logprobs"],
    )
    assert np.all(np.isfinite(np.asarray(out.loss)))


@pytest.mark.parametrize(
    "field, value",
    [
        ("divergence", "kl"),
        ("beta", 1.5),
        ("temperature", 0.0),
        ("top_k", 0),
        ("top_k", True),
        ("top_k_support", "both"),
        ("tail_bucket", 1),
        ("is_clip", -1.0),
        ("token_clip", 0.0),
        ("positive_evidence", "yes"),
        ("reduction", "sum"),
        ("chunk_size", 0),
    ],
)
def test_loss_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        losses.LossConfig(**{field: value})


def test_loss_config_rejects_token_clip_on_sampled_tokens():
    with pytest.raises(ValueError, match="LossConfig.token_clip"):
        losses.LossConfig(divergence="sampled_rkl", token_clip=1.0)


def test_dispatch_matches_the_direct_functions(data):
    s, t = data["student_logits"], data["teacher_logits"]
    ids, sampler = data["completion_ids"], data["sampler_logprobs"]
    kwargs = dict(completion_ids=ids, teacher_logits=t, sampler_logprobs=sampler)
    ratio = divergences.truncated_importance_ratio(scoring.token_logprobs(s, ids), sampler, is_clip=2.0)

    out = losses.per_token_divergence(losses.LossConfig(beta=0.5, token_clip=0.4), s, **kwargs)
    assert_close(out.loss, ratio * jnp.minimum(divergences.generalized_jsd(s, t, beta=0.5), 0.4), REF_TOL)
    assert_close(out.is_ratio, ratio, REF_TOL)

    out = losses.per_token_divergence(losses.LossConfig(divergence="topk", top_k=4, is_clip=None), s, **kwargs)
    assert_close(out.loss, divergences.top_k_divergence(s, t, k=4), REF_TOL)

    values, indices = scoring.top_k_logprobs(t, 4)
    config = losses.LossConfig(divergence="topk_rkl", top_k=4, top_k_support="teacher", is_clip=None)
    out = losses.per_token_divergence(config, s, teacher_top_k_logprobs=values, teacher_top_k_indices=indices)
    assert_close(out.loss, divergences.bias_corrected_top_k_reverse_kl(s, values, indices), REF_TOL)

    out = losses.per_token_divergence(losses.LossConfig(divergence="sampled_rkl"), s, **kwargs)
    direct = divergences.sampled_token_reverse_kl(
        scoring.token_logprobs(s, ids), scoring.token_logprobs(t, ids), sampler
    )
    assert_close(out.loss, direct.loss, REF_TOL)
    assert_close(out.divergence, -direct.advantage, REF_TOL)


def test_dispatch_names_missing_inputs(data):
    s, t = data["student_logits"], data["teacher_logits"]
    with pytest.raises(ValueError, match="completion_ids"):
        losses.per_token_divergence(losses.LossConfig(), s, teacher_logits=t)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        losses.per_token_divergence(losses.LossConfig(), s, teacher_logits=t, completion_ids=data["completion_ids"])
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.per_token_divergence(losses.LossConfig(is_clip=None), s)
    values, indices = scoring.top_k_logprobs(t, 4)
    config = losses.LossConfig(divergence="topk", top_k=4, is_clip=None)
    with pytest.raises(ValueError, match="top_k_support='teacher'"):
        losses.per_token_divergence(config, s, teacher_top_k_logprobs=values, teacher_top_k_indices=indices)


# --------------------------------------------------------------------------------------------------
# Chunked and fused forms on hidden states
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [3, 7, 16])  # T = 7: a padded last chunk, one exact chunk, chunk > T
def test_chunked_generalized_jsd_values_and_gradients(data, chunk_size):
    hs, ht, w, wt, mask = (data[k] for k in ("student_hidden", "teacher_hidden", "kernel", "teacher_kernel", "mask"))

    def naive(student_hidden, kernel, teacher_hidden, teacher_kernel):
        student_logits, teacher_logits = student_hidden @ kernel, teacher_hidden @ teacher_kernel
        per_token = divergences.generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=2.0)
        return jnp.sum(mask * per_token), per_token

    def chunked(student_hidden, kernel, teacher_hidden, teacher_kernel):
        per_token = chunked_losses.chunked_generalized_jsd(
            student_hidden,
            teacher_hidden,
            kernel,
            beta=0.5,
            temperature=2.0,
            chunk_size=chunk_size,
            teacher_head_kernel=teacher_kernel,
        )
        return jnp.sum(mask * per_token), per_token

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)  # noqa: E731
    (_, expected), expected_grads = grad(naive)(hs, w, ht, wt)
    (_, actual), actual_grads = jax.jit(grad(chunked))(hs, w, ht, wt)
    assert_close(actual, expected, PARITY_TOL)
    assert_tree_close(actual_grads[:2], expected_grads[:2], PARITY_TOL)
    assert all(np.all(np.asarray(g) == 0) for g in actual_grads[2:])  # teacher hidden and teacher head kernel


FUSED_CONFIGS = [
    losses.LossConfig(divergence="gjsd", beta=0.5, is_clip=None, chunk_size=3),
    losses.LossConfig(
        divergence="gjsd", beta=0.0, temperature=2.0, token_clip=0.5, positive_evidence=True, chunk_size=4
    ),
    losses.LossConfig(divergence="topk", beta=1.0, top_k=5, chunk_size=3, reduction="sequence_mean"),
    losses.LossConfig(divergence="topk", top_k=5, top_k_support="teacher", tail_bucket=False, chunk_size=2),
    losses.LossConfig(divergence="topk_rkl", top_k=5, top_k_support="teacher", chunk_size=3),
    losses.LossConfig(divergence="sampled_rkl", chunk_size=3),
]


@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=lambda c: f"{c.divergence}-{c.top_k_support}-{c.reduction}")
def test_fused_and_chunked_losses_match_naive(data, config):
    hs, ht, w, ids, sampler, mask = (
        data[k] for k in ("student_hidden", "teacher_hidden", "kernel", "completion_ids", "sampler_logprobs", "mask")
    )
    weights = losses.reduction_weights(config, mask)
    if config.top_k_support == "teacher" and config.divergence != "gjsd":  # the teacher's stored top-K
        stored = scoring.chunked_scores(ht, w, ids, top_k=config.top_k, temperature=config.temperature)
        teacher = dict(
            teacher_top_k_logprobs=stored.top_k_logprobs,
            teacher_top_k_indices=stored.top_k_indices,
            teacher_token_logprobs=stored.token_logprobs,
        )
    else:
        teacher = dict(teacher_hidden=ht)
    side = dict(completion_ids=ids, sampler_logprobs=sampler)

    def naive(student_hidden, kernel, teacher_hidden):
        teacher_logits = teacher_hidden @ kernel
        if "teacher_hidden" in teacher:
            out = losses.per_token_divergence(config, student_hidden @ kernel, teacher_logits=teacher_logits, **side)
        else:
            out = losses.per_token_divergence(config, student_hidden @ kernel, **{**teacher, **side})
        return jnp.sum(weights * out.loss), out

    def signal(teacher_hidden):
        if "teacher_hidden" in teacher:
            return scoring.TeacherSignal(hidden=teacher_hidden)
        return scoring.TeacherSignal(**{name.removeprefix("teacher_"): x for name, x in teacher.items()})

    def fused(student_hidden, kernel, teacher_hidden):
        loss, per_token, _ = chunked_losses.fused_distillation_loss(
            config, student_hidden, kernel, weights, signal(teacher_hidden), **side
        )
        return loss, per_token

    def chunked(student_hidden, kernel, teacher_hidden):
        out = chunked_losses.chunked_per_token_divergence(
            config, student_hidden, kernel, signal(teacher_hidden), **side
        )
        return jnp.sum(weights * out.loss), out

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)  # noqa: E731
    (expected, expected_out), expected_grads = jax.jit(grad(naive))(hs, w, ht)
    for form in (fused, chunked):
        (value, out), grads = jax.jit(grad(form))(hs, w, ht)
        assert_close(value, expected, PARITY_TOL)
        assert_tree_close(out, expected_out, PARITY_TOL)
        assert_tree_close(grads[:2], expected_grads[:2], PARITY_TOL)
        if "teacher_hidden" in teacher:
            assert np.all(np.asarray(grads[2]) == 0)
    assert float(jnp.max(jnp.abs(expected_grads[0]))) > 1e-4  # the comparison is not between zeros


def test_fused_loss_accumulates_over_micro_batches(data):
    hs, ht, w, ids, mask = (data[k] for k in ("student_hidden", "teacher_hidden", "kernel", "completion_ids", "mask"))
    config = losses.LossConfig(is_clip=None, positive_evidence=True, chunk_size=4)

    @jax.jit
    @jax.value_and_grad
    def step_loss(kernel, student_hidden, teacher_hidden, completion_ids, step_mask, num_tokens_global):
        weights = losses.reduction_weights(config, step_mask, num_tokens_global=num_tokens_global)
        teacher = scoring.TeacherSignal(hidden=teacher_hidden)
        return chunked_losses.fused_distillation_loss(
            config, student_hidden, kernel, weights, teacher, completion_ids=completion_ids
        )[0]

    total_tokens = jnp.sum(mask)  # counted once over the whole optimizer step
    full, full_grad = step_loss(w, hs, ht, ids, mask, total_tokens)
    halves = (slice(0, 1), slice(1, 2))
    parts = [step_loss(w, hs[rows], ht[rows], ids[rows], mask[rows], total_tokens) for rows in halves]
    assert_close(parts[0][0] + parts[1][0], full, PARITY_TOL)
    assert_close(parts[0][1] + parts[1][1], full_grad, PARITY_TOL)


def test_bfloat16_hidden_states(data):
    hs, ht, w = (data[k].astype(jnp.bfloat16) for k in ("student_hidden", "teacher_hidden", "kernel"))
    weights = losses.reduction_weights(losses.LossConfig(), data["mask"])
    config = losses.LossConfig(is_clip=None, chunk_size=3)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def naive(student_hidden, kernel):
        per_token = divergences.generalized_jsd(f32(student_hidden) @ f32(kernel), f32(ht) @ f32(kernel), beta=0.5)
        return jnp.sum(weights * per_token)

    expected, expected_grads = jax.value_and_grad(naive, argnums=(0, 1))(hs, w)
    value, grads = jax.value_and_grad(
        lambda h, k: chunked_losses.fused_distillation_loss(config, h, k, weights, scoring.TeacherSignal(hidden=ht))[0],
        argnums=(0, 1),
    )(hs, w)
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    assert_close(value, expected, dict(rtol=1e-5, atol=1e-6))  # logits: exact bf16 products, float32 sums
    for g, e in zip(grads, expected_grads):  # the head's backward runs in bfloat16 (like autodiff of a bf16 matmul)
        assert_close(g, e, dict(rtol=0, atol=2e-2 * float(jnp.max(jnp.abs(e)))))


@pytest.mark.parametrize("teacher_form", ["hidden", "token_logprobs"])
def test_fused_loss_scores_the_sampled_tokens(data, teacher_form):
    """The metrics the fused loss reads off its own chunks equal a float64 numpy scoring of the full logits."""
    hs, ht, w, ids, sampler = (
        data[k] for k in ("student_hidden", "teacher_hidden", "kernel", "completion_ids", "sampler_logprobs")
    )
    config = losses.LossConfig(divergence="sampled_rkl", temperature=2.0, chunk_size=3)
    weights = losses.reduction_weights(config, data["mask"])
    teacher_logits = np.asarray(ht @ w, np.float64)
    if teacher_form == "hidden":
        teacher = scoring.TeacherSignal(hidden=ht)
    else:
        teacher = scoring.TeacherSignal(token_logprobs=jnp.asarray(np_token_logprobs(teacher_logits, ids, 2.0)))
    _, _, scores = jax.jit(
        lambda h, k: chunked_losses.fused_distillation_loss(
            config, h, k, weights, teacher, completion_ids=ids, sampler_logprobs=sampler, top_k_mass=3
        )
    )(hs, w)
    tempered = np.asarray(hs @ w, np.float64) / 2.0
    logp = tempered - np.logaddexp.reduce(tempered, axis=-1, keepdims=True)
    assert_close(scores.student_token, np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0], REF_TOL)
    assert_close(scores.teacher_token, np_token_logprobs(teacher_logits, np.asarray(ids), 2.0), REF_TOL)
    assert_close(scores.entropy, -(np.exp(logp) * logp).sum(-1), REF_TOL)
    assert_close(scores.top_k_mass, np.sort(np.exp(logp), -1)[..., -3:].sum(-1), REF_TOL)
    no_mass = chunked_losses.fused_distillation_loss(
        config, hs, w, weights, teacher, completion_ids=ids, sampler_logprobs=sampler
    )[2]
    assert no_mass.top_k_mass is None


def test_chunked_teacher_scores_match_logits(data):
    ht, w, ids = data["teacher_hidden"], data["kernel"], data["completion_ids"]
    scores = scoring.chunked_scores(ht, w, ids, top_k=4, temperature=2.0, chunk_size=3)
    logits = ht @ w
    values, indices = scoring.top_k_logprobs(logits, 4, temperature=2.0)
    np.testing.assert_array_equal(np.asarray(scores.top_k_indices), np.asarray(indices))
    assert_close(scores.top_k_logprobs, values, PARITY_TOL)
    assert_close(scores.token_logprobs, np_token_logprobs(logits, np.asarray(ids), 2.0), REF_TOL)
    tempered = np.asarray(logits, np.float64) / 2.0
    logp = tempered - np.logaddexp.reduce(tempered, axis=-1, keepdims=True)
    assert_close(scores.entropy, -(np.exp(logp) * logp).sum(-1), REF_TOL)


def test_hidden_state_forms_reject_bad_shapes(data):
    with pytest.raises(ValueError, match="head_kernel"):
        chunked_losses.chunked_generalized_jsd(
            data["student_hidden"], data["teacher_hidden"], data["kernel"].T, beta=0.5
        )
    with pytest.raises(ValueError, match="teacher.hidden"):
        chunked_losses.chunked_generalized_jsd(
            data["student_hidden"], data["teacher_hidden"][:1], data["kernel"], beta=0.5
        )


def test_importance_ratio_against_the_tempered_filtered_sampler_is_unbiased():
    """Tokens drawn at temperature 0.7 with top-k 6; the student scored at the loss temperature 0.7. Weighted by
    the ratio against the sampler's `logprobs` (the distribution drawn from), a sample mean of f(y) estimates
    sum over the support of pi_0.7(y) f(y) (float64); against the plain model's logprobs (T = 1, unfiltered,
    what the trainer handed the step before) it is far off."""
    from opsd_jax.sampling.filters import sample_tokens

    temperature, top_k, draws = 0.7, 6, 40_000
    logits = np.random.default_rng(5).normal(0.0, 1.5, V)
    f = np.linspace(-1.0, 2.0, V)
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, V))
    tokens, sampled, plain = sample_tokens(jax.random.key(0), batch, temperature=temperature, top_k=top_k)
    student = scoring.token_logprobs(batch[:, None], tokens[:, None], temperature=temperature)[:, 0]

    target = np.exp(np_log_softmax(logits, temperature))
    support = logits >= np.sort(logits)[-top_k]
    reference = float(np.sum(target[support] * f[support]))

    def estimate(behaviour):
        ratio = np.asarray(divergences.truncated_importance_ratio(student, behaviour, is_clip=1e6), np.float64)
        values = ratio * f[np.asarray(tokens)]
        return values.mean(), values.std() / np.sqrt(draws)

    mean, error = estimate(sampled)
    assert abs(mean - reference) < 4 * error, (mean, reference, error)
    biased, biased_error = estimate(plain)
    assert abs(biased - reference) > 20 * biased_error, (biased, reference, biased_error)


@pytest.mark.parametrize("vocab,k", [(1024, 5), (1000, 100), (96, 7), (37, 3)])
def test_blockwise_top_k_equals_one_stage_top_k_with_ties(vocab, k):
    """The loss's top-K works in vocabulary blocks (so a vocabulary split over chips stays split); it must
    give `jax.lax.top_k`'s values and indices exactly, equal values lowest index first."""
    rng = np.random.default_rng(vocab)
    x = jnp.asarray(rng.integers(0, 12, size=(3, 4, vocab)).astype(np.float32))  # many ties
    expected = jax.lax.top_k(x, k)
    got = scoring.vocab_top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))
