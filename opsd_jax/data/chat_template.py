"""Prompts in the checkpoint's own chat template, with every medium's placeholder tokens expanded, tokenized
into static left-padded batches.

The text skeleton is what the checkpoint's chat template renders (`tokenizer.apply_chat_template`, from its
`chat_template.jinja` or `tokenizer_config.json`), each media part a content item `{"type": "image" |
"video" | "audio"}`, as the Qwen2.5-Omni processor renders a conversation. Then, as the processor does,
each medium's one placeholder token in that text is replaced, in order, by its expansion. With
Qwen2.5-Omni's template the result is

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{parts}<|im_end|>\\n<|im_start|>assistant\\n

image  `<|vision_bos|>` + `<|IMAGE|>` x t*h*w/4 + `<|vision_eos|>`     (grid in 14-pixel patches)
video  `<|vision_bos|>` + `<|VIDEO|>` x t*h*w/4 + `<|vision_eos|>`
audio  `<|audio_bos|>` + `<|AUDIO|>` x n + `<|audio_eos|>`             (n from the mel frame count)
video with its own audio track (`use_audio_in_video`):
       `<|vision_bos|><|audio_bos|>` V-chunk0 A-chunk0 V-chunk1 A-chunk1 ... `<|audio_eos|><|vision_eos|>`
       where chunk j holds the tokens whose temporal position id (25 per second) falls in the j-th
       2-second window, split exactly as the processor's `get_chunked_index` splits them.

(the vision / audio delimiters around a medium come from the template, the runs between them from here).
Each placeholder receives one encoder output row, so the counts here must equal the encoders' output
lengths; the model checks the image and video counts, the audio count only this module guarantees.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opsd_jax.models.audio import audio_output_lengths

# The default system prompt of Qwen2.5-Omni's chat template (which adds it when a conversation has none).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The system prompt Qwen recommends for Qwen2.5-Omni (required there for speech output).
QWEN_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)
SPATIAL_MERGE_SIZE = 2
POSITION_ID_PER_SECONDS = 25
SECONDS_PER_CHUNK = 2.0
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The placeholder and delimiter strings (read off the tokenizer, as the processor does)."""

    image: str = "<|IMAGE|>"
    video: str = "<|VIDEO|>"
    audio: str = "<|AUDIO|>"
    vision_bos: str = "<|vision_bos|>"
    vision_eos: str = "<|vision_eos|>"
    audio_bos: str = "<|audio_bos|>"
    audio_eos: str = "<|audio_eos|>"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        defaults = cls()
        names = {
            field.name: getattr(tokenizer, f"{field.name}_token", None) or getattr(defaults, field.name)
            for field in dataclasses.fields(cls)
        }
        return cls(**names)


def _grid(value: Sequence[int], name: str) -> tuple[int, int, int]:
    grid = tuple(int(v) for v in np.asarray(value).reshape(-1))
    if len(grid) != 3 or min(grid) < 1 or grid[1] % SPATIAL_MERGE_SIZE or grid[2] % SPATIAL_MERGE_SIZE:
        raise ValueError(
            f"{name} must be (t, h, w) positive with h, w multiples of {SPATIAL_MERGE_SIZE}, "
            f"got {tuple(np.asarray(value).reshape(-1).tolist())}"
        )
    return grid


@dataclasses.dataclass(frozen=True)
class ImagePart:
    """An image of `grid_thw` patches (a row of `image_grid_thw`)."""

    grid_thw: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "grid_thw", _grid(self.grid_thw, "ImagePart.grid_thw"))


@dataclasses.dataclass(frozen=True)
class VideoPart:
    """A video of `grid_thw` patches, `second_per_grid` seconds per temporal patch (`2 / sample_fps`; pass the
    Python float, as the processor does), and optionally the mel frame count of its own audio track, which
    is then interleaved with the frames (`use_audio_in_video=True`)."""

    grid_thw: tuple[int, int, int]
    second_per_grid: float = 1.0
    audio_feature_length: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "grid_thw", _grid(self.grid_thw, "VideoPart.grid_thw"))
        if not float(self.second_per_grid) > 0:
            raise ValueError(f"VideoPart.second_per_grid must be positive, got {self.second_per_grid}")
        if self.audio_feature_length is not None and int(self.audio_feature_length) < 1:
            raise ValueError(f"VideoPart.audio_feature_length must be >= 1 mel frame, got {self.audio_feature_length}")


@dataclasses.dataclass(frozen=True)
class AudioPart:
    """An audio of `feature_length` valid mel frames (a row sum of `feature_attention_mask`)."""

    feature_length: int

    def __post_init__(self):
        if int(self.feature_length) < 1:
            raise ValueError(f"AudioPart.feature_length must be >= 1 mel frame, got {self.feature_length}")


Part = str | ImagePart | VideoPart | AudioPart


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn: a role and either plain text or a sequence of parts rendered in order."""

    role: str
    content: str | Sequence[Part]

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Message.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            object.__setattr__(self, "content", tuple(self.content))
            for index, part in enumerate(self.content):
                if not isinstance(part, (str, ImagePart, VideoPart, AudioPart)):
                    raise TypeError(
                        f"Message.content[{index}] must be str, ImagePart, VideoPart or AudioPart, "
                        f"got {type(part).__name__}"
                    )


def vision_token_count(grid_thw: Sequence[int]) -> int:
    """Placeholders of an image or video: one per 2x2 merge block, `t * h * w / 4`."""
    t, h, w = grid_thw
    return t * h * w // SPATIAL_MERGE_SIZE**2


def audio_token_count(feature_length: int) -> int:
    """Placeholders of an audio of `feature_length` mel frames (the audio encoder's output length)."""
    return int(audio_output_lengths(feature_length))


def _chunk_sizes(time_ids: np.ndarray, tokens_per_chunk: int) -> list[int]:
    """Token counts of the processor's `get_chunked_index` chunks over non-decreasing `time_ids`.

    A chunk ends at the first id reaching the next multiple of `tokens_per_chunk`, and the threshold then
    moves up by one chunk only: after a gap wider than a chunk the processor starts a new chunk at every
    following token until the threshold catches up, and this reproduces that.
    """
    sizes, start, chunk = [], 0, 1
    for index, value in enumerate(time_ids.tolist()):
        if value >= chunk * tokens_per_chunk:
            sizes.append(index - start)
            start, chunk = index, chunk + 1
    sizes.append(len(time_ids) - start)
    return sizes


def audio_in_video_runs(
    video: VideoPart,
    *,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    seconds_per_chunk: float = SECONDS_PER_CHUNK,
) -> list[tuple[str, int]]:
    """The interleaved placeholder runs of a video with its audio: `[("video", n0), ("audio", m0), ...]`.

    Video tokens carry the temporal id `k * second_per_grid * 25` of their temporal patch k, audio token i
    the id i; both streams are cut into chunks of `25 * 2` ids and chunk j of the video precedes chunk j
    of the audio. Empty runs are left out.
    """
    if video.audio_feature_length is None:
        raise ValueError("audio_in_video_runs needs a VideoPart with audio_feature_length")
    t, h, w = video.grid_thw
    per_frame = (h // SPATIAL_MERGE_SIZE) * (w // SPATIAL_MERGE_SIZE)
    # Same operation order as the processor (k * seconds * rate) so float rounding lands the same side.
    video_ids = np.repeat(np.arange(t) * float(video.second_per_grid) * position_id_per_seconds, per_frame)
    audio_ids = np.arange(audio_token_count(video.audio_feature_length))
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    video_chunks = _chunk_sizes(video_ids, tokens_per_chunk)
    audio_chunks = _chunk_sizes(audio_ids, tokens_per_chunk)
    runs = []
    for index in range(max(len(video_chunks), len(audio_chunks))):
        if index < len(video_chunks) and video_chunks[index]:
            runs.append(("video", video_chunks[index]))
        if index < len(audio_chunks) and audio_chunks[index]:
            runs.append(("audio", audio_chunks[index]))
    return runs


def placeholder_expansion(
    part: ImagePart | VideoPart | AudioPart,
    tokens: SpecialTokens = SpecialTokens(),
    *,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    seconds_per_chunk: float = SECONDS_PER_CHUNK,
) -> str:
    """What replaces a medium's one placeholder token in the template's text (the processor's
    `replace_*_token`): the placeholder once per encoder row; a video with its own audio becomes
    `<|audio_bos|>` + the interleaved runs + `<|audio_eos|>`, inside the template's vision delimiters."""
    if isinstance(part, ImagePart):
        return tokens.image * vision_token_count(part.grid_thw)
    if isinstance(part, AudioPart):
        return tokens.audio * audio_token_count(part.feature_length)
    if isinstance(part, VideoPart):
        if part.audio_feature_length is None:
            return tokens.video * vision_token_count(part.grid_thw)
        runs = audio_in_video_runs(
            part, position_id_per_seconds=position_id_per_seconds, seconds_per_chunk=seconds_per_chunk
        )
        body = "".join((tokens.video if kind == "video" else tokens.audio) * count for kind, count in runs)
        return tokens.audio_bos + body + tokens.audio_eos
    raise TypeError(f"a media part must be ImagePart, VideoPart or AudioPart, got {type(part).__name__}")


def render_part(
    part: Part,
    tokens: SpecialTokens = SpecialTokens(),
    *,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    seconds_per_chunk: float = SECONDS_PER_CHUNK,
) -> str:
    """One content part as Qwen2.5-Omni's template renders it (its delimiters), placeholders expanded."""
    if isinstance(part, str):
        return part
    expansion = placeholder_expansion(
        part, tokens, position_id_per_seconds=position_id_per_seconds, seconds_per_chunk=seconds_per_chunk
    )
    if isinstance(part, AudioPart):
        return tokens.audio_bos + expansion + tokens.audio_eos
    return tokens.vision_bos + expansion + tokens.vision_eos


MEDIA_KINDS = {ImagePart: "image", VideoPart: "video", AudioPart: "audio"}


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """A conversation as chat templates read it: `{"role", "content"}` with plain text, or a list of
    `{"type": "text", "text": ...}` and `{"type": "image" | "video" | "audio"}` items."""
    out = []
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        else:
            out.append(
                {
                    "role": message.role,
                    "content": [
                        {"type": "text", "text": part} if isinstance(part, str) else {"type": MEDIA_KINDS[type(part)]}
                        for part in message.content
                    ],
                }
            )
    return out


def expand_placeholders(
    text: str,
    messages: Sequence[Message],
    tokens: SpecialTokens = SpecialTokens(),
    *,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    seconds_per_chunk: float = SECONDS_PER_CHUNK,
    template_name: str = "the chat template",
) -> str:
    """`text` (a rendered chat template) with the k-th image / video / audio placeholder replaced by the
    expansion of the conversation's k-th part of that kind, in one pass (as the processor's
    `get_text_with_replacements`). A template that renders another number of placeholders than the
    conversation has media is an error naming `template_name`."""
    queues: dict[str, list[Part]] = {"image": [], "video": [], "audio": []}
    for message in messages:
        for part in () if isinstance(message.content, str) else message.content:
            if not isinstance(part, str):
                queues[MEDIA_KINDS[type(part)]].append(part)
    placeholders = {tokens.image: "image", tokens.video: "video", tokens.audio: "audio"}
    pattern = re.compile("|".join(re.escape(token) for token in placeholders))
    matches = [placeholders[match.group(0)] for match in pattern.finditer(text)]
    for kind, parts in queues.items():
        if matches.count(kind) != len(parts):
            raise ValueError(
                f"{template_name} renders {matches.count(kind)} {kind} placeholder(s) for the "
                f"conversation's {len(parts)} {kind} part(s); expected one {getattr(tokens, kind)!r} each"
            )
    remaining = {kind: iter(parts) for kind, parts in queues.items()}

    def replace(match: re.Match) -> str:
        return placeholder_expansion(
            next(remaining[placeholders[match.group(0)]]),
            tokens,
            position_id_per_seconds=position_id_per_seconds,
            seconds_per_chunk=seconds_per_chunk,
        )

    return pattern.sub(replace, text)


def user_prompt(parts: Sequence[Part], *, system_prompt: str | None = None) -> list[Message]:
    """A one-turn conversation: an optional system message and a user message of `parts`."""
    system = [Message("system", system_prompt)] if system_prompt is not None else []
    return [*system, Message("user", tuple(parts))]


# Any of these makes a directory's tokenizer loadable (`AutoTokenizer.from_pretrained`).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def check_tokenizer_directory(directory: str | Path) -> None:
    """Raises `FileNotFoundError` naming `directory` when it holds no tokenizer (without this, transformers
    asks to install sentencepiece or tiktoken: the wrong remedy)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"checkpoint directory {directory} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy them "
            "from the base model, or export with `opsd-jax export --tokenizer-dir`"
        )


class PromptBuilder:
    """Renders conversations with a checkpoint's chat template and tokenizes them with its tokenizer into
    static batches."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
        seconds_per_chunk: float = SECONDS_PER_CHUNK,
        source: str = "the tokenizer",
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{source} has no chat template (chat_template.jinja, or 'chat_template' in "
                f"tokenizer_config.json); copy the base model's"
            )
        self.tokenizer = tokenizer
        self.source = source
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.position_id_per_seconds = position_id_per_seconds
        self.seconds_per_chunk = seconds_per_chunk
        self.token_ids = {name: self._single_token_id(text) for name, text in dataclasses.asdict(self.tokens).items()}
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; left padding needs one")
        self.pad_token_id = int(tokenizer.pad_token_id)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> PromptBuilder:
        """The tokenizer of a checkpoint directory (`AutoTokenizer.from_pretrained`), offline."""
        from transformers import AutoTokenizer  # slow to import; only loading a tokenizer needs it

        check_tokenizer_directory(directory)
        return cls(
            AutoTokenizer.from_pretrained(Path(directory), local_files_only=True),
            source=f"checkpoint directory {directory}",
            **kwargs,
        )

    def _single_token_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"the tokenizer splits the special token {text!r} into {len(ids)} tokens {ids}; "
                f"expected one (is it registered as a special token?)"
            )
        return int(ids[0])

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template applied to `messages`, media placeholders expanded."""
        if not messages:
            raise ValueError("render needs at least one message")
        text = self.tokenizer.apply_chat_template(
            template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return expand_placeholders(
            text,
            messages,
            self.tokens,
            position_id_per_seconds=self.position_id_per_seconds,
            seconds_per_chunk=self.seconds_per_chunk,
            template_name=f"the chat template of {self.source}",
        )

    def encode(self, texts: Sequence[str], *, length: int | None) -> dict[str, np.ndarray]:
        """Rendered texts -> `input_ids [B, length]` int32 (left-padded with the pad id) and
        `attention_mask [B, length]` int32. A text longer than `length` tokens is an error; `length=None`
        takes the longest text's length (a dynamic shape: use a bucket for jitted consumers)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts; wrap a single text in a list")
        encoded = [self.tokenizer(text)["input_ids"] for text in texts]
        if length is None:
            length = max(len(ids) for ids in encoded)
        input_ids = np.full((len(texts), length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(texts), length), np.int32)
        for row, (text, ids) in enumerate(zip(texts, encoded)):
            if len(ids) > length:
                raise ValueError(f"prompt {row} has {len(ids)} tokens, more than the length bucket {length}")
            for name in ("image", "video", "audio"):
                expected = text.count(getattr(self.tokens, name))
                if ids.count(self.token_ids[name]) != expected:
                    raise ValueError(
                        f"prompt {row}: {ids.count(self.token_ids[name])} {name} token ids for "
                        f"{expected} placeholders in the text"
                    )
            if ids:
                input_ids[row, length - len(ids) :] = ids
                attention_mask[row, length - len(ids) :] = 1
        return dict(input_ids=input_ids, attention_mask=attention_mask)

    def __call__(
        self, conversations: Sequence[Sequence[Message]], *, length: int | None, add_generation_prompt: bool = True
    ) -> dict[str, np.ndarray]:
        """A batch of conversations -> left-padded `input_ids` / `attention_mask` of `length` columns."""
        return self.encode(
            [self.render(messages, add_generation_prompt=add_generation_prompt) for messages in conversations],
            length=length,
        )
