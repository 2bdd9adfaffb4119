"""Smoke test of the input-pipeline benchmark at tiny sizes: it runs end to end and reports sane numbers."""

import json

from benchmarks import data


def test_data_benchmark_quick(tmp_path, capsys):
    out = tmp_path / "data.json"
    payload = data.main(["--quick", "--workers", "0,2", "--step-rate", "2.0", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["benchmark"] == "data" and written["results"] == payload["results"]
    assert [row["workers"] for row in written["results"]] == [0, 2]
    for row in written["results"]:
        assert row["clips_per_second"] > 0
        assert row["clips_per_second"] == row["batches_per_second"] * row["batch_size"]
        assert row["pipeline_over_step_rate"] == row["batches_per_second"] / 2.0
    printed = capsys.readouterr().out
    assert "| workers | batch | clips/s | batches/s | batches/s over 2 steps/s |" in printed
