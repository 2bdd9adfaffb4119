"""`opsd-jax data`: MER-UniBench folders -> a manifest -> a TFDS dataset, and a check of a manifest.

    opsd-jax data convert --dataset mer2023 --root /data/mer2023-dataset-process --out data/mer2023.jsonl
    opsd-jax data check --manifest data/mer2023.jsonl --config qwen2_5_omni_7b_v5p64 model.checkpoint=...
    opsd-jax data build --manifest data/mer2023.jsonl --out ~/tensorflow_datasets --name mer2023
    # prints data.train_dir=~/tensorflow_datasets/mer/mer2023/1.0.0

`convert` writes the splits the dataset has (`opsd_jax.data.converters`); `build` decodes every clip once
into ArrayRecord (`opsd_jax.data.builders.mer`: resumable, no half-written dataset); `check` decodes every
clip as `build` would, validates its labels and, with a config, counts its prompts' tokens against the
config's buckets, then prints one row per problem and exits 1 when there is any.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import tensorflow_datasets as tfds
from tqdm import tqdm

from opsd_jax.config import ConfigError, load_config, local_path
from opsd_jax.data.audio_features import feature_frames
from opsd_jax.data.builders import MerConfig, build_mer
from opsd_jax.data.builders.mer import manifest_clip_example
from opsd_jax.data.chat_template import PromptBuilder
from opsd_jax.data.converters import DATASETS, LAYOUTS, SUBTITLE_COLUMNS, ConversionError, convert, parse_splits
from opsd_jax.data.manifest import ManifestError, scan_manifest
from opsd_jax.data.media import MediaError, SkipCounter, load_clip_media
from opsd_jax.data.vision_inputs import TEMPORAL_PATCH_SIZE, video_to_inputs
from opsd_jax.opsd.prompts import prompt_lengths

SHAPE_DEFAULTS = dict(num_frames=16, height=224, width=224, max_audio_seconds=30.0)  # MerConfig's


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="convert MER-UniBench datasets to a manifest, build the TFDS dataset, check a manifest",
        description="The data a run reads: `convert` a dataset folder to a JSONL manifest, `build` the manifest "
        "into a TFDS ArrayRecord dataset of decoded clips (the directory `data.train_dir` takes), `check` that "
        "every clip of a manifest decodes, is labelled and fits a config's prompt buckets.",
    )
    commands = parser.add_subparsers(title="data commands", metavar="COMMAND", required=True)

    convert = commands.add_parser("convert", help="a MER-UniBench dataset folder -> a JSONL clip manifest")

    convert.add_argument("--dataset", required=True, type=str.lower, choices=DATASETS)
    convert.add_argument("--root", required=True, type=local_path, help="the dataset folder as shipped")
    convert.add_argument("--out", required=True, type=local_path, help="the manifest to write (JSONL)")
    convert.add_argument(
        "--splits",
        help="comma-separated splits, e.g. train,test (default: every split the dataset has; the benchmark's is test)",
    )
    convert.add_argument("--language", choices=tuple(SUBTITLE_COLUMNS), default="english", help="subtitle language")
    convert.add_argument("--subtitle-file", help="subtitle CSV (default: the first the dataset ships)")
    convert.add_argument(
        "--missing-media",
        choices=("error", "skip"),
        default="error",
        help="a clip without a video file: fail naming it, or leave it out",
    )
    convert.set_defaults(handler=_convert)

    build = commands.add_parser("build", help="a manifest -> a TFDS ArrayRecord dataset of decoded clips")
    build.add_argument("--manifest", required=True, type=local_path)
    build.add_argument("--out", required=True, type=local_path, help="the TFDS data directory")
    build.add_argument("--name", default="default", help="the dataset config name (default: default)")
    _add_shape_options(build)
    build.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a clip whose media do not decode: fail, or leave it out (recorded in the metadata)",
    )
    build.add_argument("--overwrite", action="store_true", help="rebuild a dataset of the same name")
    build.set_defaults(handler=_build)

    check = commands.add_parser("check", help="every clip decodes, is labelled and fits the config's buckets")
    check.add_argument("--manifest", required=True, type=local_path)
    check.add_argument(
        "--config",
        help="a run config (file or shipped name): prompt lengths are counted with its "
        "model.checkpoint's tokenizer against data.prompt_length, data.teacher_prompt_length and "
        "sampling.prompt_buckets (without it, only media and labels are checked)",
    )
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of --config")
    _add_shape_options(check)
    check.set_defaults(handler=_check)


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-frames", type=int, default=SHAPE_DEFAULTS["num_frames"], help="frames per clip (even; default 16)"
    )
    parser.add_argument("--height", type=int, default=SHAPE_DEFAULTS["height"], help="frame height, a multiple of 28")
    parser.add_argument("--width", type=int, default=SHAPE_DEFAULTS["width"], help="frame width, a multiple of 28")
    parser.add_argument(
        "--max-audio-seconds",
        type=float,
        default=SHAPE_DEFAULTS["max_audio_seconds"],
        help="audio kept per clip (default 30)",
    )


def _mer_config(args: argparse.Namespace, **extra: Any):
    return MerConfig(
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        max_audio_seconds=args.max_audio_seconds,
        **extra,
    )


def _fail(command: str, error: Exception) -> int:
    print(f"opsd-jax data {command}: error: {error}", file=sys.stderr)
    return 2


def _convert(args: argparse.Namespace) -> int:
    try:
        splits = None if args.splits is None else parse_splits(args.splits)
        clips = convert(
            args.dataset,
            args.root,
            args.out,
            language=args.language,
            subtitle_file=args.subtitle_file,
            splits=splits,
            missing_media=args.missing_media,
        )
    except (ConversionError, ManifestError, FileNotFoundError, ValueError) as error:
        return _fail("convert", error)
    counts = {split: sum(clip.split == split for clip in clips) for split in sorted({c.split for c in clips})}
    print(f"wrote {len(clips)} clips ({', '.join(f'{split}: {n}' for split, n in counts.items())}) to {args.out}")
    return 0


def _build(args: argparse.Namespace) -> int:
    try:
        config = _mer_config(args, name=args.name, on_error=args.on_error)
        dataset_dir = build_mer(args.manifest, args.out, config, overwrite=args.overwrite)
    except (ManifestError, MediaError, FileNotFoundError, ValueError) as error:
        return _fail("build", error)
    splits = tfds.builder_from_directory(str(dataset_dir)).info.splits
    print(", ".join(f"{name}: {splits[name].num_examples} clips" for name in sorted(splits)))
    print(f"data.train_dir={dataset_dir}")
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        config = _mer_config(args, name="check")
        clips, line_problems = scan_manifest(args.manifest)
        prompt_check = _prompt_checker(args) if args.config else None
    except (FileNotFoundError, ValueError) as error:
        return _fail("check", error)
    problems = [(clip_id or "-", f"line {number}: {message}") for number, clip_id, message in line_problems]
    problems += [(clip.id, message) for clip in clips for message in label_problems(clip)]
    decoded, media_problems = decode_clips(clips, config)
    problems += media_problems
    if prompt_check is not None:
        problems += prompt_check(decoded, config)
    total = len(clips) + len(line_problems)
    if not problems:
        checked = "media, labels" + (
            " and prompt lengths" if prompt_check else " (no --config: prompt lengths not counted)"
        )
        print(f"{args.manifest}: {total} clips, no problems ({checked})")
        return 0
    width = max(len("clip"), *(len(clip_id) for clip_id, _ in problems))
    print(f"| {'clip'.ljust(width)} | problem |")
    print(f"|{'-' * (width + 2)}|---------|")
    for clip_id, message in problems:
        print(f"| {clip_id.ljust(width)} | {' '.join(message.split())} |")
    print(f"{args.manifest}: {len(problems)} problem(s) in {len({c for c, _ in problems})} of {total} clips")
    return 1


def label_problems(clip) -> list[str]:
    """What the manifest's own checks allow but the clip's dataset does not: a basic emotion outside the
    dataset's classes, a sentiment outside its range (`converters.LAYOUTS`)."""
    layout = LAYOUTS.get(clip.dataset)
    problems = []
    if layout is None:
        return problems
    if clip.label is not None and layout.classes and clip.label not in layout.classes:
        problems.append(f"label {clip.label!r} is not one of {clip.dataset}'s classes ({', '.join(layout.classes)})")
    low_high = layout.sentiment_range
    if clip.sentiment is not None and low_high and not low_high[0] <= clip.sentiment <= low_high[1]:
        problems.append(f"sentiment {clip.sentiment} outside {clip.dataset}'s range {list(low_high)}")
    return problems


def decode_clips(clips, config) -> tuple[list[tuple[Any, dict]], list[tuple[str, str]]]:
    """Decodes every clip as `data build` does (progress bar on stderr): (clip, example) for those that
    decode to the config's static shapes, and (clip id, problem) for the others."""
    decoded, problems = [], []
    for clip in tqdm(clips, desc="decoding", unit="clip"):
        skipped = SkipCounter()
        media = load_clip_media(
            clip, on_error="skip", skipped=skipped, num_frames=config.num_frames, size=(config.height, config.width)
        )
        if media is None:
            problems.append((clip.id, f"media: {skipped.reasons[clip.id]}"))
            continue
        try:
            example = manifest_clip_example(config, clip, media)
        except ValueError as error:
            problems.append((clip.id, f"media: {error}"))
            continue
        decoded.append((clip, example))
    return decoded, problems


def _prompt_checker(args: argparse.Namespace):
    """Loads --config and its checkpoint's tokenizer (bad input fails here, before any decoding); returns
    a function (decoded clips, clip config) -> problems of prompts longer than the config's buckets."""
    run = load_config(args.config, args.overrides, num_devices=None)
    if not run.model.checkpoint:
        raise ConfigError(
            "model.checkpoint: empty; data check counts prompt tokens with the checkpoint's "
            "tokenizer (pass model.checkpoint=DIR)"
        )
    builder = PromptBuilder.from_pretrained(run.model.checkpoint)
    student_limit = min(run.data.prompt_length, max(run.sampling.prompt_buckets))
    teacher_limit = run.data.teacher_prompt_length or run.data.prompt_length

    def check(decoded, config) -> list[tuple[str, str]]:
        if not decoded:
            return []
        first = decoded[0][1]
        grid = video_to_inputs(first["frames"], float(first["sample_fps"]))["video_grid_thw"][0]  # one shape for all
        clips = [
            dict(
                video_grid_thw=grid,
                video_second_per_grid=TEMPORAL_PATCH_SIZE / float(example["sample_fps"]),
                audio_frames=feature_frames(int(example["audio_length"]), config.max_audio_samples),
                subtitle=example["subtitle"],
                rationale=example["rationale"],
            )
            for _, example in decoded
        ]
        lengths = prompt_lengths(builder, clips, run.prompt, use_audio_in_video=run.data.use_audio_in_video)
        problems = []
        for (clip, example), (student, teacher) in zip(decoded, lengths.tolist()):
            if student > student_limit:
                problems.append(
                    (
                        clip.id,
                        f"prompt: {student} tokens, over {student_limit} (data.prompt_length="
                        f"{run.data.prompt_length}, largest of sampling.prompt_buckets="
                        f"{max(run.sampling.prompt_buckets)})",
                    )
                )
            if example["rationale"] and teacher > teacher_limit:
                problems.append(
                    (
                        clip.id,
                        f"teacher prompt: {teacher} tokens with the rationale, over "
                        f"data.teacher_prompt_length={teacher_limit}",
                    )
                )
        return problems

    return check
