"""Peaks by device kind, the CPU's measured peak, and the model FLOPs of a step."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from flax import nnx

from opsd_jax.monitor import device_peak_flops, matmul_parameters, measured_cpu_flops, peak_flops, step_model_flops
from opsd_jax.sharding.topology import CHIPS


@dataclasses.dataclass
class FakeDevice:
    platform: str
    device_kind: str


@pytest.mark.parametrize(
    "platform, kind, expected",
    [
        ("tpu", "TPU v4", CHIPS["v4"].bf16_flops),
        ("tpu", "TPU v5 lite", CHIPS["v5e"].bf16_flops),
        ("tpu", "TPU v5p", CHIPS["v5p"].bf16_flops),
        ("tpu", "TPU v6 lite", CHIPS["v6e"].bf16_flops),
        ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
        ("gpu", "NVIDIA A100-SXM4-40GB", 312e12),
        ("gpu", "Some Future GPU", None),
    ],
)
def test_peaks_by_device_kind(platform, kind, expected):
    assert device_peak_flops(FakeDevice(platform, kind)) == expected
    devices = [FakeDevice(platform, kind)] * 4
    assert peak_flops(devices) == (None if expected is None else 4 * expected)


def test_the_cpu_peak_is_measured_once_for_the_process():
    measured = measured_cpu_flops()
    assert 1e8 < measured < 1e14  # a real throughput, FLOP/s
    assert measured_cpu_flops() is measured  # measured once, then reused
    assert peak_flops(jax.devices()) == measured  # the forced CPU devices share the cores: not x 8


def test_step_model_flops_counts_each_pass():
    # 10 parameters; 2 prompts of 3 tokens (teacher's: 5), 4 completion tokens over G = 2 rollouts each.
    flops = step_model_flops(10, prompt_tokens=6, teacher_prompt_tokens=10, completion_tokens=4, num_samples=2)
    rollouts = 2 * 10 * (6 + 4)
    student = 6 * 10 * (2 * 6 + 4)
    teacher = 2 * 10 * (2 * 10 + 4)
    assert flops == rollouts + student + teacher


def test_matmul_parameters_leave_out_the_encoders_and_the_embedding_lookup(tiny_untied, tiny_tied):
    from opsd_jax.models.qwen2_5_omni import from_pretrained

    for fixture, tied in ((tiny_untied, False), (tiny_tied, True)):
        model = from_pretrained(fixture[1])
        params = nnx.state(model, nnx.Param)
        text = model.config.text
        language = sum(x.size for x in jax.tree.leaves(nnx.state(model.model, nnx.Param)))
        head = 0 if tied else text.vocab_size * text.hidden_size  # untied: lm_head is its own parameter
        embedding = text.vocab_size * text.hidden_size
        got = matmul_parameters(params, tied_head=tied, vocab_size=text.vocab_size, hidden_size=text.hidden_size)
        assert got == language - embedding + head + (embedding if tied else 0)
