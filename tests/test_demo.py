"""The embedded demo, shortened (a few clips and steps per stage): every stage runs through the real pipeline.

It runs as `make demo` does: its own process on one host device (the demo's default). The trainer's
sharded paths are covered on eight devices by tests/test_train.py; eight virtual devices on two cores
would only slow this end-to-end run down (~1.7x here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import with_host_device_count
from opsd_jax import demo
from opsd_jax.demo import report
from opsd_jax.demo.run import QUICK

REFERENCES = (
    "subtitle_only",
    "warm_start",
    "teacher_with_rationale",
    "teacher_with_label",
    "teacher_with_mismatched_rationale",
)


def run_demo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": with_host_device_count(os.environ.get("XLA_FLAGS", ""), 1)}
    return subprocess.run(
        [sys.executable, "-m", "opsd_jax.demo", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_quick_demo_runs_every_stage_in_both_conditions_and_writes_its_outputs(tmp_path):
    done = run_demo("--quick", "--arms", "all", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    [seed] = results["seeds"]
    assert seed["seed"] == 0 and set(seed["conditions"]) == set(demo.CONDITIONS)
    for condition in seed["conditions"].values():
        assert set(condition["references"]) == set(REFERENCES)
        assert set(condition["arms"]) == set(demo.ARMS)
        for arm in condition["arms"].values():
            assert [row["step"] for row in arm["history"]] == [QUICK.arm_steps]
            scores = arm["scores"]
            for key in (
                "all/accuracy",
                "misleading/accuracy",
                "swapped/accuracy",
                "all/valence_accuracy",
                "all/arousal_accuracy",
            ):
                assert 0.0 <= scores[key] <= 1.0
            assert scores["all/clips"] == scores["swapped/clips"] == QUICK.test_clips
    # The student never sees a rationale; the warm-started teacher is scored with each privileged context.
    assert 0.0 <= seed["warm_start"]["standard"]["teacher_rationale"]["all/accuracy"] <= 1.0
    text = (tmp_path / "results.md").read_text()
    for condition in demo.CONDITIONS:
        assert f"### {condition}" in text
    assert text.count("| omniopsd |") == len(demo.CONDITIONS)
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "seed0" / "thinker_warm" / "config.json").is_file()  # stage 0 is cached for a rerun
    for condition in demo.CONDITIONS:
        for arm in demo.ARMS:
            assert (tmp_path / "seed0" / "runs" / condition / arm / "logs" / "metrics.jsonl").is_file()

    # Rerun: every finished arm is kept, not trained again, and the results are the same.
    again = run_demo("--quick", "--arms", "all", "--workdir", str(tmp_path))
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("kept from an earlier run") == len(demo.ARMS) * len(demo.CONDITIONS)
    [kept] = json.loads((tmp_path / "results.json").read_text())["seeds"]
    for name, condition in seed["conditions"].items():
        for arm, result in condition["arms"].items():
            assert kept["conditions"][name]["arms"][arm]["scores"] == result["scores"]
    # Another arm budget trains that arm again; other data sizes are refused before any work.
    one = run_demo(
        "--quick", "--arms", "sft_labels", "--conditions", "standard", "--arm-steps", "1", "--workdir", str(tmp_path)
    )
    assert one.returncode == 0 and "kept from an earlier run" not in one.stdout, one.stderr[-4000:]
    refused = run_demo("--arms", "sft_labels", "--workdir", str(tmp_path))
    assert refused.returncode == 2 and "seed0/demo_size.json" in refused.stderr and "[seed 0]" not in refused.stdout


def test_report_gives_mean_and_sample_standard_deviation_over_seeds():
    def seed_result(seed: int, accuracy: float) -> dict:
        scores = {
            "all/accuracy": accuracy,
            "all/macro_f1": accuracy,
            "misleading/accuracy": accuracy,
            "swapped/accuracy": 0.25,
            "media_reliance": accuracy - 0.25,
            "all/clips": 8.0,
            "all/valence_accuracy": accuracy,
            "all/arousal_accuracy": 1.0,
        }
        return {
            "seed": seed,
            "conditions": {
                "standard": {"references": {"subtitle_only": scores}, "arms": {"omniopsd": {"scores": scores}}}
            },
        }

    text = report.table([seed_result(0, 0.5), seed_result(1, 0.7)], "standard")
    row = next(line for line in text.splitlines() if line.startswith("| omniopsd |"))
    assert row == (
        "| omniopsd | 60.0 ± 14.1 | 60.0 ± 14.1 | 60.0 ± 14.1 | 25.0 ± 0.0 | 35.0 ± 14.1 | 60.0 ± 14.1 | 100.0 ± 0.0 |"
    )
    assert "| chance | 25.0 ± 0.0 |" in text and text.splitlines()[2].endswith("| 50.0 ± 0.0 | 50.0 ± 0.0 |")
