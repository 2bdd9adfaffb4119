"""Input-pipeline throughput: clips per second from ArrayRecord to batches on the device mesh, on this CPU.

A `mer` dataset of generated clips (random frames at 25 fps with a tone on the audio track) is built once
in a temporary directory; the timed part is the grain pipeline of `opsd_jax.data.pipeline`: read and
decompress records, the default preprocessing (`video_to_inputs` patch rows, `audio_to_inputs` log-mel
over the padded `max_audio_seconds`), batching, and `shard_batch` over 8 forced host devices. Medians of
`--repeats` timings of `--batches` batches each, after a warm-up batch (which absorbs the worker start).

    python -m benchmarks.data                   # 64 clips of 4 s, 16 frames of 224 x 224, 30 s audio
    python -m benchmarks.data --quick           # tiny sizes (the smoke test)
    python -m benchmarks.data --step-rate 0.5   # also: pipeline batches/s over training steps/s
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import force_host_devices, format_table, median_seconds, write_results

FULL = dict(clips=64, clip_seconds=4.0, num_frames=16, size=224, audio_seconds=30.0, batch_size=8, batches=4, repeats=3)
QUICK = dict(clips=8, clip_seconds=1.0, num_frames=4, size=56, audio_seconds=1.0, batch_size=2, batches=2, repeats=1)


def build_dataset(
    workdir: Path, *, clips: int, clip_seconds: float, num_frames: int, size: int, audio_seconds: float
) -> Path:
    import numpy as np

    from opsd_jax.data import media
    from opsd_jax.data.builders import MerConfig, build_mer

    rng = np.random.default_rng(0)
    lines = []
    for index in range(clips):
        frames = rng.integers(0, 256, (int(clip_seconds * 25), 240, 320, 3), dtype=np.uint8)
        time = np.arange(int(clip_seconds * 16000)) / 16000
        tone = (0.3 * np.sin(2 * np.pi * (200 + 10 * index) * time)).astype(np.float32)
        media.write_video(workdir / "clips" / f"clip{index}.mp4", frames, 25, audio=tone)
        lines.append(
            json.dumps(
                {
                    "id": f"clip{index}",
                    "video": f"clip{index}.mp4",
                    "task": "basic",
                    "label": "happy",
                    "subtitle": "benchmark",
                }
            )
        )
    manifest = workdir / "clips" / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    config = MerConfig(
        name="benchmark", num_frames=num_frames, height=size, width=size, max_audio_seconds=audio_seconds
    )
    return build_mer(manifest, workdir / "tfds", config)


def measure(source, mesh, *, workers: int, batch_size: int, batches: int, repeats: int) -> dict[str, Any]:
    import jax

    from opsd_jax.data.pipeline import PipelineConfig, make_iterator

    config = PipelineConfig(batch_size=batch_size, worker_count=workers, shard_index=0, shard_count=1)
    iterator = make_iterator(source, config, mesh=mesh)

    def run():
        for _ in range(batches):
            jax.block_until_ready(
                {name: value for name, value in next(iterator).items() if isinstance(value, jax.Array)}
            )

    seconds = median_seconds(run, repeats=repeats, warmup=1)
    iterator.close()  # stops the worker processes and frees their shared memory
    return {
        "workers": workers,
        "batch_size": batch_size,
        "clips_per_second": batches * batch_size / seconds,
        "batches_per_second": batches / seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--step-rate", type=float, help="training steps per second to compare with")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value))
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/data.json)")
    args = parser.parse_args(argv)
    sizes = {
        name: getattr(args, name) if getattr(args, name) is not None else default
        for name, default in (QUICK if args.quick else FULL).items()
    }
    worker_counts = [int(count) for count in args.workers.split(",")]

    from opsd_jax.config import MeshConfig
    from opsd_jax.data.builders import load_split
    from opsd_jax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    with tempfile.TemporaryDirectory() as workdir:
        dataset_dir = build_dataset(
            Path(workdir),
            clips=sizes["clips"],
            clip_seconds=sizes["clip_seconds"],
            num_frames=sizes["num_frames"],
            size=sizes["size"],
            audio_seconds=sizes["audio_seconds"],
        )
        source = load_split(dataset_dir, "train")
        rows = [
            measure(
                source,
                mesh,
                workers=workers,
                batch_size=sizes["batch_size"],
                batches=sizes["batches"],
                repeats=sizes["repeats"],
            )
            for workers in worker_counts
        ]
    headers = ["workers", "batch", "clips/s", "batches/s"]
    table = [[row["workers"], row["batch_size"], row["clips_per_second"], row["batches_per_second"]] for row in rows]
    if args.step_rate:
        for row, line in zip(rows, table):
            row["pipeline_over_step_rate"] = row["batches_per_second"] / args.step_rate
            line.append(row["pipeline_over_step_rate"])
        headers.append(f"batches/s over {args.step_rate:g} steps/s")
    print(
        f"grain pipeline, {sizes['num_frames']} frames of {sizes['size']}x{sizes['size']}, "
        f"{sizes['audio_seconds']:g} s audio, mesh of {mesh.size} devices"
    )
    print(format_table(headers, table))
    if args.step_rate:
        print("a ratio above 1 means the input pipeline keeps up with training")
    payload = {"sizes": sizes, "step_rate": args.step_rate, "results": rows}
    print(f"wrote {write_results('data', payload, args.out)}")
    return payload


if __name__ == "__main__":
    force_host_devices(8)  # before JAX starts; in-process callers (the tests) keep their devices
    main()
