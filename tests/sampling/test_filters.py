"""Sampling filters against transformers' logits warpers, and the draw's log-probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from opsd_jax.sampling.filters import sample_tokens, sampling_logits, top_k_filter, top_p_filter

LOGITS = np.random.default_rng(0).normal(size=(4, 97)).astype(np.float32) * 3


def kept(x) -> np.ndarray:
    return np.isfinite(np.asarray(x))


@pytest.mark.parametrize("k", [1, 5, 50, 97])
def test_top_k_matches_transformers(k):
    expected = TopKLogitsWarper(top_k=k)(None, torch.tensor(LOGITS)).numpy()
    np.testing.assert_array_equal(kept(top_k_filter(jnp.asarray(LOGITS), k)), kept(expected))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    expected = TopPLogitsWarper(top_p=p)(None, torch.tensor(LOGITS)).numpy()
    got = top_p_filter(jnp.asarray(LOGITS), p)
    np.testing.assert_array_equal(kept(got), kept(expected))
    np.testing.assert_array_equal(np.asarray(got)[kept(got)], LOGITS[kept(got)])


def test_chain_order_is_temperature_top_k_top_p():
    scores = torch.tensor(LOGITS)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    got = sampling_logits(jnp.asarray(LOGITS), temperature=0.7, top_k=20, top_p=0.8)
    np.testing.assert_array_equal(kept(got), kept(scores.numpy()))
    np.testing.assert_allclose(np.asarray(got)[kept(got)], scores.numpy()[kept(got)], rtol=1e-6)


def test_logprobs_of_the_draw():
    logits = jnp.asarray(LOGITS)
    tokens, sampled, model = sample_tokens(jax.random.key(0), logits, temperature=0.5, top_k=10)
    filtered = np.asarray(sampling_logits(logits, temperature=0.5, top_k=10, top_p=None), np.float64)
    log_q = filtered - np.logaddexp.reduce(filtered, axis=-1, keepdims=True)
    log_p = LOGITS - np.logaddexp.reduce(LOGITS.astype(np.float64), axis=-1, keepdims=True)
    rows = np.arange(4)
    np.testing.assert_allclose(np.asarray(sampled), log_q[rows, np.asarray(tokens)], atol=1e-5)
    np.testing.assert_allclose(np.asarray(model), log_p[rows, np.asarray(tokens)], atol=1e-5)


def test_greedy_is_argmax_with_zero_sampling_logprob():
    tokens, sampled, _ = sample_tokens(jax.random.key(0), jnp.asarray(LOGITS), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tokens), LOGITS.argmax(-1))
    np.testing.assert_array_equal(np.asarray(sampled), 0.0)
