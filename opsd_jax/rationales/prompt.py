"""The evidence-aware rationale prompt: what the frontier model sees for one clip and what it is asked.

The frontier model receives one user message whose content is, in order:

1. `num_frames` video frames sampled evenly from the clip, each a JPEG (longest side at most `max_side`)
   sent as an OpenAI `image_url` part holding a `data:image/jpeg;base64,...` URL;
2. optionally the clip's audio, as an `input_audio` part (16-bit PCM WAV, base64), for endpoints whose
   model hears audio; most vision endpoints accept no audio, so it is off by default;
3. the text `RATIONALE_PROMPT`, filled per clip.

`RATIONALE_PROMPT` shows the model the transcript and the TRUE label of the clip and asks for a short
rationale that names the observable cues supporting that label, from

* the face: facial expression, gaze, head and body movement;
* the voice: pitch, energy, tempo and tone; when no audio is sent, only as far as the words and the
  visible speaking behaviour imply them, never claiming to have heard it;
* the words: the phrases of the transcript that support the label,

with no invented facts, no hint that the label was given (the rationale later sits in the teacher's
prompt as evidence, and "the label says X" would teach the teacher nothing about the clip), in English,
as one paragraph of at most `max_words` words. Its fields:

| field          | filled with                                                                         |
|----------------|--------------------------------------------------------------------------------------|
| `num_frames`   | the number of frames attached                                                         |
| `audio_clause` | ", with its audio attached" when audio is sent, else ", without audio"               |
| `transcript`   | the subtitle in double quotes, or a note that the clip has no transcript              |
| `label_kind`   | task-aware: "emotion" (basic), "emotions" (fine_grained), "sentiment" (sentiment)    |
| `label_text`   | the label: `angry`; `happy, relieved`; `positive (+1.5 on a scale from -3 ... to +3 ...)` |
| `task_focus`   | what a good rationale accounts for, per task (see `TASK_FOCUS`)                       |
| `voice_cues`   | `VOICE_CUES_WITH_AUDIO` or `VOICE_CUES_WITHOUT_AUDIO`                                 |
| `word_cues`    | `WORD_CUES` or, with an empty transcript, `NO_WORD_CUES`                              |
| `max_words`    | the length bound (answers are also checked against it, with slack, in `generate.py`)  |

`PROMPT_SHA` (a short hash of every template here) is stored with each rationale, so a file records
which wording produced it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import wave
from typing import Any

import numpy as np
from PIL import Image

from opsd_jax.data.audio_features import SAMPLING_RATE
from opsd_jax.data.converters import LAYOUTS
from opsd_jax.data.manifest import Clip

RATIONALE_PROMPT = """\
You are an expert in affective computing. Above are {num_frames} frames sampled evenly, in order, from a \
video clip of a person{audio_clause}. Transcript of what the person says: {transcript}
The clip's {label_kind}: {label_text}.

Write an evidence-aware rationale for this {label_kind}: explain which observable cues in the clip support \
it. {task_focus}
Cover, where the clip shows them:
- the face: facial expression, gaze, head and body movement;
- the voice: {voice_cues};
- the words: {word_cues}.

Rules:
- Name only cues that are really in this clip. Do not invent events, context, names or backstory; leave a \
cue out when it is absent or unclear.
- Reason as if you had read the {label_kind} off the evidence yourself: never say or imply that it was \
given to you, and do not use the words "label", "annotation" or "ground truth".
- Explain the cues; do not just restate the {label_kind}.
- Write in English, as one plain paragraph of at most {max_words} words: no headings, no lists, no preamble."""

TASK_FOCUS = {
    "basic": "It is one basic emotion category: point out the cues that set it apart from similar emotions.",
    "fine_grained": "They are open-vocabulary emotion words that may co-occur: account for each of them.",
    "sentiment": "It is the overall valence of what the person expresses: explain both its polarity and its strength.",
}
LABEL_KIND = {"basic": "emotion", "fine_grained": "emotions", "sentiment": "sentiment"}
VOICE_CUES_WITH_AUDIO = "pitch, energy, tempo and tone of voice, as heard in the attached audio"
VOICE_CUES_WITHOUT_AUDIO = (
    "pitch, energy, tempo and tone; no audio is attached, so describe the voice only as far as the words and "
    "the visible speaking behaviour imply it (an exclamation, a wide-open mouth), and never claim to have heard it"
)
WORD_CUES = "the phrases of the transcript that support it, quoted briefly"
NO_WORD_CUES = "the clip has no transcript, so do not attribute any words to the person"
NO_TRANSCRIPT = "(none: the clip has no transcript)"

PROMPT_SHA = hashlib.sha256(
    "\x00".join(
        [
            RATIONALE_PROMPT,
            *TASK_FOCUS.values(),
            *LABEL_KIND.values(),
            VOICE_CUES_WITH_AUDIO,
            VOICE_CUES_WITHOUT_AUDIO,
            WORD_CUES,
            NO_WORD_CUES,
            NO_TRANSCRIPT,
        ]
    ).encode()
).hexdigest()[:12]

IMAGE_DETAILS = ("low", "high", "auto")


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """How a clip becomes a request: frame encoding, the length bound asked for, audio."""

    max_words: int = 120
    max_side: int = 512  # longest side of each JPEG frame, in pixels
    jpeg_quality: int = 85
    image_detail: str | None = None  # OpenAI's `detail` of each image part; None leaves it to the server
    max_audio_seconds: float = 30.0  # audio beyond this is cut (request size)

    def __post_init__(self):
        if self.max_words < 10:
            raise ValueError(f"max_words: expected at least 10, got {self.max_words}")
        if self.max_side < 16:
            raise ValueError(f"max_side: expected at least 16 pixels, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality: expected 1..95, got {self.jpeg_quality}")
        if self.image_detail is not None and self.image_detail not in IMAGE_DETAILS:
            raise ValueError(
                f"image_detail: expected one of {', '.join(IMAGE_DETAILS)} or None, got {self.image_detail!r}"
            )
        if self.max_audio_seconds <= 0:
            raise ValueError(f"max_audio_seconds: expected a positive number, got {self.max_audio_seconds}")


@dataclasses.dataclass(frozen=True)
class LabelText:
    kind: str  # "emotion", "emotions" or "sentiment": how the prompt names the label
    text: str  # the label as the prompt shows it
    words: tuple[str, ...]  # the label's own words (an answer made only of these is a copy of the label)


def describe_label(clip: Clip) -> LabelText:
    """The clip's true label as the prompt words it, for its task."""
    kind = LABEL_KIND[clip.task]
    if clip.task == "basic":
        return LabelText(kind, clip.label, (clip.label,))
    if clip.task == "fine_grained":
        return LabelText(kind, ", ".join(clip.labels), clip.labels)
    value = clip.sentiment
    polarity = "positive" if value > 0 else "negative" if value < 0 else "neutral"
    layout = LAYOUTS.get(clip.dataset)
    if layout is not None and layout.sentiment_range is not None:
        low, high = layout.sentiment_range
        scale = f"on a scale from {low:+g}, most negative, to {high:+g}, most positive"
    else:
        scale = "where the sign gives the polarity"
    return LabelText(kind, f"{polarity} ({value:+g} {scale})", (polarity,))


def rationale_prompt(clip: Clip, *, num_frames: int, with_audio: bool, max_words: int) -> str:
    """`RATIONALE_PROMPT` filled for `clip` (see the module docstring for each field)."""
    label = describe_label(clip)
    subtitle = clip.subtitle.strip()
    return RATIONALE_PROMPT.format(
        num_frames=num_frames,
        audio_clause=", with its audio attached" if with_audio else ", without audio",
        transcript=f'"{subtitle}"' if subtitle else NO_TRANSCRIPT,
        label_kind=label.kind,
        label_text=label.text,
        task_focus=TASK_FOCUS[clip.task],
        voice_cues=VOICE_CUES_WITH_AUDIO if with_audio else VOICE_CUES_WITHOUT_AUDIO,
        word_cues=WORD_CUES if subtitle else NO_WORD_CUES,
        max_words=max_words,
    )


def encode_jpeg(frame: np.ndarray, *, max_side: int, quality: int) -> str:
    """`[H, W, 3]` uint8 RGB -> base64 JPEG, shrunk (aspect kept) so its longest side is at most `max_side`."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame: expected uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    image = Image.fromarray(frame)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # only ever shrinks
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_wav(audio: np.ndarray, *, sampling_rate: int = SAMPLING_RATE) -> str:
    """`[samples]` float32 mono in [-1, 1] -> base64 16-bit PCM WAV."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio: expected a non-empty [samples] array, got shape {audio.shape}")
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sampling_rate)
        writer.writeframes(pcm.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(
    clip: Clip,
    frames: np.ndarray,
    options: PromptOptions = PromptOptions(),
    *,
    audio: np.ndarray | None = None,
    sampling_rate: int = SAMPLING_RATE,
) -> list[dict[str, Any]]:
    """The chat `messages` asking for `clip`'s rationale: one user message with the frames, the audio
    (when given; cut to `options.max_audio_seconds`) and the filled `RATIONALE_PROMPT`.

    Args:
      frames: `[T, H, W, 3]` uint8 RGB, T >= 1, in time order.
      audio: `[samples]` float32 mono at `sampling_rate`, or None to send no audio.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"frames: expected [T >= 1, H, W, 3], got shape {frames.shape}")
    content: list[dict[str, Any]] = []
    for frame in frames:
        jpeg = encode_jpeg(frame, max_side=options.max_side, quality=options.jpeg_quality)
        image_url: dict[str, Any] = {"url": "data:image/jpeg;base64," + jpeg}
        if options.image_detail is not None:
            image_url["detail"] = options.image_detail
        content.append({"type": "image_url", "image_url": image_url})
    if audio is not None:
        audio = np.asarray(audio)[: int(options.max_audio_seconds * sampling_rate)]
        wav = encode_wav(audio, sampling_rate=sampling_rate)
        content.append({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})
    text = rationale_prompt(clip, num_frames=len(frames), with_audio=audio is not None, max_words=options.max_words)
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]
