"""What training produced, for its readers (export, evaluation, generation).

    --checkpoint PATH [--step N] [--config F] [KEY=VALUE ...]
      -> `open_source`: PATH is a training run directory (`run.output_dir` of `opsd-jax train`: config.yaml
         and checkpoints/) or a Hugging Face checkpoint directory; the config is the run's own config.yaml
         (or --config), with the overrides; every check is made here, before any model loads
      -> `load_thinker`: the base checkpoint's architecture, placed on a mesh by the training sharding rules
         as it is read, then (for a run) the trained parameters restored onto those shardings

A run directory is opened read-only (it may still be training): `RunCheckpointer(read_only=True)` verifies
a checkpoint's seal before restoring it and, with no `--step`, falls back from a checkpoint that does not
restore to the newest one that does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from opsd_jax.checkpoint import RunCheckpointer
from opsd_jax.config import Config, load_config
from opsd_jax.data.builders import load_split
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.models.weights import CheckpointError
from opsd_jax.sharding import AxisRules

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # what `opsd-jax train` writes under run.output_dir
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainedSource:
    """Where a reader's parameters come from, checked.

    path: what --checkpoint named. base_dir: the Hugging Face directory of the architecture and the tokenizer
    (the run's `model.checkpoint`, or `path` itself). run_dir: the run directory, None for a Hugging Face
    one. step: the run's checkpoint step (None: the newest that restores). config: the run's config.yaml (or
    --config, or the defaults) with the overrides; `model.checkpoint` is `base_dir`. configured: the config
    came from a file (the run's or --config) rather than the defaults.
    """

    path: Path
    base_dir: Path
    run_dir: Path | None
    step: int | None
    config: Config
    configured: bool


def is_huggingface_dir(path: Path) -> bool:
    has_weights = (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))
    return path.is_dir() and (path / "config.json").is_file() and has_weights


def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() and (path / "checkpoints").is_dir()


def saved_steps(run_dir: Path) -> list[int]:
    """The complete checkpoints of a run, listed read-only."""
    checkpointer = RunCheckpointer(Path(run_dir) / "checkpoints", read_only=True)
    try:
        return sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()


def open_source(
    path: str | Path,
    *,
    step: int | None = None,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    num_devices: int | None | Literal["auto"] = "auto",
) -> TrainedSource:
    """Checks `path` (and `step`, the config and its overrides) without loading a model.

    Raises:
      CheckpointError: `path` is missing or neither kind of directory, `step` is not saved (or given for a
        Hugging Face directory), or the run's base checkpoint is missing.
      ConfigError: the config file or an override is invalid (`num_devices`: as `load_config`'s).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: does not exist")
    if is_huggingface_dir(path):
        if step is not None:
            raise CheckpointError(
                f"--step {step}: {path} is a Hugging Face checkpoint directory (one set of "
                "parameters); --step picks a checkpoint of a training run directory"
            )
        config = load_config(config_file, overrides, num_devices=num_devices)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, checkpoint=str(path)))
        return TrainedSource(path, path, None, None, config, configured=config_file is not None)
    if is_run_dir(path):
        config = load_config(
            config_file if config_file is not None else path / RUN_CONFIG, overrides, num_devices=num_devices
        )
        base = Path(config.model.checkpoint)
        if not (base / "config.json").is_file():
            raise CheckpointError(
                f"{path / RUN_CONFIG}: model.checkpoint {base} (the run's base checkpoint) is missing"
            )
        steps = saved_steps(path)
        if (step is not None and step not in steps) or not steps:
            wanted = "no checkpoint" if step is None else f"no checkpoint at step {step}"
            raise CheckpointError(f"--checkpoint {path}: {wanted}; saved steps: {', '.join(map(str, steps)) or 'none'}")
        return TrainedSource(path, base, path, step, config, configured=True)
    raise CheckpointError(
        f"--checkpoint {path}: neither a Hugging Face checkpoint directory (config.json and *.safetensors) nor a "
        "training run directory (config.yaml and checkpoints/, as `opsd-jax train` writes under run.output_dir)"
    )


def load_thinker(
    source: TrainedSource, *, dtype: str, mesh: Mesh, rules: AxisRules | None = None
) -> tuple[Any, int | None]:
    """The thinker of `source` in `dtype` ("float32" or "bfloat16", parameters and compute), every parameter
    placed on `mesh` by the logical-axis table `rules` (the run's `mesh.axis_rules()`) as it is read (so no device ever holds the whole model), and
    for a run the trained parameters restored straight onto those shardings. Returns `(model, step)`, the
    step restored (None for a Hugging Face directory)."""
    model = from_pretrained(
        source.base_dir, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], mesh=mesh, rules=rules, remat=False
    )
    if source.run_dir is None:
        return model, None
    if source.config.model.lora is not None:  # the run trained adapters on this base: they are what it saved
        model = lora.apply_lora(model, source.config.model.lora, mesh=mesh, rules=rules)
    checkpointer = RunCheckpointer(source.run_dir / "checkpoints", read_only=True)  # the run may still be training
    try:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            nnx.state(model, lora.trainable_filter(model)),
        )
        step, params = checkpointer.restore_params(source.step, abstract)
    finally:
        checkpointer.close()
    nnx.update(model, params)
    logger.info("loaded step %d of %s (%s, mesh %s)", step, source.run_dir, dtype, dict(mesh.shape))
    return model, step


@dataclasses.dataclass(frozen=True)
class ClipShape:
    """The static shape of a run's training clips: `num_frames` frames of `height` x `width`, audio padded or
    cut to `audio_samples` (16 kHz), as the dataset builder brought them (`opsd_jax.data.builders`)."""

    num_frames: int
    height: int
    width: int
    audio_samples: int


def training_clip_shape(config: Config) -> ClipShape | None:
    """The shape of the clips of `data.train_dir` (its first training clip), so that readers bring other clips
    to it; None when the run names no training dataset or it is not on this machine."""
    directory = Path(config.data.train_dir) if config.data.train_dir else None
    if directory is None or not directory.is_dir():
        return None

    source = load_split(directory, config.data.train_split)
    if not len(source):
        return None
    first = source[0]
    num_frames, height, width, _ = first["frames"].shape
    return ClipShape(int(num_frames), int(height), int(width), int(first["audio"].size))
