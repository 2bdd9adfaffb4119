"""Smoke test of `benchmarks/collectives.py` on the tiny thinker: its micro-batch compiled for a 4-chip v5e slice and
for one chip with that chip's share, a table and JSON (no timing assertions: the figures live in
benchmarks/results/)."""

from __future__ import annotations

import json

from benchmarks import collectives
from opsd_jax.testing.reference import tiny_thinker_config_dict


def test_the_slice_and_one_chip_compile_side_by_side(tiny_v5e_config, tmp_path, capsys):
    config = tiny_v5e_config(prompt_length=2048)
    out = tmp_path / "collectives.json"
    collectives.main(["--config", str(config), "--depth", "0.5", "--out", str(out)])
    saved = json.loads(out.read_text())
    on_slice, alone = saved["results"]
    # One micro-batch of 4 prompts over 4 chips, and one chip's share: 1 prompt, no collectives.
    assert on_slice["description"].startswith("update over 1 micro-batch(es) of 4 prompts")
    assert alone["description"].startswith("update over 1 micro-batch(es) of 1 prompts")
    assert on_slice["collective_gb"] > 0 and alone["collective_gb"] == 0
    assert saved["config"]["decoder_layers"] == tiny_thinker_config_dict()["text_config"]["num_hidden_layers"] // 2
    assert saved["slice_over_one_chip"] == on_slice["cost_over_compute"] / alone["cost_over_compute"]
    assert "what the slice adds" in capsys.readouterr().out
