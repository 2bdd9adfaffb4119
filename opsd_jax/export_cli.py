"""`opsd-jax export`: trained thinker parameters -> a Hugging Face checkpoint directory.

The export loads in transformers (`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`) and in
`opsd_jax.models.qwen2_5_omni.from_pretrained`, with the tokenizer and processor files copied along.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from opsd_jax.config import MeshConfig, local_path
from opsd_jax.models.export import TOKENIZER_FILES, export_thinker
from opsd_jax.models.weights import CheckpointError
from opsd_jax.sharding import make_mesh
from opsd_jax.trained import load_thinker, open_source

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`"5GB"` -> 5_000_000_000, `"512MiB"` -> 536_870_912, `"1000"` -> 1000 (Hugging Face's units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive size such as 5GB, 500MB, 512MiB or a byte count, got {text!r}"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write trained thinker parameters as a Hugging Face checkpoint directory",
        description="Converts the thinker's parameters back to the Hugging Face layout (safetensors shards, "
        "config.json, tokenizer files), thinker-only, loadable by transformers and by opsd-jax. The output "
        "directory appears only once it is complete.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=local_path,
        help="the trained parameters: a training run directory (run.output_dir of `opsd-jax "
        "train`) or a Hugging Face checkpoint directory",
    )
    parser.add_argument("--out", required=True, type=local_path, help="the directory to create")
    parser.add_argument("--step", type=int, help="with a run directory: the checkpoint step (default: the newest)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="tensor dtype of the export (default: the parameters' own)",
    )
    parser.add_argument(
        "--tokenizer-dir",
        type=local_path,
        help="copy tokenizer / processor / generation files from here (default: the base "
        "checkpoint directory, when it holds a tokenizer)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="at most this much per safetensors file, e.g. 5GB, 500MB (default 5GB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (once the new export is complete)"
    )
    parser.set_defaults(handler=run)


@dataclasses.dataclass(frozen=True)
class TrainedParams:
    """Parameters to export and the Hugging Face directory that describes their architecture.

    params: a `Qwen2_5OmniThinker`, or an `nnx.State` of its `nnx.Param`s.
    base_dir: the checkpoint directory whose config.json (and usually tokenizer) the run started from.
    """

    params: Any
    base_dir: Path


def load_trained_params(path: str | Path, step: int | None = None) -> TrainedParams:
    """The parameters stored at `path`, placed over all devices (fsdp) so none holds the whole model.

    Accepts a Hugging Face checkpoint directory (config.json + safetensors), or a training run
    directory (`run.output_dir` of `opsd-jax train`: its `config.yaml` names the base checkpoint, and
    `checkpoints/` holds the trained parameters; `step` picks one, default the newest that restores), in
    the run's `model.dtype` (a Hugging Face directory: float32).

    Raises:
      CheckpointError: `path` is missing or neither kind of directory, or `step` is not saved.
    """
    source = open_source(path, step=step, num_devices=None)
    dtype = "float32" if source.run_dir is None else source.config.model.dtype
    model, _ = load_thinker(source, dtype=dtype, mesh=make_mesh(MeshConfig()))
    return TrainedParams(model, source.base_dir)


def run(args: argparse.Namespace) -> int:
    trained = load_trained_params(args.checkpoint, args.step)
    tokenizer_dir = args.tokenizer_dir
    if tokenizer_dir is None and any((trained.base_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        tokenizer_dir = trained.base_dir
    summary = export_thinker(
        trained.params,
        trained.base_dir,
        args.out,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_size,
        tokenizer_dir=tokenizer_dir,
        overwrite=args.overwrite,
    )
    copied = sorted(
        name for name in TOKENIZER_FILES if tokenizer_dir is not None and (summary.directory / name).is_file()
    )
    print(
        f"exported {summary.num_tensors} tensors ({summary.total_bytes / 1e6:.1f} MB, {summary.dtype}, "
        f"{'tied' if summary.tie_word_embeddings else 'untied'} embeddings) in {len(summary.shards)} file(s) "
        f"to {summary.directory}"
    )
    print(f"tokenizer files: {', '.join(copied) if copied else 'none (pass --tokenizer-dir)'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`opsd-jax export ARGS` on its own (the same handler and error reporting as the full CLI)."""
    parser = argparse.ArgumentParser(prog="opsd-jax")
    register(parser.add_subparsers())
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except CheckpointError as err:
        print(f"opsd-jax export: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
