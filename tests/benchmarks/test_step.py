"""Smoke test of the step benchmark at tiny sizes (text and multimodal prompts): it runs both
implementations in two independent runs and the scaling processes, agrees on the loss, counts each
side's own work and checks each count against its framework's own (no timing assertions: the figures
live in benchmarks/results/step.json)."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks import step


def test_step_benchmark_runs(tmp_path, capsys):
    payload = step.main(["--quick", "--out", str(tmp_path / "step.json"), "--workdir", str(tmp_path / "weights")])
    tiny, omni = payload["rows"]
    assert tiny["config"] == "tiny" and tiny["step"] == step.QUICK["tiny"]["step"] and tiny["media"] is None
    # The multimodal cell: prompts of video + audio clips, the teacher's longer by the rationale.
    assert omni["config"] == "omni" and omni["media"] == step.QUICK["omni"]["media"]
    assert omni["step"]["teacher_len"] > omni["step"]["prompt_len"] > 50
    for side in ("jax", "torch"):
        assert omni["flops"][side]["encoders"] > 0 and tiny["flops"][side]["encoders"] == 0
    assert payload["complete"] is True and len(payload["runs"]) == 2 and len(payload["matmul_peak"]) == 2
    for index, row in enumerate((tiny, omni)):
        assert row["runs"] == 2
        # Same weights, same rollouts: TRL's GJSD and the fused loss agree.
        assert row["loss_agreement"]["abs_diff"] < 1e-5, (row["config"], row["loss_agreement"])
        # The shape-counted FLOPs describe what each side runs: XLA's count of the compiled opsd-jax programs
        # (element-wise work makes it larger) and PyTorch's flop counter over one PyTorch step.
        for phase, check in row["flops_check"]["jax"].items():
            assert 0.8 < check["measured_over_counted"] < 1.3, (row["config"], phase, check)
        assert set(row["flops_check"]["torch"]) == {"rollout", "teacher", "student"}
        for phase, check in row["flops_check"]["torch"].items():
            assert 0.95 < check["measured_over_counted"] < 1.1, (row["config"], phase, check)
        # The PyTorch loop repeats each prompt for its G = 2 rollouts and runs the head over every position.
        for phase, key in (("rollout", "rollout"), ("train_step", "model_train"), ("total", "total")):
            assert row["work_ratio"][phase] == row["flops"]["torch"][key] / row["flops"]["jax"][key] > 1.2
        for run, peak in zip(payload["runs"], payload["matmul_peak"]):
            measured = run["rows"][index]
            for side in ("jax", "torch"):
                times = measured[f"{side}_s"]
                assert set(times) == {"prepare", "rollout", "teacher", "update", "train_step", "total", "runs"}
                assert times["prepare"] > 0
                assert times["total"] == pytest.approx(times["prepare"] + times["rollout"] + times["train_step"])
                # Each side's utilisation is its own work over its own time.
                assert measured["utilisation"][side]["train_step"] == pytest.approx(
                    row["flops"][side]["model_train"] / times["train_step"] / peak["flops_per_s"]
                )
        ratios = [run["rows"][index]["speedup"]["total"] for run in payload["runs"]]
        assert row["speedup"]["total"] == {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    assert [s["devices"] for s in payload["scaling"]] == [1, 2]
    assert [s["prompts"] for s in payload["scaling"]] == [1, 2]
    assert payload["scaling"][0]["sharded_over_one_device"] == 1.0  # one device is its own control
    assert payload["scaling"][1]["one_device_same_prompts_s"] > 0
    assert [r["config"] for r in json.loads((tmp_path / "step.json").read_text())["rows"]] == ["tiny", "omni"]
    out = capsys.readouterr().out
    assert "work PyTorch / opsd-jax" in out and "2 independent run(s)" in out


def test_repeat_prompts_repeats_each_prompt_with_its_media():
    import numpy as np

    inputs = {
        "input_ids": np.array([[1, 2], [3, 4]]),
        "attention_mask": np.ones((2, 2)),
        "video_grid_thw": np.array([[1, 2, 2], [1, 2, 4]]),
        "pixel_values_videos": np.arange(12)[:, None],
        "use_audio_in_video": True,
    }
    rows = step.repeat_prompts(inputs, 2)
    assert rows["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert rows["video_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 2, 4], [1, 2, 4]]
    video_0, video_1 = list(range(4)), list(range(4, 12))
    assert rows["pixel_values_videos"][:, 0].tolist() == video_0 * 2 + video_1 * 2
    assert rows["use_audio_in_video"] is True
