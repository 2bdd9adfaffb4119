"""The embedded demo, shortened (a few steps per arm): every stage runs through the real pipeline."""

from __future__ import annotations

import json

from opsd_jax import demo


def test_quick_demo_runs_every_stage_and_writes_its_outputs(tmp_path, capsys):
    assert demo.main(["--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[4/4] results" in out
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
