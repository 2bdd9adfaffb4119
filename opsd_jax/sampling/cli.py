"""`opsd-jax generate`: answers for one clip, or for every clip of a manifest, with the jitted sampler.

Inference needs no rationale, label or API: the prompt is the student's (`opsd_jax.opsd.prompts`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer for a clip (or a manifest of clips) with a checkpoint",
        description="Decodes the clip's frames and audio, builds the student prompt (media + subtitle + "
        "instruction) and samples an answer with the jitted decode loop. One clip: --video [--audio] "
        "[--subtitle]; many: --manifest M --out answers.jsonl (a progress bar, batches of --batch-size).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="Hugging Face checkpoint directory (with tokenizer files)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", type=Path, help="a video file")
    source.add_argument("--manifest", type=Path, help="a JSONL manifest of clips (see README)")
    parser.add_argument("--audio", type=Path, help="an audio file (default: the video's own audio track)")
    parser.add_argument("--no-audio", action="store_true", help="use the frames only")
    parser.add_argument("--subtitle", default="", help="what is said in the clip")
    parser.add_argument("--prompt", help="the instruction (default: the training instruction)")
    parser.add_argument("--out", type=Path, help="answers JSONL (with --manifest)")
    parser.add_argument("--split", help="only clips of this split (with --manifest)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second")
    parser.add_argument("--max-frames", type=int, default=32, help="at most this many frames per clip")
    parser.add_argument("--max-pixels", type=int, default=224 * 224, help="at most this many pixels per frame")
    parser.add_argument("--separate-audio", action="store_true",
                        help="give the audio as its own part instead of interleaving it with the video")
    parser.set_defaults(handler=run)


def _clip_inputs(video: Path, audio: Path | None, *, record_id: str, args: argparse.Namespace) -> dict[str, Any]:
    from opsd_jax.data.audio_features import audio_to_inputs
    from opsd_jax.data.media import read_audio, read_video
    from opsd_jax.data.vision_inputs import video_to_inputs

    decoded = read_video(video, record_id=record_id, fps=args.fps, max_frames=args.max_frames,
                         max_pixels=args.max_pixels)
    arrays = video_to_inputs(decoded.frames, decoded.sample_fps)
    clip = {
        "pixel_values_videos": arrays["pixel_values_videos"],
        "video_grid_thw": arrays["video_grid_thw"][0],
        "video_second_per_grid": arrays["video_second_per_grid"][0],
    }
    if not args.no_audio:
        waveform = read_audio(audio or video, record_id=record_id)
        features = audio_to_inputs(waveform, max_samples=waveform.size)
        clip.update(input_features=features["input_features"][0], feature_attention_mask=features["feature_attention_mask"][0])
    return clip


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer(model, builder, clips: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Greedy (or sampled) answers for clips prepared by `_clip_inputs` (+ `subtitle`)."""
    import dataclasses

    from opsd_jax.opsd.prompts import PromptConfig, encode_clip_batch
    from opsd_jax.sampling import generate

    config = PromptConfig() if args.prompt is None else dataclasses.replace(PromptConfig(), instruction=args.prompt)
    inputs = encode_clip_batch(builder, clips, config, length=None, use_audio_in_video=not args.separate_audio)
    out = generate(
        model, inputs, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=builder.tokenizer.eos_token_id, pad_token_id=builder.pad_token_id, seed=args.seed,
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    return [builder.tokenizer.decode(row[m], skip_special_tokens=True).strip() for row, m in zip(tokens, mask)]


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    from tqdm import tqdm

    from opsd_jax.data.chat_template import PromptBuilder
    from opsd_jax.data.manifest import read_manifest
    from opsd_jax.data.media import MediaError
    from opsd_jax.models.qwen2_5_omni import from_pretrained

    if args.manifest is not None and args.out is None:
        print("opsd-jax generate: error: --manifest needs --out (the answers JSONL)", file=sys.stderr)
        return 2
    model = from_pretrained(args.checkpoint, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    builder = PromptBuilder.from_pretrained(args.checkpoint)
    try:
        if args.video is not None:
            clip = _clip_inputs(args.video, args.audio, record_id=args.video.name, args=args)
            clip["subtitle"] = args.subtitle
            print(answer(model, builder, [clip], args)[0])
            return 0
        clips = [c for c in read_manifest(args.manifest) if args.split is None or c.split == args.split]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as handle, tqdm(total=len(clips), desc="generate", unit="clip") as bar:
            for batch in _batches(clips, args.batch_size):
                prepared = []
                for clip in batch:
                    inputs = _clip_inputs(Path(clip.video), None if clip.audio is None else Path(clip.audio),
                                          record_id=clip.id, args=args)
                    inputs["subtitle"] = clip.subtitle
                    prepared.append(inputs)
                for clip, text in zip(batch, answer(model, builder, prepared, args)):
                    handle.write(json.dumps({"id": clip.id, "dataset": clip.dataset, "output": text}) + "\n")
                handle.flush()
                bar.update(len(batch))
        print(f"wrote {len(clips)} answers to {args.out}")
        return 0
    except MediaError as err:
        print(f"opsd-jax generate: error: {err}", file=sys.stderr)
        return 2
