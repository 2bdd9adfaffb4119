"""What the compile-only benchmark tests share: a tiny thinker's training config on a 4-chip v5e slice."""

from __future__ import annotations

import pytest

TINY_V5E_CONFIG = """
model: {{checkpoint: "{checkpoint}", dtype: bfloat16, param_dtype: float32, remat: true}}
mesh: {{data: 1, fsdp: -1, tensor: 1, topology: "v5e:2x2"}}
train: {{batch_size: 8, grad_accum_steps: 2, lr: 1.0e-5, total_steps: 10}}
sampling: {{num_samples: 2, max_new_tokens: 8}}
teacher: {{mode: frozen}}
loss: {{divergence: gjsd, beta: 0.5, chunk_size: 4}}
data: {{prompt_length: {prompt_length}, answer_length: 4}}
"""


@pytest.fixture
def tiny_v5e_config(tiny_untied, tmp_path):
    """`(prompt_length) -> path` of the tiny untied thinker's config on v5e:2x2 (8 prompts, 2 micro-batches)."""

    def write(prompt_length: int):
        path = tmp_path / "tiny_v5e.yaml"
        path.write_text(TINY_V5E_CONFIG.format(checkpoint=tiny_untied[1], prompt_length=prompt_length))
        return path

    return write
