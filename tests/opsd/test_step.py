"""The OmniOPSD update: no gradient into the teacher, zero loss for a self-teacher, exact accumulation,
the 8-device sharded step, frozen encoders, and learning against a fixed teacher."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opsd_jax.config import MeshConfig, TeacherConfig, TrainConfig
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.models.scoring import head_logits
from opsd_jax.opsd import step as S
from opsd_jax.opsd.losses import DIVERGENCE_FORMS, LossConfig
from opsd_jax.sampling import generate
from opsd_jax.sharding import make_mesh

PAD, G, NEW = 0, 2, 6
IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [PAD, PAD, PAD, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)
# The teacher's prompt: the student's with a privileged block before it (same length bucket + 4).
TEACHER_IDS = np.concatenate([np.array([[31, 32, 33, 34]] * 2, np.int32), IDS], axis=1)
TEACHER_MASK = np.concatenate([np.ones((2, 4), np.int32), MASK], axis=1)


@pytest.fixture(scope="module")
def model(tiny_untied):
    return from_pretrained(tiny_untied[1])


def make_batch(model, *, seed: int = 0, teacher_is_student: bool = False) -> S.StepBatch:
    student = model.prepare_inputs(IDS, attention_mask=MASK)
    teacher = student if teacher_is_student else model.prepare_inputs(TEACHER_IDS, attention_mask=TEACHER_MASK)
    out = generate(
        model,
        student,
        max_new_tokens=NEW,
        temperature=1.0,
        eos_token_id=150,
        pad_token_id=PAD,
        num_samples=G,
        seed=seed,
    )
    rows = out.tokens.shape[0]
    return S.StepBatch(
        student=student,
        teacher=teacher,
        completion=out.tokens,
        completion_mask=out.mask,
        sampler_logprobs=out.model_logprobs,
        rewards=jnp.arange(rows, dtype=jnp.float32),
        label_ids=jnp.full((2, 3), 7, jnp.int32),
        label_mask=jnp.ones((2, 3), bool),
    )


def stack(*batches: S.StepBatch) -> S.StepBatch:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def settings_for(
    model,
    teacher_mode: str = "frozen",
    *,
    loss: LossConfig = LossConfig(),
    train: TrainConfig | None = None,
    teacher: TeacherConfig | None = None,
    mesh=None,
):
    train = train or TrainConfig(lr=1e-3, total_steps=100)
    teacher = teacher or TeacherConfig(mode=teacher_mode)
    params = nnx.state(model, nnx.Param)
    tx = S.make_optimizer(train, params)
    settings = S.StepSettings(
        graphdef=nnx.graphdef(model), tx=tx, loss=loss, teacher=teacher, train_encoders=train.train_encoders, mesh=mesh
    )
    return settings, S.init_state(model, tx, teacher, mesh, train_encoders=train.train_encoders)


def flat_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def loss_grad(argnums: int = 0):
    """Jitted gradient of `S._micro_batch_loss` (settings static): one compile instead of op-by-op dispatch."""
    return jax.jit(jax.grad(S._micro_batch_loss, argnums=argnums, has_aux=True), static_argnums=4)


@pytest.mark.parametrize("mode", ["frozen", "ema", "live"])
def test_gradients_reach_only_the_student(model, mode):
    batch = make_batch(model)
    settings, state = settings_for(model, mode)
    params = state.params
    teacher_params = jax.tree.map(lambda x: x + 0.01, params) if mode != "live" else None
    counts = S.batch_counts(batch)
    if mode != "live":
        teacher_grads = loss_grad(argnums=1)(params, teacher_params, batch, counts, settings)[0]
        assert all((g == 0).all() for g in flat_leaves(teacher_grads))
    else:
        # A live teacher is the student under stop_gradient: its gradient must equal that of a frozen
        # teacher holding the same values, i.e. nothing flows through the teacher's forward.
        live = loss_grad()(params, None, batch, counts, settings)[0]
        frozen_settings, _ = settings_for(model, "frozen")
        frozen = loss_grad()(params, params, batch, counts, frozen_settings)[0]
        for a, b in zip(flat_leaves(live), flat_leaves(frozen)):
            np.testing.assert_allclose(a, b, atol=1e-7)
        assert any(np.abs(g).max() > 0 for g in flat_leaves(live))


def test_a_live_teacher_with_the_students_prompt_gives_zero_loss_and_gradient(model):
    batch = make_batch(model, teacher_is_student=True)
    settings, state = settings_for(model, "live")
    grads, metrics = loss_grad()(state.params, None, batch, S.batch_counts(batch), settings)
    assert abs(float(metrics["loss"])) < 1e-6
    assert max(np.abs(g).max() for g in flat_leaves(grads)) < 1e-6


@pytest.mark.parametrize("divergence", ["gjsd", "topk"])
def test_the_top_k_mass_is_logged_with_a_top_k_divergence_alone(model, divergence):
    """Only a form with a top-K support sorts the vocabulary for the metric; with K the whole vocabulary the
    student's top-K mass is 1 at every completion token."""
    assert {name for name, form in DIVERGENCE_FORMS.items() if form.uses_top_k} == {"topk", "topk_rkl"}
    batch = make_batch(model)
    vocab = model.head_kernel().shape[-1]
    settings, state = settings_for(model, loss=LossConfig(divergence=divergence, top_k=vocab))
    _, metrics = loss_grad()(state.params, state.teacher_params, batch, S.batch_counts(batch), settings)
    assert ("top_k_mass_sum" in metrics) == (divergence in ("topk", "topk_rkl"))
    if "top_k_mass_sum" in metrics:
        np.testing.assert_allclose(float(metrics["top_k_mass_sum"]), float(metrics["tokens"]), rtol=1e-5)
    assert ("top_k_mass" in S.summarize(metrics, state.params)) == ("top_k_mass_sum" in metrics)


def test_gradient_accumulation_equals_the_full_batch(model):
    """Two micro-batches of one prompt each give the same update as one micro-batch of both."""
    full = make_batch(model, seed=4)
    halves = []
    for row in (0, 1):
        rollouts = slice(row * G, (row + 1) * G)
        halves.append(
            S.StepBatch(
                student=model.prepare_inputs(IDS[row : row + 1], attention_mask=MASK[row : row + 1]),
                teacher=model.prepare_inputs(TEACHER_IDS[row : row + 1], attention_mask=TEACHER_MASK[row : row + 1]),
                completion=full.completion[rollouts],
                completion_mask=full.completion_mask[rollouts],
                sampler_logprobs=full.sampler_logprobs[rollouts],
                rewards=full.rewards[rollouts],
                label_ids=full.label_ids[row : row + 1],
                label_mask=full.label_mask[row : row + 1],
            )
        )
    settings, state = settings_for(model, "frozen")
    one, m1 = S.make_train_step(settings)(state, stack(full))
    settings, state = settings_for(model, "frozen")
    two, m2 = S.make_train_step(settings)(state, stack(*halves))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    # Adam's first step is ~lr * g / |g| per entry: summation-order noise in near-zero gradient entries
    # shows up at ~lr * 1e-2, hence 3e-5 here (lr 1e-3), far below a wrong weighting (~lr).
    for a, b in zip(flat_leaves(one.params), flat_leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=3e-5)


def test_frozen_encoders_do_not_move_and_the_decoder_does(model):
    settings, state = settings_for(model, "frozen")
    before = nnx.to_flat_state(state.params)
    state, _ = S.make_train_step(settings)(jax.tree.map(jnp.copy, state), stack(make_batch(model)))
    after = dict(nnx.to_flat_state(state.params))
    moved = {path[0]: False for path, _ in before}
    for path, value in before:
        moved[path[0]] |= bool(np.abs(np.asarray(after[path][...]) - np.asarray(value[...])).max() > 0)
    assert moved == {"audio_tower": False, "visual": False, "model": True, "lm_head": True}


def test_ema_teacher_moves_toward_the_student_by_its_rate(model):
    settings, state = settings_for(model, "ema", teacher=TeacherConfig(mode="ema", ema_rate=0.25))
    # The EMA copy holds the weights training changes, in float32: not the encoders (train_encoders: false).
    assert set(state.teacher_params.keys()) == {"model", "lm_head"}
    assert {x.dtype for x in jax.tree.leaves(state.teacher_params)} == {jnp.dtype(jnp.float32)}
    # The update is the one a copy of every parameter (the old state) made, on the weights it keeps.
    whole = jax.tree.map(jnp.copy, state.replace(teacher_params=state.params))  # own buffers: the step donates
    initial = flat_leaves(state.teacher_params)
    batch = stack(make_batch(model))
    state, metrics = S.make_train_step(settings)(state, batch)
    whole, whole_metrics = S.make_train_step(settings)(whole, batch)
    moved = S.at_paths_of(state.params, state.teacher_params)
    for t0, t1, p1 in zip(initial, flat_leaves(state.teacher_params), flat_leaves(moved)):
        np.testing.assert_allclose(t1, 0.75 * t0 + 0.25 * p1, atol=1e-6)
    for a, b in zip(flat_leaves(state.teacher_params), flat_leaves(S.at_paths_of(whole.teacher_params, moved))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(flat_leaves(state.params), flat_leaves(whole.params)):
        np.testing.assert_array_equal(a, b)
    assert float(metrics["loss"]) == float(whole_metrics["loss"])


@pytest.fixture(scope="module")
def bf16_models(tiny_untied, tiny_tied):
    """bfloat16 compute over float32 parameters (master weights), untied and tied output heads."""
    return {
        name: from_pretrained(fixture[1], dtype=jnp.bfloat16, param_dtype=jnp.float32)
        for name, fixture in (("untied", tiny_untied), ("tied", tiny_tied))
    }


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_a_frozen_teacher_copies_the_trained_weights_in_the_compute_dtype_with_the_same_logits(bf16_models, head):
    model = bf16_models[head]
    settings, state = settings_for(model, "frozen")
    flat = dict(nnx.to_flat_state(state.teacher_params))
    # No encoder weight (never trained: the teacher uses the student's); the decoder's in bfloat16, where its
    # layers cast them anyway, but for the step's output head (multiplied as stored: float32).
    output_head = ("model", "embed_tokens", "embedding") if head == "tied" else ("lm_head", "kernel")
    assert {path[0] for path in flat} == ({"model"} if head == "tied" else {"model", "lm_head"})
    for path, value in flat.items():
        assert value[...].dtype == (jnp.float32 if path == output_head else jnp.bfloat16), path
    # What the old state kept: a float32 copy of every parameter. The teacher's logits are bit-identical.
    whole = jax.tree.map(jnp.copy, state.params)
    batch = make_batch(model)

    @jax.jit
    def teacher_logits(params, teacher_params):
        _, teacher = S.student_and_teacher(settings, params, teacher_params, None)
        hidden = teacher.completion_hidden(batch.teacher, batch.completion, batch.completion_mask)
        return head_logits(hidden, teacher.head_kernel())

    logits = teacher_logits(state.params, state.teacher_params)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(logits, teacher_logits(state.params, whole))
    # ... and so are the step's loss, metrics and gradients (untied only: XLA:CPU has no bfloat16 x bfloat16 =
    # float32 dot, which the tied embedding's gradient takes, whatever the teacher's copy).
    if head == "tied":
        return
    counts = S.batch_counts(batch)
    grads, metrics = loss_grad()(state.params, state.teacher_params, batch, counts, settings)
    whole_grads, whole_metrics = loss_grad()(state.params, whole, batch, counts, settings)
    for a, b in zip(flat_leaves((grads, metrics)), flat_leaves((whole_grads, whole_metrics))):
        np.testing.assert_array_equal(a, b)


def test_a_frozen_teacher_of_trained_encoders_copies_them_in_their_dtype(bf16_models):
    train = TrainConfig(lr=1e-3, total_steps=100, train_encoders=True)
    _, state = settings_for(bf16_models["untied"], "frozen", train=train)
    assert set(state.teacher_params.keys()) == {"audio_tower", "visual", "model", "lm_head"}
    for name in ("audio_tower", "visual"):  # their LayerNorms compute from float32 weights: not down-cast
        assert {x.dtype for x in jax.tree.leaves(state.teacher_params[name])} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_a_state_with_the_teachers_partial_copy_restores_exactly(bf16_models, mode, tmp_path):
    from opsd_jax.checkpoint import RunCheckpointer, abstract_like

    _, state = settings_for(bf16_models["untied"], mode)
    checkpointer = RunCheckpointer(tmp_path, keep_last=1, keep_best=0, async_save=False)
    checkpointer.save(1, state.saved())
    restored, _ = checkpointer.restore(1, abstract_like(state.saved()))
    checkpointer.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state.saved())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.saved())):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ablation_terms_add_to_the_loss(model):
    batch = stack(make_batch(model))
    base_settings, state = settings_for(model, "frozen")
    _, base = S.make_train_step(base_settings)(state, batch)
    settings, state = settings_for(
        model, "frozen", teacher=TeacherConfig(mode="frozen", label_pg_weight=1.0, label_ce_weight=1.0)
    )
    _, with_terms = S.make_train_step(settings)(state, batch)
    assert float(with_terms["loss"]) != pytest.approx(float(base["loss"]))
    assert np.isfinite(float(with_terms["loss"]))


def test_sharded_step_on_eight_devices_equals_one_device(tiny_untied, model):
    batch = stack(make_batch(model, seed=2))
    # A small learning rate: Adam's first step is ~lr * g / |g|, which turns summation-order rounding in
    # near-zero gradient entries into differences of up to ~lr * 1e-2.
    train = TrainConfig(lr=1e-4, total_steps=100)
    settings, state = settings_for(model, "ema", train=train)
    single, _ = S.make_train_step(settings)(state, batch)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded_model = from_pretrained(tiny_untied[1], mesh=mesh)
    settings, state = settings_for(sharded_model, "ema", train=train, mesh=mesh)
    kernel = state.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8
    placed = S.place_step_batch(batch, mesh)
    assert placed.completion.sharding.spec[1] == ("data", "fsdp")
    sharded, _ = S.make_train_step(settings, state)(state, placed)
    assert sharded.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...].sharding == kernel.sharding
    for a, b in zip(flat_leaves(single.params), flat_leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_weights_cast_once_under_fsdp_give_the_gradients_of_casting_at_use(tiny_untied, monkeypatch):
    """bfloat16 compute over float32 weights sharded over fsdp: the step casts the decoder's weights once per
    micro-batch, not in each layer at each use; the gradient is the same, and the copy is only made under FSDP."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    model = from_pretrained(tiny_untied[1], dtype=jnp.bfloat16, param_dtype=jnp.float32, mesh=mesh)
    batch = S.place_step_batch(stack(make_batch(model, seed=3)), mesh)
    micro = jax.tree.map(lambda x: x[0], batch)
    settings, state = settings_for(model, "ema", mesh=mesh)
    assert S._casts_once(settings) and not S._casts_once(settings_for(model, "ema")[0])  # under FSDP alone
    casts = S._decoder_weights_in(state.params, jnp.bfloat16)
    dtypes = {"/".join(map(str, k)): v.get_value().dtype for k, v in nnx.to_flat_state(casts)}
    assert dtypes["model/layers/0/mlp/up_proj/kernel"] == jnp.bfloat16
    assert dtypes["model/embed_tokens/embedding"] == dtypes["lm_head/kernel"] == jnp.float32
    for merged in S.student_and_teacher(settings, state.params, state.teacher_params, None):  # both cast
        assert merged.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16

    def grads():
        args = (state.params, state.teacher_params, micro, S.batch_counts(batch), settings)
        return flat_leaves(loss_grad()(*args)[0])

    once = grads()
    monkeypatch.setattr(S, "_casts_once", lambda settings: False)
    for a, b in zip(once, grads()):
        np.testing.assert_array_equal(a, b)


def test_training_against_a_fixed_different_teacher_halves_the_divergence(model, tmp_path):
    """200 on-policy steps (fresh rollouts each step) against a frozen teacher with other weights."""
    from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, tiny_thinker_config_dict

    settings, state = settings_for(
        model,
        "frozen",
        train=TrainConfig(lr=3e-3, total_steps=200, warmup_steps=10),
        loss=LossConfig(divergence="gjsd", beta=0.5, is_clip=None),
    )
    other = build_reference_thinker(tiny_thinker_config_dict(), seed=9)
    teacher_model = from_pretrained(save_reference_thinker(other, tmp_path / "teacher"))
    state = state.replace(teacher_params=nnx.state(teacher_model, nnx.Param))
    step_fn = S.make_train_step(settings)
    student = nnx.merge(settings.graphdef, state.params)
    divergences = []
    for step in range(200):
        nnx.update(student, state.params)
        state, metrics = step_fn(state, stack(make_batch(student, seed=step)))
        divergences.append(float(metrics["divergence"]))
    first, last = np.mean(divergences[:10]), np.mean(divergences[-10:])
    assert last <= 0.5 * first, (first, last)


def media_step_batch(model, builder) -> S.StepBatch:
    """Two video + audio-track clips; the teacher's prompts add a rationale over the same media."""
    from opsd_jax.data.audio_features import audio_to_inputs
    from opsd_jax.data.vision_inputs import video_to_inputs
    from opsd_jax.opsd.prompts import PromptConfig, encode_clip_batch

    rng = np.random.default_rng(3)
    clips = []
    for index in range(2):
        video = video_to_inputs(rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8), sample_fps=2.0)
        audio = audio_to_inputs(0.1 * rng.standard_normal(16000 - 3000 * index), max_samples=16000)
        clips.append(
            {
                "pixel_values_videos": video["pixel_values_videos"],
                "video_grid_thw": video["video_grid_thw"][0],
                "video_second_per_grid": video["video_second_per_grid"][0],
                "input_features": audio["input_features"][0],
                "feature_attention_mask": audio["feature_attention_mask"][0],
                "subtitle": "fine" * (index + 1),
                "rationale": "A tense face and a loud voice.",
            }
        )
    inputs = encode_clip_batch(builder, clips, PromptConfig(), length=None, with_teacher=True)
    teacher_text = {
        "input_ids": inputs.pop("teacher_input_ids"),
        "attention_mask": inputs.pop("teacher_attention_mask"),
    }
    student, teacher = model.prepare_inputs(**inputs), model.prepare_inputs(**{**inputs, **teacher_text})
    out = generate(
        model, student, max_new_tokens=NEW, temperature=1.0, eos_token_id=150, pad_token_id=PAD, num_samples=G, seed=4
    )
    return S.StepBatch(
        student=student,
        teacher=teacher,
        completion=out.tokens,
        completion_mask=out.mask,
        sampler_logprobs=out.model_logprobs,
        rewards=jnp.zeros(out.tokens.shape[0], jnp.float32),
        label_ids=jnp.full((2, 3), 7, jnp.int32),
        label_mask=jnp.ones((2, 3), bool),
    )


@pytest.mark.parametrize("mode", ["frozen", "ema"])
def test_teacher_reuses_the_students_media_features_when_encoders_are_not_trained(
    model, tiny_prompt_builder, mode, monkeypatch
):
    """A frozen or EMA copy of never-trained encoders equals the student's: the encoders run once per
    micro-batch, and the loss is the one of a teacher that encodes the media itself."""
    batch = media_step_batch(model, tiny_prompt_builder)
    counts = S.batch_counts(stack(batch))
    calls = []
    encode_media = type(model).encode_media
    monkeypatch.setattr(type(model), "encode_media", lambda self, inputs: calls.append(1) or encode_media(self, inputs))

    def loss_and_encoder_calls(train_encoders: bool):
        calls.clear()
        settings, state = settings_for(
            model, mode, train=TrainConfig(lr=1e-3, total_steps=100, train_encoders=train_encoders)
        )
        loss, _ = jax.jit(S._micro_batch_loss, static_argnums=4)(
            state.params, state.teacher_params, batch, counts, settings
        )
        return float(loss), len(calls)

    shared_loss, shared_calls = loss_and_encoder_calls(train_encoders=False)
    own_loss, own_calls = loss_and_encoder_calls(train_encoders=True)  # trained encoders: the teacher encodes itself
    assert (shared_calls, own_calls) == (1, 2)
    assert shared_loss > 0 and shared_loss == pytest.approx(own_loss, rel=1e-6, abs=1e-7)


def test_the_label_cross_entropy_reuses_the_steps_media_features(model, tiny_prompt_builder, monkeypatch):
    """The cross-entropy ablation term scores the labels on the media features the step encoded: the encoders
    run once, and with frozen encoders no gradient reaches them (nor the logged gradient norm)."""
    batch = media_step_batch(model, tiny_prompt_builder)
    counts = S.batch_counts(stack(batch))
    calls = []
    encode_media = type(model).encode_media
    monkeypatch.setattr(type(model), "encode_media", lambda self, inputs: calls.append(1) or encode_media(self, inputs))
    settings, state = settings_for(model, "frozen", teacher=TeacherConfig(mode="frozen", label_ce_weight=1.0))
    grads, _ = loss_grad()(state.params, state.teacher_params, batch, counts, settings)
    assert len(calls) == 1
    encoder_grads = [
        np.abs(np.asarray(value[...])).max() for path, value in nnx.to_flat_state(grads) if S.is_encoder_path(path)
    ]
    assert encoder_grads and max(encoder_grads) == 0.0
