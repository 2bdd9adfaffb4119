"""TMRoPE position ids of the Qwen2.5-Omni thinker: a host-side numpy port of the reference's `get_rope_index`.

Every token gets a (t, h, w) position. Text, `<|..._bos|>` / `<|..._eos|>` tokens and audio placeholders
advance all three axes together; an image or video placeholder block sits on a grid: `t` counts time in
`position_id_per_seconds` steps per second, `h` / `w` count merged patch rows / columns. A video that
carries its own audio track interleaves 2-second chunks of both streams on a shared time axis. Each
segment starts one past the largest id of the segment before it (`max` over all three axes, as the
reference does), so positions run ahead of or behind the token count and each row gets a delta.

The layout depends on data (token ids, grids, audio lengths), so it is computed on the host in numpy and
handed to the jitted model as an int32 array (reference doc §5.3 P10). The decode rule that continues the
positions during generation, `decode_position_ids`, is a jnp function usable inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opsd_jax.models.audio import audio_output_lengths


@dataclasses.dataclass(frozen=True)
class PositionConfig:
    """Token ids and time constants of `get_rope_index` (real Qwen2.5-Omni ids as defaults)."""

    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    spatial_merge_size: int = 2
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"PositionConfig.{field.name}: expected an int, got {value!r}")
        for name in ("spatial_merge_size", "position_id_per_seconds", "seconds_per_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PositionConfig.{name}: expected a positive int, got {getattr(self, name)}")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> PositionConfig:
        """From a thinker config.json dict, or a full Omni one (which nests it under `thinker_config`).

        Accepts both spellings of the placeholder ids (`image_token_index`, written by config.json, and
        `image_token_id`, the attribute alias of the transformers config class).
        """
        if "thinker_config" in cfg:
            cfg = cfg["thinker_config"]
        defaults = cls()

        def token(name: str) -> int:
            index_name = name.replace("_token_id", "_token_index")
            return int(cfg.get(index_name, cfg.get(name, getattr(defaults, name))))

        vision = cfg.get("vision_config") or {}
        return cls(
            audio_token_id=token("audio_token_id"),
            image_token_id=token("image_token_id"),
            video_token_id=token("video_token_id"),
            audio_start_token_id=int(cfg.get("audio_start_token_id", defaults.audio_start_token_id)),
            audio_end_token_id=int(cfg.get("audio_end_token_id", defaults.audio_end_token_id)),
            vision_start_token_id=int(cfg.get("vision_start_token_id", defaults.vision_start_token_id)),
            vision_end_token_id=int(cfg.get("vision_end_token_id", defaults.vision_end_token_id)),
            spatial_merge_size=int(vision.get("spatial_merge_size", defaults.spatial_merge_size)),
            position_id_per_seconds=int(cfg.get("position_id_per_seconds", defaults.position_id_per_seconds)),
            seconds_per_chunk=int(cfg.get("seconds_per_chunk", defaults.seconds_per_chunk)),
        )


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    video_second_per_grid: np.ndarray | Sequence[float] | None = None,
    audio_seqlens: np.ndarray | None = None,
    use_audio_in_video: bool = False,
    config: PositionConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """TMRoPE positions of a (padded) batch, equal to the reference's `get_rope_index`.

    Args:
      input_ids: `[batch, seq]` token ids (any padding side).
      attention_mask: `[batch, seq]`, 1 for real tokens.
      image_grid_thw / video_grid_thw: `[num_images / num_videos, 3]` patch grids, in the order the
        media occur in the batch read row-major (row 0 first, left to right).
      video_second_per_grid: `[num_videos]` seconds per temporal grid step (2 / fps); needed with videos.
      audio_seqlens: `[num_audios]` mel frames per audio (`feature_attention_mask.sum(-1)`), in the same
        order; an audio track of a video (use_audio_in_video) counts as an audio.
      use_audio_in_video: videos are laid out as `<vision_bos><audio_bos>` + interleaved chunks +
        `<audio_eos><vision_eos>`.

    Returns:
      position_ids `[3, batch, seq]` int32 (t, h, w; padded slots hold 1) and deltas `[batch]` int32,
      `max(position) + 1 - real tokens` per row, which continue the positions while decoding.
    """
    input_ids = _as_int_matrix(input_ids, "input_ids")
    attention_mask = _as_int_matrix(attention_mask, "attention_mask", binary=True)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {input_ids.shape} (that of input_ids), got {attention_mask.shape}"
        )

    if image_grid_thw is None and video_grid_thw is None:
        return _sequential_positions(attention_mask)

    # The reference rounds seconds per grid to float32 before using them; so does the port.
    seconds_per_grid = None if video_second_per_grid is None else np.asarray(video_second_per_grid, np.float32)
    audio_lengths = None if audio_seqlens is None else audio_output_lengths(np.asarray(audio_seqlens, np.int64))
    media = _MediaQueue(
        images=_as_grids(image_grid_thw, "image_grid_thw"),
        videos=_as_grids(video_grid_thw, "video_grid_thw"),
        seconds_per_grid=None if seconds_per_grid is None else seconds_per_grid.reshape(-1),
        audio_lengths=None if audio_lengths is None else audio_lengths.reshape(-1),
    )
    positions = np.ones((3,) + input_ids.shape, np.int64)
    deltas = np.zeros(input_ids.shape[0], np.int64)
    for row in range(input_ids.shape[0]):
        real = attention_mask[row] == 1
        tokens = input_ids[row][real]
        row_positions = _RowLayout(tokens, row, media, config, use_audio_in_video).positions()
        positions[:, row, real] = row_positions
        deltas[row] = row_positions.max() + 1 - len(tokens)
    return positions.astype(np.int32), deltas.astype(np.int32)


def decode_position_ids(
    prompt_length: int, step: jax.Array | int, deltas: jax.Array, n_left_pad: jax.Array, *, num_tokens: int = 1
) -> jax.Array:
    """`[3, batch, num_tokens]` positions of generated tokens `step ... step + num_tokens - 1` (0-based).

    The token written at column `prompt_length + i` of a left-padded prompt of static length
    `prompt_length` gets `prompt_length + i + delta - n_left_pad` on all three axes: one past the last
    prompt position, since prompts end with text (reference doc §2.3). `deltas` and `n_left_pad` are
    `[batch]`; `step` may be traced.
    """
    offsets = jnp.asarray(step, jnp.int32) + jnp.arange(num_tokens, dtype=jnp.int32)
    base = jnp.asarray(deltas, jnp.int32) - jnp.asarray(n_left_pad, jnp.int32) + prompt_length
    positions = base[:, None] + offsets[None, :]
    return jnp.broadcast_to(positions[None], (3,) + positions.shape)


def _sequential_positions(attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's branch for batches without images or videos (text, audio): 1-D positions.

    The delta uses the row maximum including padded slots (which hold 1), as the reference does.
    """
    positions = np.where(attention_mask == 1, np.cumsum(attention_mask, axis=-1) - 1, 1)
    deltas = positions.max(axis=-1) + 1 - attention_mask.sum(axis=-1)
    return np.broadcast_to(positions[None], (3,) + positions.shape).astype(np.int32), deltas.astype(np.int32)


@dataclasses.dataclass
class _MediaQueue:
    """Per-modality media consumed in row-major order over the whole batch."""

    images: np.ndarray
    videos: np.ndarray
    seconds_per_grid: np.ndarray | None
    audio_lengths: np.ndarray | None
    next_image: int = 0
    next_video: int = 0
    next_audio: int = 0

    def take_image(self, row: int) -> np.ndarray:
        if self.next_image >= len(self.images):
            raise ValueError(
                f"image_grid_thw: row {row} holds image #{self.next_image} but only {len(self.images)} grids were given"
            )
        self.next_image += 1
        return self.images[self.next_image - 1]

    def take_video(self, row: int) -> tuple[np.ndarray, np.float32]:
        if self.next_video >= len(self.videos):
            raise ValueError(
                f"video_grid_thw: row {row} holds video #{self.next_video} but only {len(self.videos)} grids were given"
            )
        if self.seconds_per_grid is None or self.next_video >= len(self.seconds_per_grid):
            given = 0 if self.seconds_per_grid is None else len(self.seconds_per_grid)
            raise ValueError(
                f"video_second_per_grid: row {row} holds video #{self.next_video} but {given} values were given"
            )
        self.next_video += 1
        return self.videos[self.next_video - 1], self.seconds_per_grid[self.next_video - 1]

    def take_audio(self, row: int) -> int:
        if self.audio_lengths is None or self.next_audio >= len(self.audio_lengths):
            given = 0 if self.audio_lengths is None else len(self.audio_lengths)
            raise ValueError(f"audio_seqlens: row {row} holds audio #{self.next_audio} but {given} lengths were given")
        length = int(self.audio_lengths[self.next_audio])
        if length <= 0:
            raise ValueError(f"audio_seqlens: audio #{self.next_audio} is too short to give any audio token")
        self.next_audio += 1
        return length


class _RowLayout:
    """Walks one row's real tokens the way the reference does and collects `[3, n]` position segments."""

    def __init__(
        self, tokens: np.ndarray, row: int, media: _MediaQueue, config: PositionConfig, use_audio_in_video: bool
    ):
        self.tokens = tokens
        self.row = row
        self.media = media
        self.config = config
        self.use_audio_in_video = use_audio_in_video
        self.segments: list[np.ndarray] = []

    def positions(self) -> np.ndarray:
        cfg, tokens = self.config, self.tokens
        # Media counts as the reference takes them: an image / video is what follows <vision_bos>; with
        # audio in video a video is a <vision_bos> followed by <audio_bos>, and its audio counts as an audio.
        after_vision_start = tokens[np.flatnonzero(tokens[:-1] == cfg.vision_start_token_id) + 1]
        video_marker = cfg.audio_start_token_id if self.use_audio_in_video else cfg.video_token_id
        remaining = {
            "image": int(np.sum(after_vision_start == cfg.image_token_id)),
            "video": int(np.sum(after_vision_start == video_marker)),
            "audio": int(np.sum(tokens == cfg.audio_start_token_id)),
        }
        num_items = remaining["image"] + remaining["audio"] + (0 if self.use_audio_in_video else remaining["video"])
        placeholder = {"image": cfg.image_token_id, "video": cfg.video_token_id, "audio": cfg.audio_token_id}

        cursor = 0
        for _ in range(num_items):
            found = {
                kind: self._find(placeholder[kind], cursor) if remaining[kind] > 0 else len(tokens) + 1
                for kind in ("audio", "image", "video")
            }
            kind = min(found, key=found.get)  # the next media item of any kind still announced
            if found[kind] > len(tokens):
                raise ValueError(
                    f"input_ids row {self.row}: start tokens announce more media ({remaining} left) than there are "
                    f"placeholders after column {cursor} of the unpadded row"
                )
            if kind == "video" and self.use_audio_in_video:
                cursor = self._video_with_audio(cursor, found[kind])
                remaining["audio"] -= 1
            elif kind == "audio":
                cursor = self._audio(cursor, found[kind])
            else:
                cursor = self._vision(kind, cursor, found[kind])
            remaining[kind] -= 1

        if cursor < len(tokens):
            self._append_text(len(tokens) - cursor)
        if not self.segments:
            raise ValueError(f"attention_mask row {self.row}: no real token in the row")
        positions = np.concatenate(self.segments, axis=1)
        if positions.shape[1] != len(tokens):
            raise ValueError(
                f"input_ids row {self.row}: the media layout covers {positions.shape[1]} tokens but the row has "
                f"{len(tokens)} real tokens (a placeholder run is longer or shorter than its grid / audio length)"
            )
        return positions

    def _find(self, token_id: int, start: int) -> int:
        hits = np.flatnonzero(self.tokens[start:] == token_id)
        return start + int(hits[0]) if hits.size else len(self.tokens) + 1

    def _next_start(self) -> int:
        # The reference continues from the last segment's maximum, not the running maximum.
        return int(self.segments[-1].max()) + 1 if self.segments else 0

    def _append_text(self, length: int, *, start: int | None = None) -> None:
        start = self._next_start() if start is None else start
        self.segments.append(np.broadcast_to(np.arange(length, dtype=np.int64) + start, (3, length)))

    def _text_before(self, cursor: int, first_placeholder: int, num_start_tokens: int) -> int:
        length = first_placeholder - cursor - num_start_tokens
        if length < 0:
            raise ValueError(
                f"input_ids row {self.row}: the placeholder at column {first_placeholder} of the unpadded row is not "
                f"preceded by its {num_start_tokens} start token(s)"
            )
        if length:
            self._append_text(length)
        return length

    def _check_run(self, start: int, length: int, token_id: int, what: str) -> None:
        run = self.tokens[start : start + length]
        if (
            len(run) != length
            or np.any(run != token_id)
            or (start + length < len(self.tokens) and self.tokens[start + length] == token_id)
        ):
            actual = int(np.sum(np.cumprod(self.tokens[start:] == token_id)))
            raise ValueError(
                f"input_ids row {self.row}: {what} needs {length} consecutive placeholder tokens (id {token_id}) "
                f"at column {start} of the unpadded row, found {actual}"
            )

    def _audio(self, cursor: int, first: int) -> int:
        text = self._text_before(cursor, first, 1)
        self._append_text(1)  # <audio_bos>
        index = self.media.next_audio
        length = self.media.take_audio(self.row)
        self._check_run(first, length, self.config.audio_token_id, f"audio #{index}")
        self._append_text(length)
        self._append_text(1)  # <audio_eos>
        return cursor + text + 1 + length + 1

    def _vision(self, kind: str, cursor: int, first: int) -> int:
        text = self._text_before(cursor, first, 1)
        self._append_text(1)  # <vision_bos>
        if kind == "image":
            index = self.media.next_image
            grid, seconds_per_grid = self.media.take_image(self.row), None
            token_id = self.config.image_token_id
        else:
            index = self.media.next_video
            grid, seconds_per_grid = self.media.take_video(self.row)
            token_id = self.config.video_token_id
        grid_positions = self._grid(grid, seconds_per_grid, self._next_start())
        self._check_run(first, grid_positions.shape[1], token_id, f"{kind} #{index} (grid {grid.tolist()})")
        self.segments.append(grid_positions)
        self._append_text(1)  # <vision_eos>
        return cursor + text + 1 + grid_positions.shape[1] + 1

    def _video_with_audio(self, cursor: int, first: int) -> int:
        text = self._text_before(cursor, first, 2)
        bos = self._next_start()
        self._append_text(1, start=bos)  # <vision_bos> and <audio_bos> share one position
        self._append_text(1, start=bos)
        start = bos + 1
        grid, seconds_per_grid = self.media.take_video(self.row)
        video_index = self.media.next_video - 1
        video = self._grid(grid, seconds_per_grid, start)
        num_audio = self.media.take_audio(self.row)
        audio = np.broadcast_to(np.arange(num_audio, dtype=np.int64) + start, (3, num_audio))

        span = self.tokens[first : first + video.shape[1] + num_audio]
        counts = (int(np.sum(span == self.config.video_token_id)), int(np.sum(span == self.config.audio_token_id)))
        if counts != (video.shape[1], num_audio):
            raise ValueError(
                f"input_ids row {self.row}: video #{video_index} with its audio needs {video.shape[1]} video and "
                f"{num_audio} audio placeholders after column {first} of the unpadded row, "
                f"found {counts[0]} and {counts[1]}"
            )

        tokens_per_chunk = self.config.position_id_per_seconds * self.config.seconds_per_chunk
        video_chunks = _chunk_bounds(video[0] - start, tokens_per_chunk)
        audio_chunks = _chunk_bounds(audio[0] - start, tokens_per_chunk)
        for j in range(max(len(video_chunks), len(audio_chunks))):
            if j < len(video_chunks):
                self.segments.append(video[:, slice(*video_chunks[j])])
            if j < len(audio_chunks):
                self.segments.append(audio[:, slice(*audio_chunks[j])])

        eos = self._next_start()
        self._append_text(1, start=eos)  # <audio_eos> and <vision_eos> share one position
        self._append_text(1, start=eos)
        return cursor + text + 2 + video.shape[1] + num_audio + 2

    def _grid(self, grid: np.ndarray, seconds_per_grid: np.float32 | None, start: int) -> np.ndarray:
        """`[3, t * h * w / merge**2]` positions of one image / video, merged patches in (t, h, w) order."""
        merge = self.config.spatial_merge_size
        grid_t, grid_h, grid_w = (int(v) for v in grid)
        if grid_h % merge or grid_w % merge:
            raise ValueError(f"grid {grid.tolist()}: height and width must be multiples of spatial_merge_size {merge}")
        rows, cols = grid_h // merge, grid_w // merge
        if seconds_per_grid is None:  # image: one time step per temporal patch
            t = np.arange(grid_t, dtype=np.int64) * self.config.position_id_per_seconds
        else:
            # float32 and truncation, bit for bit what the reference computes.
            seconds = np.arange(grid_t, dtype=np.float32) * np.float32(seconds_per_grid)
            t = (seconds * np.float32(self.config.position_id_per_seconds)).astype(np.int64)
        t_ids = np.repeat(t, rows * cols)
        h_ids = np.tile(np.repeat(np.arange(rows, dtype=np.int64), cols), grid_t)
        w_ids = np.tile(np.arange(cols, dtype=np.int64), grid_t * rows)
        return np.stack([t_ids, h_ids, w_ids]) + start


def _chunk_bounds(time_ids: np.ndarray, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """The reference's `get_chunked_index`: `[start, end)` slices of a non-decreasing id list.

    A boundary is placed at the first id reaching the next multiple of `tokens_per_chunk`, and the
    threshold then moves up by one chunk only, so a gap wider than a chunk splits the ids after it one
    token at a time, exactly as the reference (and the processor's placeholder layout) does.
    """
    bounds, start, chunk = [], 0, 1
    for i, value in enumerate(time_ids.tolist()):
        if value >= chunk * tokens_per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(time_ids)))
    return bounds


def _as_int_matrix(value: Any, name: str, *, binary: bool = False) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{name}: expected an integer array [batch, seq], got dtype {array.dtype} shape {array.shape}")
    array = array.astype(np.int64)
    if binary and np.any((array != 0) & (array != 1)):
        raise ValueError(f"{name}: expected only 0 and 1, got values {np.unique(array).tolist()}")
    return array


def _as_grids(value: Any, name: str) -> np.ndarray:
    if value is None:
        return np.zeros((0, 3), np.int64)
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [num_items, 3] (t, h, w), got {array.shape}")
    return array.astype(np.int64)
