"""The demo's command line: seeds, conditions and arms to run, sizes; the report over all seeds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

from opsd_jax.demo import __doc__ as DESCRIPTION
from opsd_jax.demo import report
from opsd_jax.demo.arms import ARMS, DEFAULT_ARMS
from opsd_jax.demo.data import CONDITIONS
from opsd_jax.demo.run import QUICK, DemoSize, WorkdirError, check_seed_directory, run_seed


def _names(text: str, known, what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = list(known) if text == "all" else [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"--{what}: unknown or no {what} {unknown}; choose from {list(known)} or 'all'")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opsd_jax.demo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("outputs/demo"),
        help="where data, runs and results go (default: %(default)s). Each seed's data, warm start and finished "
        "arms are kept there: rerunning a command completes what an interrupted or partial run left, without "
        "redoing it; another --workdir starts afresh",
    )
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (default: %(default)s); the README's table: --seeds 0,1,2 --arms all",
    )
    parser.add_argument("--conditions", default="all", help="comma-separated subset of: " + ", ".join(CONDITIONS))
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help="comma-separated subset of: " + ", ".join(ARMS) + ", or 'all' (default: %(default)s)",
    )
    parser.add_argument("--arm-steps", type=int, help=f"training steps per arm (default {DemoSize.arm_steps})")
    parser.add_argument("--quick", action="store_true", help="a few clips and steps per stage (the test's smoke run)")
    args = parser.parse_args(argv)
    arms = _names(args.arms, ARMS, "arms", parser)
    conditions = _names(args.conditions, CONDITIONS, "conditions", parser)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds: expected at least one seed")
    size = QUICK if args.quick else DemoSize()
    if args.arm_steps is not None:
        if args.arm_steps < 1:
            parser.error(f"--arm-steps: expected >= 1, got {args.arm_steps}")
        size = dataclasses.replace(size, arm_steps=args.arm_steps, eval_every=min(size.eval_every, args.arm_steps))

    # Arms of one objective compile the same programs: the persistent cache compiles each once per workdir.
    jax.config.update("jax_compilation_cache_dir", str((args.workdir / "jax_cache").resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    for seed in seeds:  # before any work: a seed directory made for other sizes is refused
        try:
            check_seed_directory(args.workdir / f"seed{seed}", size)
        except WorkdirError as err:
            parser.error(str(err))
    began = time.perf_counter()
    results = [run_seed(args.workdir / f"seed{seed}", size, seed, conditions, arms) for seed in seeds]
    seconds = time.perf_counter() - began
    descriptions = {name: ARMS[name].description for name in arms}
    text = report.markdown(results, conditions, descriptions)
    command = " ".join(["python -m opsd_jax.demo", *(argv if argv is not None else sys.argv[1:])])
    text += f"\n`{command}`: {seconds / 60:.1f} minutes.\n"
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(
        json.dumps({"size": dataclasses.asdict(size), "seeds": results, "seconds": seconds}, indent=2)
    )
    (args.workdir / "results.md").write_text(text)
    report.plot(results, conditions, args.workdir / "accuracy.png")
    print(text)
    print(f"wrote {args.workdir / 'results.json'}, {args.workdir / 'results.md'} and {args.workdir / 'accuracy.png'}")
    return 0
