"""`opsd-jax compile-check --config F [--topology NAME] [--out FILE.json]`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from opsd_jax.compile_check import report as report_module
from opsd_jax.compile_check.programs import ClipShape, check_config
from opsd_jax.config import ConfigError, load_config
from opsd_jax.models.architectures import thinker_config
from opsd_jax.sharding.topology import TopologyError, topology_chips, topology_devices

logger = logging.getLogger(__name__)

PROGRAMS = (
    "train_step",
    "train_micro_step",
    "rollout_prefill",
    "rollout_decode",
    "eval_prefill",
    "eval_decode",
    "reader_prefill",
    "reader_decode",
)


def _frame_size(text: str) -> tuple[int, int]:
    height, sep, width = text.partition("x")
    try:
        return int(height), int(width if sep else height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels (e.g. 224x224), got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides, num_devices=None)
    topology = args.topology or config.mesh.topology
    if not topology:
        raise ConfigError(f"{args.config}: mesh.topology is not set; pass --topology (e.g. v5p:4x4x2)")
    try:
        chips = topology_chips(topology)
    except TopologyError as err:
        raise ConfigError(str(err)) from None
    config.validate(chips)  # the mesh must fill the slice: a one-line error, before any compile

    try:
        chip, devices = topology_devices(topology)
    except TopologyError as err:
        print(f"opsd-jax: error: {err}", file=sys.stderr)
        return 2
    thinker, source = thinker_config(config.model.checkpoint)
    height, width = args.frame_size
    clip = ClipShape(
        num_frames=args.frames,
        height=height,
        width=width,
        audio_seconds=args.audio_seconds,
        text_tokens=args.text_tokens,
        rationale_tokens=args.rationale_tokens,
    )
    header = (
        f"compile-check {args.config} on {topology} ({chips} chips, mesh {config.mesh.data} x {config.mesh.fsdp} x "
        f"{config.mesh.tensor}); thinker: {source}; clips: {clip.num_frames} frames of {height} x {width}, "
        f"{clip.audio_seconds:g} s of audio"
    )
    print(header, flush=True)
    began = time.perf_counter()

    def progress(report) -> None:
        state = "compiled" if report.compiled else "FAILED"
        print(f"  {report.name}: {state} in {report.compile_seconds:.0f} s", flush=True)

    reports = check_config(config, thinker, chip, devices, clip=clip, programs=args.programs, on_program=progress)
    print()
    print(report_module.table(reports, chip, header))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            report_module.to_json(
                reports,
                chip,
                config=str(args.config),
                topology=topology,
                thinker=source,
                clip=dataclasses.asdict(clip),
                overrides=list(args.overrides),
                seconds=time.perf_counter() - began,
            )
        )
        print(f"\nwrote {args.out}")
    problems = report_module.verdicts(reports, args.min_spare)
    for problem in problems:
        print(f"opsd-jax: compile-check: {problem}", file=sys.stderr)
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compile-check",
        help="compile a config's programs for its TPU slice or GPUs, without them, and report memory and traffic",
        description="Compiles every program a training run of the config compiles (the train step with its "
        "micro-batch loop, one micro-batch alone for XLA's cost model, the rollout's prefill and decode loop, "
        "evaluation's generation) for a TPU topology with libtpu, or for GPUs with the CUDA plugin, on this machine, "
        "with no TPU or GPU. Prints per chip: "
        "memory (arguments, temporaries, outputs, what stays resident, the peak against HBM), FLOPs (loop "
        "bodies times their trip counts), XLA's cost-model time against pure compute, collectives by kind, and "
        "for the decode loop the bytes per generated token against the HBM floor. Exits 1 naming the program "
        "when one does not compile or leaves less than --min-spare of HBM, 2 on bad arguments. The model's "
        "architecture is the checkpoint's config.json, or the published one named by the checkpoint "
        "directory (Qwen2.5-Omni-3B / -7B) when the weights are elsewhere. Needs libtpu: "
        "pip install 'opsd-jax[tpu]'; GPUs (h100:N) need the CUDA plugin, pip install 'opsd-jax[cuda]', whose "
        "compile has no cost model (XLA prices GPU programs only on a GPU) and no autotuning (matmuls compiled as "
        "cuBLAS calls). A 7B config takes 5-20 minutes and up to ~12 GB of RAM.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="YAML run config file, or the name of a shipped one (demo_tiny, qwen2_5_omni_3b_v5e16, ...: configs/)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as in train")
    parser.add_argument(
        "--topology",
        help="TPU slice, GENERATION:CHIPGRID, e.g. v5p:4x4x2, or GPUs on one host, MODEL:COUNT, e.g. h100:1 "
        "(default: mesh.topology)",
    )
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument(
        "--programs",
        nargs="+",
        choices=PROGRAMS,
        metavar="NAME",
        help=f"compile only these ({', '.join(PROGRAMS)}; default: all)",
    )
    parser.add_argument("--frames", type=int, default=16, help="frames per clip of the dataset (default 16)")
    parser.add_argument(
        "--frame-size",
        type=_frame_size,
        default=(224, 224),
        metavar="HxW",
        help="frame size of the dataset in pixels (default 224x224)",
    )
    parser.add_argument("--audio-seconds", type=float, default=30.0, help="audio per clip in seconds (default 30)")
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=160,
        help="text tokens of a student prompt around the clip's media (default 160)",
    )
    parser.add_argument(
        "--rationale-tokens",
        type=int,
        default=320,
        help="tokens the teacher's prompt adds for the rationale (default 320)",
    )
    parser.add_argument(
        "--min-spare",
        type=float,
        default=0.10,
        help="fraction of HBM that must stay free at every program's peak (default 0.10)",
    )
    parser.set_defaults(handler=_run)
