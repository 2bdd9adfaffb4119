"""Typed, frozen run configuration loaded from YAML with dotted command-line overrides.

A run is described by one `Config` tree of frozen dataclasses. `load_config` reads a YAML file, applies
overrides such as `train.lr=1e-5 mesh.fsdp=4`, converts every value to its declared type and validates
the result, so that an unknown key, a wrong type or an impossible value fails before any work starts,
with a message that names the dotted key.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import jax
import yaml

from opsd_jax.data.jsonl import decode_utf8
from opsd_jax.opsd.losses import LossConfig
from opsd_jax.opsd.prompts import PromptConfig
from opsd_jax.settings import ConfigError, LoraConfig, TeacherConfig, TrainConfig
from opsd_jax.sharding import MeshConfig

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
REMOTE_HINT = (
    "only run.output_dir may be a gs:// URL; copy the files between the bucket and local disk "
    "(e.g. `gcloud storage cp -r`)"
)


def local_path(text: str) -> Path:
    """An argparse type for paths that must be on this machine: a URL is refused by name (pathlib would
    silently read `gs://bucket/x` as the local directory `gs:/bucket/x`)."""
    if _URL.match(text):
        raise argparse.ArgumentTypeError(f"{text}: expected a local path; {REMOTE_HINT}")
    return Path(text)


def _check_local(key: str, value: str) -> None:
    if _URL.match(value):
        raise ConfigError(f"{key}: {value} must be a local path; {REMOTE_HINT}")


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to load and in which precision."""

    checkpoint: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"  # activations and matmuls
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # stored weights (float32: master weights)
    remat: bool = False  # recompute decoder-layer activations in the backward pass
    # With remat, what each layer keeps for its backward: its input alone ("full"), or also its matmuls' outputs
    # ("save_dots": q, k, v, o, gate, up and down per token, and the rotated q and k, so the backward recomputes only
    # element-wise work and attention; for the 7B, 2 x (4 x 3,584 + 3 x 512 + 2 x 18,944) = 108 KB per token
    # and layer).
    remat_policy: Literal["full", "save_dots"] = "full"
    # Train low-rank adapters on frozen base weights instead of every weight (null: full fine-tuning).
    lora: LoraConfig | None = None
    # The attention of the training/scoring forward (prompts, then their completions over the prompts' keys):
    # XLA's, or the fused Pallas splash kernel (TPU; on other devices it runs interpreted, slowly). Prefill and
    # decode always run XLA's.
    attention: Literal["xla", "splash"] = "xla"

    def validate(self, num_devices: int | None) -> None:
        del num_devices
        _check_local("model.checkpoint", self.checkpoint)
        if self.remat_policy != "full" and not self.remat:
            raise ConfigError(f"model.remat_policy: {self.remat_policy} applies with model.remat: true, which is off")
        if self.lora is not None:
            self.lora.validate()
            width = {"float32": 4, "bfloat16": 2}
            if self.lora.base_dtype == "dtype" and width[self.dtype] > width[self.param_dtype]:
                raise ConfigError(
                    f"model.lora.base_dtype: dtype would store the base weights in model.dtype {self.dtype}, wider than "
                    f"model.param_dtype {self.param_dtype}; use param_dtype"
                )


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The student's rollouts."""

    num_samples: int = 4
    max_new_tokens: int = 64
    eval_max_new_tokens: int = 64  # greedy answers of the held-out evaluation
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # The prompt lengths of generation from a run (`opsd-jax generate` / `eval`, whose prompts vary in
    # length): a batch is left-padded to the smallest that holds it. The trainer's rollouts and held-out
    # evaluation need none: their prompts are all `data.prompt_length` (one static shape already).
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    # What one rollout decode covers: each micro-batch's prompts ("micro_batch", grad_accum_steps decodes
    # per step) or the whole step's ("step", one decode). A decode token reads every decoder weight once
    # whatever the rows, so one decode over k micro-batches' rows reads the weights k times less per row;
    # it holds the KV cache and the prefill's activations of all of them at once.
    rollout_batch: Literal["micro_batch", "step"] = "micro_batch"

    def validate(self, num_devices: int | None) -> None:
        del num_devices
        if self.num_samples < 1:
            raise ConfigError(f"sampling.num_samples: expected >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"sampling.top_k: expected >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p: expected a value in (0, 1] or null, got {self.top_p}")
        if not self.prompt_buckets or any(b < 1 for b in self.prompt_buckets):
            raise ConfigError(f"sampling.prompt_buckets: expected positive lengths, got {list(self.prompt_buckets)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where clips come from and the static shapes they are brought to.

    `train_dir` / `eval_dir` are built TFDS dataset directories (`opsd_jax.data.builders`); every clip
    of a dataset has `num_frames` frames of `frame_size` pixels and up to `max_audio_seconds` of audio,
    so batches have static shapes. `prompt_length` is the one length bucket both prompts are
    left-padded to.
    """

    train_dir: str = ""
    eval_dir: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    prompt_length: int = 1024
    teacher_prompt_length: int | None = None  # default: prompt_length (one bucket for both)
    answer_length: int = 32  # static width of reference answers (cross-entropy terms); longer ones are cut
    use_audio_in_video: bool = True
    worker_count: int = 0
    eval_clips: int = 64
    # Clips whose prompts exceed the buckets (checked for every clip when training starts): false = refuse to
    # start, naming them; true = leave them out of training and evaluation, counted in the log.
    skip_long_prompts: bool = False

    def validate(self, num_devices: int | None) -> None:
        del num_devices
        _check_local("data.train_dir", self.train_dir)
        _check_local("data.eval_dir", self.eval_dir)
        if self.prompt_length < 8:
            raise ConfigError(f"data.prompt_length: expected >= 8 tokens, got {self.prompt_length}")
        if self.teacher_prompt_length is not None and self.teacher_prompt_length < self.prompt_length:
            raise ConfigError(
                f"data.teacher_prompt_length: expected >= data.prompt_length ({self.prompt_length}): the teacher's "
                f"prompt holds the student's plus the rationale; got {self.teacher_prompt_length}"
            )
        if self.worker_count < 0:
            raise ConfigError(f"data.worker_count: expected >= 0, got {self.worker_count}")
        if self.eval_clips < 0:
            raise ConfigError(f"data.eval_clips: expected >= 0, got {self.eval_clips}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Outputs of a run: checkpoints, logs, evaluation cadence."""

    output_dir: str = "runs/default"
    save_every: int = 100
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str = "eval/accuracy"
    eval_every: int = 100
    log_every: int = 1
    async_checkpointing: bool = True
    # Every this many steps, the rollouts of the step's first prompt (their text, per-token divergence, and the
    # teacher's top tokens where the student diverged most) go to logs/rollouts.jsonl and TensorBoard's text
    # panel; 0: never. Costs one extra forward of that micro-batch (student and teacher) on those steps.
    log_rollouts_every: int = 0
    # A Weights & Biases project that gets the same metrics as TensorBoard (`pip install 'opsd-jax[wandb]'`;
    # WANDB_MODE=offline keeps them on disk); null: none.
    wandb_project: str | None = None

    def validate(self, num_devices: int | None) -> None:
        del num_devices
        if not self.output_dir:
            raise ConfigError("run.output_dir: expected a directory for checkpoints and logs")
        for name in ("save_every", "eval_every", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}: expected >= 1, got {getattr(self, name)}")
        if self.keep_best < 0:
            raise ConfigError(f"run.keep_best: expected >= 0, got {self.keep_best}")
        if self.log_rollouts_every < 0:
            raise ConfigError(f"run.log_rollouts_every: expected >= 0 (0 = never), got {self.log_rollouts_every}")
        if self.wandb_project is not None:
            if not self.wandb_project.strip():
                raise ConfigError("run.wandb_project: expected a project name, or null for no Weights & Biases")
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError(
                    f"run.wandb_project: {self.wandb_project!r} is set but wandb is not installed; "
                    "pip install 'opsd-jax[wandb]', or set run.wandb_project: null"
                )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    sampling: SamplingConfig = SamplingConfig()
    teacher: TeacherConfig = TeacherConfig()
    loss: LossConfig = LossConfig()
    prompt: PromptConfig = PromptConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()

    def validate(self, num_devices: int | None) -> None:
        for field in dataclasses.fields(self):
            section = getattr(self, field.name)
            if hasattr(section, "validate"):
                section.validate(num_devices)
        distills = self.teacher.distill_weight > 0 and self.loss.is_clip is not None
        if distills and self.sampling.temperature != self.loss.temperature:
            # The ratio divides the student at loss.temperature by the tempered, filtered distribution the
            # rollouts came from; at two temperatures it reweights towards another policy than the one sampled.
            raise ConfigError(
                f"sampling.temperature ({self.sampling.temperature}) differs from loss.temperature "
                f"({self.loss.temperature}): the importance ratio compares the student at loss.temperature with "
                "the distribution rollouts are drawn from; set them equal, or loss.is_clip: null for no ratio"
            )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """The named run configs shipped inside the package (`opsd_jax/configs/*.yaml`, package data): name ->
    file. Found through `importlib.resources`, so an installed wheel has them as a checkout does."""
    folder = resources.files("opsd_jax") / "configs"
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def resolve_config_path(path: str | Path) -> Path:
    """A config file: `path` itself when it is a file, else the shipped config of that name (`demo_tiny`
    or `demo_tiny.yaml`). Raises `ConfigError` naming both places when neither exists."""
    path = Path(path)
    if path.is_file():
        return path
    named = shipped_configs()
    name = path.stem if path.suffix in ("", ".yaml") and path.parent == Path(".") else None
    if name in named:
        return named[name]
    raise ConfigError(
        f"config file {path} does not exist (nor is it a shipped config: {', '.join(named) or 'none found'})"
    )


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    num_devices: int | None | Literal["auto"] = "auto",
) -> Config:
    """Reads a YAML config, applies `key.sub=value` overrides, converts types and validates.

    Args:
      path: a YAML file, the name of a shipped config (`demo_tiny`, see `shipped_configs`), or None for
        the defaults.
      overrides: dotted assignments; values are parsed as YAML scalars (`1e-5`, `true`, `[1, 2]`).
      num_devices: the device count the mesh must match; "auto" asks JAX, None skips that check.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        text = decode_utf8(path.read_bytes(), path, ConfigError)
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        _set_dotted(raw, key.strip(), _Override(value))
    config = from_dict(Config, raw)
    if num_devices == "auto":
        num_devices = jax.device_count()
    config.validate(num_devices)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {line} (first on line {seen[key]})", None
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: its text, read as YAML unless the field is a string (so `a: {b}` stays text)."""

    text: str

    def parsed(self) -> Any:
        return yaml.safe_load(self.text) if self.text.strip() else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, checking every key and converting every value."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        # Sections that validate themselves on construction name fields as `ClassName.field`.
        raise ConfigError(str(err).replace(f"{cls.__name__}.", prefix)) from err


def _convert(hint: Any, value: Any, key: str) -> Any:
    if isinstance(value, _Override):
        textual = hint is str or (str in typing.get_args(hint) and value.text.strip() not in ("null", "~", ""))
        value = value.text if textual else value.parsed()
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key + ".")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_hint = args[0] if args else Any
        return tuple(_convert(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML reads YAML 1.1, where `1e-5` (no dot) is a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # a NaN passes every `<` / `>` check below it, silently
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")
