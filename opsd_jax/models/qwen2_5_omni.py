"""The Qwen2.5-Omni thinker in Flax NNX and `from_pretrained` for Hugging Face checkpoints.

`Qwen2_5OmniThinker` holds `model` (the text decoder) and `lm_head` (absent when the embeddings are
tied); its call takes the transformers processor's arrays under their own names and returns logits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from opsd_jax.models import weights
from opsd_jax.models.layers import Linear
from opsd_jax.models.text import TextConfig, TextModel, causal_padding_mask

logger = logging.getLogger(__name__)

# Checkpoint prefixes of thinker parts this port does not run yet: their tensors are reported, not loaded.
UNPORTED_PREFIXES: tuple[str, ...] = ("audio_tower.", "visual.")


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    """The thinker's architecture, read from a transformers config.json."""

    text: TextConfig
    audio: Mapping[str, Any] = dataclasses.field(hash=False, compare=False)
    vision: Mapping[str, Any] = dataclasses.field(hash=False, compare=False)
    tie_word_embeddings: bool
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config") -> "ThinkerConfig":
        """From a thinker config or a full Omni config (which nests it under `thinker_config`)."""
        if "thinker_config" in cfg:
            cfg = cfg["thinker_config"]
        try:
            return cls(
                text=TextConfig.from_hf(cfg["text_config"]),
                audio=dict(cfg.get("audio_config", {})),
                vision=dict(cfg.get("vision_config", {})),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                audio_token_id=cfg.get("audio_token_index", cfg.get("audio_token_id", 151646)),
                image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 151655)),
                video_token_id=cfg.get("video_token_index", cfg.get("video_token_id", 151656)),
                audio_start_token_id=cfg.get("audio_start_token_id", 151647),
                audio_end_token_id=cfg.get("audio_end_token_id", 151648),
                vision_start_token_id=cfg.get("vision_start_token_id", 151652),
                vision_end_token_id=cfg.get("vision_end_token_id", 151653),
                position_id_per_seconds=cfg.get("position_id_per_seconds", 25),
                seconds_per_chunk=cfg.get("seconds_per_chunk", 2),
            )
        except KeyError as err:
            raise weights.CheckpointError(f"{source}: missing field {err.args[0]!r} in the thinker config") from err
        except ValueError as err:
            raise weights.CheckpointError(f"{source}: {err}") from err


@struct.dataclass
class ThinkerInputs:
    """One prepared batch, ready for a jitted forward (every shape static).

    input_ids, attention_mask: `[batch, seq]` int32, left-padded.
    position_ids: `[3, batch, seq]` int32 TMRoPE positions.
    rope_deltas: `[batch]` int32; generated token i after a prompt of padded length P sits at
      `P + i + rope_deltas - n_left_pad` on all three axes.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    position_ids: jax.Array
    rope_deltas: jax.Array


def text_position_ids(attention_mask: jax.Array) -> jax.Array:
    """`[batch, seq]` padding mask -> `[3, batch, seq]` positions of a text-only batch.

    The count of real tokens before each one, the same on all three axes; padded slots hold 1, as in
    the reference's `get_rope_index` for inputs without images or videos.
    """
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 1)
    return jnp.broadcast_to(positions[None], (3,) + positions.shape)


class Qwen2_5OmniThinker(nnx.Module):
    """Text decoder + output head of `Qwen2_5OmniThinkerForConditionalGeneration`."""

    def __init__(self, config: ThinkerConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        text = config.text
        self.model = TextModel(text, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(text.hidden_size, text.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw: jax.Array | None = None,
        video_second_per_grid: jax.Array | None = None,
        input_features: jax.Array | None = None,
        feature_attention_mask: jax.Array | None = None,
        use_audio_in_video: bool = False,
    ) -> jax.Array:
        """The processor's arrays -> logits `[batch, seq, vocab]`.

        `input_ids [batch, seq]` are left-padded with `attention_mask [batch, seq]`; media arguments
        have the transformers processor's names and layouts. Host-side planning happens here, so under
        `jax.jit` call `prepare_inputs` outside and `forward` inside instead.
        """
        inputs = self.prepare_inputs(
            input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            video_second_per_grid=video_second_per_grid,
            input_features=input_features,
            feature_attention_mask=feature_attention_mask,
            use_audio_in_video=use_audio_in_video,
        )
        return self.forward(inputs)

    def prepare_inputs(
        self,
        input_ids,
        *,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        video_second_per_grid=None,
        input_features=None,
        feature_attention_mask=None,
        use_audio_in_video: bool = False,
    ) -> "ThinkerInputs":
        """Host-side planning of one batch: positions, and (with media) the encoders' layouts."""
        media = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "input_features": input_features,
        }
        given = [name for name, value in media.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)}: this build of the thinker runs the text decoder only; the encoders are not ported"
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        position_ids = text_position_ids(attention_mask)
        return ThinkerInputs(
            input_ids=jnp.asarray(input_ids, jnp.int32),
            attention_mask=jnp.asarray(attention_mask, jnp.int32),
            position_ids=jnp.asarray(position_ids, jnp.int32),
            rope_deltas=jnp.zeros((input_ids.shape[0],), jnp.int32),
        )

    def embed_inputs(self, inputs: "ThinkerInputs") -> jax.Array:
        """Token embeddings with the media features merged in: `[batch, seq, hidden]`."""
        return self.model.embed_tokens(inputs.input_ids)

    def hidden_states(self, inputs: "ThinkerInputs") -> jax.Array:
        """Final-norm hidden states `[batch, seq, hidden]` of a cache-free forward."""
        hidden, _ = self.model(self.embed_inputs(inputs), inputs.position_ids, causal_padding_mask(inputs.attention_mask))
        return hidden

    def forward(self, inputs: "ThinkerInputs") -> jax.Array:
        """Jittable forward of prepared inputs: logits `[batch, seq, vocab]`."""
        return self.logits(self.hidden_states(inputs))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[..., hidden] -> [..., vocab]` through the untied head or the tied embedding."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)


def read_config(path: str | Path) -> ThinkerConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise weights.CheckpointError(f"checkpoint directory {path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise weights.CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    return ThinkerConfig.from_hf(raw, source=str(config_file))


def from_pretrained(path: str | Path, *, dtype: jnp.dtype = jnp.float32, mesh: Mesh | None = None) -> Qwen2_5OmniThinker:
    """Loads a Hugging Face Qwen2.5-Omni (thinker) checkpoint directory into the Flax thinker.

    Accepts full Omni checkpoints (`thinker.*` names; talker and token2wav tensors are skipped and
    counted) and thinker-only ones. A checkpoint without `lm_head.weight` has tied embeddings. With a
    `mesh`, every parameter is placed by the logical-axis rules as it is read, so a model larger than
    one device's memory never sits whole on one device.
    """
    path = Path(path)
    config = read_config(path)
    checkpoint = weights.SafetensorsCheckpoint.open(path)
    if not config.tie_word_embeddings and "lm_head.weight" not in checkpoint:
        logger.info("checkpoint %s has no lm_head.weight: using tied embeddings", path)
        config = dataclasses.replace(config, tie_word_embeddings=True)

    abstract = nnx.eval_shape(lambda: Qwen2_5OmniThinker(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))

    if mesh is not None:
        from opsd_jax.sharding import param_shardings

        shardings = dict(nnx.to_flat_state(param_shardings(state, mesh)))

    def place(param_path: tuple, tensor: np.ndarray) -> jax.Array:
        array = np.asarray(tensor).astype(flat[param_path].get_value().dtype)
        if mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, shardings[param_path].get_value())

    loaded = weights.load_into(
        {p: v.get_value() for p, v in flat.items()},
        checkpoint,
        place=place,
        unused_ok=lambda name: name.startswith(UNPORTED_PREFIXES),
    )
    for param_path, variable in flat.items():
        variable.set_value(loaded[param_path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
