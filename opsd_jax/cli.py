"""`opsd-jax`: the command-line entry point.

Each command group lives beside the code it drives and registers itself here with `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Sequence

import yaml

from opsd_jax.compile_check.cli import register as register_compile_check
from opsd_jax.config import ConfigError, load_config
from opsd_jax.data_cli import register as register_data
from opsd_jax.eval.cli import lift_overrides
from opsd_jax.eval.cli import register as register_eval
from opsd_jax.export_cli import register as register_export
from opsd_jax.generate_cli import register as register_generate
from opsd_jax.models.weights import CheckpointError
from opsd_jax.rationales.cli import register as register_rationales
from opsd_jax.train import TrainingDiverged, initialize_distributed, train

LOG_LEVELS = ("debug", "info", "warning", "error")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a caller, such as a test, may replace it and
    close the old one between records)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        del value


def configure_logging(level: str = "info") -> None:
    """The process's logging, set once before any command runs: `level` for opsd-jax and the libraries.

    absl (orbax's and JAX's log) stays at errors unless `level` is debug: orbax warns on every read-only
    open of a run directory, which is how every reader opens one.
    """
    numeric = getattr(logging, level.upper())
    root = logging.getLogger()
    # Plain stream handlers a library (or an earlier call) installed would print every record twice; subclasses
    # (a test runner's capture) stay.
    for handler in [h for h in root.handlers if type(h) in (logging.StreamHandler, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("absl").setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.ERROR))


def _config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides, num_devices=None if args.no_device_check else "auto")
    print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
    return 0


def _register_config(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="load, validate and print a run configuration",
        description="Loads a YAML config, applies key.sub=value overrides, validates it against the "
        "devices JAX sees, and prints the resolved configuration as YAML.",
    )
    parser.add_argument("--config", help="YAML file (default: built-in defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-5 mesh.fsdp=4"
    )
    parser.add_argument(
        "--no-device-check", action="store_true", help="skip checking the mesh against the device count"
    )
    parser.set_defaults(handler=_config_show)


def _train(args: argparse.Namespace) -> int:
    initialize_distributed()  # before the config asks JAX for the device count
    config = load_config(args.config, args.overrides)
    try:
        summary = train(
            config,
            resume=args.resume,
            max_steps=args.max_steps,
            resume_step=args.step,
            require_checkpoint=args.require_checkpoint,
            overwrite=args.overwrite,
        )
    except TrainingDiverged as err:
        print(f"opsd-jax train: {err}", file=sys.stderr)
        return 1
    print(
        f"trained to step {summary.steps} in {summary.seconds:.1f}s"
        + (" (stopped by SIGTERM; rerun with --resume)" if summary.preempted else "")
    )
    for name, value in sorted(summary.final_metrics.items()):
        print(f"  {name}: {value:.4g}")
    return 0


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run OmniOPSD training from a config",
        description="Trains the thinker with rationale-privileged on-policy self-distillation: rollouts of "
        "the student, one batched teacher forward over the rationale-prefixed prompts, the configured "
        "divergence, an optax update. Every host of a pod runs the same command. Checkpoints, logs and "
        "the summary go to run.output_dir.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="YAML run config file, or the name of a shipped one (demo_tiny, qwen2_5_omni_3b_v5e16, ...: configs/)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-5")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint that restores (a corrupt one is skipped, with a "
        "warning); with none, start at step 0 and say so",
    )
    parser.add_argument(
        "--require-checkpoint",
        action="store_true",
        help="like --resume, but refuse to start when run.output_dir holds no checkpoint",
    )
    parser.add_argument("--step", type=int, help="resume from this checkpoint step (implies --resume)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="clear a previous run in run.output_dir (its checkpoints, logs, config.yaml) first",
    )
    parser.add_argument("--max-steps", type=int, help="stop after this many more steps")
    parser.set_defaults(handler=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opsd-jax",
        description="OmniOPSD in JAX: rationale-privileged on-policy self-distillation for omni-modal "
        "(video + audio + text) emotion understanding with the Qwen2.5-Omni thinker.",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="what the log shows, for every command (before it: opsd-jax --log-level debug train ...)",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _register_config(subparsers)
    _register_train(subparsers)

    register_data(subparsers)
    register_generate(subparsers)
    register_rationales(subparsers)
    register_eval(subparsers)
    register_export(subparsers)
    register_compile_check(subparsers)
    return parser


def parse_command_line(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """`opsd-jax ARGV` -> its arguments, as `main` runs them; a command line argparse refuses exits 2 (SystemExit)."""
    parser = parser or build_parser()
    argv = list(argv)
    lifted: list[str] = []
    if argv[:1] == ["eval"]:  # its COMMAND positional would take a KEY=VALUE word for a command's name
        argv, lifted = lift_overrides(argv)
    args, extra = parser.parse_known_args(argv)
    if lifted:
        args.overrides = [*args.overrides, *lifted]
    # KEY=VALUE overrides may sit on both sides of a flag (`train.lr=1 --resume train.seed=3`); argparse
    # gives a positional list only its first run of words, the later ones come back as unknown.
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(sys.argv[1:] if argv is None else argv, parser)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    configure_logging(args.log_level)

    try:
        return int(args.handler(args) or 0)
    except (ConfigError, CheckpointError) as err:
        print(f"opsd-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
