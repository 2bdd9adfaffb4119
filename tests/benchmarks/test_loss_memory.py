"""Smoke test of benchmarks/loss_memory.py at tiny sizes (no timing assertions)."""

import json

import pytest

from benchmarks import loss_memory

TINY = ["--batch", "2", "--completion", "6", "--hidden", "8", "--vocab", "48", "--chunk-size", "4", "--runs", "1"]


def test_main_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results" / "loss_memory.json"
    results = loss_memory.main([*TINY, "--out", str(out)])

    assert json.loads(out.read_text()) == results
    sizes = {"batch": 2, "completion": 6, "hidden": 8, "vocab": 48, "chunk_size": 4, "dtype": "float32"}
    assert results["sizes"] == sizes
    variants = results["variants"]
    assert set(variants) == {"naive", "chunked", "fused"}
    for row in variants.values():
        assert row["temp_size_in_bytes"] >= 0 and row["output_size_in_bytes"] > 0
        assert row["median_seconds"] > 0 and row["median_cpu_seconds"] > 0
        # All three variants compute the same loss on the same inputs.
        assert row["loss"] == pytest.approx(variants["naive"]["loss"], rel=1e-5)
    table = capsys.readouterr().out
    assert all(name in table for name in variants) and "temp GiB" in table and "wall s" in table


def test_memory_only_run_skips_timing(tmp_path):
    results = loss_memory.main([*TINY, "--runs", "0", "--variants", "fused", "--out", str(tmp_path / "r.json")])
    assert set(results["variants"]) == {"fused"} and "median_seconds" not in results["variants"]["fused"]


def test_help_and_bad_sizes(capsys):
    with pytest.raises(SystemExit) as help_exit:
        loss_memory.main(["--help"])
    assert help_exit.value.code == 0 and "--completion" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_exit:
        loss_memory.main(["--vocab", "0"])
    assert bad_exit.value.code == 2 and "--vocab" in capsys.readouterr().err
