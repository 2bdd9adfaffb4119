"""Generation, one way for every caller: the trainer's rollouts and held-out answers, `opsd-jax generate` and
`opsd-jax eval`.

`Decoding` is how completions are drawn and `decode` the one call of the sampler that spells its keyword list
(the tokenizer's EOS and padding ids, the mesh and the logical-axis table). `generate` and `eval` answer clips
read from media files: `GenerationSettings` says how a clip becomes a prompt (its frames, audio layout,
wording, length buckets) and how its answer is decoded; `clip_inputs` reads a clip's media by those settings
and `answer` turns a batch of clips into text with a loaded `Reader`.

Inference needs no rationale, label or API: the prompt is the student's (`opsd_jax.opsd.prompts`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from opsd_jax import sampling
from opsd_jax.data.audio_features import audio_to_inputs
from opsd_jax.data.chat_template import PromptBuilder
from opsd_jax.data.media import read_audio, read_video
from opsd_jax.data.vision_inputs import video_to_inputs
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerInputs
from opsd_jax.opsd.prompts import PromptConfig, encode_clip_batch
from opsd_jax.sampling import GenerationOutput
from opsd_jax.sharding import AxisRules, make_mesh, to_host
from opsd_jax.trained import ClipShape, TrainedSource, load_thinker


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How completions are drawn: `max_new_tokens` (the static length), `temperature` (0 is greedy), top-k /
    top-p filtering, and `num_samples` completions per prompt (rows prompt-major)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p}")


def decode(
    model: Qwen2_5OmniThinker,
    inputs: Mapping[str, Any] | ThinkerInputs,
    decoding: Decoding,
    *,
    builder: PromptBuilder,
    mesh: Mesh | None,
    rules: AxisRules | None,
    seed: int | jax.Array = 0,
    prompt_buckets: Sequence[int] | None = None,
) -> GenerationOutput:
    """`decoding`'s completions of the prompts `inputs` (`opsd_jax.sampling.generate`'s, left-padded), ending at
    the tokenizer's EOS and padded with its pad id; `seed` and `prompt_buckets` as `generate` takes them."""
    # Looked up on the package at each call, so that a test may stand in for the sampler.
    return sampling.generate(
        model,
        inputs,
        max_new_tokens=decoding.max_new_tokens,
        temperature=decoding.temperature,
        top_k=decoding.top_k,
        top_p=decoding.top_p,
        eos_token_id=builder.tokenizer.eos_token_id,
        pad_token_id=builder.pad_token_id,
        num_samples=decoding.num_samples,
        seed=seed,
        prompt_buckets=prompt_buckets,
        mesh=mesh,
        rules=rules,
    )


class GenerateError(ValueError):
    """Bad input of `opsd-jax generate` (arguments, files, a prompt over the model's context): exit 2."""


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How a clip read from media files is answered (`opsd-jax generate`, `opsd-jax eval`). Its fields are
    recorded flat in an evaluation's generation.json.

    prompt_config: the prompt's wording (a run's `prompt` section, the instruction replaced by --prompt).
    prompt_buckets: prompt lengths a batch is left-padded to (the smallest that holds it; a run's
      `sampling.prompt_buckets`), so that batches share compiled programs.
    max_new_tokens, temperature (0 is greedy), top_k, top_p: the `decoding`; seed: the sampler's.
    fps, max_frames, max_pixels: how a manifest clip's video is sampled (a TFDS clip's frames are fixed
      when the dataset is built); with `clip_shape` (a run's training clips), none of them: manifest clips
      are brought to its frames and audio length, as the dataset builder brought the training clips.
    no_audio: frames only; separate_audio: audio as its own prompt part instead of interleaved.
    """

    prompt_config: PromptConfig = PromptConfig()
    prompt_buckets: tuple[int, ...] = ()
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    fps: float = 2.0
    max_frames: int = 32
    max_pixels: int = 224 * 224
    clip_shape: ClipShape | None = None
    no_audio: bool = False
    separate_audio: bool = False

    def __post_init__(self):
        self.decoding  # noqa: B018 - builds the decoding, which checks its fields
        if self.fps <= 0 or self.max_frames < 1 or self.max_pixels < 1:
            raise ValueError(
                f"fps, max_frames, max_pixels: expected positive values, got {self.fps}, "
                f"{self.max_frames}, {self.max_pixels}"
            )

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


def clip_inputs(video: Path, audio: Path | None, *, record_id: str, settings: GenerationSettings) -> dict[str, Any]:
    """The processor arrays of a clip's media files, read by `settings` (frames, audio layout): what
    `answer` takes, once the clip's `subtitle` is added."""
    shape = settings.clip_shape  # the run's training clips: decoded as the dataset builder decoded them
    if shape is not None:
        decoded = read_video(video, record_id=record_id, num_frames=shape.num_frames, size=(shape.height, shape.width))
    else:
        decoded = read_video(
            video,
            record_id=record_id,
            fps=settings.fps,
            max_frames=settings.max_frames,
            max_pixels=settings.max_pixels,
        )
    arrays = video_to_inputs(decoded.frames, decoded.sample_fps)
    clip = {
        "pixel_values_videos": arrays["pixel_values_videos"],
        "video_grid_thw": arrays["video_grid_thw"][0],
        "video_second_per_grid": arrays["video_second_per_grid"][0],
    }
    if not settings.no_audio:
        waveform = read_audio(audio or video, record_id=record_id)
        # A training clip's audio was cut to (or padded to) the dataset's length; other audio keeps its own.
        features = audio_to_inputs(waveform, max_samples=shape.audio_samples if shape is not None else waveform.size)
        clip.update(
            input_features=features["input_features"][0], feature_attention_mask=features["feature_attention_mask"][0]
        )
    return clip


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """`items` in consecutive batches of `size` (the last may be shorter): the clips of one `answer` call."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclasses.dataclass(frozen=True)
class Reader:
    """A loaded thinker, ready to answer: the model on its mesh, its tokenizer, the step restored."""

    model: Any
    builder: Any
    mesh: Any
    step: int | None
    rules: Any  # the config's logical-axis table (`MeshConfig.axis_rules`)


def load_reader(source: TrainedSource, dtype: str) -> Reader:
    """The tokenizer (first: a missing one is named before the model loads), then the thinker of `source`
    on the mesh of its config (`mesh.*`), sharded by the training rules."""
    builder = PromptBuilder.from_pretrained(source.base_dir)
    mesh = make_mesh(source.config.mesh)
    rules = source.config.mesh.axis_rules()
    model, step = load_thinker(source, dtype=dtype, mesh=mesh, rules=rules)
    return Reader(model, builder, mesh, step, rules)


def answer(
    reader: Reader,
    clips: list[dict[str, Any]],
    settings: GenerationSettings,
    *,
    model_context: int | None = None,
    ids: Sequence[str] = (),
) -> list[str]:
    """Greedy (or sampled) answers for clips prepared by `clip_inputs` (+ `subtitle`), batched over the
    reader's mesh; a prompt that does not fit `model_context` with the new tokens is refused (`GenerateError`
    naming its clip of `ids`)."""
    builder = reader.builder
    inputs = encode_clip_batch(
        builder, clips, settings.prompt_config, length=None, use_audio_in_video=not settings.separate_audio
    )
    _fits(model_context, inputs, settings, list(ids) or [str(i) for i in range(len(clips))])
    length = inputs["input_ids"].shape[1]
    # Left-padded to the config's bucket, so that batches of nearby lengths share one compiled program; a
    # prompt longer than every bucket runs at its own length.
    buckets = [bucket for bucket in settings.prompt_buckets if bucket >= length] or None
    out = decode(
        reader.model,
        inputs,
        settings.decoding,
        builder=builder,
        mesh=reader.mesh,
        rules=reader.rules,
        seed=settings.seed,
        prompt_buckets=buckets,
    )
    tokens, mask = to_host(out.tokens), to_host(out.mask)
    return [builder.tokenizer.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(tokens, mask)]


def _fits(model_context: int | None, inputs: dict[str, Any], settings: GenerationSettings, ids: list[str]) -> None:
    """Refuses prompts whose length plus --max-new-tokens exceeds the model's context (positions past it
    were never trained: the answer would be noise, with no word said)."""
    if model_context is None:
        return
    mask = np.asarray(inputs["attention_mask"])
    for clip_id, row in zip(ids, mask):
        length = int(row.sum())
        if length + settings.max_new_tokens > model_context:
            raise GenerateError(
                f"clip {clip_id!r}: a prompt of {length} tokens plus --max-new-tokens {settings.max_new_tokens} "
                f"exceeds the model's context of {model_context} tokens (max_position_embeddings); lower "
                "--max-frames, --max-pixels or --max-new-tokens (refused, not truncated)"
            )
