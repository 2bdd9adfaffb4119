"""Placeholder merge against the reference's `masked_scatter` and a plain loop (exact: it only moves values)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from opsd_jax.models.merge import check_placeholder_count, merge_modal_embeddings

AUDIO, IMAGE, VIDEO = 200, 201, 202
BUCKET, HIDDEN = 16, 8

merge = jax.jit(merge_modal_embeddings)  # one compile for every case below: same shapes, traced ids and counts


def loop_merge(embeds, input_ids, token_id, features):
    out, k = embeds.copy(), 0
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            if input_ids[b, t] == token_id:
                out[b, t] = features[k]
                k += 1
    return out


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    input_ids = np.array(
        [
            [5, IMAGE, IMAGE, 6, AUDIO, AUDIO, AUDIO, 7, VIDEO, VIDEO, 8, 9],
            [0, 0, AUDIO, IMAGE, IMAGE, IMAGE, 10, VIDEO, AUDIO, VIDEO, VIDEO, 11],
        ],
        np.int32,
    )
    embeds = rng.standard_normal(input_ids.shape + (HIDDEN,)).astype(np.float32)
    return input_ids, embeds, rng


def padded_features(rng, num_valid):
    features = rng.standard_normal((BUCKET, HIDDEN)).astype(np.float32)
    features[num_valid:] = np.nan  # padding must never be read
    return features


def test_merge_matches_masked_scatter_and_loop_in_row_major_order(batch):
    input_ids, embeds, rng = batch
    merged, expected = embeds, torch.from_numpy(embeds)
    for token_id in (AUDIO, IMAGE, VIDEO):  # the reference's order; modalities touch disjoint slots
        num_valid = int(np.sum(input_ids == token_id))
        check_placeholder_count(input_ids, token_id, num_valid, "modality")
        features = padded_features(rng, num_valid)
        loop = loop_merge(np.asarray(merged), input_ids, token_id, features)
        merged = merge(jnp.asarray(merged), jnp.asarray(input_ids), token_id, jnp.asarray(features), num_valid)
        np.testing.assert_array_equal(np.asarray(merged), loop)
        mask = torch.from_numpy(input_ids == token_id)[..., None].expand_as(expected)
        expected = expected.masked_scatter(mask, torch.from_numpy(features[:num_valid]))
    np.testing.assert_array_equal(np.asarray(merged), expected.numpy())
    assert not np.isnan(np.asarray(merged)).any()
    keep = ~np.isin(input_ids, (AUDIO, IMAGE, VIDEO))
    np.testing.assert_array_equal(np.asarray(merged)[keep], embeds[keep])


def test_features_beyond_num_valid_are_not_read(batch):
    input_ids, embeds, rng = batch
    features = padded_features(rng, 3)
    merged = np.asarray(merge(jnp.asarray(embeds), jnp.asarray(input_ids), AUDIO, jnp.asarray(features), 3))
    slots = np.argwhere(input_ids == AUDIO)  # row-major: the first three audio slots are in row 0
    np.testing.assert_array_equal(merged[tuple(slots[:3].T)], features[:3])
    np.testing.assert_array_equal(merged[tuple(slots[3:].T)], embeds[tuple(slots[3:].T)])


def test_count_mismatch_names_modality_and_both_counts(batch):
    input_ids, _, _ = batch
    check_placeholder_count(input_ids, IMAGE, 5, "image")
    with pytest.raises(ValueError, match=r"video: input_ids hold 5 placeholder tokens \(id 202\) .* gave 4 features"):
        check_placeholder_count(input_ids, VIDEO, 4, "video")
