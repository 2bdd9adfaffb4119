"""The perception probe: the random encoders' outputs carry the face's valence in the video tokens and the
voice's arousal in the audio tokens, and neither cue in the other modality (the README's finding)."""

from __future__ import annotations

import numpy as np
import pytest

from opsd_jax.demo.perception import probe_encoders, ridge_probe_accuracy


def test_ridge_probe_separates_a_separable_cue_and_not_noise():
    rng = np.random.default_rng(0)
    targets = rng.random(120) < 0.5
    informative = rng.standard_normal((120, 300)) + 1.0 * targets[:, None] * (np.arange(300) < 30)
    assert ridge_probe_accuracy(informative, targets, fit=90) >= 0.9
    assert ridge_probe_accuracy(rng.standard_normal((120, 300)), targets, fit=90) < 0.75


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_random_encoders_carry_valence_in_video_and_arousal_in_audio():
    from flax import nnx

    from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig
    from opsd_jax.testing.reference import tiny_thinker_config_dict

    model = Qwen2_5OmniThinker(ThinkerConfig.from_hf(tiny_thinker_config_dict()), rngs=nnx.Rngs(0))
    scores = probe_encoders(model, clips=96, seed=0)
    assert scores["video/valence"] >= 0.9 and scores["audio/arousal"] >= 0.9
    assert scores["video/arousal"] <= 0.75 and scores["audio/valence"] <= 0.75
