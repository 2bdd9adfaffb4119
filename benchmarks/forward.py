"""Forward time of the Flax thinker against the transformers reference on the same multimodal batch.

A small config (4 decoder layers, hidden 512; the tiny encoders of the parity tests widened to match)
and a batch of `synthetic_affect` clips, each a video of `--frames` frames at `--fps` with its audio
track interleaved (`use_audio_in_video`), its subtitle and the instruction: the student's prompt,
left-padded. The Flax side is timed with the
host-side planning done once (`prepare_inputs`) and the jitted `forward` called on the prepared batch,
which is how the trainer runs it; the planning cost is reported apart. Medians over `--repeats` runs.

    python -m benchmarks.forward            # writes benchmarks/results/forward.json
    python -m benchmarks.forward --quick    # tiny sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import force_host_devices, format_table, median_seconds, write_results

# The tiny parity-test encoders widened to a small thinker's scale (shared with `step.py`'s omni config).
WIDE_ENCODERS = {
    "vision_config": dict(hidden_size=128, intermediate_size=256, num_heads=4),
    "audio_config": dict(d_model=128, encoder_attention_heads=4, encoder_ffn_dim=256),
}


def small_config(hidden: int, layers: int, vocab_size: int | None = None) -> dict[str, Any]:
    """A thinker of `layers` decoder layers of width `hidden` (8 heads, 2 KV heads) with `WIDE_ENCODERS`."""
    from opsd_jax.testing.reference import tiny_thinker_config_dict

    half = hidden // 8 // 2  # 8 heads; M-RoPE splits head_dim / 2 frequency pairs over (t, h, w) as 1 : 1.5 : 1.5
    temporal = half // 4
    vocab = {} if vocab_size is None else {"vocab_size": vocab_size}
    config = tiny_thinker_config_dict(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=hidden * 11 // 4,
        mrope_section=(temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2),
        **vocab,
    )
    for name, fields in WIDE_ENCODERS.items():
        config[name].update(fields)
    return config


def synthetic_clips(count: int, frames: int, *, fps: int = 2, size: int = 112, seed: int = 0) -> list[dict[str, Any]]:
    """`count` `synthetic_affect` clips (a drawn face, a voice, a subtitle) of `frames` frames of `size`^2
    at `fps` (so `frames / fps` seconds of audio), each with its rule-based rationale (the teacher's
    privileged text), through the training pipeline's preprocessing (`ProcessorInputs`): the per-clip
    arrays `opsd_jax.opsd.prompts.encode_clip_batch` takes."""
    from opsd_jax.data.builders.clips import clip_example
    from opsd_jax.data.builders.synthetic_affect import SyntheticAffectConfig
    from opsd_jax.data.pipeline import ProcessorInputs
    from opsd_jax.data.synthetic import DATASET, TASK, clip_at
    from opsd_jax.rationales.rule_based import write_rationale

    config = SyntheticAffectConfig(
        name="benchmark", num_frames=frames, height=size, width=size, max_audio_seconds=frames / fps
    )
    preprocess = ProcessorInputs()
    clips = []
    for index in range(count):
        clip = clip_at(seed, "benchmark", index, num_frames=frames, height=size, width=size, fps=fps)
        rationale = write_rationale(clip["cues"].valence, clip["cues"].arousal, clip["subtitle"], clip["label"])
        clips.append(
            preprocess(
                clip_example(
                    config,
                    id=clip["id"],
                    frames=clip["frames"],
                    sample_fps=float(fps),
                    audio=clip["audio"],
                    task=TASK,
                    subtitle=clip["subtitle"],
                    label=clip["label"],
                    dataset=DATASET,
                    rationale=rationale,
                )
            )
        )
    return clips


def build_batch(builder, clips: list[dict[str, Any]], *, with_teacher: bool = False) -> dict[str, Any]:
    """The model call's arguments for `clips`: the student's prompts (video with its audio track
    interleaved, the subtitle, the instruction), left-padded; with `with_teacher` also the teacher's
    (`teacher_input_ids`, `teacher_attention_mask`: the rationale added) over the same media."""
    from opsd_jax.opsd.prompts import PromptConfig, encode_clip_batch

    return encode_clip_batch(builder, clips, PromptConfig(), length=None, with_teacher=with_teacher)


def measure(batch: int, frames: int, fps: int, hidden: int, layers: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import jax
    import numpy as np
    import torch

    from opsd_jax.data.chat_template import PromptBuilder
    from opsd_jax.models.qwen2_5_omni import from_pretrained
    from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, torch_inputs
    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(workdir / "tokenizer")
    builder = PromptBuilder.from_pretrained(workdir / "tokenizer")
    reference = build_reference_thinker(small_config(hidden, layers))
    model = from_pretrained(save_reference_thinker(reference, workdir / "thinker"))
    inputs = build_batch(builder, synthetic_clips(batch, frames, fps=fps))

    tensors = torch_inputs(inputs)

    def torch_forward():
        with torch.no_grad():
            return reference(**tensors).logits

    host = dict(inputs)
    ids = host.pop("input_ids")
    plan_seconds = median_seconds(lambda: model.prepare_inputs(ids, **host), repeats=repeats)
    prepared = model.prepare_inputs(ids, **host)
    forward = jax.jit(lambda m, x: m.forward(x))
    flax_seconds = median_seconds(lambda: jax.block_until_ready(forward(model, prepared)), repeats=repeats)
    torch_seconds = median_seconds(torch_forward, repeats=repeats)
    real = inputs["attention_mask"].astype(bool)
    error = float(np.abs(np.asarray(forward(model, prepared)) - torch_forward().numpy())[real].max())
    return {
        "batch": batch,
        "frames": frames,
        "audio_seconds": frames / fps,
        "hidden": hidden,
        "layers": layers,
        "sequence": int(inputs["input_ids"].shape[1]),
        "flax_forward_s": flax_seconds,
        "flax_host_plan_s": plan_seconds,
        "torch_forward_s": torch_seconds,
        "speedup": torch_seconds / flax_seconds,
        "max_abs_logit_diff": error,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8, help="video frames per clip (even)")
    parser.add_argument(
        "--fps", type=int, default=2, help="frames per second: a clip has frames / fps seconds of audio"
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/forward.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.frames, args.fps, args.hidden, args.layers, args.repeats = 1, 2, 2, 64, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.batch, args.frames, args.fps, args.hidden, args.layers, args.repeats, Path(tmp))
    table = format_table(
        [
            "batch",
            "tokens",
            "Flax forward (s)",
            "host planning (s)",
            "torch forward (s)",
            "torch / Flax",
            "max |dlogit|",
        ],
        [
            (
                row["batch"],
                row["sequence"],
                row["flax_forward_s"],
                row["flax_host_plan_s"],
                row["torch_forward_s"],
                f"{row['speedup']:.2f}x",
                f"{row['max_abs_logit_diff']:.1e}",
            )
        ],
    )
    print(table)
    path = write_results("forward", {"settings": vars(args), "row": row, "table": table}, args.out)
    print(f"wrote {path}")
    return row


if __name__ == "__main__":
    force_host_devices(1)  # before JAX starts; in-process callers (the tests) keep their devices
    main()
