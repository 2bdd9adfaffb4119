"""Smoke test of the LoRA benchmark at tiny sizes: it runs, prints both tables and writes the JSON with the
adapted vs merged decoding figures (no timing assertions: the figures live in benchmarks/results/)."""

from __future__ import annotations

import json

import pytest

from benchmarks import lora as lora_benchmark

TINY = "--hidden 64 --layers 1 --intermediate 128 --vocab 512 --prompts 1 --samples 2 --prompt-length 16"
TINY += " --completion-length 8 --runs 1"


def test_lora_benchmark_times_adapted_and_merged_decoding(tmp_path, capsys):
    out = tmp_path / "lora.json"
    argv = [*TINY.split(), "--arms", "full,lora", "--decode-tokens", "4", "--out", str(out)]
    payload = lora_benchmark.main(argv)
    saved = json.loads(out.read_text())
    assert saved["config"]["decode_tokens"] == 4 and set(saved["results"]) == {"full", "lora"}
    assert "decode" not in saved["results"]["full"]  # decoding is timed for the LoRA arms only
    decode = saved["results"]["lora"]["decode"]
    assert decode == payload["results"]["lora"]["decode"]
    assert decode["decode_tokens"] == 4 and decode["decode_rows"] == 2  # prompts x samples
    for name in ("adapted", "merged"):
        assert decode[f"{name}_seconds_per_token"] == pytest.approx(decode[f"{name}_decode_seconds"] / 3)
        assert decode[f"{name}_prefill_seconds"] > 0
    assert decode["merged_over_adapted"] == pytest.approx(
        decode["merged_seconds_per_token"] / decode["adapted_seconds_per_token"]
    )
    samples = decode["samples_seconds"]
    assert {name: len(times) for name, times in samples.items()} == {
        f"{name}_{program}": 1 for name in ("adapted", "merged") for program in ("prefill", "decode")
    }
    assert decode["merged_over_adapted_fastest"] == pytest.approx(
        min(samples["merged_decode"]) / min(samples["adapted_decode"])
    )
    copies = decode["copy_seconds"]  # the decode copy without and with the merge
    assert copies["merged"] > 0 and decode["merge_seconds"] == pytest.approx(copies["merged"] - copies["adapted"])
    assert 0.0 <= decode["equal_row_fraction"] <= decode["equal_token_fraction"] <= 1.0
    printed = capsys.readouterr().out
    assert "| lora | " in printed and "merged / adapted" in printed and "equal tokens" in printed


def test_lora_benchmark_refuses_a_one_token_decode():
    with pytest.raises(SystemExit):
        lora_benchmark.parse_args(["--decode-tokens", "1"])
