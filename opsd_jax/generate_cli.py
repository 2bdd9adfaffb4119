"""`opsd-jax generate`: answers for one clip, or for every clip of a manifest, with the jitted sampler.

The model is a training run's (a run directory: its config.yaml decides the prompt, audio layout, prompt
buckets, answer length, mesh and clip shape) or a Hugging Face directory's, loaded in bfloat16 over the
config's mesh (`opsd_jax.trained`); the answers are `opsd_jax.generation`'s. `add_checkpoint_arguments`,
`add_frame_arguments` and `settings_from_config` serve `opsd-jax eval` too.
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
from typing import Any

from tqdm import tqdm

from opsd_jax.config import local_path
from opsd_jax.data.chat_template import check_tokenizer_directory
from opsd_jax.data.jsonl import decode_utf8, read_complete
from opsd_jax.data.manifest import ManifestError, read_manifest
from opsd_jax.data.media import ON_ERROR, MediaError, SkipCounter
from opsd_jax.generation import GenerateError, GenerationSettings, answer, batches, clip_inputs, load_reader
from opsd_jax.trained import TrainedSource, open_source, training_clip_shape

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = GenerationSettings.max_new_tokens  # without a config file; with one, its eval_max_new_tokens


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


FRAME_DEFAULTS = {name: getattr(GenerationSettings, name) for name in ("fps", "max_frames", "max_pixels")}


def add_frame_arguments(parser: argparse.ArgumentParser) -> None:
    """--fps, --max-frames, --max-pixels: how a video file is sampled. Without them, a run directory whose
    training dataset is on this machine brings clips to its training clips' frames and audio length."""
    where = "; default: a run's training clips' frames when its data.train_dir is here, else {}".format
    parser.add_argument(
        "--fps", type=float, help="video frames sampled per second" + where(f"{FRAME_DEFAULTS['fps']:g}")
    )
    parser.add_argument(
        "--max-frames", type=int, help="at most this many frames per clip" + where(str(FRAME_DEFAULTS["max_frames"]))
    )
    parser.add_argument(
        "--max-pixels", type=int, help="at most this many pixels per frame" + where(str(FRAME_DEFAULTS["max_pixels"]))
    )


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


def settings_from_config(source: TrainedSource, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `GenerationSettings`: the command line's (decoding, frames, audio), and what the config
    (`source.config`, a run's own) decides where the command line leaves it open: the prompt wording
    (--prompt replaces its instruction), the prompt buckets, the audio layout and the answer length."""
    config = source.config
    prompt = config.prompt if args.prompt is None else dataclasses.replace(config.prompt, instruction=args.prompt)
    if args.max_new_tokens is not None:
        max_new_tokens = args.max_new_tokens
    else:
        max_new_tokens = config.sampling.eval_max_new_tokens if source.configured else DEFAULT_MAX_NEW_TOKENS
    frames = {name: getattr(args, name) for name in FRAME_DEFAULTS}
    clip_shape = None
    if source.run_dir is not None and all(value is None for value in frames.values()):
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
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        clip_shape=clip_shape,
        no_audio=args.no_audio,
        **frames,
    )


def check_arguments(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """The sampling and media arguments (`settings`: completed by `settings_from_config`), before any model
    loads."""
    values = {"batch_size": args.batch_size, **settings}
    for name in ("batch_size", "max_new_tokens", "max_frames", "max_pixels"):
        if values[name] < 1:
            raise GenerateError(f"--{name.replace('_', '-')}: expected >= 1, got {values[name]}")
    if not math.isfinite(values["temperature"]) or values["temperature"] < 0:
        raise GenerateError(f"--temperature: expected a finite value >= 0 (0 = greedy), got {values['temperature']}")
    if values["top_k"] is not None and values["top_k"] < 1:
        raise GenerateError(f"--top-k: expected >= 1, got {values['top_k']}")
    if values["top_p"] is not None and not 0 < values["top_p"] <= 1:
        raise GenerateError(f"--top-p: expected a value in (0, 1], got {values['top_p']}")
    if not math.isfinite(values["fps"]) or values["fps"] <= 0:
        raise GenerateError(f"--fps: expected a positive number, got {values['fps']}")
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


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (GenerateError, MediaError, ManifestError, FileNotFoundError) as err:
        print(f"opsd-jax generate: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the model loads.
    source = open_source(args.checkpoint, step=args.step, config_file=args.config, overrides=args.overrides)
    fields = settings_from_config(source, args)
    check_arguments(args, fields)
    settings = GenerationSettings(**fields)
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
        clip = clip_inputs(args.video, args.audio, record_id=args.video.name, settings=settings)
        clip["subtitle"] = args.subtitle
        print(answer(reader, [clip], settings, model_context=model_context, ids=[args.video.name])[0])
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
        for batch in batches(todo, args.batch_size):
            prepared, kept = [], []
            for clip in batch:
                try:
                    inputs = clip_inputs(
                        Path(clip.video),
                        None if clip.audio is None else Path(clip.audio),
                        record_id=clip.id,
                        settings=settings,
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
                texts = answer(reader, prepared, settings, model_context=model_context, ids=[c.id for c in kept])
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
