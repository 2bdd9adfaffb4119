"""Smoke test of `benchmarks/cost_model_floor.py` on the tiny thinker's layer for one chip of a v5e slice: a table and
JSON (no assertions on the cost model's figures: those live in benchmarks/results/)."""

from __future__ import annotations

import json

from benchmarks import cost_model_floor


def test_each_operation_of_a_layer_is_priced_against_its_flops_and_bytes(tiny_v5e_config, tmp_path, capsys):
    config = tiny_v5e_config(prompt_length=64)
    out = tmp_path / "floor.json"
    cost_model_floor.main(["--config", str(config), "--out", str(out)])
    saved = json.loads(out.read_text())
    # 4 prompts per micro-batch over 4 chips: one prompt of 64 tokens and its 2 completions of 8 per chip.
    assert saved["config"]["tokens_per_chip"] == 64 + 2 * 8
    names = [r["operation"] for r in saved["results"]]
    assert names[:3] == ["q_proj", "k_proj (v_proj alike)", "o_proj"] and "silu(gate) * up" in names
    for r in saved["results"]:
        assert r["cost_model_seconds"] > 0 and r["bytes_seconds"] > 0
    matmuls = [r for r in saved["results"] if r["matmul"]]
    assert len(matmuls) == 9 and all(r["flops_seconds"] > 0 for r in matmuls)
    assert saved["matmuls_cost_over_flops"] == sum(r["cost_model_seconds"] for r in matmuls) / sum(
        r["flops_seconds"] for r in matmuls
    )
    assert "their FLOPs at the bf16 peak" in capsys.readouterr().out
