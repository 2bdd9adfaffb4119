"""`opsd-jax generate`: answers for one clip, or for every clip of a manifest, with the jitted sampler.

The model is a training run's (a run directory: its config.yaml decides the prompt, audio layout, prompt
buckets, answer length, mesh and clip shape) or a Hugging Face directory's, loaded in bfloat16 over the
config's mesh (`opsd_jax.trained`). `add_checkpoint_arguments`, `settings_from_config`, `load_reader` and
`answer` serve `opsd-jax eval` too.

Inference needs no rationale, label or API: the prompt is the student's (`opsd_jax.opsd.prompts`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from opsd_jax.config import local_path
from opsd_jax.data.jsonl import decode_utf8, read_complete
from opsd_jax.data.manifest import ManifestError, read_manifest
from opsd_jax.data.media import ON_ERROR, MediaError, SkipCounter

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # without a config file; with one, its sampling.eval_max_new_tokens


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--checkpoint, --step, --config, --dtype: where the model comes from (`opsd_jax.trained`)."""
    parser.add_argument(
        "--checkpoint",
        type=local_path,
        required=required,
        help="a training run directory (run.output_dir of `opsd-jax train`: its config.yaml gives "
        "the prompt, audio layout, prompt buckets, answer length and mesh) or a Hugging Face "
        "checkpoint directory (with tokenizer files)",
    )
    parser.add_argument(
        "--step", type=int, help="with a run directory: the checkpoint step (default: the newest that restores)"
    )
    parser.add_argument(
        "--config",
        type=local_path,
        help="a YAML run config to use instead of the run's config.yaml "
        "(with a Hugging Face directory: instead of the defaults); KEY=VALUE words after the flags "
        "override it as in `opsd-jax train`, e.g. mesh.fsdp=4 prompt.instruction=...",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="parameters and compute (default: %(default)s), sharded over the config's mesh",
    )


FRAME_DEFAULTS = {"fps": 2.0, "max_frames": 32, "max_pixels": 224 * 224}


def add_frame_arguments(parser: argparse.ArgumentParser) -> None:
    """--fps, --max-frames, --max-pixels: how a video file is sampled. Without them, a run directory whose
    training dataset is on this machine brings clips to its training clips' frames and audio length."""
    where = "; default: a run's training clips' frames when its data.train_dir is here, else {}".format
    parser.add_argument("--fps", type=float, help="video frames sampled per second" + where("2"))
    parser.add_argument("--max-frames", type=int, help="at most this many frames per clip" + where("32"))
    parser.add_argument("--max-pixels", type=int, help="at most this many pixels per frame" + where(str(224 * 224)))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer for a clip (or a manifest of clips) with a checkpoint",
        description="Decodes the clip's frames and audio, builds the student prompt (media + subtitle + "
        "instruction) and samples an answer with the jitted decode loop. One clip: --video [--audio] "
        "[--subtitle]; many: --manifest M --out answers.jsonl (a progress bar, batches of --batch-size; "
        "answers go to OUT.partial, renamed to OUT when every clip is done; a rerun skips the ids answered).",
    )
    add_checkpoint_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", type=local_path, help="a video file")
    source.add_argument("--manifest", type=local_path, help="a JSONL manifest of clips (see README)")
    parser.add_argument("--audio", type=local_path, help="an audio file (default: the video's own audio track)")
    parser.add_argument("--no-audio", action="store_true", help="use the frames only")
    parser.add_argument("--subtitle", default="", help="what is said in the clip")
    parser.add_argument("--prompt", help="the instruction (default: the config's prompt.instruction)")
    parser.add_argument("--out", type=local_path, help="answers JSONL (with --manifest)")
    parser.add_argument("--split", help="only clips of this split (with --manifest)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default: the config's sampling.eval_max_new_tokens, without a config file {DEFAULT_MAX_NEW_TOKENS}",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    add_frame_arguments(parser)
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="raise",
        help="a manifest clip whose media cannot be read: raise (stop, exit 2; default) or skip "
        "it (counted and named at the end, exit 1; a rerun tries it again)",
    )
    parser.add_argument(
        "--separate-audio",
        action="store_true",
        help="give the audio as its own part instead of interleaving it with the video (default: "
        "the config's data.use_audio_in_video)",
    )
    parser.set_defaults(handler=run)


def settings_from_config(source, args: argparse.Namespace) -> dict[str, Any]:
    """What the config (`source.config`, a run's own) decides where the command line leaves it open: the
    prompt wording (--prompt replaces its instruction), the prompt buckets, the audio layout and the answer
    length. Field names are `answer`'s settings."""
    config = source.config
    prompt = config.prompt if args.prompt is None else dataclasses.replace(config.prompt, instruction=args.prompt)
    if args.max_new_tokens is not None:
        max_new_tokens = args.max_new_tokens
    else:
        max_new_tokens = config.sampling.eval_max_new_tokens if source.configured else DEFAULT_MAX_NEW_TOKENS
    frames = {name: getattr(args, name) for name in FRAME_DEFAULTS}
    clip_shape = None
    if source.run_dir is not None and all(value is None for value in frames.values()):
        from opsd_jax.trained import training_clip_shape

        clip_shape = training_clip_shape(config)
        if clip_shape is not None:
            logger.info(
                "clips are brought to the run's training clips: %d frames of %d x %d, %d audio samples (%s)",
                clip_shape.num_frames,
                clip_shape.height,
                clip_shape.width,
                clip_shape.audio_samples,
                config.data.train_dir,
            )
    frames = {name: FRAME_DEFAULTS[name] if value is None else value for name, value in frames.items()}
    return dict(
        prompt_config=prompt,
        prompt_buckets=tuple(config.sampling.prompt_buckets),
        separate_audio=args.separate_audio or not config.data.use_audio_in_video,
        max_new_tokens=max_new_tokens,
        clip_shape=clip_shape,
        **frames,
    )


@dataclasses.dataclass(frozen=True)
class Reader:
    """A loaded thinker, ready to answer: the model on its mesh, its tokenizer, the step restored."""

    model: Any
    builder: Any
    mesh: Any
    step: int | None
    rules: Any  # the config's logical-axis table (`MeshConfig.axis_rules`)


def load_reader(source, dtype: str) -> Reader:
    """The tokenizer (first: a missing one is named before the model loads), then the thinker of `source`
    on the mesh of its config (`mesh.*`), sharded by the training rules."""
    from opsd_jax.data.chat_template import PromptBuilder
    from opsd_jax.sharding import make_mesh
    from opsd_jax.trained import load_thinker

    builder = PromptBuilder.from_pretrained(source.base_dir)
    mesh = make_mesh(source.config.mesh)
    rules = source.config.mesh.axis_rules()
    model, step = load_thinker(source, dtype=dtype, mesh=mesh, rules=rules)
    return Reader(model, builder, mesh, step, rules)


def _clip_inputs(video: Path, audio: Path | None, *, record_id: str, args: argparse.Namespace) -> dict[str, Any]:
    from opsd_jax.data.audio_features import audio_to_inputs
    from opsd_jax.data.media import read_audio, read_video
    from opsd_jax.data.vision_inputs import video_to_inputs

    shape = args.clip_shape  # the run's training clips: decoded as the dataset builder decoded them
    if shape is not None:
        decoded = read_video(video, record_id=record_id, num_frames=shape.num_frames, size=(shape.height, shape.width))
    else:
        decoded = read_video(
            video, record_id=record_id, fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels
        )
    arrays = video_to_inputs(decoded.frames, decoded.sample_fps)
    clip = {
        "pixel_values_videos": arrays["pixel_values_videos"],
        "video_grid_thw": arrays["video_grid_thw"][0],
        "video_second_per_grid": arrays["video_second_per_grid"][0],
    }
    if not args.no_audio:
        waveform = read_audio(audio or video, record_id=record_id)
        # A training clip's audio was cut to (or padded to) the dataset's length; other audio keeps its own.
        features = audio_to_inputs(waveform, max_samples=shape.audio_samples if shape is not None else waveform.size)
        clip.update(
            input_features=features["input_features"][0], feature_attention_mask=features["feature_attention_mask"][0]
        )
    return clip


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer(
    reader: Reader, clips: list[dict[str, Any]], settings, *, model_context: int | None = None, ids: Sequence[str] = ()
) -> list[str]:
    """Greedy (or sampled) answers for clips prepared by `_clip_inputs` (+ `subtitle`), batched over the reader's
    mesh; a prompt that does not fit `model_context` with the new tokens is refused (`GenerateError` naming
    its clip of `ids`). `settings`: `opsd-jax generate`'s arguments completed by `settings_from_config`, or an
    evaluation's `GenerationSettings`."""
    from opsd_jax.opsd.prompts import encode_clip_batch
    from opsd_jax.sampling import generate
    from opsd_jax.sharding import to_host

    builder = reader.builder
    inputs = encode_clip_batch(
        builder, clips, settings.prompt_config, length=None, use_audio_in_video=not settings.separate_audio
    )
    _fits(model_context, inputs, settings, list(ids) or [str(i) for i in range(len(clips))])
    length = inputs["input_ids"].shape[1]
    # Left-padded to the config's bucket, so that batches of nearby lengths share one compiled program; a
    # prompt longer than every bucket runs at its own length.
    buckets = [bucket for bucket in settings.prompt_buckets if bucket >= length] or None
    out = generate(
        reader.model,
        inputs,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        eos_token_id=builder.tokenizer.eos_token_id,
        pad_token_id=builder.pad_token_id,
        seed=settings.seed,
        prompt_buckets=buckets,
        mesh=reader.mesh,
        rules=reader.rules,
    )
    tokens, mask = to_host(out.tokens), to_host(out.mask)
    return [builder.tokenizer.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(tokens, mask)]


class GenerateError(ValueError):
    """Bad input of `opsd-jax generate` (arguments, files, a prompt over the model's context): exit 2."""


def check_arguments(args: argparse.Namespace) -> None:
    """The sampling and media arguments, before any model loads."""
    for name in ("batch_size", "max_new_tokens", "max_frames", "max_pixels"):
        if getattr(args, name) < 1:
            raise GenerateError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise GenerateError(f"--temperature: expected a finite value >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise GenerateError(f"--top-k: expected >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p: expected a value in (0, 1], got {args.top_p}")
    if not math.isfinite(args.fps) or args.fps <= 0:
        raise GenerateError(f"--fps: expected a positive number, got {args.fps}")
    if args.manifest is not None and args.out is None:
        raise GenerateError("--manifest needs --out (the answers JSONL)")
    if args.out is not None and args.out.is_dir():
        raise GenerateError(f"--out {args.out}: is a directory; expected the answers JSONL file")
    for flag, path in (("--video", args.video), ("--audio", args.audio)):
        if path is not None and path.is_dir():
            raise GenerateError(f"{flag} {path}: is a directory, not a media file")
        if path is not None and not path.is_file():
            raise GenerateError(f"{flag} {path}: no such file")


def check_checkpoint(directory: Path) -> int | None:
    """A Hugging Face checkpoint directory with its tokenizer; returns the model's context length
    (`max_position_embeddings` of the text config), None when config.json does not say."""
    if not directory.is_dir():
        raise GenerateError(f"--checkpoint {directory}: no such directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise GenerateError(f"--checkpoint {directory}: no config.json; expected a Hugging Face checkpoint directory")
    from opsd_jax.data.chat_template import check_tokenizer_directory  # imports JAX: not at CLI start-up

    check_tokenizer_directory(directory)
    try:
        config = json.loads(decode_utf8(config_file.read_bytes(), config_file, GenerateError))
    except json.JSONDecodeError as err:
        raise GenerateError(f"{config_file}: not valid JSON ({err.msg} on line {err.lineno})") from None
    config = config.get("thinker_config", config)
    return (config.get("text_config") or {}).get("max_position_embeddings")


def read_answered(path: Path) -> dict[str, str]:
    """The answers JSONL lines already written (id -> line) by an earlier, possibly interrupted, run."""
    if not path.is_file():
        return {}
    answered = {}
    for number, line in enumerate(decode_utf8(read_complete(path), path, GenerateError).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise GenerateError(
                f"{path}:{number}: not an answers line (invalid JSON); move the file away or pick another --out"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or "output" not in record:
            raise GenerateError(
                f'{path}:{number}: expected {{"id", "output", ...}}; move the file away or pick another --out'
            )
        answered[record["id"]] = line
    return answered


def _fits(model_context: int | None, inputs: dict[str, Any], args: argparse.Namespace, ids: list[str]) -> None:
    """Refuses prompts whose length plus --max-new-tokens exceeds the model's context (positions past it
    were never trained: the answer would be noise, with no word said)."""
    if model_context is None:
        return
    mask = np.asarray(inputs["attention_mask"])
    for clip_id, row in zip(ids, mask):
        length = int(row.sum())
        if length + args.max_new_tokens > model_context:
            raise GenerateError(
                f"clip {clip_id!r}: a prompt of {length} tokens plus --max-new-tokens {args.max_new_tokens} exceeds "
                f"the model's context of {model_context} tokens (max_position_embeddings); lower --max-frames, "
                "--max-pixels or --max-new-tokens (refused, not truncated)"
            )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (GenerateError, MediaError, ManifestError, FileNotFoundError) as err:
        print(f"opsd-jax generate: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from opsd_jax.trained import open_source

    # Everything a user can get wrong is checked before the model loads.
    source = open_source(args.checkpoint, step=args.step, config_file=args.config, overrides=args.overrides)
    vars(args).update(settings_from_config(source, args))
    check_arguments(args)
    model_context = check_checkpoint(source.base_dir)
    clips = []
    if args.manifest is not None:
        every = read_manifest(args.manifest)
        clips = [c for c in every if args.split is None or c.split == args.split]
        if not clips:
            splits = sorted({c.split for c in every})
            raise GenerateError(
                f"--manifest {args.manifest}: no clip"
                + (f" of split {args.split!r}; it has {', '.join(splits)}" if every else "; the file is empty")
            )
    reader = load_reader(source, args.dtype)
    if args.video is not None:
        clip = _clip_inputs(args.video, args.audio, record_id=args.video.name, args=args)
        clip["subtitle"] = args.subtitle
        print(answer(reader, [clip], args, model_context=model_context, ids=[args.video.name])[0])
        return 0
    # Answers accumulate in OUT.partial (with those of an earlier run of OUT or OUT.partial) and replace OUT
    # only once every clip is done: an interrupted run loses nothing and a rerun skips what is answered.
    partial = args.out.with_name(args.out.name + ".partial")
    answered = {**read_answered(args.out), **read_answered(partial)}
    wanted = {c.id for c in clips}
    todo = [c for c in clips if c.id not in answered]
    skipped = SkipCounter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(partial, "w", encoding="utf-8") as handle,
        tqdm(total=len(clips), initial=len(clips) - len(todo), desc="generate", unit="clip") as bar,
    ):
        handle.writelines(line + "\n" for clip_id, line in answered.items() if clip_id in wanted)
        handle.flush()
        for batch in _batches(todo, args.batch_size):
            prepared, kept = [], []
            for clip in batch:
                try:
                    inputs = _clip_inputs(
                        Path(clip.video), None if clip.audio is None else Path(clip.audio), record_id=clip.id, args=args
                    )
                except MediaError as err:
                    if args.on_error == "raise":
                        raise
                    skipped.reasons[clip.id] = str(err)
                    continue
                inputs["subtitle"] = clip.subtitle
                prepared.append(inputs)
                kept.append(clip)
            if kept:
                texts = answer(reader, prepared, args, model_context=model_context, ids=[c.id for c in kept])
                for clip, text in zip(kept, texts):
                    handle.write(
                        json.dumps({"id": clip.id, "dataset": clip.dataset, "output": text}, ensure_ascii=False) + "\n"
                    )
                handle.flush()
                os.fsync(handle.fileno())
            bar.update(len(batch))
    os.replace(partial, args.out)
    done = len(clips) - skipped.count
    print(
        f"wrote {done} answers to {args.out} ({len(clips) - len(todo)} from an earlier run)"
        + (
            f"; skipped {skipped.count} clip(s) whose media could not be read: " + "; ".join(skipped.reasons.values())
            if skipped.count
            else ""
        )
    )
    return 1 if skipped.count else 0
