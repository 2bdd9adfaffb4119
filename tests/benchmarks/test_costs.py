"""The step's cost model: shapes -> FLOPs and memory (checked against XLA by tests/benchmarks/test_step.py)."""

from __future__ import annotations

import pytest

from benchmarks.costs import MODELS, DecoderShape, StepShape, forward_flops, repeated_step_flops, step_flops


def test_decoder_weights_match_the_reference_parameter_count():
    # Reference §8.1: the 7B text decoder (layers + embeddings) holds 7,070.6 M parameters; the counted
    # matmul weights (layers + the untied head, the same size as the embeddings) leave out only the
    # norms and q/k/v biases (~0.3 M).
    shape = DecoderShape.from_model("7b")
    assert shape.decoder_weights == pytest.approx(7_070.6e6, rel=1e-4)
    assert shape.decoder_weights < 7_070.6e6


def test_forward_flops_by_hand():
    shape = DecoderShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32)
    # Per layer: q 8x8, k 8x4, v 8x4, o 8x8 = 192 weights; MLP 3 x 8 x 16 = 384.
    assert shape.layer_weights == 576
    per_token = 2 * 2 * (576 + 2 * 2 * 4 * 10)  # 10 keys: scores and values, 2 heads of 4
    assert forward_flops(shape, tokens=3, keys=10, head_tokens=2) == 3 * per_token + 2 * 2 * 8 * 32


def test_step_flops_phases_add_up_and_scale():
    shape = DecoderShape.from_model("3b")
    step = StepShape(prompts=4, samples=2, prompt_len=64, teacher_len=96, completion_len=16)
    flops = step_flops(shape, step)
    assert flops["total"] == pytest.approx(flops["rollout"] + flops["model_train"] + flops["metrics"])
    assert flops["model_train"] == flops["teacher"] + flops["student"]
    # The dense part of the student's forward + backward is 6 x weights x tokens it runs (prompt once per
    # prompt, completions per rollout); attention adds the rest.
    tokens = step.prompts * step.prompt_len + step.completion_tokens
    dense = 6 * shape.layers * shape.layer_weights * tokens + 6 * shape.hidden * shape.vocab * step.completion_tokens
    assert 1.0 < flops["student"] / dense < 1.1
    doubled = step_flops(shape, StepShape(8, 2, 64, 96, 16))
    assert doubled["model_train"] == pytest.approx(2 * flops["model_train"])
    assert set(MODELS) == {"3b", "7b"}


def test_repeated_step_flops_count_each_rollouts_prompt_and_every_positions_head():
    shape = DecoderShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32)
    step = StepShape(prompts=3, samples=4, prompt_len=10, teacher_len=14, completion_len=5)
    ours, theirs = step_flops(shape, step, encoders=100.0), repeated_step_flops(shape, step, encoders=100.0)
    rows, per_key = step.rows, 2 * shape.layers * 2 * shape.heads * shape.head_dim

    def dense(tokens: int, keys: float) -> float:  # weights and head over every token, attention over `keys`
        return tokens * (2 * shape.layers * shape.layer_weights + per_key * keys + 2 * shape.hidden * shape.vocab)

    # Prefill: every row's copy of its prompt; decode step t of C - 1 attends over P + t keys.
    decode = sum(dense(rows, step.prompt_len + t) for t in range(1, step.completion_len))
    assert theirs["rollout"] == pytest.approx(dense(rows * 10, 10) + decode + 4 * 100.0)
    assert theirs["teacher"] == pytest.approx(dense(rows * 19, 19) + 4 * 100.0)
    assert theirs["student"] == pytest.approx(3 * dense(rows * 15, 15) + 4 * 100.0)  # the frozen encoders: forward only
    assert theirs["encoders"] == 3 * 4 * 100.0 and ours["encoders"] == 2 * 100.0
    assert theirs["model_train"] == theirs["teacher"] + theirs["student"]
    assert theirs["total"] == pytest.approx(theirs["rollout"] + theirs["model_train"])
    # opsd-jax's count with the encoders: one pass in the rollout, one in the train step.
    assert ours["total"] == pytest.approx(step_flops(shape, step)["total"] + 200.0)
    assert ours["model_train"] == pytest.approx(step_flops(shape, step)["model_train"] + 100.0)
    # With one rollout per prompt the work differs only by the head over the prompt positions (and the
    # rollout's attention over its growing cache instead of the whole one).
    single = StepShape(prompts=3, samples=1, prompt_len=10, teacher_len=14, completion_len=5)
    head_on_prompts = 2 * shape.hidden * shape.vocab * 3 * (14 + 3 * 10)
    assert repeated_step_flops(shape, single)["model_train"] - step_flops(shape, single)[
        "model_train"
    ] == pytest.approx(head_on_prompts)
