"""The embedded demo, shortened (a few steps per arm): every stage runs through the real pipeline.

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


def test_quick_demo_runs_every_stage_and_writes_its_outputs(tmp_path):
    env = {**os.environ, "XLA_FLAGS": with_host_device_count(os.environ.get("XLA_FLAGS", ""), 1)}
    done = subprocess.run([sys.executable, "-m", "opsd_jax.demo", "--quick", "--workdir", str(tmp_path)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[4/4] results" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["arms"]) == set(demo.ARMS)
    for arm in results["arms"].values():
        assert [row["step"] for row in arm["history"]] == [0, demo.QUICK.arm_steps]
        assert 0.0 <= arm["final"]["eval/accuracy"] <= 1.0
    assert 0.0 <= results["warm_start"]["teacher_accuracy"] <= 1.0
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "results.md").read_text().count("\n") == 2 + len(demo.ARMS)
    # Stage 0 is cached: a second run reuses the warm start instead of training it again.
    assert (tmp_path / "thinker_warm" / "config.json").is_file()
    for stage in ("warm_start", *demo.ARMS):
        assert (tmp_path / "runs" / stage / "logs" / "metrics.jsonl").is_file()
