"""`mer`: the clips of a manifest (`opsd_jax.data.manifest`) as a TFDS dataset of decoded media.

The manifest lies in the builder's manual directory (`manual_dir`; its media paths resolve against it);
each distinct `split` of the manifest becomes a dataset split. Every clip's video is decoded to the
config's `num_frames` frames at linspace indices (`vision_inputs.sample_frame_indices`; frames of short
clips repeat), resized to `height x width` with no crop (the aspect ratio is not kept, as with
qwen-omni-utils' `resized_height` / `resized_width`), and its audio (the `audio` file, else the video's
own track) to 16 kHz mono cut or padded to `max_audio_seconds`. The example schema is in `clips`.

    from opsd_jax.data.builders import MerConfig, build_mer, load_split
    dataset_dir = build_mer("data/mer2023/manifest.jsonl", "~/tensorflow_datasets",
                            MerConfig(name="mer2023", num_frames=16, height=224, width=224))
    source = load_split(dataset_dir, "test")
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

from opsd_jax.data.builders.clips import ClipBuilder, ClipConfig, clip_example, prepare
from opsd_jax.data.manifest import ManifestError, read_manifest
from opsd_jax.data.media import ON_ERROR, SkipCounter, load_clip_media

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MerConfig(ClipConfig):
    """`manifest`: the manifest's file name in the manual directory. `on_error="skip"` leaves out clips
    whose media cannot be decoded (their ids and reasons land in the dataset's metadata, `skipped`)."""

    manifest: str = "manifest.jsonl"
    on_error: str = "raise"

    def __post_init__(self):
        super().__post_init__()
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")


class Mer(ClipBuilder):
    """Multimodal emotion recognition clips from a manifest: decoded frames, 16 kHz audio, subtitle, labels."""

    BUILDER_CONFIGS = [MerConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the licensed clips and a manifest (JSONL, see opsd_jax.data.manifest; "
        "`opsd_jax.data.converters` writes one from a MER-UniBench dataset folder) in the manual directory.")

    def _split_generators(self, dl_manager):
        config: MerConfig = self.builder_config
        clips = read_manifest(Path(str(dl_manager.manual_dir)) / config.manifest)
        by_split = collections.defaultdict(list)
        for clip in clips:
            by_split[clip.split].append(clip)
        self.info.metadata["skipped"] = {}
        return {split: self._generate_examples(split_clips) for split, split_clips in sorted(by_split.items())}

    def _generate_examples(self, clips):
        config: MerConfig = self.builder_config
        skipped = SkipCounter()
        for clip in clips:
            media = load_clip_media(clip, on_error=config.on_error, skipped=skipped, num_frames=config.num_frames,
                                    size=(config.height, config.width))
            if media is None:
                continue
            yield clip.id, clip_example(
                config, id=clip.id, frames=media.frames, sample_fps=media.sample_fps, audio=media.audio,
                task=clip.task, subtitle=clip.subtitle, label=clip.label, labels=clip.labels,
                sentiment=clip.sentiment, dataset=clip.dataset, rationale=clip.rationale)
        if skipped.count:
            logger.warning("mer: skipped %d clip(s) whose media could not be decoded, e.g. %s", skipped.count,
                           next(iter(skipped.reasons.values())))
            self.info.metadata["skipped"].update(skipped.reasons)


def build_mer(manifest: str | Path, data_dir: str | Path, config: MerConfig | None = None, *,
              overwrite: bool = False) -> Path:
    """Builds the `mer` dataset of `manifest` (its directory is the manual directory) under `data_dir`;
    returns the dataset directory. An existing build of the same config name is reused unless `overwrite`."""
    manifest = Path(manifest).expanduser().resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if not read_manifest(manifest):
        raise ManifestError(f"{manifest}: the manifest holds no clip; expected one JSON object per line")
    config = dataclasses.replace(config or MerConfig(name="default"), manifest=manifest.name)
    return prepare(Mer, config, Path(data_dir).expanduser(), manual_dir=manifest.parent, overwrite=overwrite)
