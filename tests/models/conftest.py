"""Tiny reference thinkers shared by the model tests (built once per test session)."""

from __future__ import annotations

import pytest

from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, tiny_thinker_config_dict


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    """(reference model, checkpoint dir): untied head, 4 query heads over 2 KV heads."""
    model = build_reference_thinker(tiny_thinker_config_dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False))
    return model, save_reference_thinker(model, tmp_path_factory.mktemp("tiny_untied"))


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    """(reference model, checkpoint dir): tied embeddings, 8 query heads over 1 KV head, 3 layers."""
    config = tiny_thinker_config_dict(
        hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=1, tie_word_embeddings=True, mrope_section=(1, 1, 2)
    )
    model = build_reference_thinker(config, seed=1)
    return model, save_reference_thinker(model, tmp_path_factory.mktemp("tiny_tied"))
