"""`opsd-jax rationales ...`: write the frontier model's rationales once, then merge them into a manifest.

    opsd-jax rationales --manifest M.jsonl --out R.jsonl --model NAME --base-url URL [--split train] ...
    opsd-jax rationales merge --manifest M.jsonl --rationales R.jsonl --out M2.jsonl [--require-split train]

`register(subparsers)` adds the group to the `opsd-jax` parser (`opsd_jax.cli`), which runs it.
"""

from __future__ import annotations

import argparse
import os
import sys

from opsd_jax.config import local_path
from opsd_jax.rationales.client import (
    ChatClientError,
    add_client_arguments,
    client_from_arguments,
    json_object,
    positive_int,
)
from opsd_jax.rationales.generate import (
    DEFAULT_REQUEST_PARAMS,
    ValidationRules,
    generate_rationales,
    merge_rationales,
)
from opsd_jax.rationales.prompt import PromptOptions

DESCRIPTION = """\
Sends each clip's sampled frames (JPEG data URLs), subtitle and TRUE label to a frontier model behind an
OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, ...) and writes the evidence-aware rationale it returns
(the cues from face, voice and words that support the label) as one JSON line per clip. The rationales are
later shown only to the teacher, as privileged evidence.

The run is resumable: every line is fsync'ed as soon as its clip is done, ids already in --out are skipped,
and an interrupted last line is dropped, so rerunning the same command continues where it stopped. Clips
whose media cannot be read, or whose answers fail validation every time, get a "failed" line (retry them
with --retry-failed); clips that only met endpoint errors (429, 5xx, timeouts) get no line and a rerun
sends them again. The API key is read from the environment variable named by --api-key-env, never from
the command line, and is never written anywhere (an endpoint's error message that repeats it, or any
"Bearer ..." token, is written with the token replaced by [REDACTED]). The prompt is documented in opsd_jax/rationales/prompt.py.

Exit status: 0 when every selected clip has a line, 1 when some clips are still missing (rerun), 2 on an
error (bad input, unreadable files, a rejected key or model name)."""

MERGE_DESCRIPTION = """\
Writes a new manifest: MANIFEST with each clip's `rationale` field set from the ok lines of RATIONALES
(clips without one keep theirs). Media paths are written relative to the new manifest's directory."""


def _error(message: str) -> int:
    print(f"opsd-jax rationales: error: {message}", file=sys.stderr)
    return 2


def _generate(args: argparse.Namespace) -> int:
    missing = [
        flag
        for flag, value in (
            ("--manifest", args.manifest),
            ("--out", args.out),
            ("--model", args.model),
            ("--base-url", args.base_url),
        )
        if value is None
    ]
    if missing:
        return _error(f"{', '.join(missing)} required (or use `opsd-jax rationales merge ...`); see --help")
    if not os.environ.get(args.api_key_env):
        print(f"opsd-jax rationales: ${args.api_key_env} is not set; sending no Authorization header", file=sys.stderr)
    client = client_from_arguments(args)
    params = {**DEFAULT_REQUEST_PARAMS, "temperature": args.temperature, "max_tokens": args.max_tokens, **args.params}
    options = PromptOptions(max_words=args.max_words, max_side=args.max_side, image_detail=args.image_detail)
    summary = generate_rationales(
        args.manifest,
        args.out,
        client,
        frames_per_clip=args.frames,
        split=args.split,
        limit=args.limit,
        prompt_options=options,
        rules=ValidationRules.for_prompt(args.max_words, min_words=args.min_words),
        validation_retries=args.validation_retries,
        request_params=params,
        include_audio=args.audio,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
    )
    print(summary)
    if summary.remaining:  # the exit status the description promises: 1 while any selected clip lacks a line
        left_out = summary.remaining - summary.unfinished
        reasons = [f"{summary.unfinished} met endpoint errors"] if summary.unfinished else []
        reasons += [f"{left_out} were left for later by --limit"] if left_out else []
        print(
            f"opsd-jax rationales: {summary.remaining} clips have no line yet ({', '.join(reasons)}); "
            "rerun the same command to continue",
            file=sys.stderr,
        )
        return 1
    return 0


def _merge(args: argparse.Namespace) -> int:
    summary = merge_rationales(
        args.merge_manifest, args.merge_rationales, args.merge_out, require_split=args.require_split
    )
    print(f"{summary}; wrote {args.merge_out}")
    return 0


def _guarded(handler):
    """Expected failures (bad input, missing or malformed files, a rejected request) -> one line, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ChatClientError, ValueError, OSError) as err:  # ManifestError, RationaleFileError: ValueErrors
            return _error(str(err))

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `rationales` command (and its `merge` subcommand) to the `opsd-jax` parser."""
    parser = subparsers.add_parser(
        "rationales",
        help="write evidence-aware rationales with a frontier model; merge them into a manifest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("files")
    io.add_argument("--manifest", type=local_path, help="clip manifest JSONL (opsd_jax/data/manifest.py); required")
    io.add_argument("--out", type=local_path, help="rationale JSONL, created or resumed; required")
    io.add_argument("--split", help="only the clips of this split, e.g. train (default: every clip)")
    io.add_argument("--limit", type=int, help="attempt at most N clips that still lack a line (a trial, a budget)")
    io.add_argument(
        "--retry-failed", action="store_true", help="drop the failed lines of --out and try those clips again"
    )

    endpoint = parser.add_argument_group("endpoint (--model and --base-url required)")
    add_client_arguments(endpoint, timeout_s=60.0, max_retries=5, model_example="gpt-4o")

    request = parser.add_argument_group("prompt and answers")
    request.add_argument(
        "--frames", type=positive_int, default=8, help="frames per clip, evenly spaced (default: %(default)s)"
    )
    request.add_argument(
        "--max-side",
        type=positive_int,
        default=512,
        help="longest side of each JPEG frame in pixels (default: %(default)s)",
    )
    request.add_argument(
        "--image-detail",
        choices=("low", "high", "auto"),
        help="OpenAI image detail level (default: not sent, the endpoint decides)",
    )
    request.add_argument(
        "--audio",
        action="store_true",
        help="also send each clip's audio as an input_audio part (audio-capable models only)",
    )
    request.add_argument(
        "--max-words",
        type=positive_int,
        default=120,
        help="length asked for; answers over 1.25x this are rejected (default: %(default)s)",
    )
    request.add_argument(
        "--min-words", type=positive_int, default=15, help="shorter answers are rejected (default: %(default)s)"
    )
    request.add_argument(
        "--validation-retries",
        type=int,
        default=2,
        help="times to ask again after an invalid answer before the clip is recorded as failed (default: %(default)s)",
    )
    request.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (default: %(default)s)")
    request.add_argument(
        "--max-tokens", type=positive_int, default=512, help="completion token limit per answer (default: %(default)s)"
    )
    request.add_argument(
        "--params",
        type=json_object,
        default={},
        help="JSON merged into every request, e.g. '{\"top_p\": 0.9}' (overrides the two above)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_guarded(_generate))

    commands = parser.add_subparsers(title="subcommands", metavar="merge")
    merge = commands.add_parser(
        "merge", help="write a manifest with the rationales merged in", description=MERGE_DESCRIPTION
    )
    merge.add_argument(
        "--manifest",
        dest="merge_manifest",
        metavar="MANIFEST",
        type=local_path,
        required=True,
        help="the manifest the rationales were written for",
    )
    merge.add_argument(
        "--rationales",
        dest="merge_rationales",
        metavar="RATIONALES",
        type=local_path,
        required=True,
        help="the JSONL written by `opsd-jax rationales`",
    )
    merge.add_argument(
        "--out",
        dest="merge_out",
        metavar="OUT",
        type=local_path,
        required=True,
        help="the new manifest (must differ from MANIFEST)",
    )
    merge.add_argument(
        "--require-split", metavar="SPLIT", help="fail unless every clip of this split (e.g. train) has a rationale"
    )
    merge.set_defaults(handler=_guarded(_merge))
