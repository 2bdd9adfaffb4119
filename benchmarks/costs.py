"""What a step costs, counted from shapes: matmul FLOPs per phase and memory per device.

The FLOP counts follow what the implementation computes, so that XLA's own count of the compiled step
can check them (`benchmarks/step.py` does): dense attention over the whole KV cache (padding and
causal masks are applied to scores, not skipped), the prompt run once per prompt and its cache shared
by the prompt's G rollouts (`opsd_jax/opsd/teacher.py`, `opsd_jax/sampling/sampler.py`), the output
head only on completion positions. `repeated_step_flops` counts the same step as TRL-style PyTorch
trainers run it (each prompt repeated for its G rollouts, the head over every position), the peer that
`benchmarks/step.py` times, checked there against PyTorch's own FLOP counter. A multiply-add is 2
FLOPs; norms, rotary, softmax and other element-wise work are left out (a few percent at the sizes
measured, less at 7B).

The memory budget is the arithmetic written out in the run configs' comments (`configs/*.yaml`);
`tests/test_configs.py` recomputes each config's budget line with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from opsd_jax.settings import DECODER_PROJECTIONS


def _model(**fields: float) -> dict[str, Any]:
    return {**fields, "encoders": fields["audio"] + fields["vision"]}


# Reference §8.1 of Qwen2.5-Omni: trainable = text decoder + lm_head (budgeted untied), frozen = the audio and
# vision encoders.
MODELS: dict[str, dict[str, Any]] = {
    "3b": _model(
        trainable=3_085.9e6 + 311.2e6,
        audio=637.7e6,
        vision=668.7e6,
        layers=36,
        hidden=2048,
        heads=16,
        kv_heads=2,
        head_dim=128,
        intermediate=11_008,
        vocab=151_936,
    ),
    "7b": _model(
        trainable=7_070.6e6 + 545.0e6,
        audio=639.6e6,
        vision=676.6e6,
        layers=28,
        hidden=3584,
        heads=28,
        kv_heads=4,
        head_dim=128,
        intermediate=18_944,
        vocab=152_064,
    ),
}
PARAM_BYTES = {"float32": 4, "bfloat16": 2}
QUANTIZED_BYTES = {"int8": 1.0, "nf4": 0.5}  # QLoRA's stored base kernels (`model.lora.base_dtype`), scales apart


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The text decoder's sizes that set its matmul FLOPs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_text_config(cls, text: Any) -> DecoderShape:
        """From `opsd_jax.models.text.TextConfig` (a loaded checkpoint's decoder)."""
        return cls(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=text.head_dim,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
        )

    @classmethod
    def from_model(cls, name: str) -> DecoderShape:
        """A row of `MODELS` ("3b", "7b")."""
        model = MODELS[name]
        return cls(**{field.name: model[field.name] for field in dataclasses.fields(cls)})

    @property
    def layer_weights(self) -> int:
        """Matmul weights of one layer: q, k, v, o projections and the gated MLP."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    @property
    def decoder_weights(self) -> int:
        """Matmul weights of all layers plus the output head."""
        return self.layers * self.layer_weights + self.hidden * self.vocab


def forward_flops(shape: DecoderShape, tokens: float, keys: float, head_tokens: float) -> float:
    """FLOPs of one decoder forward: `tokens` query tokens, each scoring `keys` cached keys in every layer
    (scores and the weighted sum of values: 2 matmuls of `heads * head_dim`), and the output head on
    `head_tokens` of them."""
    per_token = 2 * shape.layers * (shape.layer_weights + 2 * shape.heads * shape.head_dim * keys)
    return tokens * per_token + 2 * head_tokens * shape.hidden * shape.vocab


@dataclasses.dataclass(frozen=True)
class StepShape:
    """One optimizer step's work: `prompts` prompts of `prompt_len` tokens (the teacher's: `teacher_len`),
    `samples` rollouts each of `completion_len` tokens."""

    prompts: int
    samples: int
    prompt_len: int
    teacher_len: int
    completion_len: int

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def completion_tokens(self) -> int:
        return self.rows * self.completion_len


def scoring_flops(shape: DecoderShape, step: StepShape, prompt_len: int) -> float:
    """One forward of `[prompt | completion]` as the trainer runs it (`completion_hidden`): the prompt once
    per prompt into a cache of `prompt_len + C`, the completions of all rollouts against it, the head on
    the completion positions."""
    cache = prompt_len + step.completion_len
    prompt = forward_flops(shape, step.prompts * prompt_len, cache, head_tokens=0)
    completion = forward_flops(shape, step.completion_tokens, cache, head_tokens=step.completion_tokens)
    return prompt + completion


def step_flops(
    shape: DecoderShape, step: StepShape, *, metric_heads: int = 2, encoders: float = 0.0
) -> dict[str, float]:
    """Matmul FLOPs of one OmniOPSD step by phase, as opsd-jax runs it.

    rollout: the prefill (each prompt once, cache `P + C`) and `C - 1` decode steps of every row.
    teacher: the teacher's scoring forward over `[teacher prompt | completion]`.
    student: the student's forward and backward (backward = 2 x forward) over `[prompt | completion]`.
    metrics: `metric_heads` extra output-head products that the step spends on its logged metrics
    (the sampled tokens' logprobs under student and teacher); not model FLOPs.
    model_train: teacher + student, the useful work of the jitted update (utilisation counts these).
    encoders: FLOPs of encoding the step's media once (one pass over the `prompts` prompts' clips; 0 for
    text). opsd-jax encodes each clip once in the rollout's prefill and once in the train step, where the
    teacher shares the student's features (frozen encoders); both rollout and teacher carry one pass
    (the teacher's program run alone encodes), model_train one.
    """
    cache = step.prompt_len + step.completion_len
    prefill = forward_flops(shape, step.prompts * step.prompt_len, cache, head_tokens=step.prompts)
    decode = forward_flops(
        shape, step.rows * (step.completion_len - 1), cache, head_tokens=step.rows * (step.completion_len - 1)
    )
    rollout = prefill + decode + encoders
    teacher = scoring_flops(shape, step, step.teacher_len) + encoders
    student = 3 * scoring_flops(shape, step, step.prompt_len)
    metrics = metric_heads * 2 * step.completion_tokens * shape.hidden * shape.vocab
    return {
        "rollout": rollout,
        "teacher": teacher,
        "student": student,
        "metrics": metrics,
        "encoders": 2 * encoders,  # the share of `total`
        "model_train": teacher + student,
        "total": rollout + teacher + student + metrics,
    }


def repeated_step_flops(shape: DecoderShape, step: StepShape, *, encoders: float = 0.0) -> dict[str, float]:
    """Matmul FLOPs of the same step as TRL-style PyTorch trainers run it (transformers `generate` with
    `num_return_sequences=G`, full forwards for teacher and student): every prompt, with its media,
    repeated for each of its G rollouts, and the output head over every position of every forward (the
    thinker's forward has no `logits_to_keep`). Attention is dense over the keys present, as PyTorch's
    FLOP counter counts it.

    rollout: the prefill of all `rows x P` tokens (keys `P`, head everywhere) and `C - 1` decode steps
    of every row against its growing cache (`P + t` keys at step t: `P + C / 2` on average).
    teacher: one forward over the `rows x (P_teacher + C)` tokens. student: its forward and backward
    (3 x) over `rows x (P + C)`; the backward of the head runs over every position too.
    encoders: as in `step_flops` (one pass over the prompts' clips); every row's copy is encoded in
    each of the three forwards (G passes each), forward only in the student (frozen encoders).
    """
    rows, completion = step.rows, step.completion_len
    prefill = forward_flops(shape, rows * step.prompt_len, step.prompt_len, head_tokens=rows * step.prompt_len)
    decode_tokens = rows * (completion - 1)
    decode = forward_flops(shape, decode_tokens, step.prompt_len + completion / 2, head_tokens=decode_tokens)

    def full_forward(prompt_len: int) -> float:
        tokens = rows * (prompt_len + completion)
        return forward_flops(shape, tokens, prompt_len + completion, head_tokens=tokens)

    repeated_encoders = step.samples * encoders
    rollout = prefill + decode + repeated_encoders
    teacher = full_forward(step.teacher_len) + repeated_encoders
    student = 3 * full_forward(step.prompt_len) + repeated_encoders
    return {
        "rollout": rollout,
        "teacher": teacher,
        "student": student,
        "encoders": 3 * repeated_encoders,  # the share of `total`
        "model_train": teacher + student,
        "total": rollout + teacher + student,
    }


def kv_bytes_per_token(model: Mapping[str, float]) -> int:
    """Bytes of bf16 KV cache per token: keys and values of every layer's KV heads."""
    return int(model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * 2)


def decoder_projections(model: Mapping[str, float]) -> tuple[list[tuple[int, int]], int]:
    """The `(in, out)` kernel shapes of one decoder layer's attention and MLP projections (q, k, v, o, gate,
    up, down: LoRA's default `target_modules`) and the number of layers."""
    hidden, intermediate = int(model["hidden"]), int(model["intermediate"])
    queries, kv = int(model["heads"] * model["head_dim"]), int(model["kv_heads"] * model["head_dim"])
    shapes = [(hidden, queries), (hidden, kv), (hidden, kv), (queries, hidden)]
    shapes += [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return shapes, int(model["layers"])


def decoder_bytes(config: Any, model: Mapping[str, float]) -> float:
    """Bytes of the text decoder and output head (`trainable`) stored as `opsd_jax.models.precision` allows: the
    decoder's weights in the compute dtype `model.dtype` (its layers cast them there anyway), the training step's
    output head (`hidden x vocab`, budgeted untied: multiplied as stored) in `model.param_dtype`."""
    head = model["hidden"] * model["vocab"]
    return (model["trainable"] - head) * PARAM_BYTES[config.model.dtype] + head * PARAM_BYTES[config.model.param_dtype]


def teacher_bytes(config: Any, model: Mapping[str, float]) -> float:
    """Bytes of a full fine-tune's teacher copy, unsharded (`opsd_jax.opsd.step.teacher_copy`): the weights
    training changes (decoder and output head; the encoders too with `train.train_encoders`), an EMA teacher's
    in `model.param_dtype` (float32 masters), a frozen teacher's decoder as `decoder_bytes` stores it (trained
    encoders in `model.param_dtype`: their LayerNorms compute from them as they are); a live teacher: none."""
    if config.teacher.mode == "live":
        return 0.0
    param_bytes = PARAM_BYTES[config.model.param_dtype]
    encoders = model["encoders"] * param_bytes if config.train.train_encoders else 0.0
    if config.teacher.mode == "ema":
        return model["trainable"] * param_bytes + encoders
    return decoder_bytes(config, model) + encoders


def lora_state_bytes(config: Any, model: Mapping[str, float]) -> float:
    """Bytes of a LoRA run's state (`config.model.lora`, default target modules), unsharded: every base weight
    in `model.param_dtype` (QLoRA: the adapted kernels in int8 / nf4 with their scales in it; `base_dtype`
    dtype: the decoder's as `decoder_bytes` stores them, its norm weights, 0.2 M at 7B, counted there too), the adapters with their Adam moments and gradients in
    `model.param_dtype` (qwix gives them the dtype of the base kernel it creates them on: the base as loaded), an
    EMA teacher's copy of the adapters; a frozen teacher is the base (no copy)."""
    settings = config.model.lora
    if settings.target_modules != DECODER_PROJECTIONS:
        raise ValueError(
            f"memory_budget: budgets the default model.lora.target_modules only, got {settings.target_modules!r}"
        )
    param_bytes = PARAM_BYTES[config.model.param_dtype]
    shapes, layers = decoder_projections(model)
    kernels = layers * sum(inputs * outputs for inputs, outputs in shapes)
    adapters = layers * settings.rank * sum(inputs + outputs for inputs, outputs in shapes)
    base = (model["trainable"] + model["encoders"]) * param_bytes
    if settings.base_dtype == "dtype":
        base = decoder_bytes(config, model) + model["encoders"] * param_bytes
    elif settings.base_dtype != "param_dtype":
        if settings.base_dtype == "int8":  # one scale per output channel
            scales = layers * sum(outputs for _, outputs in shapes)
        else:  # nf4: one scale per tile of `quantization_tile` input features
            scales = kernels / settings.quantization_tile
        base += kernels * (QUANTIZED_BYTES[settings.base_dtype] - param_bytes) + scales * param_bytes
    teacher = adapters * param_bytes if config.teacher.mode == "ema" else 0
    return base + adapters * 4 * param_bytes + teacher


def memory_budget(config: Any, model: Mapping[str, float], mesh: Mapping[str, int]) -> tuple[float, float]:
    """(state, activations) in GB per device for an `opsd_jax.config.Config` on a mesh of `mesh` sizes,
    the arithmetic written out in the configs' comments.

    State: trainable x 16 B (bf16 param + fp32 master + fp32 Adam m, v + bf16 grad) + frozen encoders x 2 B
    + the teacher's copy (`teacher_bytes`), sharded over fsdp x tensor; with LoRA, `lora_state_bytes`. Activations of one
    micro-step, rows sharded over data x fsdp: remat-kept layer inputs (2h B per token and layer), one
    recomputed layer (34h B per token), float32 attention scores and probabilities of one layer (none with
    `model.attention: splash`, whose kernel keeps a tile's scores on chip), three vocab chunks of float32 logits
    (student, teacher, gradient) and the rollouts' KV cache. With `model.remat_policy: save_dots`, also every
    layer's matmul outputs (q, k, v, o, gate, up, down in bf16; those split by the tensor axis divided by it) and
    its rotated q and k, for the tokens the layers run: each prompt once for its rollouts, then every rollout's new
    tokens.
    """
    trainable, frozen = model["trainable"], model["encoders"]
    if config.train.train_encoders:
        trainable, frozen = trainable + frozen, 0.0
    if config.model.lora is not None:
        state = lora_state_bytes(config, model)
    else:
        state = trainable * 16 + frozen * 2 + teacher_bytes(config, model)
    state /= mesh["fsdp"] * mesh["tensor"]

    prompts = config.train.batch_size // config.train.grad_accum_steps
    rows = prompts * config.sampling.num_samples // (mesh["data"] * mesh["fsdp"])
    length = config.data.prompt_length + config.sampling.max_new_tokens
    tokens = rows * length
    scores = 0 if config.model.attention == "splash" else 2 * rows * model["heads"] // mesh["tensor"] * length**2 * 4
    activations = (
        tokens * model["layers"] * 2 * model["hidden"]
        + tokens * 34 * model["hidden"]
        + scores
        + 3 * rows * config.loss.chunk_size * model["vocab"] * 4
        + rows * length * kv_bytes_per_token(model)
    )
    if config.model.remat and config.model.remat_policy == "save_dots":
        per_prompt = config.data.prompt_length + config.sampling.num_samples * config.sampling.max_new_tokens
        layer_tokens = prompts * per_prompt // (mesh["data"] * mesh["fsdp"])
        activations += layer_tokens * model["layers"] * saved_dot_bytes_per_token(model, mesh["tensor"])
    return state / 1e9, activations / 1e9


def saved_dot_bytes_per_token(model: Mapping[str, float], tensor: int) -> float:
    """Bytes per token of what `remat_policy: save_dots` keeps of one decoder layer, in bf16, on one device: the
    matmuls' outputs (q, k, v, gate and up split over the tensor axis, o and down whole) and the rotated q and k."""
    (q, k, v, o, gate, up, down), _ = decoder_projections(model)
    rotated = q[1] + k[1]  # the rotated queries and keys, kept beside the projections' outputs
    return 2 * ((q[1] + k[1] + v[1] + gate[1] + up[1] + rotated) / tensor + o[1] + down[1])


def mesh_sizes(config: Any, devices: int) -> dict[str, int]:
    """The mesh axis sizes a config resolves to on `devices` devices (-1 takes the rest)."""
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    fixed = 1
    for size in sizes.values():
        fixed *= size if size != -1 else 1
    return {name: devices // fixed if size == -1 else size for name, size in sizes.items()}
