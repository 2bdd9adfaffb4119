"""The published thinker architectures, for planning without the weights (`opsd-jax compile-check`).

`thinker_config` reads a checkpoint directory's own config.json when it is on this machine; a shipped
run config names its checkpoint by the Hugging Face repository's directory name (`Qwen2.5-Omni-7B`), so
when the directory is elsewhere (a TPU worker's disk) the architecture is the published one of that
name. Figures: the reference config classes and §4 / §8 of shared/reference/qwen2_5_omni.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from opsd_jax.models.qwen2_5_omni import ThinkerConfig, read_config
from opsd_jax.models.weights import CheckpointError

_TOKEN_IDS = dict(
    audio_token_index=151646,
    image_token_index=151655,
    video_token_index=151656,
    audio_start_token_id=151647,
    audio_end_token_id=151648,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    position_id_per_seconds=25,
    seconds_per_chunk=2,
)


def _thinker(
    *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool
) -> dict[str, Any]:
    return dict(
        audio_config=dict(
            num_mel_bins=128,
            encoder_layers=32,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            d_model=1280,
            max_source_positions=1500,
            n_window=100,
            output_dim=hidden,
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden,
            fullatt_block_indexes=[7, 15, 23, 31],
            hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        tie_word_embeddings=tie,
        **_TOKEN_IDS,
    )


PUBLISHED: dict[str, dict[str, Any]] = {
    "Qwen2.5-Omni-7B": _thinker(
        hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tie=False
    ),
    # The 3B's tie flag is unconfirmed (reference §8.1): planned untied, the larger case.
    "Qwen2.5-Omni-3B": _thinker(
        hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936, tie=False
    ),
}


def thinker_config(checkpoint: str | Path) -> tuple[ThinkerConfig, str]:
    """The thinker architecture of `checkpoint`, and where it came from.

    The directory's config.json when it exists here; otherwise the published architecture whose name
    is the directory's (case-insensitive), so that a run config can be planned on a machine without the
    weights. Anything else is a `CheckpointError` naming both ways out.
    """
    path = Path(str(checkpoint))
    if (path / "config.json").is_file():
        return read_config(path), str(path / "config.json")
    by_name = {name.lower(): name for name in PUBLISHED}
    name = by_name.get(path.name.lower())
    if name is None:
        raise CheckpointError(
            f"model.checkpoint {checkpoint}: no config.json here and not a published architecture "
            f"({', '.join(PUBLISHED)}); point model.checkpoint at a checkpoint directory on this machine"
        )
    return ThinkerConfig.from_hf(copy.deepcopy(PUBLISHED[name]), source=name), f"published {name}"
