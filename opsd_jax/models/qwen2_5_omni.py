"""The Qwen2.5-Omni thinker in Flax NNX and `from_pretrained` for Hugging Face checkpoints.

`Qwen2_5OmniThinker` holds the audio tower, the vision encoder, the text decoder (`model`) and the
output head (`lm_head`, absent when the embeddings are tied). Its call takes the transformers
processor's arrays under their own names and returns logits. A call has two halves:

* `prepare_inputs` (host, numpy): everything data-dependent, the encoders' plans, the TMRoPE
  positions and the placeholder checks, padded to static buckets; returns `ThinkerInputs`;
* `forward` (jittable): encoders, merge into the token embeddings, decoder, head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from opsd_jax.models import weights
from opsd_jax.models.audio import AudioConfig, AudioEncoder, AudioPlan, prepare_audio
from opsd_jax.models.layers import CausalSegments, Linear
from opsd_jax.models.merge import check_placeholder_count, merge_modal_embeddings
from opsd_jax.models.positions import PositionConfig, rope_index
from opsd_jax.models.scoring import SignalRequest, TeacherSignal, signal_from_hidden
from opsd_jax.models.text import LayerCache, TextConfig, TextModel, causal_padding_mask, prefill_mask
from opsd_jax.models.vision import VisionConfig, VisionEncoder, VisionPlan, pad_patches, vision_plan
from opsd_jax.sharding import AxisRules, logical_to_spec, param_shardings, resolve_rules

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    """The thinker's architecture, read from a transformers config.json."""

    text: TextConfig
    audio: AudioConfig
    vision: VisionConfig
    positions: PositionConfig
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], source: str = "config") -> ThinkerConfig:
        """From a thinker config or a full Omni config (which nests it under `thinker_config`)."""
        if "thinker_config" in cfg:
            cfg = cfg["thinker_config"]
        try:
            return cls(
                text=TextConfig.from_hf(cfg["text_config"]),
                audio=AudioConfig.from_hf(cfg.get("audio_config", {})),
                vision=VisionConfig.from_hf(cfg.get("vision_config", {})),
                positions=PositionConfig.from_hf(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as err:
            raise weights.CheckpointError(f"{source}: missing field {err.args[0]!r} in the thinker config") from err
        except ValueError as err:
            raise weights.CheckpointError(f"{source}: {err}") from err


@struct.dataclass
class MediaFeatures:
    """Encoder outputs of a prepared batch, `[rows, hidden]` each (padded to the plans' buckets), or None."""

    audio: jax.Array | None = None
    image: jax.Array | None = None
    video: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class MediaBuckets:
    """Static sizes the media of a batch are padded to, so that batches share one compiled program.

    None means "exactly what this batch needs" (one compile per distinct size).
    """

    image_patches: int | None = None
    video_patches: int | None = None
    audio_chunks: int | None = None
    audio_tokens: int | None = None


@struct.dataclass
class ThinkerInputs:
    """One prepared batch, ready for a jitted forward (every shape static).

    input_ids, attention_mask: `[batch, seq]` int32, left-padded.
    position_ids: `[3, batch, seq]` int32 TMRoPE positions.
    rope_deltas: `[batch]` int32; generated token i after a prompt of padded length P sits at
      `P + i + rope_deltas - n_left_pad` on all three axes.
    image_pixels / video_pixels: `[patch_bucket, 1176]` patches, with their `VisionPlan`s; or None.
    audio_chunks: `[chunk_bucket, mel, 2 * n_window]`, with its `AudioPlan`; or None.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    position_ids: jax.Array
    rope_deltas: jax.Array
    image_pixels: jax.Array | None = None
    image_plan: VisionPlan | None = None
    video_pixels: jax.Array | None = None
    video_plan: VisionPlan | None = None
    audio_chunks: jax.Array | None = None
    audio_plan: AudioPlan | None = None


def text_position_ids(attention_mask: jax.Array) -> jax.Array:
    """`[batch, seq]` padding mask -> `[3, batch, seq]` positions of a text-only batch.

    The count of real tokens before each one, the same on all three axes; padded slots hold 1, as in
    the reference's `get_rope_index` for inputs without images or videos.
    """
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 1)
    return jnp.broadcast_to(positions[None], (3,) + positions.shape)


class Qwen2_5OmniThinker(nnx.Module):
    """`Qwen2_5OmniThinkerForConditionalGeneration` in Flax NNX."""

    def __init__(
        self,
        config: ThinkerConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        remat: bool = False,
        remat_policy: str = "full",
        attention: str = "xla",
    ):
        self.config = config
        self.dtype = dtype
        text = config.text
        self.audio_tower = AudioEncoder(config.audio, dtype=dtype, rngs=rngs)
        self.visual = VisionEncoder(config.vision, dtype=dtype, rngs=rngs)
        self.model = TextModel(
            text, dtype=dtype, rngs=rngs, remat=remat, remat_policy=remat_policy, attention=attention
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                text.hidden_size, text.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=dtype, rngs=rngs
            )
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
        buckets: MediaBuckets = MediaBuckets(),
    ) -> ThinkerInputs:
        """Host-side planning of one batch: the encoders' layouts, placeholder checks and positions.

        Text-only batches need no host work and may be traced (so `model(ids, attention_mask=m)` jits).
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if all(value is None for value in (pixel_values, pixel_values_videos, input_features)):
            return ThinkerInputs(
                input_ids=jnp.asarray(input_ids, jnp.int32),
                attention_mask=jnp.asarray(attention_mask, jnp.int32),
                position_ids=text_position_ids(jnp.asarray(attention_mask)),
                rope_deltas=jnp.zeros((input_ids.shape[0],), jnp.int32),
            )

        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        tokens = self.config.positions
        media: dict[str, Any] = {}
        for kind, pixels, grid, bucket, token_id in (
            ("image", pixel_values, image_grid_thw, buckets.image_patches, tokens.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, buckets.video_patches, tokens.video_token_id),
        ):
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{kind}: pixel values were given without {kind}_grid_thw")
            plan = vision_plan(grid, self.config.vision, bucket)
            check_placeholder_count(ids, token_id, int(plan.num_tokens), kind)
            pixels = np.asarray(pixels, np.float32)
            media[f"{kind}_pixels"] = jnp.asarray(pad_patches(pixels, bucket) if bucket else pixels)
            media[f"{kind}_plan"] = plan
        audio_lengths = None
        if input_features is not None:
            if feature_attention_mask is None:
                raise ValueError("input_features were given without feature_attention_mask")
            chunks, plan = prepare_audio(
                input_features,
                feature_attention_mask,
                self.config.audio,
                chunk_bucket=buckets.audio_chunks,
                token_bucket=buckets.audio_tokens,
            )
            check_placeholder_count(ids, tokens.audio_token_id, int(np.count_nonzero(plan.valid_rows)), "audio")
            media["audio_chunks"], media["audio_plan"] = jnp.asarray(chunks), plan
            audio_lengths = np.asarray(feature_attention_mask).astype(bool).sum(-1)

        if image_grid_thw is None and video_grid_thw is None:
            # No grid: the reference's sequential branch (audio positions are sequential anyway).
            position_ids = np.asarray(text_position_ids(jnp.asarray(mask)))
        else:
            position_ids, _ = rope_index(
                ids,
                mask,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                video_second_per_grid=video_second_per_grid,
                audio_seqlens=audio_lengths,
                use_audio_in_video=use_audio_in_video,
                config=tokens,
            )
        # One convention for every branch: the position after the prompt's last, minus its real length.
        real = mask.astype(bool)
        last = np.where(real[None], position_ids, np.iinfo(np.int32).min).max(axis=(0, 2))
        rope_deltas = last + 1 - real.sum(-1)
        return ThinkerInputs(
            input_ids=jnp.asarray(ids, jnp.int32),
            attention_mask=jnp.asarray(mask, jnp.int32),
            position_ids=jnp.asarray(position_ids, jnp.int32),
            rope_deltas=jnp.asarray(rope_deltas, jnp.int32),
            **media,
        )

    def encode_media(self, inputs: ThinkerInputs) -> MediaFeatures:
        """Runs the encoders on a prepared batch's media (once per prompt, however often it is repeated)."""
        audio = image = video = None
        if inputs.audio_chunks is not None:
            audio = self.audio_tower(inputs.audio_chunks, inputs.audio_plan)
        if inputs.image_pixels is not None:
            image = self.visual(inputs.image_pixels, inputs.image_plan)
        if inputs.video_pixels is not None:
            video = self.visual(inputs.video_pixels, inputs.video_plan)
        return MediaFeatures(audio=audio, image=image, video=video)

    def embed_inputs(
        self, inputs: ThinkerInputs, features: MediaFeatures | None = None, *, repeats: int = 1
    ) -> jax.Array:
        """Token embeddings with the media features merged in, `[batch, seq, hidden]`.

        Audio, then images, then videos, in the order the reference scatters them. `features` are
        encoded here unless given (a live teacher shares the student's). With `repeats > 1` the rows
        hold each prompt of the media batch `repeats` times (see `append_completion`).
        """
        if features is None:
            features = self.encode_media(inputs)
        tokens = self.config.positions
        embeds = self.model.embed_tokens(inputs.input_ids)
        for feats, count, token_id in (
            (
                features.audio,
                None if inputs.audio_plan is None else jnp.sum(inputs.audio_plan.valid_rows),
                tokens.audio_token_id,
            ),
            (
                features.image,
                None if inputs.image_plan is None else inputs.image_plan.num_tokens,
                tokens.image_token_id,
            ),
            (
                features.video,
                None if inputs.video_plan is None else inputs.video_plan.num_tokens,
                tokens.video_token_id,
            ),
        ):
            if feats is not None:
                embeds = merge_modal_embeddings(embeds, inputs.input_ids, token_id, feats, count, repeats=repeats)
        return embeds

    def hidden_states(
        self, inputs: ThinkerInputs, features: MediaFeatures | None = None, *, repeats: int = 1
    ) -> jax.Array:
        """Final-norm hidden states `[batch, seq, hidden]` of a cache-free forward."""
        embeds = self.embed_inputs(inputs, features, repeats=repeats)
        hidden, _ = self.model(embeds, inputs.position_ids, causal_padding_mask(inputs.attention_mask))
        return hidden

    def head_kernel(self) -> jax.Array:
        """The output projection `[hidden, vocab]` (the embedding table, transposed, when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def forward(self, inputs: ThinkerInputs) -> jax.Array:
        """Jittable forward of prepared inputs: logits `[batch, seq, vocab]`."""
        return self.logits(self.hidden_states(inputs))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[..., hidden] -> [..., vocab]` through the untied head or the tied embedding."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    # ----------------------------------------------------------------------------------------------
    # Inference over a KV cache: the sampler's prefill and decode loop, the prefix-shared scoring
    # ----------------------------------------------------------------------------------------------

    def init_cache(
        self, batch: int, length: int, *, mesh: Mesh | None = None, rules: AxisRules | None = None
    ) -> list[LayerCache]:
        """Empty per-layer KV caches for `batch` rows of up to `length` tokens (`TextModel.init_cache`)."""
        return self.model.init_cache(batch, length, mesh=mesh, rules=rules)

    def extend(
        self, inputs: jax.Array, positions: jax.Array, cache: list[LayerCache], mask: jax.Array, index: jax.Array
    ) -> tuple[jax.Array, list[LayerCache]]:
        """The decoder over S new tokens, their keys and values written into the cache from column `index`.

        Args:
          inputs: token ids `[B, S]`, or embeddings `[B, S, hidden]` (a prompt with its media merged in).
          positions: `[3, B, S]` M-RoPE positions.
          cache: `init_cache`'s per-layer caches `[B, L, kv_heads, head_dim]`.
          mask: boolean `[B, S, L]`, True where a new token may attend to a cache column (its own included).
          index: int32 scalar, the cache column of the first new token.

        Returns:
          final-norm hidden states `[B, S, hidden]` (`logits` turns the ones needed into `[.., vocab]`) and the
          updated caches.
        """
        embeds = self.model.embed_tokens(inputs) if inputs.ndim == 2 else inputs
        return self.model(embeds, positions, mask, cache, index)

    def prefill(
        self, prompt: ThinkerInputs, cache: list[LayerCache], features: MediaFeatures | None = None
    ) -> tuple[jax.Array, list[LayerCache]]:
        """Prepared prompts `[B, P]` (left-padded, with their media) into an empty cache from column 0.

        Returns hidden states `[B, P, hidden]` (column P - 1 predicts the first new token) and the caches. Each
        prompt token sees the real tokens up to itself; the cache's later columns stay hidden.
        """
        mask = prefill_mask(prompt.attention_mask, cache[0].key.shape[1])
        return self.extend(self.embed_inputs(prompt, features), prompt.position_ids, cache, mask, jnp.int32(0))

    def completion_hidden(
        self,
        prompt: ThinkerInputs,
        completion: jax.Array,
        completion_mask: jax.Array,
        features: MediaFeatures | None = None,
    ) -> jax.Array:
        """Hidden states that predict each completion token: `[B * G, C, hidden]`.

        `prompt`: `[B, P]` prepared prompts; `completion` / `completion_mask`: `[B * G, C]`, prompt-major.
        Equal to one forward over `[prompt | completion]` (`append_completion`) sliced at columns
        `P - 1 ... P + C - 2`, but the G rollouts of a prompt share its prefix: the prompt runs once per prompt
        (B rows) into a KV cache, which is repeated for the completions (B * G rows of C tokens). For a long
        multimodal prompt and short answers this divides the forward (and, for the student, the backward) by ~G.
        """
        batch, prompt_len = prompt.input_ids.shape
        rows, length = completion.shape
        # A static repeat count lowers to a broadcast; `total_repeat_length` would make it a gather, which
        # libtpu's all-reduce-scatter fusion fails on under FSDP (RET_CHECK in hlo_instruction.cc).
        repeat = functools.partial(jnp.repeat, repeats=rows // batch, axis=0)
        start = repeat(first_new_position(prompt))
        positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
        positions = jnp.broadcast_to(positions[None], (3, rows, length))
        # Segment 1 is the real tokens, 0 the prompts' left padding. A prompt token sees the real prompt tokens up
        # to itself over a cache with the completions' columns after the prompt (never reached: causal). A padded
        # prompt row sees the padding up to itself (never an empty row; `prefill_mask` gives it only its diagonal, so
        # its outputs differ from a prefill's): they feed no real token.
        # Completion token i sees the prompt's real tokens and completion tokens 0..i.
        real = prompt.attention_mask.astype(jnp.int32)
        prefix_mask = CausalSegments(real, jnp.pad(real, ((0, 0), (0, length))), offset=0)
        ones = jnp.ones((rows, length), jnp.int32)
        mask = CausalSegments(ones, jnp.concatenate([repeat(real), ones], axis=1), offset=prompt_len)
        del completion_mask  # tokens after EOS only feed predictions that are masked out of every loss
        # Layer by layer, the prompts and then their completions over the prompts' cache: under FSDP each
        # layer's weights are gathered once per pass, not once for the prompts and again for the completions.
        prefix, hidden = self.model.prefix_and_continuations(
            self.embed_inputs(prompt, features),
            prompt.position_ids,
            prefix_mask,
            self.model.embed_tokens(completion),
            positions,
            mask,
        )
        return jnp.concatenate([repeat(prefix[:, -1:]), hidden[:, :-1]], axis=1)

    def score_completions(
        self,
        prompt: ThinkerInputs,
        completion: jax.Array,
        completion_mask: jax.Array,
        request: SignalRequest,
        features: MediaFeatures | None = None,
    ) -> TeacherSignal:
        """Scores sampled completions `[B * G, C]` after prompts `[B, P]` (prefix-shared, `completion_hidden`) and
        keeps what `request` asks for (`signal_from_hidden`), under `stop_gradient`."""
        hidden = self.completion_hidden(prompt, completion, completion_mask, features)
        return signal_from_hidden(hidden, self.head_kernel(), completion, request)


def first_new_position(prompt: ThinkerInputs) -> jax.Array:
    """`[B]` int32: the position, on all three axes, of the first token after each prompt `[B, P]`
    (`P + rope_delta - n_left_pad`); generated token i sits i further."""
    prompt_len = prompt.input_ids.shape[1]
    n_left_pad = prompt_len - jnp.sum(prompt.attention_mask, axis=-1, dtype=jnp.int32)
    return prompt_len + prompt.rope_deltas - n_left_pad


# The batch axis of each prompt field (media arrays are packed across the batch: see MEDIA_ROW_FIELDS).
PROMPT_BATCH_AXES = {"input_ids": 0, "attention_mask": 0, "position_ids": 1, "rope_deltas": 0}
# Media arrays whose first axis is rows of patches or audio chunks, clip after clip.
MEDIA_ROW_FIELDS = ("image_pixels", "video_pixels", "audio_chunks")


def input_shardings(
    inputs: ThinkerInputs, mesh: Mesh, *, leading_axes: int = 0, rules: AxisRules | None = None
) -> ThinkerInputs:
    """The placement of prepared inputs on `mesh`: prompt rows over the batch mesh axes, the media's patch
    and chunk rows over the `media` axes (each chip holds and encodes its share of the clips, as the
    encoders' layer-boundary constraints lay them out), the media plans (index arrays) replicated.

    A tree like `inputs` of `NamedSharding`s (for `jax.device_put`, or abstract inputs of an ahead-of-time
    compile). `leading_axes` counts extra axes in front of every field (1 for stacked micro-batches).
    `rules`: the run's logical-axis table (`MeshConfig.axis_rules`; default: the default table).
    """
    rules = resolve_rules() if rules is None else rules

    def sharding(x, axis: int | None, logical: str | None = None):
        axes: list[str | None] = [None] * x.ndim
        if axis is not None:
            axes[leading_axes + axis] = logical
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))

    split = {name: (axis, "batch") for name, axis in PROMPT_BATCH_AXES.items()}
    split.update({name: (0, "media") for name in MEDIA_ROW_FIELDS if getattr(inputs, name) is not None})
    rows = {name: sharding(getattr(inputs, name), axis, logical) for name, (axis, logical) in split.items()}
    rest = jax.tree.map(lambda x: sharding(x, None), inputs.replace(**{name: None for name in split}))
    return rest.replace(**rows)


def place_inputs(
    inputs: ThinkerInputs, mesh: Mesh, *, leading_axes: int = 0, rules: AxisRules | None = None
) -> ThinkerInputs:
    """Puts prepared inputs on the mesh (`input_shardings`). Every process passes the same global inputs."""
    return jax.device_put(inputs, input_shardings(inputs, mesh, leading_axes=leading_axes, rules=rules))


def append_completion(prompt: ThinkerInputs, completion: jax.Array, completion_mask: jax.Array) -> ThinkerInputs:
    """`[prompt | completion]` inputs for scoring sampled completions in one forward (jittable).

    Args:
      prompt: prepared prompts `[B, P]` (left-padded), with their media.
      completion: `[B * G, C]` sampled tokens, prompt-major (G = rows per prompt).
      completion_mask: `[B * G, C]`, true up to and including EOS.

    Returns:
      inputs of `[B * G, P + C]` rows; the media stay those of the B prompts (score them with
      `repeats=G`). Completion token i of a row sits at column `P + i` with position
      `P + i + rope_delta - n_left_pad` on all three axes, exactly where decoding put it; logits at
      column `P - 1 + i` predict it.
    """
    repeats = completion.shape[0] // prompt.input_ids.shape[0]
    repeat = functools.partial(jnp.repeat, repeats=repeats, axis=0)  # static: a broadcast, not a gather
    start = repeat(first_new_position(prompt))
    completion_positions = start[:, None] + jnp.arange(completion.shape[1], dtype=jnp.int32)[None]
    prompt_positions = jnp.repeat(prompt.position_ids, repeats, axis=1)
    return prompt.replace(
        input_ids=jnp.concatenate([repeat(prompt.input_ids), completion.astype(jnp.int32)], axis=1),
        attention_mask=jnp.concatenate([repeat(prompt.attention_mask), completion_mask.astype(jnp.int32)], axis=1),
        position_ids=jnp.concatenate(
            [prompt_positions, jnp.broadcast_to(completion_positions[None], (3,) + completion_positions.shape)], axis=2
        ),
        rope_deltas=repeat(prompt.rope_deltas),
    )


def read_config(path: str | Path) -> ThinkerConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise weights.CheckpointError(f"checkpoint directory {path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise weights.CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    return ThinkerConfig.from_hf(raw, source=str(config_file))


def from_pretrained(
    path: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    mesh: Mesh | None = None,
    rules: AxisRules | None = None,
    param_dtype: jnp.dtype | None = None,
    remat: bool = False,
    remat_policy: str = "full",
    attention: str = "xla",
) -> Qwen2_5OmniThinker:
    """Loads a Hugging Face Qwen2.5-Omni (thinker) checkpoint directory into the Flax thinker.

    Accepts full Omni checkpoints (`thinker.*` names; talker and token2wav tensors are skipped and
    counted) and thinker-only ones. A checkpoint without `lm_head.weight` has tied embeddings. With a
    `mesh`, every parameter is placed by the logical-axis table `rules` (the run's `MeshConfig.axis_rules`;
    default: the default table) as it is read, so a model larger than one device's memory never sits whole
    on one device. `dtype` is the compute dtype; `param_dtype`
    (default: the same) is the stored one, e.g. float32 master weights for bfloat16 training.
    `remat` recomputes decoder-layer activations in the backward pass, keeping what `remat_policy` says
    (`opsd_jax.models.text.REMAT_POLICIES`); `attention` is the scoring forward's
    attention kernel (`opsd_jax.models.text.ATTENTION_KERNELS`).
    """
    path = Path(path)
    config = read_config(path)
    checkpoint = weights.SafetensorsCheckpoint.open(path)
    if not config.tie_word_embeddings and "lm_head.weight" not in checkpoint:
        logger.info("checkpoint %s has no lm_head.weight: using tied embeddings", path)
        config = dataclasses.replace(config, tie_word_embeddings=True)

    abstract = nnx.eval_shape(
        lambda: Qwen2_5OmniThinker(
            config, dtype=dtype, rngs=nnx.Rngs(0), remat=remat, remat_policy=remat_policy, attention=attention
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))

    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(state, mesh, rules)))

    def place(param_path: tuple, tensor: np.ndarray) -> jax.Array:
        array = np.asarray(tensor).astype(param_dtype or flat[param_path].get_value().dtype)
        if mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, shardings[param_path].get_value())

    loaded = weights.load_into(
        {p: v.get_value() for p, v in flat.items()},
        checkpoint,
        place=place,
    )
    for param_path, variable in flat.items():
        variable.set_value(loaded[param_path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
