"""Smoke test of the step benchmark at tiny sizes (text and multimodal prompts): it runs both
implementations and the scaling processes, agrees on the loss, and its FLOP count agrees with XLA's (no timing assertions: the figures
live in benchmarks/results/step.json)."""

from __future__ import annotations

import json

from benchmarks import step


def test_step_benchmark_runs(tmp_path, capsys):
    payload = step.main(["--quick", "--out", str(tmp_path / "step.json"), "--workdir", str(tmp_path / "weights")])
    tiny, omni = payload["rows"]
    assert tiny["config"] == "tiny" and tiny["step"] == step.QUICK["tiny"]["step"] and tiny["media"] is None
    # The multimodal cell: prompts of video + audio clips, the teacher's longer by the rationale.
    assert omni["config"] == "omni" and omni["media"] == step.QUICK["omni"]["media"]
    assert omni["step"]["teacher_len"] > omni["step"]["prompt_len"] > 50
    assert omni["flops"]["encoders"] > 0 and tiny["flops"]["encoders"] == 0
    for row in (tiny, omni):
        # Same weights, same rollouts: TRL's GJSD and the fused loss agree.
        assert row["loss_agreement"]["abs_diff"] < 1e-5, (row["config"], row["loss_agreement"])
        # The shape-counted FLOPs describe what XLA compiled (element-wise work makes XLA's count larger).
        for phase, check in row["flops_check"].items():
            assert 0.8 < check["xla_over_counted"] < 1.3, (row["config"], phase, check)
        for times in (row["jax_s"], row["torch_s"]):
            assert times["total"] > 0 and set(times) == {"rollout", "teacher", "update", "train_step", "total", "runs"}
    assert [s["devices"] for s in payload["scaling"]] == [1, 2]
    assert [s["prompts"] for s in payload["scaling"]] == [1, 2]
    assert payload["scaling"][0]["sharded_over_one_device"] == 1.0  # one device is its own control
    assert payload["scaling"][1]["one_device_same_prompts_s"] > 0
    assert 0 < payload["matmul_peak"]["flops_per_s"]
    assert [r["config"] for r in json.loads((tmp_path / "step.json").read_text())["rows"]] == ["tiny", "omni"]
    assert "PyTorch / opsd-jax" in capsys.readouterr().out


def test_repeat_prompts_repeats_each_prompt_with_its_media():
    import numpy as np

    inputs = {"input_ids": np.array([[1, 2], [3, 4]]), "attention_mask": np.ones((2, 2)),
              "video_grid_thw": np.array([[1, 2, 2], [1, 2, 4]]), "pixel_values_videos": np.arange(12)[:, None],
              "use_audio_in_video": True}
    rows = step.repeat_prompts(inputs, 2)
    assert rows["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert rows["video_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 2, 4], [1, 2, 4]]
    video_0, video_1 = list(range(4)), list(range(4, 12))
    assert rows["pixel_values_videos"][:, 0].tolist() == video_0 * 2 + video_1 * 2
    assert rows["use_audio_in_video"] is True
