"""`make demo`: rationale-privileged self-distillation teaching a student that never sees a rationale.

Everything runs on the CPU with nothing downloaded, through the real pipeline:

1. **Data.** `synthetic_affect` clips (a drawn face whose mouth and brows carry valence, a voice whose
   pitch and energy carry arousal, a subtitle that agrees or misleads) are written as mp4 files with a
   manifest; a rule-based stand-in for the frontier model writes evidence-aware rationales through the
   same rationale interface and files as the real one; the clips become TFDS ArrayRecord datasets.
2. **A tiny thinker** is initialised at random in Flax and exported as a Hugging Face checkpoint, so
   every later stage loads it as it would load Qwen2.5-Omni.
3. **Stage 0, warm start (cached).** The thinker learns to *read written evidence*, as a pretrained
   model can: cross-entropy on the label given the teacher's prompt, whose media come from another
   clip, so the media carry no information and the student stays near chance.
4. **Stage 1 and the ablations,** under the same budget, from the warm start: OmniOPSD (frozen
   teacher with the rationale in its prompt), a teacher without the rationale, supervised fine-tuning
   on labels, on rationales (imitation), and a label-reward policy gradient (GRPO-style).
5. **Output:** held-out accuracy and macro-F1 per arm (no rationale at test time), a PNG plot of
   accuracy against step, and JSON, under the work directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_tiny.yaml"

# Arm name -> config overrides on top of configs/demo_tiny.yaml (all start from the warm start).
ARMS: dict[str, list[str]] = {
    "omniopsd": ["teacher.distill_weight=1.0"],
    "teacher_without_rationale": ["teacher.distill_weight=1.0", "teacher.use_rationale=false"],
    "sft_labels": ["teacher.distill_weight=0.0", "teacher.label_ce_weight=1.0"],
    "sft_rationales": ["teacher.distill_weight=0.0", "teacher.label_ce_weight=1.0", "teacher.label_ce_target=rationale",
                       "data.answer_length=224", "sampling.eval_max_new_tokens=224"],
    "grpo_label_reward": ["teacher.distill_weight=0.0", "teacher.label_pg_weight=1.0"],
}


@dataclasses.dataclass(frozen=True)
class DemoSize:
    train_clips: int = 256
    test_clips: int = 64
    warm_steps: int = 150
    arm_steps: int = 120
    eval_every: int = 30


QUICK = DemoSize(train_clips=16, test_clips=8, warm_steps=2, arm_steps=2, eval_every=2)


def build_data(workdir: Path, size: DemoSize, seed: int) -> dict[str, Path]:
    """Clips, rule-based rationales (train and test: the test ones only to measure the teacher), and the
    TFDS datasets: `train` / `test` as they are, and `warm` with every clip's media swapped for another's."""
    from opsd_jax.data.builders import build_mer
    from opsd_jax.data.builders.mer import MerConfig
    from opsd_jax.data.manifest import read_manifest, write_manifest
    from opsd_jax.data.synthetic import write_synthetic_manifest
    from opsd_jax.rationales.generate import merge_rationales
    from opsd_jax.rationales.rule_based import write_rule_based_rationales

    data = workdir / "data"
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        write_synthetic_manifest(data, size.train_clips, size.test_clips, seed=seed)
    rationales = data / "rationales.jsonl"
    write_rule_based_rationales(manifest, rationales, split=None)  # resumable: a rerun sends nothing
    with_rationales = data / "manifest_with_rationales.jsonl"
    if not with_rationales.is_file():
        merge_rationales(manifest, rationales, with_rationales, require_split="train")
    clips = read_manifest(with_rationales)
    train = [c for c in clips if c.split == "train"]
    # The warm start's clips: labels and rationales kept, media rotated by one clip of another label.
    shifted = train[1:] + train[:1]
    warm = [dataclasses.replace(c, video=other.video, audio=other.audio) for c, other in zip(train, shifted)]
    warm_manifest = write_manifest(data / "manifest_warm.jsonl", warm)
    config = MerConfig(name="demo", num_frames=4, height=56, width=56, max_audio_seconds=1.0)
    return {
        "main": build_mer(with_rationales, workdir / "tfds", config),
        "warm": build_mer(warm_manifest, workdir / "tfds_warm", dataclasses.replace(config, name="warm")),
    }


def build_checkpoint(workdir: Path, seed: int) -> Path:
    """A random tiny thinker, exported as a Hugging Face directory with the tiny tokenizer."""
    from flax import nnx

    from opsd_jax.models.export import export_thinker
    from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig
    from opsd_jax.testing.reference import tiny_thinker_config_dict
    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    directory = workdir / "thinker_init"
    if (directory / "config.json").is_file():
        return directory
    config_dict = tiny_thinker_config_dict()
    model = Qwen2_5OmniThinker(ThinkerConfig.from_hf(config_dict), rngs=nnx.Rngs(seed))
    export_thinker(model, config_dict, directory)
    build_tiny_tokenizer(directory)
    return directory


def run_stage(name: str, checkpoint: Path, datasets: dict[str, Path], workdir: Path, overrides: list[str],
              steps: int, size: DemoSize, seed: int) -> tuple[Any, dict[str, Any]]:
    """One training stage through `opsd_jax.train.Trainer`: returns the trainer and its summary."""
    from opsd_jax.config import load_config
    from opsd_jax.train import Trainer

    config = load_config(CONFIG, [
        f"model.checkpoint={checkpoint}", f"data.train_dir={datasets['main']}", f"data.eval_dir={datasets['main']}",
        f"data.eval_clips={size.test_clips}", f"train.total_steps={steps}", f"train.seed={seed}",
        f"train.warmup_steps={min(5, steps - 1)}",
        f"run.output_dir={workdir / 'runs' / name}", f"run.eval_every={size.eval_every}",
        f"run.save_every={steps}", *overrides,
    ])
    trainer = Trainer(config)
    history = [{"step": 0, **trainer.evaluate()}]
    summary = trainer.run()
    trainer.checkpointer.close()
    history += summary.eval_history
    return trainer, {"history": history, "seconds": summary.seconds, "final": history[-1]}


def warm_start(checkpoint: Path, datasets: dict[str, Path], workdir: Path, size: DemoSize, seed: int) -> tuple[Path, dict]:
    """Stage 0, cached in `workdir/thinker_warm` (a Hugging Face directory)."""
    from opsd_jax.models.export import export_thinker

    directory = workdir / "thinker_warm"
    report_file = workdir / "warm_start.json"
    if (directory / "config.json").is_file() and report_file.is_file():
        return directory, json.loads(report_file.read_text())
    overrides = ["teacher.distill_weight=0.0", "teacher.label_ce_weight=1.0", "teacher.label_ce_prompt=teacher",
                 f"data.train_dir={datasets['warm']}", "train.lr=3e-3"]
    trainer, summary = run_stage("warm_start", checkpoint, datasets, workdir, overrides, size.warm_steps, size, seed)
    report = {
        "student_accuracy": trainer.evaluate()["eval/accuracy"],
        "teacher_accuracy": trainer.evaluate(with_rationale=True)["eval/accuracy"],
        "seconds": summary["seconds"],
    }
    if directory.exists():
        shutil.rmtree(directory)
    export_thinker(trainer.model, json.loads((checkpoint / "config.json").read_text()), directory, tokenizer_dir=checkpoint)
    report_file.write_text(json.dumps(report, indent=2))
    return directory, report


def plot(results: dict[str, dict[str, Any]], path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for arm, result in results.items():
        steps = [row["step"] for row in result["history"]]
        accuracy = [100 * row["eval/accuracy"] for row in result["history"]]
        axis.plot(steps, accuracy, marker="o", label=arm)
    axis.axhline(25, color="gray", linestyle=":", label="chance (4 classes)")
    axis.set_xlabel("training step")
    axis.set_ylabel("held-out accuracy (%), no rationale")
    axis.set_title(f"synthetic_affect, tiny thinker, seed {seed}")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def table(results: dict[str, dict[str, Any]], warm: dict[str, Any], seed: int) -> str:
    rows = ["| arm | held-out accuracy | macro-F1 | gain over warm start | seed |", "|---|---|---|---|---|"]
    for arm, result in results.items():
        final = result["final"]
        gain = 100 * (final["eval/accuracy"] - warm["student_accuracy"])
        rows.append(f"| {arm} | {100 * final['eval/accuracy']:.1f} | {100 * final['eval/macro_f1']:.1f} | "
                    f"{gain:+.1f} | {seed} |")
    return "\n".join(rows)


def run(workdir: Path, size: DemoSize, seed: int, arms: list[str]) -> dict[str, Any]:
    began = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] data: {size.train_clips} training and {size.test_clips} held-out clips, rule-based rationales", flush=True)
    datasets = build_data(workdir, size, seed)
    checkpoint = build_checkpoint(workdir, seed)
    print("[2/4] stage 0, warm start: reading evidence written in the prompt", flush=True)
    warm_checkpoint, warm = warm_start(checkpoint, datasets, workdir, size, seed)
    print(f"      student (no rationale) {100 * warm['student_accuracy']:.1f}% | teacher (with rationale) "
          f"{100 * warm['teacher_accuracy']:.1f}% | chance 25%", flush=True)
    results = {}
    for index, arm in enumerate(arms, 1):
        print(f"[3/4] arm {index}/{len(arms)}: {arm}", flush=True)
        _, results[arm] = run_stage(arm, warm_checkpoint, datasets, workdir, ARMS[arm], size.arm_steps, size, seed)
        print(f"      held-out accuracy {100 * results[arm]['final']['eval/accuracy']:.1f}% "
              f"({results[arm]['seconds']:.0f}s)", flush=True)
    summary = {"seed": seed, "size": dataclasses.asdict(size), "warm_start": warm, "arms": results,
               "seconds": time.perf_counter() - began}
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    plot(results, workdir / "accuracy.png", seed)
    text = table(results, warm, seed)
    (workdir / "results.md").write_text(text + "\n")
    print("[4/4] results (held-out clips, student prompt without rationale):")
    print(text)
    print(f"wrote {workdir / 'results.json'}, {workdir / 'results.md'} and {workdir / 'accuracy.png'} "
          f"in {summary['seconds']:.0f}s")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/demo"), help="where data, runs and results go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--quick", action="store_true", help="a few steps per arm (the test's smoke run)")
    args = parser.parse_args(argv)
    arms = [arm for arm in args.arms.split(",") if arm]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    run(args.workdir, QUICK if args.quick else DemoSize(), args.seed, arms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
