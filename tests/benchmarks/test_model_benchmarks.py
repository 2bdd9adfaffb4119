"""Smoke tests of the model benchmarks at tiny sizes: they run, print a table and write JSON (no timing
assertions: the figures themselves live in benchmarks/results/)."""

from __future__ import annotations

import json

from benchmarks import decode, forward


def test_forward_benchmark_runs(tmp_path, capsys):
    row = forward.main(["--quick", "--out", str(tmp_path / "forward.json")])
    assert row["max_abs_logit_diff"] <= 1e-4  # the two implementations agree on the benchmarked batch
    saved = json.loads((tmp_path / "forward.json").read_text())
    assert saved["row"]["batch"] == 1 and "torch / Flax" in capsys.readouterr().out


def test_decode_benchmark_runs(tmp_path, capsys):
    rows = decode.main(["--quick", "--out", str(tmp_path / "decode.json")])
    assert [(r["config"], r["batch"]) for r in rows] == [("tiny", 1)]
    assert json.loads((tmp_path / "decode.json").read_text())["rows"][0]["new_tokens"] == 4
    assert "JAX / torch" in capsys.readouterr().out
