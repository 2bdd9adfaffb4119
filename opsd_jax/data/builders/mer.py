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

Builds resume: `build_mer` keeps each clip's decoded media in `<data_dir>/mer/<name>/decoded/` (one
atomically written file per clip, keyed by the media files and the config's shapes) until the dataset is in
place, so a rerun after an interruption decodes only the clips not yet done. TFDS writes the dataset into
an `incomplete.*` directory and renames it at the end: an interrupted build leaves no dataset behind.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from opsd_jax.data.builders.clips import ClipBuilder, ClipConfig, clip_example, prepare
from opsd_jax.data.manifest import Clip, ManifestError, read_manifest
from opsd_jax.data.media import ON_ERROR, ClipMedia, SkipCounter, load_clip_media

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MerConfig(ClipConfig):
    """`manifest`: the manifest's file name in the manual directory. `on_error="skip"` leaves out clips
    whose media cannot be decoded (their ids and reasons land in the dataset's metadata, `skipped`).
    `decoded_dir`: where decoded media are kept between interrupted runs ("" keeps none)."""

    manifest: str = "manifest.jsonl"
    on_error: str = "raise"
    decoded_dir: str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")


class Mer(ClipBuilder):
    """Multimodal emotion recognition clips from a manifest: decoded frames, 16 kHz audio, subtitle, labels."""

    BUILDER_CONFIGS = [MerConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the licensed clips and a manifest (JSONL, see opsd_jax.data.manifest; "
        "`opsd-jax data convert` writes one from a MER-UniBench dataset folder) in the manual directory."
    )

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
            media = decoded_media(clip, config, skipped)
            if media is None:
                continue
            yield clip.id, manifest_clip_example(config, clip, media)
        if skipped.count:
            logger.warning(
                "mer: skipped %d clip(s) whose media could not be decoded, e.g. %s",
                skipped.count,
                next(iter(skipped.reasons.values())),
            )
            self.info.metadata["skipped"].update(skipped.reasons)


def manifest_clip_example(config: ClipConfig, clip: Clip, media: ClipMedia) -> dict:
    """A manifest clip and its decoded media as the dataset's example (`clip_example`'s fields)."""
    return clip_example(
        config,
        id=clip.id,
        frames=media.frames,
        sample_fps=media.sample_fps,
        audio=media.audio,
        task=clip.task,
        subtitle=clip.subtitle,
        label=clip.label,
        labels=clip.labels,
        sentiment=clip.sentiment,
        dataset=clip.dataset,
        rationale=clip.rationale,
    )


def _decoded_path(clip: Clip, config: MerConfig) -> Path:
    """The cache file of a clip's decoded media: named by its id and a digest of what decoding reads (the
    media files' paths, sizes and modification times) and the shapes it produces."""
    files = [path for path in (clip.video, clip.audio) if path is not None]
    key = json.dumps(
        [[str(path), path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else [str(path)] for path in files]
        + [config.num_frames, config.height, config.width, config.max_audio_samples]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_id = "".join(char if char.isalnum() or char in "-_." else "_" for char in clip.id)[:80]
    return Path(config.decoded_dir) / f"{safe_id}-{digest}.npz"


def decoded_media(clip: Clip, config: MerConfig, skipped: SkipCounter) -> ClipMedia | None:
    """A clip's media at the config's shapes, from the decoded cache when an earlier run wrote it."""
    path = _decoded_path(clip, config) if config.decoded_dir else None
    if path is not None and path.is_file():
        with np.load(path) as cached:
            return ClipMedia(frames=cached["frames"], sample_fps=float(cached["sample_fps"]), audio=cached["audio"])
    media = load_clip_media(
        clip,
        on_error=config.on_error,
        skipped=skipped,
        num_frames=config.num_frames,
        size=(config.height, config.width),
    )
    if media is not None and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.stem + ".partial.npz")
        np.savez(
            partial,
            frames=media.frames,
            sample_fps=np.float64(media.sample_fps),
            audio=np.asarray(media.audio, np.float32)[: config.max_audio_samples],
        )
        os.replace(partial, path)  # a file is whole or absent
    return media


def build_mer(
    manifest: str | Path, data_dir: str | Path, config: MerConfig | None = None, *, overwrite: bool = False
) -> Path:
    """Builds the `mer` dataset of `manifest` (its directory is the manual directory) under `data_dir`;
    returns the dataset directory. An existing build of the same config name is reused unless `overwrite`."""
    manifest = Path(manifest).expanduser().resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    if not read_manifest(manifest):
        raise ManifestError(f"{manifest}: the manifest holds no clip; expected one JSON object per line")
    data_dir = Path(data_dir).expanduser().resolve()
    config = config or MerConfig(name="default")
    decoded = data_dir / "mer" / config.name / "decoded"
    config = dataclasses.replace(config, manifest=manifest.name, decoded_dir=str(decoded))
    dataset_dir = prepare(Mer, config, data_dir, manual_dir=manifest.parent, overwrite=overwrite)
    shutil.rmtree(decoded, ignore_errors=True)  # the dataset is in place: nothing left to resume
    return dataset_dir
