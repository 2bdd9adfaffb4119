"""The demo's stages, per seed: data of both conditions, a random tiny thinker, the warm start, the arms.

Every stage trains through `opsd_jax.train.Trainer` from configs/demo_tiny.yaml and a Hugging Face
checkpoint directory, as a real run does; `evaluate.view_scores` scores each trained model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from flax import nnx

from opsd_jax.config import load_config
from opsd_jax.data.manifest import read_manifest
from opsd_jax.demo.arms import ARMS
from opsd_jax.demo.data import ConditionData, build_condition
from opsd_jax.demo.evaluate import misleading_ids, subtitle_only_rows, view_scores
from opsd_jax.models.export import export_thinker
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig
from opsd_jax.testing.reference import tiny_thinker_config_dict
from opsd_jax.testing.tokenizer import build_tiny_tokenizer
from opsd_jax.train import Trainer, clear_run_directory


@dataclasses.dataclass(frozen=True)
class DemoSize:
    train_clips: int = 256
    test_clips: int = 96
    warm_steps: int = 150
    arm_steps: int = 120
    eval_every: int = 60


QUICK = DemoSize(train_clips=16, test_clips=8, warm_steps=2, arm_steps=2, eval_every=2)

# What a seed's directory keeps from one invocation to the next: its data and warm start (made once, for these
# sizes) and each arm's result (reused while the arm's own budget is unchanged), so an interrupted or partial
# run (`--arms`, `--seeds`) is completed by rerunning the full command, not redone.
_STAMP = "demo_size.json"


class WorkdirError(ValueError):
    """A seed directory made for other data or warm-start sizes than asked for."""


def _seed_sizes(size: DemoSize) -> dict[str, int]:
    return {"train_clips": size.train_clips, "test_clips": size.test_clips, "warm_steps": size.warm_steps}


def check_seed_directory(root: Path, size: DemoSize) -> None:
    """Refuses (`WorkdirError`, one line) a seed directory whose data and warm start were made for other sizes."""
    stamp = root / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) != _seed_sizes(size):
        raise WorkdirError(
            f"{stamp}: this seed's data and warm start were made for {json.loads(stamp.read_text())}, not "
            f"{_seed_sizes(size)}; pass another --workdir"
        )


def _write_json(path: Path, value: Any) -> None:
    """Atomically: a temporary file renamed into place, so an interrupted write leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)


def build_checkpoint(directory: Path, seed: int) -> Path:
    """A random tiny thinker, exported as a Hugging Face directory with the tiny tokenizer."""
    if (directory / "config.json").is_file():
        return directory
    config_dict = tiny_thinker_config_dict()
    model = Qwen2_5OmniThinker(ThinkerConfig.from_hf(config_dict), rngs=nnx.Rngs(seed))
    export_thinker(model, config_dict, directory)
    build_tiny_tokenizer(directory)
    return directory


def make_trainer(
    checkpoint: Path,
    train_dir: Path,
    eval_dir: Path,
    output: Path,
    size: DemoSize,
    seed: int,
    steps: int,
    overrides: tuple[str, ...] | list[str] = (),
):
    config = load_config(
        "demo_tiny",
        [
            f"model.checkpoint={checkpoint}",
            f"data.train_dir={train_dir}",
            f"data.eval_dir={eval_dir}",
            f"data.eval_clips={size.test_clips}",
            f"train.total_steps={max(steps, 1)}",
            f"train.seed={seed}",
            f"train.warmup_steps={min(5, max(steps - 1, 0))}",
            f"run.output_dir={output}",
            f"run.eval_every={size.eval_every}",
            f"run.save_every={max(steps, 1)}",
            *overrides,
        ],
    )
    clear_run_directory(config.run.output_dir)  # a rerun of the demo replaces its stages' runs
    return Trainer(config)


def train(trainer):
    """`trainer.run()`; a SIGTERM (the trainer saves and stops) stops the whole demo, not just this stage."""
    summary = trainer.run()
    trainer.checkpointer.close()
    if summary.preempted:
        raise SystemExit(f"stopped by SIGTERM at step {summary.steps} of {trainer.output_dir}")
    return summary


def score(trainer, data: ConditionData, *, subtitles: bool = True, privileged: str | None = None) -> dict[str, float]:
    """`evaluate.view_scores` of the trainer's model on a condition's held-out clips: the student's prompt
    (with or without subtitles), or with `privileged` (a dataset name) the teacher's prompt of that dataset."""
    if privileged is not None:  # the teacher: its media do not matter once it reads the context (no swap view)
        rows, swapped = trainer.predict(str(data.datasets[privileged]), with_rationale=True), None
    else:
        rows = trainer.predict(str(data.datasets["main" if subtitles else "no_subtitle"]))
        swapped = trainer.predict(str(data.datasets["swapped" if subtitles else "swapped_no_subtitle"]))
    misleading = misleading_ids(c for c in read_manifest(data.manifest) if c.split == "test")
    return view_scores(rows, swapped, misleading)


def warm_start(
    root: Path, checkpoint: Path, data: dict[str, ConditionData], size: DemoSize, seed: int
) -> tuple[Path, dict[str, Any]]:
    """Stage 0, cached in `root/thinker_warm`: cross-entropy on the label given the teacher's prompt whose
    media are a random partner clip's, on the standard condition's training clips, half of them with the
    label statement as evidence. The thinker learns to read evidence written in its prompt (a rationale or
    a plain statement), as a pretrained model can, and nothing about the media."""
    directory, report_file = root / "thinker_warm", root / "warm_start.json"
    if (directory / "config.json").is_file() and report_file.is_file():
        return directory, json.loads(report_file.read_text())
    standard = data["standard"]
    trainer = make_trainer(
        checkpoint,
        standard.datasets["warm"],
        standard.datasets["main"],
        root / "runs" / "warm_start",
        size,
        seed,
        size.warm_steps,
        [
            "teacher.distill_weight=0.0",
            "teacher.label_ce_weight=1.0",
            "teacher.label_ce_prompt=teacher",
            "train.lr=3e-3",
            "train.train_encoders=false",
        ],
    )
    summary = train(trainer)
    report: dict[str, Any] = {"seconds": summary.seconds, "history": summary.eval_history}
    for condition, condition_data in data.items():
        report[condition] = {
            "student": score(trainer, condition_data),
            "teacher_rationale": score(trainer, condition_data, privileged="main"),
            "teacher_label": score(trainer, condition_data, privileged="label"),
            "teacher_mismatched": score(trainer, condition_data, privileged="mismatched"),
        }
    if directory.exists():
        shutil.rmtree(directory)
    export_thinker(
        trainer.model, json.loads((checkpoint / "config.json").read_text()), directory, tokenizer_dir=checkpoint
    )
    _write_json(report_file, report)
    return directory, report


def run_arm(
    root: Path, warm: Path, data: ConditionData, condition: str, arm_name: str, size: DemoSize, seed: int
) -> dict[str, Any]:
    """One arm of one condition from the warm start: its accuracy along the way and its final scores.

    Kept in `root/runs/CONDITION/ARM.json` with the arm's budget; a later call with the same budget returns
    it (marked `"cached": true`) without training again."""
    arm = ARMS[arm_name]
    overrides = arm.overrides
    result_file = root / "runs" / condition / f"{arm_name}.json"
    budget = {"arm_steps": size.arm_steps, "eval_every": size.eval_every, "overrides": list(overrides)}
    if result_file.is_file():
        kept = json.loads(result_file.read_text())
        if kept.get("budget") == budget:
            return {**kept["result"], "cached": True}
    eval_dir = data.datasets["main" if arm.subtitles else "no_subtitle"]
    trainer = make_trainer(
        warm,
        data.datasets[arm.train],
        eval_dir,
        root / "runs" / condition / arm_name,
        size,
        seed,
        size.arm_steps,
        overrides,
    )
    summary = train(trainer)
    result = {
        "history": summary.eval_history,
        "seconds": summary.seconds,
        "scores": score(trainer, data, subtitles=arm.subtitles),
    }
    _write_json(result_file, {"budget": budget, "result": result})
    return result


def run_seed(root: Path, size: DemoSize, seed: int, conditions: list[str], arms: list[str]) -> dict[str, Any]:
    """Everything of one seed under `root`; returns its results (also written to `root/results.json`)."""
    began = time.perf_counter()
    check_seed_directory(root, size)
    _write_json(root / _STAMP, _seed_sizes(size))
    print(
        f"[seed {seed}] data: {size.train_clips} training and {size.test_clips} held-out clips per condition "
        f"({', '.join(conditions)}), rule-based rationales",
        flush=True,
    )
    data = {
        c: build_condition(root / "data" / c, c, train_clips=size.train_clips, test_clips=size.test_clips, seed=seed)
        for c in dict.fromkeys(["standard", *conditions])
    }
    checkpoint = build_checkpoint(root / "thinker_init", seed)
    print(f"[seed {seed}] stage 0, warm start: reading evidence written in the prompt", flush=True)
    warm_checkpoint, warm = warm_start(root, checkpoint, data, size, seed)
    results: dict[str, Any] = {"seed": seed, "warm_start": warm, "conditions": {}}
    for condition in conditions:
        test = [c for c in read_manifest(data[condition].manifest) if c.split == "test"]
        subtitle_rows = subtitle_only_rows(test)
        references = {
            "subtitle_only": view_scores(subtitle_rows, subtitle_rows, misleading_ids(test)),
            "warm_start": warm[condition]["student"],
            "teacher_with_rationale": warm[condition]["teacher_rationale"],
            "teacher_with_label": warm[condition]["teacher_label"],
            "teacher_with_mismatched_rationale": warm[condition]["teacher_mismatched"],
        }
        print(
            f"[seed {seed}] {condition}: warm-start student {100 * references['warm_start']['all/accuracy']:.1f}%, "
            f"teacher with rationale {100 * references['teacher_with_rationale']['all/accuracy']:.1f}%, "
            f"subtitle only {100 * references['subtitle_only']['all/accuracy']:.1f}%",
            flush=True,
        )
        trained = {}
        for index, arm in enumerate(arms, 1):
            trained[arm] = run_arm(root, warm_checkpoint, data[condition], condition, arm, size, seed)
            s = trained[arm]["scores"]
            print(
                f"[seed {seed}] {condition} arm {index}/{len(arms)} {arm}: all {100 * s['all/accuracy']:.1f}%, "
                f"misleading {100 * s['misleading/accuracy']:.1f}%, swapped media {100 * s['swapped/accuracy']:.1f}% "
                f"({trained[arm]['seconds']:.0f}s{', kept from an earlier run' if trained[arm].get('cached') else ''})",
                flush=True,
            )
        results["conditions"][condition] = {"references": references, "arms": trained}
    results["seconds"] = time.perf_counter() - began
    _write_json(root / "results.json", results)
    return results


__all__ = ["DemoSize", "QUICK", "run_seed"]
