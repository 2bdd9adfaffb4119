"""TFDS builders of static-shape clip datasets, written as ArrayRecord without TensorFlow."""

from opsd_jax.data.builders.clips import ClipBuilder, ClipConfig, clip_example, clip_features, load_split, prepare
from opsd_jax.data.builders.mer import Mer, MerConfig, build_mer
from opsd_jax.data.builders.synthetic_affect import SyntheticAffect, SyntheticAffectConfig, build_synthetic_affect

__all__ = [
    "ClipBuilder",
    "ClipConfig",
    "Mer",
    "MerConfig",
    "SyntheticAffect",
    "SyntheticAffectConfig",
    "build_mer",
    "build_synthetic_affect",
    "clip_example",
    "clip_features",
    "load_split",
    "prepare",
]
