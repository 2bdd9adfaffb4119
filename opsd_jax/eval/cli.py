"""`opsd-jax eval ...`: run a checkpoint on MER-UniBench, score saved predictions, fetch the wheel files.

    opsd-jax eval --checkpoint RUN_OR_HF_DIR [--step N] [--config F] --data MANIFEST_OR_TFDS_DIR [...]
                  --wheel-dir DIR [--datasets mer2023,meld] [--out DIR] [--batch-size N] [--max-new-tokens N]
                  [--extractor builtin|llm] [--limit N] [KEY=VALUE ...]
    opsd-jax eval score --predictions P.jsonl --wheel-dir DIR [--out DIR] [--extractor auto|saved|builtin|llm]
    opsd-jax eval fetch-wheels --dest DIR [--base-url URL] [--no-verify]

`register(subparsers)` adds the group to the `opsd-jax` parser (`opsd_jax.cli`), which runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from opsd_jax.config import Config, local_path
from opsd_jax.data.chat_template import check_tokenizer_directory
from opsd_jax.eval.datasets import DATASET_NAMES
from opsd_jax.eval.extract import (
    BENCHMARK_SAMPLING,
    BuiltinExtractor,
    ExtractionError,
    LLMExtractor,
    check_saved_extractions,
)
from opsd_jax.eval.fetch import DEFAULT_BASE_URL, FetchError, fetch_wheel_files
from opsd_jax.eval.predictions import read_predictions, write_predictions
from opsd_jax.eval.report import markdown_report, write_report
from opsd_jax.eval.runner import (
    PREDICTIONS_FILE,
    check_generation_settings,
    collect_clips,
    generate_predictions,
    parse_dataset_names,
)
from opsd_jax.eval.scoring import score_records
from opsd_jax.eval.wheels import WheelFilesError, load_emotion_wheels
from opsd_jax.generate_cli import (
    DEFAULT_MAX_NEW_TOKENS,
    add_checkpoint_arguments,
    add_frame_arguments,
    settings_from_config,
)
from opsd_jax.generation import GenerationSettings, load_reader
from opsd_jax.rationales.client import ChatClientError, add_client_arguments, client_from_arguments, json_object
from opsd_jax.trained import open_source

EXTRACTED_PREDICTIONS_FILE = "predictions.extracted.jsonl"
CACHE_FILE = "extractor_cache.jsonl"
EVAL_COMMANDS = ("score", "fetch-wheels")


def lift_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`opsd-jax eval --checkpoint ... KEY=VALUE ...` -> (the command line without them, the overrides).

    argparse would read a KEY=VALUE word as the name of an eval COMMAND; a word is an override when it
    starts with a config section and a dotted key (`mesh.fsdp=4`, `prompt.instruction=...`). Only in the
    run form: `eval score` and `eval fetch-wheels` take none.
    """
    sections = "|".join(field.name for field in dataclasses.fields(Config))
    pattern = re.compile(rf"^({sections})\.[A-Za-z_][\w.]*=")
    words = list(argv)
    if any(word in EVAL_COMMANDS for word in words):
        return words, []
    overrides = [word for word in words if pattern.match(word)]
    return [word for word in words if not pattern.match(word)], overrides


def _make_llm_extractor(args: argparse.Namespace, cache_dir: Path):
    if not args.llm_base_url or not args.llm_model:
        raise ValueError("--extractor llm needs --llm-base-url and --llm-model")
    client = client_from_arguments(args, prefix="llm-")
    cache = args.llm_cache or Path(cache_dir) / CACHE_FILE
    return LLMExtractor(client, cache, {**BENCHMARK_SAMPLING, **args.llm_params}, progress=not args.no_progress)


def _extract_score_report(records, wheels, extractor, out: Path | None, metadata: dict[str, object]) -> int:
    """Fill in labels with `extractor` (None: use the saved ones), score, print the table; with `out`,
    write scores.json, report.md and (when extracted here) the predictions with their labels."""
    if extractor is None:
        extractor_name = check_saved_extractions(records)
    else:
        records = extractor.extract(records)
        extractor_name = extractor.name
        if isinstance(extractor, LLMExtractor):
            metadata["extractor_requests_sent"] = extractor.requests_sent
            metadata["extractor_cache"] = str(extractor.cache.path)
            metadata["extractor_usage"] = dataclasses.asdict(extractor.client.usage)
            metadata["extractor_sampling"] = extractor.sampling
    scores = score_records(records, wheels, extractor_name)
    print(markdown_report(scores), end="")
    if out:
        json_path, markdown_path = write_report(scores, out, metadata)
        written = [json_path, markdown_path]
        if extractor is not None:
            write_predictions(Path(out) / EXTRACTED_PREDICTIONS_FILE, records)
            written.append(Path(out) / EXTRACTED_PREDICTIONS_FILE)
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    wheels = load_emotion_wheels(args.wheel_dir)
    records = read_predictions(args.predictions)
    mode = args.extractor
    if mode == "auto":
        try:
            check_saved_extractions(records)
            mode = "saved"
        except ValueError:
            mode = "builtin"
    metadata: dict[str, object] = {"predictions": str(args.predictions), "wheel_dir": str(args.wheel_dir)}
    if mode == "saved":
        extractor = None
    elif mode == "builtin":
        extractor = BuiltinExtractor(wheels)
    else:
        extractor = _make_llm_extractor(args, Path(args.out) if args.out else Path(args.predictions).parent)
    return _extract_score_report(records, wheels, extractor, args.out, metadata)


def _evaluate(args: argparse.Namespace) -> int:
    """Generate answers for the benchmark clips (resuming), then extract, score and report them."""
    missing = [flag for flag, value in (("--data", args.data), ("--wheel-dir", args.wheel_dir)) if not value]
    if missing:
        raise ValueError(f"opsd-jax eval --checkpoint also needs {' and '.join(missing)}")
    source = open_source(args.checkpoint, step=args.step, config_file=args.config, overrides=args.overrides)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    datasets = DATASET_NAMES if args.datasets is None else parse_dataset_names(args.datasets)
    settings = GenerationSettings(**settings_from_config(source, args))
    out = args.out or Path("eval_results") / args.checkpoint.resolve().name
    # Everything that can fail is checked before the first answer is generated.
    wheels = load_emotion_wheels(args.wheel_dir)
    extractor = BuiltinExtractor(wheels) if args.extractor == "builtin" else _make_llm_extractor(args, out)
    clips = collect_clips(
        args.data, datasets, args.split, settings, requested=args.datasets is not None, limit=args.limit
    )
    generation = {
        "checkpoint": str(args.checkpoint.resolve()),
        "step": args.step,
        "dtype": args.dtype,
        "split": args.split,
        **dataclasses.asdict(settings),
    }
    generation = json.loads(json.dumps(generation))  # as generation.json holds it (lists, not tuples)
    check_generation_settings(out, generation)

    def load_model():
        check_tokenizer_directory(source.base_dir)  # a missing tokenizer is named before the model loads
        return load_reader(source, args.dtype)

    summary = generate_predictions(
        load_model, clips, settings, out / PREDICTIONS_FILE, batch_size=args.batch_size, progress=not args.no_progress
    )
    print(
        f"{summary.generated} clip(s) generated, {summary.reused} already in {out / PREDICTIONS_FILE}", file=sys.stderr
    )
    metadata: dict[str, object] = {
        "predictions": str(out / PREDICTIONS_FILE),
        "wheel_dir": str(args.wheel_dir),
        "data": [str(path) for path in args.data],
        "datasets": sorted({clip.dataset for clip in clips}),
        "limit": args.limit,
        "generation": generation,
        "generated": summary.generated,
        "reused": summary.reused,
    }
    return _extract_score_report(summary.records, wheels, extractor, out, metadata)


def _fetch_wheels(args: argparse.Namespace) -> int:
    for path in fetch_wheel_files(args.dest, args.base_url, verify=not args.no_verify, timeout_s=args.timeout):
        print(path)
    return 0


def _guarded(handler):
    """Turn the expected failures (bad input, missing files, network) into a one-line error and exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (WheelFilesError, FetchError, ExtractionError, ChatClientError, FileNotFoundError, ValueError) as err:
            print(f"opsd-jax: error: {err}", file=sys.stderr)
            return 2

    return run


def _add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    llm = parser.add_argument_group("LLM extractor (--extractor llm)")
    add_client_arguments(
        llm, prefix="llm-", timeout_s=120.0, max_retries=6, model_example="Qwen2.5-7B-Instruct (the benchmark's)"
    )
    llm.add_argument("--llm-cache", type=local_path, help=f"answer cache JSONL (default: OUT/{CACHE_FILE})")
    llm.add_argument(
        "--llm-params",
        type=json_object,
        default={},
        help="JSON merged into the sampling parameters, e.g. '{\"repetition_penalty\": 1.05}' for vLLM",
    )


def _add_run_arguments(group: argparse.ArgumentParser) -> None:
    """`opsd-jax eval --checkpoint ... [KEY=VALUE ...]` (no COMMAND): generate, extract, score."""
    run = group.add_argument_group("run a checkpoint (no COMMAND)")
    add_checkpoint_arguments(run, required=False)
    run.add_argument(
        "--data",
        nargs="+",
        type=local_path,
        metavar="MANIFEST_OR_TFDS_DIR",
        help="clip manifests (JSONL) and/or built TFDS `mer` dataset directories; a clip's `dataset` "
        "field names its benchmark dataset",
    )
    run.add_argument(
        "--datasets",
        help="comma-separated benchmark datasets (mer2023, mer2024, meld, iemocapfour, "
        "cmumosi, cmumosei, sims, simsv2, ovmerdplus, or all); each must have clips "
        "(default: every one present in the data)",
    )
    run.add_argument("--split", default="test", help="the clips' split (default: %(default)s)")
    run.add_argument("--wheel-dir", type=local_path, help="directory with the 7 emotion-wheel files")
    run.add_argument(
        "--out",
        type=local_path,
        help="directory for predictions.jsonl (resumable), generation.json, "
        "scores.json, report.md (default: eval_results/<checkpoint name>)",
    )
    run.add_argument("--limit", type=int, help="at most this many clips per dataset (a quick partial run)")
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default: the config's sampling.eval_max_new_tokens, without a config file {DEFAULT_MAX_NEW_TOKENS}",
    )
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int)
    run.add_argument("--top-p", type=float)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--prompt",
        help="the instruction (default: the config's prompt.instruction); AffectGPT's zero-shot "
        "one is 'Please recognize all possible emotional states of the character.'",
    )
    add_frame_arguments(run)  # manifest clips
    run.add_argument("--no-audio", action="store_true", help="use the frames only")
    run.add_argument(
        "--separate-audio",
        action="store_true",
        help="give the audio as its own part instead of interleaving it with the video (default: the "
        "config's data.use_audio_in_video)",
    )
    run.add_argument(
        "--extractor",
        choices=("builtin", "llm"),
        default="builtin",
        help="builtin (default): lexicon matching, no model; llm: the benchmark's extractor prompts "
        "on an OpenAI-compatible endpoint",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_llm_arguments(group)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command group to the `opsd-jax` parser."""
    group = subparsers.add_parser(
        "eval",
        help="MER-UniBench evaluation",
        description="With --checkpoint: answer every clip of the requested MER-UniBench datasets with the jitted "
        "sampler (batched, greedy by default, the student prompt), extract emotion labels, score them with the "
        "benchmark's metrics and write predictions.jsonl, scores.json and report.md; a rerun resumes. The "
        "checkpoint may be a training run directory (its config.yaml gives the prompt, audio layout, buckets, "
        "answer length and mesh; KEY=VALUE words override it as in `opsd-jax train`). With a COMMAND: score "
        "saved predictions, or fetch the emotion-wheel files.",
    )
    _add_run_arguments(group)
    commands = group.add_subparsers(title="eval commands", metavar="COMMAND")

    def evaluate_or_help(args: argparse.Namespace) -> int:
        if args.checkpoint is None:
            group.print_help()
            return 2
        return _evaluate(args)

    group.set_defaults(handler=_guarded(evaluate_or_help), overrides=[])

    score = commands.add_parser(
        "score",
        help="score a predictions JSONL file",
        description="Extracts labels from each prediction's free text (unless they are saved), scores every "
        "dataset with the benchmark's metrics and prints the table; with --out also writes scores.json, "
        "report.md and the predictions with their extracted labels. The JSONL schema is documented in "
        "opsd_jax/eval/predictions.py.",
    )
    score.add_argument("--predictions", required=True, type=local_path, help="predictions JSONL file")
    score.add_argument("--wheel-dir", required=True, type=local_path, help="directory with the 7 emotion-wheel files")
    score.add_argument("--out", type=local_path, help="directory for scores.json, report.md and extracted predictions")
    score.add_argument(
        "--extractor",
        choices=("auto", "saved", "builtin", "llm"),
        default="auto",
        help="saved: use the labels in the file; builtin: lexicon matching, no model; llm: the benchmark's "
        "extractor prompts on an OpenAI-compatible endpoint; auto (default): saved if every line has them, "
        "else builtin",
    )
    _add_llm_arguments(score)
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(handler=_guarded(_score))

    fetch = commands.add_parser(
        "fetch-wheels",
        help="download the emotion-wheel files",
        description="Downloads format.csv, synonym.xlsx and wheel1..5.xlsx (AffectGPT/emotion_wheel/ in "
        "https://github.com/zeroQiaoba/AffectGPT, Apache-2.0) and checks them against the benchmark's version.",
    )
    fetch.add_argument("--dest", required=True, type=local_path, help="directory to write the files into")
    fetch.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where the files are (default: %(default)s)")
    fetch.add_argument("--no-verify", action="store_true", help="accept files that differ from the benchmark's version")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    fetch.set_defaults(handler=_guarded(_fetch_wheels))
