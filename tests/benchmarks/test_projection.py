"""The TPU projection runs, and its memory line is the one its config carries."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import projection


def test_projection_runs_and_matches_the_config_budget(tmp_path, capsys):
    rows = projection.main(["--out", str(tmp_path / "projection.json")])
    by_slice = {row["slice"]: row for row in rows}
    assert set(by_slice) == {"v5p-64", "v5e-16"}
    # v5p-64 projects the config as written: its memory is the config's own budget line.
    text = (projection.CONFIGS / "qwen2_5_omni_7b_v5p64.yaml").read_text()
    budget = float(re.search(r"^# budget_gb: .* = ([\d.]+)$", text, re.MULTILINE).group(1))
    assert by_slice["v5p-64"]["memory_gb_per_chip"]["total"] == pytest.approx(budget, abs=0.01)
    for row in rows:
        assert row["memory_gb_per_chip"]["total"] < row["memory_gb_per_chip"]["hbm"], row["slice"]
        # The same step on both slices: the same FLOPs; time at 40% of peak scales with chips x peak.
        assert row["flops_total"] == pytest.approx(rows[0]["flops_total"])
        expected = row["flops_total"] / (row["devices"] * row["chip"]["peak_flops"] * projection.UTILISATION)
        assert sum(row["seconds_at_40pct"].values()) == pytest.approx(expected)
        assert row["step_s"] >= sum(row["seconds_at_40pct"].values()) - 1e-9
    saved = json.loads((tmp_path / "projection.json").read_text())
    assert saved["utilisation"] == 0.4 and "v5e-16" in capsys.readouterr().out
