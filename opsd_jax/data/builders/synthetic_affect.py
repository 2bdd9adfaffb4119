"""`synthetic_affect`: a generated clip dataset whose content is plugged in as a function.

The builder owns the schema (`clips.clip_features`), the ArrayRecord writing and the split layout; the
content comes from `SyntheticAffectConfig.generator(split, config)`, an iterable of keyword dicts for
`clips.clip_example` (`id`, `frames [num_frames, height, width, 3]` uint8, `sample_fps`, `audio`, `task`,
labels, ...). Examples are keyed by `id`, so a generator that is deterministic in (split, config) builds the
same dataset every time; `config.seed` is there for the generator to use.

    def make_examples(split, config):
        rng = np.random.default_rng([config.seed, len(split)])
        for index in range(8):
            yield dict(id=f"{split}_{index}", frames=..., sample_fps=2.0, audio=..., task="basic", label="happy")

    config = SyntheticAffectConfig(name="v1", generator=make_examples, splits=("train", "test"))
    dataset_dir = build_synthetic_affect("~/tensorflow_datasets", config)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opsd_jax.data.builders.clips import ClipBuilder, ClipConfig, clip_example, prepare
from opsd_jax.data.manifest import SPLIT_PATTERN

ExampleGenerator = Callable[[str, "SyntheticAffectConfig"], Iterable[dict[str, Any]]]


@dataclasses.dataclass
class SyntheticAffectConfig(ClipConfig):
    generator: ExampleGenerator | None = None
    splits: tuple[str, ...] = ("train",)
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.generator is not None and not callable(self.generator):
            raise ValueError(f"generator must be callable (split, config) -> examples, got {self.generator!r}")
        if not self.splits or any(not SPLIT_PATTERN.match(split) for split in self.splits):
            raise ValueError(f"splits must be names of letters, digits and '_', got {self.splits!r}")


class SyntheticAffect(ClipBuilder):
    """Generated affect clips: frames, audio and labels from the config's generator."""

    BUILDER_CONFIGS = [SyntheticAffectConfig(name="default")]

    def _split_generators(self, dl_manager):
        config: SyntheticAffectConfig = self.builder_config
        if config.generator is None:
            raise ValueError(
                f"synthetic_affect config {config.name!r} has no generator; pass SyntheticAffectConfig(generator=...)"
            )
        return {split: self._generate_examples(split) for split in config.splits}

    def _generate_examples(self, split):
        config: SyntheticAffectConfig = self.builder_config
        for index, fields in enumerate(config.generator(split, config)):
            if not isinstance(fields, dict):
                raise TypeError(
                    f"synthetic_affect generator: example {index} of split {split!r} must be a dict of "
                    f"clip_example fields, got {type(fields).__name__}"
                )
            example = clip_example(config, **fields)
            yield example["id"], example


def build_synthetic_affect(data_dir: str | Path, config: SyntheticAffectConfig, *, overwrite: bool = False) -> Path:
    """Generates and writes the dataset of `config` under `data_dir`; returns the dataset directory."""
    return prepare(SyntheticAffect, config, Path(data_dir).expanduser(), overwrite=overwrite)
