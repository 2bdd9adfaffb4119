"""The compiled train step's memory with and without per-layer remat, for a small text-only thinker.

`python -m opsd_jax.testing.step_memory` prints `{"remat": {"temp_bytes": ...}, "no_remat": {...}}` as JSON.

Run it in a process whose XLA_FLAGS hold `--xla_cpu_enable_concurrency_optimized_scheduler=false`
(`CPU_MEMORY_SCHEDULER_FLAG`) when it compiles for the CPU: the CPU's default scheduler orders work for
concurrency and computes a rematerialised layer's forward again early, next to the original one, so the
temporaries it reports are the same with remat or without (measured: a textbook 8-layer attention stack
reports 69.2 MB either way). TPU and GPU compilers schedule against memory, as this flag makes the CPU
do (the same stack: 69.2 MB -> 42.5 MB). The flag is read when the backend starts, not per compile
(`compile(compiler_options=...)` accepts it and leaves the schedule unchanged), hence a separate process.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig
from opsd_jax.opsd import step
from opsd_jax.opsd.losses import LossConfig
from opsd_jax.settings import TeacherConfig, TrainConfig
from opsd_jax.testing.reference import tiny_thinker_config_dict

CPU_MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def train_step_memory(
    *,
    remat: bool,
    layers: int = 4,
    prompt_length: int = 512,
    completion_length: int = 512,
    num_samples: int = 2,
    intermediate: int = 2048,
) -> dict[str, int]:
    """Compiles (does not run) the jitted train step of one prompt with `num_samples` completions on one
    device and returns `memory_analysis()`'s figures in bytes: temporaries, arguments, outputs.

    The thinker is the tiny test one (hidden 64, 4 heads) with `layers` decoder layers and a wide MLP
    (`intermediate` 2048), text only: a layer's MLP activations (`tokens x intermediate`, several of them)
    dominate what a layer would keep for the backward. (Its attention scores no longer do: attention runs
    in checkpointed query blocks, `opsd_jax.models.layers.QUERY_BLOCK`, with remat or without.)
    """
    config = ThinkerConfig.from_hf(tiny_thinker_config_dict(num_layers=layers, intermediate_size=intermediate))
    model = Qwen2_5OmniThinker(config, rngs=nnx.Rngs(0), remat=remat)
    mask = np.ones((1, prompt_length), np.int32)
    prompt = model.prepare_inputs(np.ones((1, prompt_length), np.int32), attention_mask=mask)
    rows = num_samples
    batch = step.StepBatch(
        student=prompt,
        teacher=prompt,
        completion=jnp.ones((rows, completion_length), jnp.int32),
        completion_mask=jnp.ones((rows, completion_length), bool),
        sampler_logprobs=jnp.zeros((rows, completion_length)),
        rewards=jnp.zeros(rows),
        label_ids=jnp.ones((1, 4), jnp.int32),
        label_mask=jnp.ones((1, 4), bool),
    )
    batches = jax.tree.map(lambda x: x[None], batch)  # one micro-batch
    train, teacher = TrainConfig(lr=1e-3, total_steps=10), TeacherConfig(mode="frozen")
    tx = step.make_optimizer(train, nnx.state(model, nnx.Param))
    settings = step.StepSettings(
        graphdef=nnx.graphdef(model), tx=tx, loss=LossConfig(), teacher=teacher, train_encoders=False
    )
    state = step.init_state(model, tx, teacher, train_encoders=False)
    stats = step.make_train_step(settings).lower(state, batches).compile().memory_analysis()
    return {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
    }


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    print(json.dumps({"remat": train_step_memory(remat=True), "no_remat": train_step_memory(remat=False)}))
