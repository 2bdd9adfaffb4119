"""Student and teacher prompts: the same conversation, the teacher's with a privileged-evidence block.

Both prompts come from one function (`conversation`) so that they can differ only where intended: a
chat-template mismatch between sampler and scorer silently breaks on-policy distillation. The teacher's
block is written from a template with a `{rationale}` field, placed before the instruction, after it,
or in the system message. Both prompts are left-padded to the same static length bucket, so that a
completion appended to either sits at the same columns.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from opsd_jax.data.chat_template import (
    DEFAULT_SYSTEM_PROMPT,
    AudioPart,
    Message,
    Part,
    PromptBuilder,
    VideoPart,
    user_prompt,
)
from opsd_jax.settings import ConfigError

DEFAULT_INSTRUCTION = (
    "As an expert in emotion analysis, identify the emotional state of the person in this clip from their "
    "face, voice and words. Reason briefly, then give the emotion in <answer></answer> tags."
)
DEFAULT_PRIVILEGED_TEMPLATE = (
    "Reference analysis of this clip (the evidence from face, voice and words that supports its emotion):\n"
    "{rationale}\n"
    "Understand this evidence rather than copying it, and answer in your own words."
)
DEFAULT_SUBTITLE_TEMPLATE = 'Subtitle: "{subtitle}"'


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """The wording of both prompts and the place of the privileged block."""

    instruction: str = DEFAULT_INSTRUCTION
    subtitle_template: str = DEFAULT_SUBTITLE_TEMPLATE
    privileged_template: str = DEFAULT_PRIVILEGED_TEMPLATE
    privileged_position: Literal["before_instruction", "after_instruction", "system"] = "before_instruction"
    system_prompt: str | None = None
    # The reference answer of the supervised ablations and the warm start (`{label}` is the label).
    answer_template: str = "<answer>{label}</answer>"

    def validate(self, num_devices: int | None = None) -> None:
        del num_devices
        if "{rationale}" not in self.privileged_template:
            raise ConfigError("prompt.privileged_template: must contain the field {rationale}")
        if "{subtitle}" not in self.subtitle_template:
            raise ConfigError("prompt.subtitle_template: must contain the field {subtitle}")
        if "{label}" not in self.answer_template:
            raise ConfigError("prompt.answer_template: must contain the field {label}")
        if self.privileged_position not in ("before_instruction", "after_instruction", "system"):
            raise ConfigError(
                "prompt.privileged_position: expected before_instruction, after_instruction or system, "
                f"got {self.privileged_position!r}"
            )


def conversation(
    media: Sequence[Part], subtitle: str, config: PromptConfig, *, rationale: str | None = None
) -> list[Message]:
    """The chat of one clip: media parts, the subtitle, the instruction; with `rationale`, the teacher's.

    Args:
      media: the clip's placeholder parts (`VideoPart`, `AudioPart`, `ImagePart`), in prompt order.
      subtitle: what is said in the clip ("" for none).
      rationale: the privileged evidence; None renders the student's prompt.
    """
    texts: list[str] = []
    if subtitle:
        texts.append(config.subtitle_template.format(subtitle=subtitle))
    block = None if rationale is None else config.privileged_template.format(rationale=rationale)
    if block is not None and config.privileged_position == "before_instruction":
        texts.append(block)
    texts.append(config.instruction)
    if block is not None and config.privileged_position == "after_instruction":
        texts.append(block)
    system = config.system_prompt
    if block is not None and config.privileged_position == "system":
        system = f"{system or DEFAULT_SYSTEM_PROMPT}\n\n{block}"
    return user_prompt([*media, "\n".join(texts)], system_prompt=system)


def encode_prompt_pairs(
    builder: PromptBuilder,
    media: Sequence[Sequence[Part]],
    subtitles: Sequence[str],
    rationales: Sequence[str],
    config: PromptConfig,
    *,
    length: int,
    teacher_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Student and teacher prompts of a batch, left-padded to `length` / `teacher_length` tokens.

    With one length (the default) a completion appended to either prompt sits at the same columns;
    a shorter student bucket saves the student's forward and the sampler's prefill the teacher's
    extra context (the scorer slices each side at its own prompt length).

    Returns:
      `student_input_ids`, `student_attention_mask` `[batch, length]` and `teacher_input_ids`,
      `teacher_attention_mask` `[batch, teacher_length]`, int32. An error names the clip that does not fit.
    """
    if not len(media) == len(subtitles) == len(rationales):
        raise ValueError(
            f"media, subtitles and rationales must have one entry per clip, got {len(media)}, {len(subtitles)}, "
            f"{len(rationales)}"
        )
    student = builder([conversation(m, s, config) for m, s in zip(media, subtitles)], length=length)
    teacher = builder(
        [conversation(m, s, config, rationale=r) for m, s, r in zip(media, subtitles, rationales)],
        length=length if teacher_length is None else teacher_length,
    )
    return {
        "student_input_ids": student["input_ids"],
        "student_attention_mask": student["attention_mask"],
        "teacher_input_ids": teacher["input_ids"],
        "teacher_attention_mask": teacher["attention_mask"],
    }


def clip_parts(
    video_grid_thw, video_second_per_grid: float, audio_frames: int | None, *, use_audio_in_video: bool
) -> list[Part]:
    """The placeholder parts of one clip: its video, with its audio interleaved or as a separate audio."""
    grid = tuple(int(v) for v in np.asarray(video_grid_thw).reshape(-1))
    if audio_frames is None:
        return [VideoPart(grid, float(video_second_per_grid))]
    if use_audio_in_video:
        return [VideoPart(grid, float(video_second_per_grid), int(audio_frames))]
    return [VideoPart(grid, float(video_second_per_grid)), AudioPart(int(audio_frames))]


def encode_clip_batch(
    builder: PromptBuilder,
    clips: Sequence[dict],
    config: PromptConfig,
    *,
    length: int | None,
    use_audio_in_video: bool = True,
    with_teacher: bool = False,
    teacher_length: int | None = None,
) -> dict[str, np.ndarray | bool]:
    """Clips (each a dict of `data.pipeline.ProcessorInputs` arrays plus `subtitle` and, for the
    teacher, `rationale`; the audio arrays are optional) -> the model call's keyword arguments for the
    student prompts.

    With `with_teacher`, also `teacher_input_ids` / `teacher_attention_mask` over the same media,
    padded to the same `length`. Media rows are packed in clip order, as the processor packs them;
    audio features are right-padded to the longest clip's.
    """
    has_audio = ["input_features" in c for c in clips]
    if any(has_audio) and not all(has_audio):
        raise ValueError("clips of one batch must all have audio or all have none")
    media = [
        clip_parts(
            c["video_grid_thw"],
            c["video_second_per_grid"],
            int(np.sum(c["feature_attention_mask"])) if "input_features" in c else None,
            use_audio_in_video=use_audio_in_video,
        )
        for c in clips
    ]
    subtitles = [str(c.get("subtitle", "")) for c in clips]
    if with_teacher:
        text = encode_prompt_pairs(
            builder,
            media,
            subtitles,
            [str(c["rationale"]) for c in clips],
            config,
            length=length,
            teacher_length=teacher_length,
        )
        inputs: dict[str, np.ndarray | bool] = {
            "input_ids": text["student_input_ids"],
            "attention_mask": text["student_attention_mask"],
            "teacher_input_ids": text["teacher_input_ids"],
            "teacher_attention_mask": text["teacher_attention_mask"],
        }
    else:
        inputs = dict(builder([conversation(m, s, config) for m, s in zip(media, subtitles)], length=length))
    inputs.update(
        pixel_values_videos=np.concatenate([np.asarray(c["pixel_values_videos"]) for c in clips]),
        video_grid_thw=np.stack([np.asarray(c["video_grid_thw"]).reshape(3) for c in clips]),
        video_second_per_grid=np.asarray([float(c["video_second_per_grid"]) for c in clips], np.float32),
    )
    if all(has_audio):
        frames = max(np.asarray(c["input_features"]).shape[-1] for c in clips)
        pad = lambda x: np.pad(np.asarray(x), [(0, 0)] * (np.ndim(x) - 1) + [(0, frames - np.shape(x)[-1])])  # noqa: E731
        inputs.update(
            input_features=np.stack([pad(c["input_features"]) for c in clips]),
            feature_attention_mask=np.stack([pad(c["feature_attention_mask"]) for c in clips]),
            use_audio_in_video=use_audio_in_video,
        )
    return inputs


def prompt_lengths(
    builder: PromptBuilder,
    clips: Sequence[dict],
    config: PromptConfig,
    *,
    use_audio_in_video: bool = True,
    chunk: int = 256,
) -> np.ndarray:
    """Token counts of each clip's student and teacher prompts, `[len(clips), 2]` int64, without padding
    them to a bucket: what `encode_clip_batch(..., with_teacher=True)` needs room for.

    Each clip is a dict of `video_grid_thw`, `video_second_per_grid`, `audio_frames` (valid mel frames, or
    None without audio), `subtitle` and `rationale`: no pixel or audio arrays are needed.
    """
    out = np.zeros((len(clips), 2), np.int64)
    for start in range(0, len(clips), chunk):
        part = clips[start : start + chunk]
        media = [
            clip_parts(
                c["video_grid_thw"],
                c["video_second_per_grid"],
                c["audio_frames"],
                use_audio_in_video=use_audio_in_video,
            )
            for c in part
        ]
        text = encode_prompt_pairs(
            builder, media, [str(c["subtitle"]) for c in part], [str(c["rationale"]) for c in part], config, length=None
        )
        out[start : start + len(part), 0] = text["student_attention_mask"].sum(axis=1)
        out[start : start + len(part), 1] = text["teacher_attention_mask"].sum(axis=1)
    return out
