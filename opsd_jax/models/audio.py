"""The thinker's audio encoder (`audio_tower.*`): a Whisper-like encoder run on 2-second chunks.

Pipeline per audio of `L` log-mel frames (reference `Qwen2_5OmniAudioEncoder`):

1. split into chunks of `2 * n_window` frames (the last one is the remainder);
2. per chunk: `gelu(conv1(x))` with padded frames zeroed, `gelu(conv2(.))` (stride 2) -> `n_window`
   token slots, plus a fixed sinusoid table whose positions restart at 0 in every chunk;
3. pre-LN transformer layers whose attention never crosses a chunk boundary;
4. per audio (not per chunk): average consecutive token pairs (an odd last token is dropped),
   then `ln_post` and `proj` to the language model width.

Everything data-dependent (chunk counts and lengths, which rows are pooled) is planned on the host
in numpy by `audio_plan`, padded to static buckets, and handed to the jittable `AudioEncoder.__call__`.
Because chunks are the unit of attention, the encoder keeps them as a leading batch axis
`[chunks, n_window, d_model]`: the reference's block-diagonal attention over packed tokens becomes
ordinary batched attention with a per-chunk key mask, with no `[tokens, tokens]` mask at all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from opsd_jax.models.layers import Embed, LayerNorm, Linear, dot_product_attention, gelu
from opsd_jax.sharding import constrain_activation


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584

    def __post_init__(self) -> None:
        for name in (
            "num_mel_bins",
            "d_model",
            "encoder_layers",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "max_source_positions",
            "n_window",
            "output_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"audio_config.{name}: expected a positive integer, got {value!r}")
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"audio_config: d_model ({self.d_model}) must be a multiple of encoder_attention_heads "
                f"({self.encoder_attention_heads})"
            )
        if self.d_model % 2 or self.d_model < 4:
            raise ValueError(f"audio_config.d_model: the sinusoid table needs an even width >= 4, got {self.d_model}")
        if self.n_window > self.max_source_positions:
            raise ValueError(
                f"audio_config.n_window ({self.n_window}) token slots per chunk exceed the sinusoid table's "
                f"max_source_positions ({self.max_source_positions})"
            )

    @property
    def chunk_frames(self) -> int:
        """Mel frames per chunk (200 = 2 s at 100 frames/s in the real config)."""
        return 2 * self.n_window

    @property
    def tokens_per_chunk(self) -> int:
        """Token slots per chunk after the stride-2 conv: `(2 * n_window - 1) // 2 + 1 = n_window`."""
        return self.n_window

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> AudioConfig:
        """From the `audio_config` block of a transformers config.json; missing keys take the reference's defaults."""
        activation = cfg.get("activation_function", "gelu")
        if activation != "gelu":
            raise ValueError(
                f"audio_config.activation_function: only 'gelu' (exact erf) is supported, got {activation!r}"
            )
        defaults = cls()
        return cls(
            **{field.name: cfg.get(field.name, getattr(defaults, field.name)) for field in dataclasses.fields(cls)}
        )


# --------------------------------------------------------------------------------------------------
# Host-side planning (numpy)
# --------------------------------------------------------------------------------------------------


def _after_conv(frames):
    """Token slots after the stride-2 conv for `frames` mel frames (numpy or jax integers; 0 -> 0)."""
    return (frames - 1) // 2 + 1


def audio_output_lengths(mel_lengths) -> np.ndarray:
    """Audio tokens per audio of `mel_lengths` frames: `L1 = (L - 1) // 2 + 1; (L1 - 2) // 2 + 1`.

    The one home of this formula (the reference's `_get_feat_extract_output_lengths`), used by the
    prompt builder (how many `<|AUDIO|>` placeholders) and the position code. 25 tokens per second.
    """
    lengths = np.asarray(mel_lengths, dtype=np.int64)
    if np.any(lengths < 0):
        raise ValueError(f"mel_lengths: expected non-negative frame counts, got {lengths.tolist()}")
    return (_after_conv(lengths) - 2) // 2 + 1


@struct.dataclass
class AudioPlan:
    """The data-dependent layout of one audio batch, as static-shape int32 arrays (a pytree for jit).

    Attributes:
      chunk_lengths: `[chunk_bucket]` mel frames in each chunk, in audio order; 0 for bucket padding.
      pool_index: `[token_bucket]` output row j averages token slots `pool_index[j]` and
        `pool_index[j] + 1` of the flattened `[chunk_bucket * tokens_per_chunk]` grid; 0 on padding rows.
      token_audio: `[token_bucket]` the audio each output row belongs to; -1 on padding rows.
        Valid rows come first, audio by audio, exactly the rows of the reference's output.
    """

    chunk_lengths: np.ndarray
    pool_index: np.ndarray
    token_audio: np.ndarray

    @property
    def valid_rows(self):
        """`[token_bucket]` bool: rows that hold an audio token."""
        return self.token_audio >= 0


def _check_lengths(feature_lens) -> np.ndarray:
    lens = np.asarray(feature_lens)
    if lens.ndim != 1 or lens.size == 0 or not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"feature_lens: expected a non-empty 1-D integer array of mel frame counts, got {lens!r}")
    empty = np.flatnonzero(lens < 1)
    if empty.size:
        raise ValueError(
            f"feature_lens: audio {int(empty[0])} has {int(lens[empty[0]])} mel frames; every audio needs at least 1"
        )
    return lens.astype(np.int64)


def _chunk_layout(lens: np.ndarray, chunk_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(chunk_lengths, chunk_audio, chunk_offset)` per chunk: frames, audio index, first frame within the audio."""
    chunks_per_audio = -(-lens // chunk_frames)
    chunk_audio = np.repeat(np.arange(lens.size), chunks_per_audio)
    first_chunk = np.concatenate([[0], np.cumsum(chunks_per_audio)[:-1]])
    chunk_offset = (np.arange(chunk_audio.size) - first_chunk[chunk_audio]) * chunk_frames
    chunk_lengths = np.minimum(lens[chunk_audio] - chunk_offset, chunk_frames)
    return chunk_lengths, chunk_audio, chunk_offset


def _bucket(name: str, bucket: int | None, needed: int, what: str) -> int:
    if bucket is None:
        return needed
    if bucket < needed:
        raise ValueError(f"{name}={bucket} is smaller than the {needed} {what} these audios need")
    return bucket


def audio_plan(
    feature_lens, config: AudioConfig, chunk_bucket: int | None = None, token_bucket: int | None = None
) -> AudioPlan:
    """Chunks and pooling pairs for audios of `feature_lens` mel frames (`[num_audios]`).

    `chunk_bucket` / `token_bucket` pad to static sizes (default: exactly what is needed); a bucket
    smaller than needed raises.
    """
    lens = _check_lengths(feature_lens)
    chunk_lengths, chunk_audio, _ = _chunk_layout(lens, config.chunk_frames)
    chunk_bucket = _bucket("chunk_bucket", chunk_bucket, chunk_lengths.size, "chunks")

    tokens_out = audio_output_lengths(lens)
    token_bucket = _bucket("token_bucket", token_bucket, int(tokens_out.sum()), "output tokens")
    # An audio's token slots are contiguous in the flattened chunk grid: only its last chunk is short.
    first_slot = np.searchsorted(chunk_audio, np.arange(lens.size)) * config.tokens_per_chunk
    row_audio = np.repeat(np.arange(lens.size), tokens_out)
    row_in_audio = np.arange(row_audio.size) - np.repeat(np.cumsum(tokens_out) - tokens_out, tokens_out)

    pool_index = np.zeros(token_bucket, np.int32)
    pool_index[: row_audio.size] = first_slot[row_audio] + 2 * row_in_audio
    token_audio = np.full(token_bucket, -1, np.int32)
    token_audio[: row_audio.size] = row_audio
    padded_lengths = np.zeros(chunk_bucket, np.int32)
    padded_lengths[: chunk_lengths.size] = chunk_lengths
    return AudioPlan(chunk_lengths=padded_lengths, pool_index=pool_index, token_audio=token_audio)


def audio_feature_lengths(input_features, feature_attention_mask, config: AudioConfig) -> np.ndarray:
    """`[batch]` mel frames per audio, after checking the processor's arrays against each other."""
    features = np.asarray(input_features)
    mask = np.asarray(feature_attention_mask)
    if features.ndim != 3 or features.shape[1] != config.num_mel_bins:
        raise ValueError(
            f"input_features: expected shape [batch, {config.num_mel_bins} mel bins, frames], got {features.shape}"
        )
    if mask.shape != (features.shape[0], features.shape[2]):
        raise ValueError(
            f"feature_attention_mask: expected shape {(features.shape[0], features.shape[2])} to match "
            f"input_features {features.shape}, got {mask.shape}"
        )
    return _check_lengths(mask.astype(bool).sum(-1))


def pack_audio_chunks(
    input_features, feature_attention_mask, config: AudioConfig, chunk_bucket: int | None = None
) -> np.ndarray:
    """The processor's `input_features [batch, mel, frames]` + `feature_attention_mask [batch, frames]`
    -> zero-padded chunks `[chunk_bucket, mel, 2 * n_window]`.

    As the reference does, the masked-in frames of each audio are taken in order (wherever they sit),
    then cut into chunks; everything past a chunk's length is zero.
    """
    lens = audio_feature_lengths(input_features, feature_attention_mask, config)
    return _pack(input_features, feature_attention_mask, lens, config, chunk_bucket)


def _pack(input_features, feature_attention_mask, lens: np.ndarray, config: AudioConfig, chunk_bucket: int | None):
    features = np.asarray(input_features, dtype=np.float32)
    mask = np.asarray(feature_attention_mask).astype(bool)
    frames = features.transpose(0, 2, 1)[mask]  # [sum(lens), mel]: all audios' valid frames, concatenated
    chunk_lengths, chunk_audio, chunk_offset = _chunk_layout(lens, config.chunk_frames)
    chunk_bucket = _bucket("chunk_bucket", chunk_bucket, chunk_lengths.size, "chunks")

    audio_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    position = np.arange(config.chunk_frames)
    source = (audio_start[chunk_audio] + chunk_offset)[:, None] + position  # [chunks, chunk_frames]
    valid = position < chunk_lengths[:, None]
    chunks = np.zeros((chunk_bucket, config.chunk_frames, config.num_mel_bins), np.float32)
    chunks[: chunk_lengths.size] = np.where(valid[..., None], frames[np.where(valid, source, 0)], 0.0)
    return chunks.transpose(0, 2, 1)


def prepare_audio(
    input_features,
    feature_attention_mask,
    config: AudioConfig,
    *,
    chunk_bucket: int | None = None,
    token_bucket: int | None = None,
) -> tuple[np.ndarray, AudioPlan]:
    """`(chunks [chunk_bucket, mel, 2 * n_window], plan)` for `AudioEncoder.__call__`."""
    lens = audio_feature_lengths(input_features, feature_attention_mask, config)
    plan = audio_plan(lens, config, chunk_bucket, token_bucket)
    return _pack(input_features, feature_attention_mask, lens, config, chunk_bucket), plan


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """`[length, channels]` Whisper position table: `[sin(t * f_i), cos(t * f_i)]`, sin half first.

    Computed in float32 like the reference's buffer (`f_i = exp(-i * ln(max_timescale) / (channels/2 - 1))`).
    """
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-np.float32(increment) * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class Conv1d(nnx.Module):
    """`torch.nn.Conv1d` on channel-last input: kernel `[kernel_size, in, out]` (torch's reversed), bias `[out]`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int,
        stride: int,
        padding: int,
        axes: tuple[str | None, str | None, str | None],
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        init = 0.02 * jax.random.normal(rngs.params(), (kernel_size, in_features, out_features))
        self.kernel = nnx.Param(init.astype(dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[2],))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, length, in] -> [batch, (length + 2 * padding - kernel_size) // stride + 1, out]`."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,),
            padding=((self.padding, self.padding),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class AudioAttention(nnx.Module):
    """Bidirectional multi-head attention; `k_proj` has no bias (q, v and out do)."""

    def __init__(self, cfg: AudioConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.d_model // cfg.encoder_attention_heads
        width = cfg.d_model
        kw = dict(dtype=dtype, rngs=rngs)
        self.q_proj = Linear(width, width, use_bias=True, axes=("encoder_embed", "encoder_heads"), **kw)
        self.k_proj = Linear(width, width, use_bias=False, axes=("encoder_embed", "encoder_heads"), **kw)
        self.v_proj = Linear(width, width, use_bias=True, axes=("encoder_embed", "encoder_heads"), **kw)
        self.out_proj = Linear(width, width, use_bias=True, axes=("encoder_heads", "encoder_embed"), **kw)

    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        """`x [chunks, tokens, d_model]`, `key_valid [chunks, 1, tokens]` -> `[chunks, tokens, d_model]`."""
        chunks, tokens, width = x.shape

        def split(y):
            return y.reshape(chunks, tokens, self.num_heads, self.head_dim)

        out = dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), key_valid, scale=self.head_dim**-0.5
        )
        return self.out_proj(out.reshape(chunks, tokens, width))


class AudioEncoderLayer(nnx.Module):
    """Pre-LN block: `x += attn(LN(x))`, `x += fc2(gelu(fc1(LN(x))))`, LayerNorm eps 1e-5."""

    def __init__(self, cfg: AudioConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.self_attn = AudioAttention(cfg, **kw)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, axis="encoder_norm", dtype=dtype)
        self.fc1 = Linear(cfg.d_model, cfg.encoder_ffn_dim, use_bias=True, axes=("encoder_embed", "encoder_mlp"), **kw)
        self.fc2 = Linear(cfg.encoder_ffn_dim, cfg.d_model, use_bias=True, axes=("encoder_mlp", "encoder_embed"), **kw)
        self.final_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, axis="encoder_norm", dtype=dtype)

    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_valid)
        return x + self.fc2(gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nnx.Module):
    """`audio_tower.*` of the thinker: chunked mel frames -> audio token embeddings of the LM width."""

    def __init__(self, cfg: AudioConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, rngs=rngs)
        conv = dict(kernel_size=3, padding=1, **kw)
        self.conv1 = Conv1d(
            cfg.num_mel_bins, cfg.d_model, stride=1, axes=("encoder_kernel", "encoder_patch", "encoder_embed"), **conv
        )
        self.conv2 = Conv1d(cfg.d_model, cfg.d_model, stride=2, axes=("encoder_kernel", None, "encoder_embed"), **conv)
        self.layers = nnx.List([AudioEncoderLayer(cfg, **kw) for _ in range(cfg.encoder_layers)])
        self.ln_post = LayerNorm(cfg.d_model, eps=1e-5, axis="encoder_norm", dtype=dtype)
        self.proj = Linear(cfg.d_model, cfg.output_dim, use_bias=True, axes=("encoder_embed", "embed"), **kw)
        # In the checkpoint but unused by the reference's forward; kept so every thinker tensor loads.
        self.audio_bos_eos_token = Embed(2, cfg.output_dim, axes=(None, "embed"), **kw)

    def __call__(self, chunks: jax.Array, plan: AudioPlan) -> jax.Array:
        """Encodes planned chunks.

        Args:
          chunks: `[chunk_bucket, num_mel_bins, 2 * n_window]` from `pack_audio_chunks` (zero past each
            chunk's length).
          plan: the matching `audio_plan`.

        Returns:
          `[token_bucket, output_dim]`. Row j holds an audio token where `plan.token_audio[j] >= 0`;
          these rows come first and, in order, equal the reference's `get_audio_features` output.
          Padding rows are zero.
        """
        cfg = self.config
        if chunks.shape[1:] != (cfg.num_mel_bins, cfg.chunk_frames):
            raise ValueError(
                f"chunks: expected [chunks, {cfg.num_mel_bins}, {cfg.chunk_frames}], got {tuple(chunks.shape)}"
            )
        if chunks.shape[0] != plan.chunk_lengths.shape[0]:
            raise ValueError(
                f"chunks: {chunks.shape[0]} chunks, but plan.chunk_lengths has {plan.chunk_lengths.shape[0]}"
            )
        lengths = plan.chunk_lengths[:, None]
        frame_valid = jnp.arange(cfg.chunk_frames)[None, :] < lengths  # [chunks, chunk_frames]
        token_valid = jnp.arange(cfg.tokens_per_chunk)[None, :] < _after_conv(lengths)  # [chunks, tokens]

        x = chunks.astype(self.dtype).transpose(0, 2, 1)  # [chunks, chunk_frames, mel]
        # Zeroing after conv1 makes conv2 see exactly the zero padding of a chunk cut to its own length.
        x = gelu(self.conv1(x)) * frame_valid[..., None].astype(self.dtype)
        x = gelu(self.conv2(x))  # [chunks, tokens, d_model]
        x = x + jnp.asarray(sinusoid_positions(cfg.tokens_per_chunk, cfg.d_model), self.dtype)

        key_valid = token_valid[:, None, :]
        rows = functools.partial(constrain_activation, logical_axes=("media", None, None))  # chunks over the chips
        x = rows(x)
        for layer in self.layers:
            x = rows(layer(x, key_valid))

        slots = x.reshape(-1, cfg.d_model)  # [chunk_bucket * tokens, d_model]
        pooled = (slots[plan.pool_index] + slots[plan.pool_index + 1]) / 2
        out = self.proj(self.ln_post(pooled))
        return jnp.where(plan.valid_rows[:, None], out, jnp.zeros((), out.dtype))

    def encode(
        self,
        input_features,
        feature_attention_mask,
        *,
        chunk_bucket: int | None = None,
        token_bucket: int | None = None,
    ) -> jax.Array:
        """The processor's arrays -> `[total audio tokens, output_dim]`, like the reference's `get_audio_features`.

        Host convenience (plans, then runs the jitted forward); inside a jitted model, call
        `prepare_audio` on the host and `__call__` with the result.
        """
        chunks, plan = prepare_audio(
            input_features, feature_attention_mask, self.config, chunk_bucket=chunk_bucket, token_bucket=token_bucket
        )
        out = _jitted_forward(self, jnp.asarray(chunks), plan)
        return out[: int(np.count_nonzero(plan.valid_rows))]


_jitted_forward = nnx.jit(lambda encoder, chunks, plan: encoder(chunks, plan))
