"""Tiny random Qwen2.5-Omni thinkers built with transformers (the PyTorch reference), saved to disk.

The Flax port loads what these functions save through `from_pretrained`, the same code path a real
checkpoint takes, so parity tests exercise the loader too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

# Special token ids of the tiny configs (the real ones are ~151k; a 256-token vocabulary keeps models tiny).
TINY_TOKEN_IDS = dict(
    audio_token_index=200,
    image_token_index=201,
    video_token_index=202,
    audio_start_token_id=203,
    audio_end_token_id=204,
    vision_start_token_id=205,
    vision_end_token_id=206,
)


def tiny_thinker_config_dict(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    tie_word_embeddings: bool = False,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    n_window: int = 100,
) -> dict[str, Any]:
    """Keyword arguments of `Qwen2_5OmniThinkerConfig` for a tiny thinker with every path of the real one."""
    return dict(
        audio_config=dict(
            d_model=32,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            encoder_layers=2,
            num_mel_bins=128,
            max_source_positions=1500,
            n_window=n_window,
            output_dim=hidden_size,
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[1, 3],
            hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section)},
        ),
        position_id_per_seconds=25,
        seconds_per_chunk=2,
        tie_word_embeddings=tie_word_embeddings,
        **TINY_TOKEN_IDS,
    )


def build_reference_thinker(config_dict: dict[str, Any], *, seed: int = 0):
    """A `Qwen2_5OmniThinkerForConditionalGeneration` in float32 eval mode with random weights.

    The reference's init (std 0.02, norms at 1, biases at 0) makes attention almost uniform, so a
    parity test would not notice wrong rotary positions or a missing window mask. Linear and
    convolution weights are redrawn with std 1/sqrt(fan_in) and norms and biases perturbed, so that
    every parameter and every position matters.
    """
    import torch  # optional: the test extra's reference implementation
    from transformers import (  # slow to import; only the reference needs it
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    torch.manual_seed(seed)
    config = Qwen2_5OmniThinkerConfig(**copy.deepcopy(config_dict))
    config._attn_implementation = "eager"
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv3d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * fan_in**-0.5)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def torch_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The model call's numpy arguments as torch tensors for the reference (ids and masks int64, as the
    transformers processor returns them); other values (`use_audio_in_video`) as they are."""
    import torch  # optional: the test extra's reference implementation

    tensors = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    for name in ("input_ids", "attention_mask", "feature_attention_mask"):
        if name in tensors:
            tensors[name] = tensors[name].long()
    return tensors


def save_reference_thinker(model, directory: str | Path) -> Path:
    """`save_pretrained` into `directory` (file names as real checkpoints write them)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def rewrite_checkpoint(
    source: str | Path,
    dest: str | Path,
    *,
    rename=None,
    extra: dict[str, np.ndarray] | None = None,
    shards: int = 1,
    drop: tuple[str, ...] = (),
) -> Path:
    """Copies a saved checkpoint with renamed / dropped / extra tensors, optionally split into shards
    with a `model.safetensors.index.json`, to test the loader on every layout real checkpoints use."""
    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    tensors = {(rename(name) if rename else name): value for name, value in tensors.items() if name not in drop}
    tensors.update(extra or {})
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dest / "model.safetensors"))
    else:
        weight_map = {}
        for index in range(shards):
            file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[index::shards]}
            save_file(part, str(dest / file))
            weight_map.update({name: file for name in part})
        (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dest / "config.json").write_text((source / "config.json").read_text())
    return dest
