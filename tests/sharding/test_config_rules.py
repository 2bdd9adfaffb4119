"""A config's `mesh.logical_axis_rules` reaches every placement a run makes: parameters as they load, the
step's batches, the prompts, and the step's own activation layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from opsd_jax.config import load_config
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.opsd import step as opsd_step
from opsd_jax.sharding import AxisRules, make_mesh

# Swapped roles: the model width over tensor, the heads over fsdp, rows over tensor.
OVERRIDES = [
    "mesh.data=1",
    "mesh.fsdp=4",
    "mesh.tensor=2",
    "mesh.logical_axis_rules.embed=tensor",
    "mesh.logical_axis_rules.heads=fsdp",
    "mesh.logical_axis_rules.batch=[tensor]",
]


def test_the_configs_rules_move_parameters_and_batches(tiny_untied):
    config = load_config(None, OVERRIDES, num_devices=8)
    rules = config.mesh.axis_rules()
    assert isinstance(rules, AxisRules) and hash(rules) == hash(config.mesh.axis_rules())  # a static argument
    mesh = make_mesh(config.mesh)

    default = from_pretrained(tiny_untied[1], mesh=mesh)
    moved = from_pretrained(tiny_untied[1], mesh=mesh, rules=rules)
    kernel = lambda model: model.model.layers[0].self_attn.q_proj.kernel[...]  # noqa: E731  ("embed", "heads", None)
    assert kernel(default).sharding.spec == P("fsdp", "tensor", None)
    assert kernel(moved).sharding.spec == P("tensor", "fsdp", None)
    np.testing.assert_array_equal(np.asarray(kernel(moved)), np.asarray(kernel(default)))

    ids = jnp.zeros((4, 8), jnp.int32)
    prompt = moved.prepare_inputs(ids, attention_mask=jnp.ones_like(ids))
    micro = jax.tree.map(
        lambda x: x[None],
        opsd_step.StepBatch(
            student=prompt,
            teacher=prompt,
            completion=ids,
            completion_mask=ids.astype(bool),
            sampler_logprobs=ids.astype(jnp.float32),
            rewards=jnp.zeros(4),
            label_ids=ids,
            label_mask=ids.astype(bool),
        ),
    )
    assert opsd_step.step_batch_shardings(micro, mesh).completion.spec == P(None, "fsdp", None)
    placed = opsd_step.step_batch_shardings(micro, mesh, rules)
    assert placed.completion.spec == P(None, "tensor", None) == placed.student.input_ids.spec
