"""What every clip dataset shares: the static-shape example schema, its config, and building / reading.

A clip example holds decoded media, so training never touches a video file:

| feature        | shape, dtype                                  | meaning                                          |
|----------------|-----------------------------------------------|--------------------------------------------------|
| `id`           | text                                          | the clip id                                      |
| `frames`       | `[num_frames, height, width, 3]` uint8 (zlib) | RGB frames sampled evenly over the clip          |
| `sample_fps`   | float32                                       | frames per second of the samples: `num_frames / total_frames * video_fps` |
| `audio`        | `[max_audio_samples]` float32 (zlib)          | 16 kHz mono, zero-padded or cut                  |
| `audio_length` | int32                                         | the valid samples at the front of `audio`        |
| `subtitle`, `task`, `label`, `dataset`, `rationale` | text     | as in the manifest; "" when absent               |
| `labels`       | sequence of text                              | open-vocabulary labels; empty when absent        |
| `sentiment`    | float32                                       | NaN when absent                                  |

TFDS writes ArrayRecord with no TensorFlow installed: `GeneratorBasedBuilder` plus
`file_format="array_record"` needs only numpy features (`Tensor`, `Scalar`, `Text`, `Sequence`), and
`as_data_source` reads the records back as numpy dicts, a random-access source for grain.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from opsd_jax.data.audio_features import N_FFT, SAMPLING_RATE
from opsd_jax.data.manifest import check_labels
from opsd_jax.data.vision_inputs import IMAGE_FACTOR, TEMPORAL_PATCH_SIZE


@dataclasses.dataclass
class ClipConfig(tfds.core.BuilderConfig):
    """Static example shapes. Sides must be multiples of 28 and the frame count even (the vision encoder's
    patch and temporal-patch sizes). The defaults, 16 frames of 224 x 224 (8 s at 2 fps; 8 x 8 x 8 = 512
    video tokens) and 30 s of audio, suit MER clips of a few seconds."""

    num_frames: int = 16
    height: int = 224
    width: int = 224
    max_audio_seconds: float = 30.0

    def __post_init__(self):
        if self.num_frames < TEMPORAL_PATCH_SIZE or self.num_frames % TEMPORAL_PATCH_SIZE:
            raise ValueError(f"num_frames must be a positive multiple of {TEMPORAL_PATCH_SIZE}, got {self.num_frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < IMAGE_FACTOR or value % IMAGE_FACTOR:
                raise ValueError(f"{name} must be a positive multiple of {IMAGE_FACTOR}, got {value}")
        if not self.max_audio_samples >= N_FFT:
            raise ValueError(
                f"max_audio_seconds must give at least {N_FFT} samples at {SAMPLING_RATE} Hz, "
                f"got {self.max_audio_seconds}"
            )

    @property
    def max_audio_samples(self) -> int:
        return int(round(self.max_audio_seconds * SAMPLING_RATE))

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.height, self.width, 3)


def clip_features(config: ClipConfig) -> tfds.features.FeaturesDict:
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "frames": tfds.features.Tensor(shape=config.frame_shape, dtype=np.uint8, encoding=zlib),
            "sample_fps": tfds.features.Scalar(dtype=np.float32),
            "audio": tfds.features.Tensor(shape=(config.max_audio_samples,), dtype=np.float32, encoding=zlib),
            "audio_length": tfds.features.Scalar(dtype=np.int32),
            "subtitle": tfds.features.Text(),
            "task": tfds.features.Text(),
            "label": tfds.features.Text(),
            "labels": tfds.features.Sequence(tfds.features.Text()),
            "sentiment": tfds.features.Scalar(dtype=np.float32),
            "dataset": tfds.features.Text(),
            "rationale": tfds.features.Text(),
        }
    )


def clip_example(
    config: ClipConfig,
    *,
    id: str,
    frames: np.ndarray,
    sample_fps: float,
    audio: np.ndarray,
    task: str,
    subtitle: str = "",
    label: str | None = None,
    labels=None,
    sentiment: float | None = None,
    dataset: str = "",
    rationale: str | None = None,
) -> dict[str, Any]:
    """One example in the schema above; the audio is padded or cut to the config's length."""
    if not isinstance(id, str) or not id:
        raise ValueError(f"id must be a non-empty string, got {id!r}")
    frames = np.asarray(frames)
    if frames.shape != config.frame_shape or frames.dtype != np.uint8:
        raise ValueError(
            f"clip {id!r}: frames must be uint8 of shape {config.frame_shape} (the config's static "
            f"shape), got {frames.dtype} {frames.shape}"
        )
    if not (isinstance(sample_fps, (int, float, np.floating)) and math.isfinite(sample_fps) and sample_fps > 0):
        raise ValueError(f"clip {id!r}: sample_fps must be a positive number, got {sample_fps!r}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"clip {id!r}: audio must be a non-empty mono waveform [samples], got shape {audio.shape}")
    labels, sentiment = check_labels(task, label, labels, sentiment)
    length = min(audio.size, config.max_audio_samples)
    padded = np.zeros(config.max_audio_samples, np.float32)
    padded[:length] = audio[:length]
    return {
        "id": id,
        "frames": frames,
        "sample_fps": np.float32(sample_fps),
        "audio": padded,
        "audio_length": np.int32(length),
        "subtitle": subtitle,
        "task": task,
        "label": label or "",
        "labels": list(labels or ()),
        "sentiment": np.float32(np.nan if sentiment is None else sentiment),
        "dataset": dataset,
        "rationale": rationale or "",
    }


class ClipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder of clip examples (`clip_features` of its config); subclasses generate the splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Decoded frames and 16 kHz audio at static shapes."}

    @py_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup tests `importlib_resources.abc.Traversable` for builders defined in a package, a
        # module etils declares only as an optional extra; the source file is all TFDS needs (it looks for a
        # checksums file beside it).
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=clip_features(self.builder_config),
            metadata=tfds.core.MetadataDict(),
        )


def prepare(
    builder_class: type[ClipBuilder],
    config: ClipConfig,
    data_dir: str | Path,
    *,
    manual_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Builds (or, unless `overwrite`, reuses) a dataset as ArrayRecord; returns its versioned directory."""
    builder = builder_class(data_dir=str(Path(data_dir).resolve()), config=config, file_format="array_record")
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else str(manual_dir), download_mode=mode
        )
    )
    return Path(str(builder.data_path))


def load_split(dataset_dir: str | Path, split: str, *, decode_media: bool = True):
    """A random-access source of one split's examples (numpy dicts) from a built dataset directory.

    `decode_media=False` leaves `frames` and `audio` as their stored bytes: an index pass over the text
    fields (and `sample_fps`, `audio_length`) that costs no decoding."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{dataset_dir} is not a built dataset (no dataset_info.json); pass the directory that `prepare` returned"
        )
    builder = tfds.builder_from_directory(str(dataset_dir))
    if split not in builder.info.splits:
        has = (
            f"it has {', '.join(builder.info.splits)}"
            if builder.info.splits
            else "it has no split at all (was it built from an empty manifest?)"
        )
        raise ValueError(f"split {split!r} is not in {dataset_dir}; {has}")
    if decode_media:
        return builder.as_data_source(split=split)
    skip = tfds.decode.SkipDecoding()
    return builder.as_data_source(split=split, decoders={"frames": skip, "audio": skip})
