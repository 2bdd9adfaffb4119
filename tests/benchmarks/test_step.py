"""Smoke test of the step benchmark at tiny sizes: it runs both implementations and the scaling
processes, agrees on the loss, and its FLOP count agrees with XLA's (no timing assertions: the figures
live in benchmarks/results/step.json)."""

from __future__ import annotations

import json

from benchmarks import step


def test_step_benchmark_runs(tmp_path, capsys):
    payload = step.main(["--quick", "--out", str(tmp_path / "step.json"), "--workdir", str(tmp_path / "weights")])
    (row,) = payload["rows"]
    assert row["config"] == "tiny" and row["step"] == step.QUICK_STEP
    # Same weights, same rollouts: TRL's GJSD and the fused loss agree.
    assert row["loss_agreement"]["abs_diff"] < 1e-5, row["loss_agreement"]
    # The shape-counted FLOPs describe what XLA compiled (element-wise work makes XLA's count larger).
    for phase, check in row["flops_check"].items():
        assert 0.8 < check["xla_over_counted"] < 1.3, (phase, check)
    assert [s["devices"] for s in payload["scaling"]] == [1, 2]
    assert [s["prompts"] for s in payload["scaling"]] == [1, 2]
    assert payload["scaling"][0]["sharded_over_one_device"] == 1.0  # one device is its own control
    assert payload["scaling"][1]["one_device_same_prompts_s"] > 0
    for times in (row["jax_s"], row["torch_s"]):
        assert times["total"] > 0 and set(times) == {"rollout", "teacher", "update", "train_step", "total", "runs"}
    assert 0 < payload["matmul_peak"]["flops_per_s"]
    assert json.loads((tmp_path / "step.json").read_text())["rows"][0]["config"] == "tiny"
    assert "PyTorch / opsd-jax" in capsys.readouterr().out
