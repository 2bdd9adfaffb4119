"""Settings that the layers below the run read, and the error a bad setting raises.

`opsd_jax.config` assembles the whole run's `Config` from these and the sections that live beside their code
(`MeshConfig` in `opsd_jax.sharding`, `LossConfig` in `opsd_jax.opsd.losses`, `PromptConfig` in
`opsd_jax.opsd.prompts`). This module imports nothing from the package, so that every layer may import it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warm-up and cosine decay, global-norm clipping, accumulation."""

    seed: int = 0
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    total_steps: int = 1000
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    train_encoders: bool = False

    def validate(self, num_devices: int | None) -> None:
        del num_devices
        if self.lr <= 0:
            raise ConfigError(f"train.lr: expected a positive learning rate, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        for name in ("total_steps", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size: {self.batch_size} prompts do not split into "
                f"train.grad_accum_steps = {self.grad_accum_steps} equal micro-batches"
            )
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"train.warmup_steps: expected 0..train.total_steps - 1 ({self.total_steps - 1}), got {self.warmup_steps}"
            )
        if self.max_grad_norm <= 0:
            raise ConfigError(f"train.max_grad_norm: expected > 0, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: expected >= 0, got {self.weight_decay}")
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected a value in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Which parameters score the completions: the live student (stop-gradient), the initial ones, or an EMA."""

    mode: Literal["live", "frozen", "ema"] = "frozen"
    ema_rate: float = 0.05
    # False gives the teacher the student's own prompt (the "teacher without rationale" ablation).
    use_rationale: bool = True
    distill_weight: float = 1.0
    # Ablation terms, 0 by default: a label-reward policy gradient (GRPO-style) and a cross-entropy term
    # on reference answers (`label_ce_target`: the label, or the rationale followed by the label) given
    # the student's or the teacher's prompt (`label_ce_prompt`; "teacher" is the warm start's reading
    # of written evidence).
    label_pg_weight: float = 0.0
    label_ce_weight: float = 0.0
    label_ce_target: Literal["label", "rationale"] = "label"
    label_ce_prompt: Literal["student", "teacher"] = "student"

    def validate(self, num_devices: int | None) -> None:
        del num_devices
        if not 0 < self.ema_rate <= 1:
            raise ConfigError(f"teacher.ema_rate: expected a value in (0, 1], got {self.ema_rate}")
        for name in ("label_pg_weight", "label_ce_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"teacher.{name}: expected >= 0, got {getattr(self, name)}")


# The text decoder's attention and MLP projections (module paths of `Qwen2_5OmniThinker`, '/'-joined).
DECODER_PROJECTIONS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the frozen base weights (`opsd_jax.models.lora`, built with qwix).

    `target_modules` is a regular expression that must match the whole '/'-joined path of a linear layer
    (`model/layers/3/mlp/up_proj`, `visual/blocks/0/attn/qkv`, `lm_head`); the default adapts the text
    decoder's attention and MLP projections. `base_dtype` stores the frozen base weights as they are
    ("param_dtype"), the text decoder's kernels and embeddings in the compute dtype `model.dtype` ("dtype": where
    its layers cast them anyway, so the same outputs from half the bytes of float32; the adapters stay in
    `model.param_dtype`, the encoders' weights, the decoder's norms and the training step's output head as they
    are: `opsd_jax.models.precision`), or the
    adapted layers' kernels quantized by qwix (QLoRA: "int8" per channel, "nf4" in tiles of
    `quantization_tile` input features). There is no dropout setting: qwix's LoRA dropout is always on, so
    it would also perturb the teacher's scoring forward and the rollouts, which run the same adapted layers.
    `decode` chooses whether generation runs the adapters or a copy with them merged in.
    """

    rank: int = 16
    alpha: float = 32.0
    target_modules: str = DECODER_PROJECTIONS
    base_dtype: Literal["param_dtype", "dtype", "int8", "nf4"] = "param_dtype"
    quantization_tile: int = 64
    # How generation decodes the adapted model (`opsd_jax.sampling.decode_weights.generation_model`): "auto" merges
    # the adapters into the compute-dtype copy of the decoder when generation makes that copy anyway (a base stored
    # wider than `model.dtype`), and runs them otherwise; "merged" always decodes a merged copy (costing, while it
    # generates, a compute-dtype copy of the adapted kernels beside a base already stored in `model.dtype`, or
    # QLoRA's); "adapted" always runs the adapters.
    decode: Literal["auto", "merged", "adapted"] = "auto"

    def validate(self, prefix: str = "model.lora") -> None:
        if self.rank < 1:
            raise ConfigError(f"{prefix}.rank: expected >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha: expected > 0, got {self.alpha}")
        if self.quantization_tile < 1:
            raise ConfigError(f"{prefix}.quantization_tile: expected >= 1, got {self.quantization_tile}")
        try:
            re.compile(self.target_modules)
        except re.error as err:
            raise ConfigError(
                f"{prefix}.target_modules: {self.target_modules!r} is not a regular expression ({err})"
            ) from None
