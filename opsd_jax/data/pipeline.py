"""The grain input pipeline: a built clip dataset -> static-shape batches on the device mesh.

    source (ArrayRecord, random access)
      -> seeded shuffle, a new order every epoch
      -> this process's shard: every `shard_count`-th example from `shard_index`, the same count everywhere
      -> repeat for `num_epochs` (None: forever)
      -> preprocess (the caller's function; default `ProcessorInputs`), in `worker_count` worker processes
      -> batches of `batch_size`, the incomplete last one dropped
      -> numeric arrays placed on the mesh (`opsd_jax.sharding.shard_batch`); text stays on the host

Everything before the device placement is a grain `MapDataset`, so example i of the stream is a pure
function of (seed, shard, i): batches are identical for any worker count, and the iterator's
`get_state()` / `set_state()` resume a stream exactly where it stopped. A state is tied to the worker
count it was taken with (grain records per-worker positions); resume with the same `worker_count`.
Batches may span an epoch boundary (the shard's epoch length need not divide by `batch_size`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from opsd_jax.data.audio_features import audio_to_inputs
from opsd_jax.data.vision_inputs import video_to_inputs
from opsd_jax.sharding import shard_batch

Example = Mapping[str, Any]
Preprocess = Callable[[Example], dict[str, Any]]
TEXT_FIELDS = ("id", "subtitle", "task", "label", "dataset", "rationale")
MODEL_INPUTS = (
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
    "input_features",
    "feature_attention_mask",
)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """`shard_index` / `shard_count` default to `jax.process_index()` / `jax.process_count()`.
    `read_threads` prefetch in the main process; `worker_count` > 0 preprocesses in that many processes."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    read_buffer_size: int = 8
    shard_index: int | None = None
    shard_count: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "read_threads", "read_buffer_size", "worker_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {self.worker_count}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("shard_index and shard_count must be given together")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index must be in [0, shard_count={self.shard_count}), got {self.shard_index}")

    def shard(self) -> tuple[int, int]:
        if self.shard_count is not None:
            return self.shard_index, self.shard_count

        return jax.process_index(), jax.process_count()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class ProcessorInputs:
    """A clip example -> the processor's arrays (model layout, per example) and its text fields.

    `pixel_values_videos [T/2 * H/14 * W/14, 1176]` float32, `video_grid_thw [3]` int64,
    `video_second_per_grid []` float32, `input_features [128, max_audio_samples // 160]` float32 and
    `feature_attention_mask [max_audio_samples // 160]` int32; plus `sentiment` float32 (NaN when
    absent), the text fields as str and `labels` joined by ", ". Every shape is fixed by the dataset's
    config and `max_audio_samples` (default: the stored audio length), so batches are static.
    """

    max_audio_samples: int | None = None

    def __call__(self, example: Example) -> dict[str, Any]:
        video = video_to_inputs(np.asarray(example["frames"]), float(example["sample_fps"]))
        waveform = np.asarray(example["audio"])[: int(example["audio_length"])]
        audio = audio_to_inputs(waveform, max_samples=self.max_audio_samples or int(np.asarray(example["audio"]).size))
        inputs = {
            "pixel_values_videos": video["pixel_values_videos"],
            "video_grid_thw": video["video_grid_thw"][0],
            "video_second_per_grid": video["video_second_per_grid"][0],
            "input_features": audio["input_features"][0],
            "feature_attention_mask": audio["feature_attention_mask"][0],
            "sentiment": np.float32(example["sentiment"]),
            "labels": ", ".join(_text(label) for label in example["labels"]),
        }
        inputs.update({name: _text(example[name]) for name in TEXT_FIELDS})
        return inputs


def to_model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A batch of `ProcessorInputs` -> the model call's media arguments: the per-clip patch rows
    `[B, P, 1176]` packed into `[B * P, 1176]` (the processor's layout), the rest as they are."""
    inputs = {name: batch[name] for name in MODEL_INPUTS}
    rows = inputs["pixel_values_videos"]
    inputs["pixel_values_videos"] = rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[2])
    return inputs


def place_on_mesh(batch: Mapping[str, Any], mesh, rules=None) -> dict[str, Any]:
    """Numeric arrays -> `shard_batch` (leading axis over the batch mesh axes of `rules`, a run's
    `MeshConfig.axis_rules`; default: the default table); text arrays stay numpy."""
    numeric = {name: value for name, value in batch.items() if np.asarray(value).dtype.kind in "biuf"}
    placed = shard_batch(numeric, mesh, rules)
    return {name: placed.get(name, value) for name, value in batch.items()}


def _allow_grain_workers_without_absl_app() -> None:
    # grain reads an absl flag when it starts worker processes; outside `absl.app.run` (pytest, notebooks,
    # our CLI) flags are unparsed and reading one raises. Marking them parsed keeps every default.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(source, config: PipelineConfig, preprocess: Preprocess | None = None) -> grain.IterDataset:
    """The pipeline up to host batches (dicts of numpy arrays stacked on a new leading batch axis)."""
    dataset = grain.MapDataset.source(source)
    size = len(dataset)
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    shard_index, shard_count = config.shard()
    shard_size = size // shard_count  # equal shards, so every process yields the same number of batches
    if shard_size < config.batch_size:
        raise ValueError(
            f"a shard of {shard_size} examples ({size} examples over {shard_count} processes) cannot "
            f"fill one batch of batch_size={config.batch_size}"
        )
    dataset = dataset[shard_index : shard_size * shard_count : shard_count]
    dataset = dataset.repeat(config.num_epochs)
    dataset = dataset.map(preprocess or ProcessorInputs())
    dataset = dataset.batch(config.batch_size, drop_remainder=True)
    stream = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)
    )
    if config.worker_count:
        _allow_grain_workers_without_absl_app()
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return stream


def make_iterator(
    source, config: PipelineConfig, *, mesh=None, rules=None, preprocess: Preprocess | None = None
) -> grain.DatasetIterator:
    """An iterator of batches, on `mesh` when given (placed by `rules`, a run's logical-axis table);
    checkpoint it with `get_state()` / `set_state()`."""
    stream = make_dataset(source, config, preprocess)
    if mesh is not None:
        stream = stream.map(functools.partial(place_on_mesh, mesh=mesh, rules=rules))
    return iter(stream)
