"""`opsd-jax eval ...`: score saved predictions on MER-UniBench and fetch the emotion-wheel files.

    opsd-jax eval score --predictions P.jsonl --wheel-dir DIR [--out DIR] [--extractor auto|saved|builtin|llm]
    opsd-jax eval fetch-wheels --dest DIR [--base-url URL] [--no-verify]

`register(subparsers)` adds the group to the main `opsd-jax` parser; `main(argv)` runs it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

EXTRACTED_PREDICTIONS_FILE = "predictions.extracted.jsonl"
CACHE_FILE = "extractor_cache.jsonl"


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _make_llm_extractor(args: argparse.Namespace):
    from opsd_jax.eval.extract import BENCHMARK_SAMPLING, LLMExtractor
    from opsd_jax.rationales.client import ChatClient

    if not args.llm_base_url or not args.llm_model:
        raise ValueError("--extractor llm needs --llm-base-url and --llm-model")
    client = ChatClient(
        args.llm_base_url,
        args.llm_model,
        api_key_env=args.llm_api_key_env,
        timeout_s=args.llm_timeout,
        max_retries=args.llm_max_retries,
        max_concurrency=args.llm_max_concurrency,
    )
    cache = args.llm_cache or (Path(args.out) if args.out else Path(args.predictions).parent) / CACHE_FILE
    return LLMExtractor(client, cache, {**BENCHMARK_SAMPLING, **args.llm_params}, progress=not args.no_progress)


def _score(args: argparse.Namespace) -> int:
    from opsd_jax.eval.extract import BuiltinExtractor, check_saved_extractions
    from opsd_jax.eval.predictions import read_predictions, write_predictions
    from opsd_jax.eval.report import markdown_report, write_report
    from opsd_jax.eval.scoring import score_records
    from opsd_jax.eval.wheels import load_emotion_wheels

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
        extractor_name = check_saved_extractions(records)
    else:
        extractor = BuiltinExtractor(wheels) if mode == "builtin" else _make_llm_extractor(args)
        records = extractor.extract(records)
        extractor_name = extractor.name
        if mode == "llm":
            metadata["extractor_requests_sent"] = extractor.requests_sent
            metadata["extractor_cache"] = str(extractor.cache.path)
            metadata["extractor_usage"] = dataclasses.asdict(extractor.client.usage)
            metadata["extractor_sampling"] = extractor.sampling
    scores = score_records(records, wheels, extractor_name)
    print(markdown_report(scores), end="")
    if args.out:
        json_path, markdown_path = write_report(scores, args.out, metadata)
        written = [json_path, markdown_path]
        if mode != "saved":
            write_predictions(Path(args.out) / EXTRACTED_PREDICTIONS_FILE, records)
            written.append(Path(args.out) / EXTRACTED_PREDICTIONS_FILE)
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0


def _fetch_wheels(args: argparse.Namespace) -> int:
    from opsd_jax.eval.fetch import fetch_wheel_files

    for path in fetch_wheel_files(args.dest, args.base_url, verify=not args.no_verify, timeout_s=args.timeout):
        print(path)
    return 0


def _guarded(handler):
    """Turn the expected failures (bad input, missing files, network) into a one-line error and exit 2."""

    def run(args: argparse.Namespace) -> int:
        from opsd_jax.eval.extract import ExtractionError
        from opsd_jax.eval.fetch import FetchError
        from opsd_jax.eval.wheels import WheelFilesError
        from opsd_jax.rationales.client import ChatClientError

        try:
            return handler(args)
        except (WheelFilesError, FetchError, ExtractionError, ChatClientError, ValueError) as err:
            print(f"opsd-jax: error: {err}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command group to the `opsd-jax` parser."""
    from opsd_jax.eval.fetch import DEFAULT_BASE_URL

    group = subparsers.add_parser(
        "eval", help="MER-UniBench evaluation", description="Score predictions on MER-UniBench, fetch its files."
    )
    commands = group.add_subparsers(title="eval commands", metavar="COMMAND")
    group.set_defaults(handler=lambda args: group.print_help() or 2)

    score = commands.add_parser(
        "score",
        help="score a predictions JSONL file",
        description="Extracts labels from each prediction's free text (unless they are saved), scores every "
        "dataset with the benchmark's metrics and prints the table; with --out also writes scores.json, "
        "report.md and the predictions with their extracted labels. The JSONL schema is documented in "
        "opsd_jax/eval/predictions.py.",
    )
    score.add_argument("--predictions", required=True, type=Path, help="predictions JSONL file")
    score.add_argument("--wheel-dir", required=True, type=Path, help="directory with the 7 emotion-wheel files")
    score.add_argument("--out", type=Path, help="directory for scores.json, report.md and extracted predictions")
    score.add_argument(
        "--extractor",
        choices=("auto", "saved", "builtin", "llm"),
        default="auto",
        help="saved: use the labels in the file; builtin: lexicon matching, no model; llm: the benchmark's "
        "extractor prompts on an OpenAI-compatible endpoint; auto (default): saved if every line has them, "
        "else builtin",
    )
    llm = score.add_argument_group("LLM extractor (--extractor llm)")
    llm.add_argument("--llm-base-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    llm.add_argument("--llm-model", help="model name on that endpoint (the benchmark uses Qwen2.5-7B-Instruct)")
    llm.add_argument("--llm-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    llm.add_argument("--llm-cache", type=Path, help=f"answer cache JSONL (default: OUT/{CACHE_FILE})")
    llm.add_argument("--llm-params", type=_json_object, default={}, help="JSON merged into the sampling parameters, "
                     'e.g. \'{"repetition_penalty": 1.05}\' for vLLM')
    llm.add_argument("--llm-max-concurrency", type=int, default=8)
    llm.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per request")
    llm.add_argument("--llm-max-retries", type=int, default=6)
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(handler=_guarded(_score))

    fetch = commands.add_parser(
        "fetch-wheels",
        help="download the emotion-wheel files",
        description="Downloads format.csv, synonym.xlsx and wheel1..5.xlsx (AffectGPT/emotion_wheel/ in "
        "https://github.com/zeroQiaoba/AffectGPT, Apache-2.0) and checks them against the benchmark's version.",
    )
    fetch.add_argument("--dest", required=True, type=Path, help="directory to write the files into")
    fetch.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"where the files are (default: %(default)s)")
    fetch.add_argument("--no-verify", action="store_true", help="accept files that differ from the benchmark's version")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    fetch.set_defaults(handler=_guarded(_fetch_wheels))


def main(argv: Sequence[str] | None = None) -> int:
    """Run `opsd-jax eval ...` alone: `main(["eval", "score", ...])`."""
    parser = argparse.ArgumentParser(prog="opsd-jax")
    register(parser.add_subparsers(title="commands", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
