"""`opsd-jax export`: trained thinker parameters -> a Hugging Face checkpoint directory.

`--format merged` (the default) writes full weights, which load in transformers
(`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`) and in
`opsd_jax.models.qwen2_5_omni.from_pretrained`, with the tokenizer and processor files copied along; a LoRA
run's adapters are merged into the base weights. `--format peft` writes a LoRA run's adapters alone, as a
PEFT adapter directory for `peft.PeftModel.from_pretrained` on the base checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from opsd_jax.config import MeshConfig, local_path
from opsd_jax.models.export import (
    DEFAULT_MAX_SHARD_BYTES,
    TOKENIZER_FILES,
    ExportError,
    export_peft_adapter,
    export_thinker,
)
from opsd_jax.models.weights import CheckpointError
from opsd_jax.sharding import make_mesh
from opsd_jax.trained import RUN_CONFIG, TrainedSource, load_thinker, open_source

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
        "config.json, tokenizer files), thinker-only, loadable by transformers and by opsd-jax; or writes a LoRA "
        "run's adapters as a PEFT adapter directory (--format peft). The output directory appears only once it "
        "is complete.",
    )
    parser.add_argument(
        "--format",
        choices=("merged", "peft"),
        default="merged",
        help="merged (default): full weights; a LoRA run's adapters are merged into its base weights "
        "(kernel + a @ b * alpha / rank; a QLoRA run's quantized base kernels are dequantized first), a "
        "checkpoint directory transformers loads on its own. peft: a LoRA run's adapters only "
        "(adapter_config.json + adapter_model.safetensors, PEFT's names for the thinker's modules), which "
        "peft.PeftModel.from_pretrained loads onto the run's base checkpoint (model.checkpoint); not for a "
        "full fine-tune nor a QLoRA run (PEFT would add its adapters to the unquantized base)",
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
        help="--format merged: at most this much per safetensors file, e.g. 5GB, 500MB (default 5GB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (once the new export is complete)"
    )
    parser.set_defaults(handler=run)


@dataclasses.dataclass(frozen=True)
class TrainedParams:
    """Parameters to export and the Hugging Face directory that describes their architecture.

    params: a `Qwen2_5OmniThinker` (with LoRA adapters for a LoRA run), or an `nnx.State` of its `nnx.Param`s.
    base_dir: the checkpoint directory whose config.json (and usually tokenizer) the run started from.
    """

    params: Any
    base_dir: Path


def load_trained_params(path: str | Path, step: int | None = None) -> TrainedParams:
    """The parameters stored at `path`, placed over all devices (fsdp) so none holds the whole model.

    Accepts a Hugging Face checkpoint directory (config.json + safetensors), or a training run
    directory (`run.output_dir` of `opsd-jax train`: its `config.yaml` names the base checkpoint, and
    `checkpoints/` holds the trained parameters; `step` picks one, default the newest that restores), in
    the run's `model.dtype` (a Hugging Face directory: float32); a LoRA run's as the base thinker with its
    trained adapters.

    Raises:
      CheckpointError: `path` is missing or neither kind of directory, or `step` is not saved.
    """
    source = open_source(path, step=step, num_devices=None)
    dtype = "float32" if source.run_dir is None else source.config.model.dtype
    model, _ = load_thinker(source, dtype=dtype, mesh=make_mesh(MeshConfig()))
    return TrainedParams(model, source.base_dir)


def check_format(export_format: str, source: TrainedSource, max_shard_size: int | None) -> None:
    """Refuses a `--format` that `source` cannot give (before any model loads).

    Raises:
      ExportError: `peft` for a Hugging Face directory, a full fine-tune or a QLoRA run, or with --max-shard-size.
    """
    if export_format != "peft":
        return
    if max_shard_size is not None:
        raise ExportError("--max-shard-size: applies to --format merged; a PEFT adapter is one file")
    if source.run_dir is None:
        raise ExportError(
            f"--format peft: {source.path} is a Hugging Face checkpoint directory, which holds no LoRA adapters; "
            "pass the directory of a run with model.lora set"
        )
    settings = source.config.model.lora
    if settings is None:
        raise ExportError(
            f"--format peft: {source.run_dir / RUN_CONFIG} has no model.lora (the run trained every weight, there "
            "are no adapters); use --format merged"
        )
    if settings.base_dtype in ("int8", "nf4"):
        raise ExportError(
            f"--format peft: {source.run_dir / RUN_CONFIG} has model.lora.base_dtype {settings.base_dtype} (QLoRA): "
            "its adapters were trained on quantized base kernels and PEFT would add them to the unquantized base, "
            "another model; use --format merged (the dequantized base with the adapters merged)"
        )


def run(args: argparse.Namespace) -> int:
    check_format(args.format, open_source(args.checkpoint, step=args.step, num_devices=None), args.max_shard_size)
    trained = load_trained_params(args.checkpoint, args.step)
    tokenizer_dir = args.tokenizer_dir
    if tokenizer_dir is None and any((trained.base_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        tokenizer_dir = trained.base_dir
    if args.format == "peft":
        adapter = export_peft_adapter(
            trained.params,
            args.out,
            base_model=str(trained.base_dir),
            dtype=args.dtype,
            tokenizer_dir=tokenizer_dir,
            overwrite=args.overwrite,
        )
        print(
            f"exported the LoRA adapters of {len(adapter.modules)} layers (rank {adapter.rank}, alpha "
            f"{adapter.alpha:g}, {adapter.total_bytes / 1e6:.1f} MB, {adapter.dtype}) as a PEFT adapter for "
            f"{trained.base_dir} to {adapter.directory}"
        )
        return 0
    summary = export_thinker(
        trained.params,
        trained.base_dir,
        args.out,
        dtype=args.dtype,
        max_shard_bytes=DEFAULT_MAX_SHARD_BYTES if args.max_shard_size is None else args.max_shard_size,
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
