"""The train step with LoRA: only the adapters train, the frozen teacher is the base model (its logits equal the
original model's) with no second copy of any weight, EMA runs over the adapters, and the 8-device step equals the
1-device one."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from opsd_jax.config import MeshConfig, TeacherConfig, TrainConfig
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.opsd import step as S
from opsd_jax.settings import LoraConfig
from opsd_jax.sharding import make_mesh
from tests.opsd.test_step import flat_leaves, make_batch, stack

CONFIG = LoraConfig(rank=4, alpha=8.0)


def adapted_settings(model, mode: str, *, train: TrainConfig | None = None, mesh=None):
    train = train or TrainConfig(lr=1e-2, total_steps=100)
    tx = S.make_optimizer(train, nnx.state(model, lora.trainable_filter(model)))
    settings = S.StepSettings(
        graphdef=nnx.graphdef(model),
        tx=tx,
        loss=S.losses.LossConfig(),
        teacher=TeacherConfig(mode=mode),
        train_encoders=False,
        mesh=mesh,
    )
    return settings, S.init_state(model, tx, settings.teacher, mesh, train_encoders=False)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def base(tiny_untied):
    return from_pretrained(tiny_untied[1], remat=True)


def test_frozen_teacher_is_the_base_model_and_the_state_holds_one_copy_of_it(base):
    adapted = lora.apply_lora(base, CONFIG)
    settings, state = adapted_settings(adapted, "frozen")
    batch = stack(make_batch(base))
    base_weights = nnx.state(base, nnx.Param)
    adapters = nnx.state(adapted, nnx.LoRAParam)

    # One copy of the base: the state's frozen weights are the model's arrays; no teacher copy; the optimizer holds
    # two moments of the adapters only.
    assert state.teacher_params is None
    frozen_leaves = jax.tree.leaves(state.frozen)
    assert all(a is b for a, b in zip(frozen_leaves, jax.tree.leaves(nnx.state(adapted, lora.frozen_filter()))))
    assert nbytes(state.frozen) == nbytes(base_weights)
    assert nbytes(state.params) == nbytes(adapters) < nbytes(base_weights) / 4
    assert nbytes(state.opt_state) < 2 * nbytes(adapters) + 1024  # two moments (+ counters)
    assert nbytes(state) < nbytes(base_weights) + 3 * nbytes(adapters) + 1024

    before = [np.asarray(x) for x in frozen_leaves]
    step_fn = S.make_train_step(settings)
    for _ in range(3):
        state, metrics = step_fn(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(before, jax.tree.leaves(state.frozen)):  # the base never moves
        np.testing.assert_array_equal(a, b)
    assert any(
        float(np.abs(np.asarray(x)).max()) > 0
        for p, x in jax.tree_util.tree_leaves_with_path(state.params)
        if lora.is_lora_b(p)
    )

    prompts = jax.tree.map(lambda x: x[0], batch.student)  # micro-batch 0's prepared prompts
    forward = lambda models: [m.forward(prompts) for m in models]  # noqa: E731
    student, teacher = jax.jit(lambda p, f: forward(S.student_and_teacher(settings, p, None, f)))(
        state.params, state.frozen
    )
    graphdef, params = nnx.split(base)
    (original,) = jax.jit(lambda p: forward([nnx.merge(graphdef, p)]))(params)
    np.testing.assert_array_equal(teacher, original)
    assert float(np.abs(np.asarray(student) - np.asarray(original)).max()) > 1e-4  # the student did learn


def test_ema_teacher_averages_the_adapters_only(base):
    adapted = lora.apply_lora(base, CONFIG)
    settings, state = adapted_settings(adapted, "ema")
    assert jax.tree.structure(state.teacher_params) == jax.tree.structure(state.params)
    initial = flat_leaves(state.teacher_params)
    state, _ = S.make_train_step(settings)(state, stack(make_batch(base)))
    rate = settings.teacher.ema_rate
    for t0, t1, p1 in zip(initial, flat_leaves(state.teacher_params), flat_leaves(state.params)):
        np.testing.assert_allclose(t1, (1 - rate) * t0 + rate * p1, atol=1e-6)


def test_sharded_lora_step_on_eight_devices_equals_one_device(tiny_untied, base):
    batch = stack(make_batch(base, seed=2))
    train = TrainConfig(lr=1e-4, total_steps=100)  # small: Adam's first step amplifies summation-order rounding
    settings, state = adapted_settings(lora.apply_lora(base, CONFIG), "ema", train=train)
    single, _ = S.make_train_step(settings)(state, batch)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_model = lora.apply_lora(from_pretrained(tiny_untied[1], mesh=mesh, remat=True), CONFIG, mesh=mesh)
    settings, state = adapted_settings(sharded_model, "ema", train=train, mesh=mesh)
    adapter = state.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel_lora_b"][...]
    assert len(adapter.sharding.device_set) == 8 and adapter.sharding.spec != jax.sharding.PartitionSpec()
    sharded, _ = S.make_train_step(settings, state)(state, S.place_step_batch(batch, mesh))
    assert sharded.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel_lora_b"][...].sharding == adapter.sharding
    for a, b in zip(flat_leaves(single.params), flat_leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
