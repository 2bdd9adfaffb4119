"""Forward time of the Flax thinker against the transformers reference on the same multimodal batch.

A small config (4 decoder layers, hidden 512; the tiny encoders of the parity tests widened to match)
and a batch of clips, each a video of `--frames` frames at 2 fps with its own `--audio-seconds` audio
track (`use_audio_in_video`), a subtitle-length question, left-padded. The Flax side is timed with the
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



def small_config(hidden: int, layers: int) -> dict[str, Any]:
    from opsd_jax.testing.reference import tiny_thinker_config_dict

    half = hidden // 8 // 2  # 8 heads; M-RoPE splits head_dim / 2 frequency pairs over (t, h, w) as 1 : 1.5 : 1.5
    temporal = half // 4
    config = tiny_thinker_config_dict(hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=2,
                                      intermediate_size=hidden * 11 // 4,
                                      mrope_section=(temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2))
    config["vision_config"].update(hidden_size=128, intermediate_size=256, num_heads=4)
    config["audio_config"].update(d_model=128, encoder_attention_heads=4, encoder_ffn_dim=256)
    return config


def build_batch(builder, batch: int, frames: int, audio_seconds: float, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    from opsd_jax.data import chat_template as ct
    from opsd_jax.data.audio_features import audio_to_inputs
    from opsd_jax.data.vision_inputs import concatenate_inputs, video_to_inputs

    rng = np.random.default_rng(seed)
    samples = int(audio_seconds * 16000)
    videos = [video_to_inputs(rng.integers(0, 256, (frames, 112, 112, 3), dtype=np.uint8), sample_fps=2.0)
              for _ in range(batch)]
    audio = audio_to_inputs([0.1 * rng.standard_normal(samples - 800 * i) for i in range(batch)], max_samples=samples)
    lengths = audio["feature_attention_mask"].sum(-1).tolist()
    prompts = [ct.user_prompt([ct.VideoPart(v["video_grid_thw"][0], 1.0, n), "How does the speaker feel?" + " so" * i])
               for i, (v, n) in enumerate(zip(videos, lengths))]
    return {**builder(prompts, length=None), **concatenate_inputs(videos), **audio, "use_audio_in_video": True}


def measure(batch: int, frames: int, audio_seconds: float, hidden: int, layers: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import jax
    import numpy as np
    import torch

    from opsd_jax.data.chat_template import PromptBuilder
    from opsd_jax.models.qwen2_5_omni import from_pretrained
    from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker
    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(workdir / "tokenizer")
    builder = PromptBuilder.from_pretrained(workdir / "tokenizer")
    reference = build_reference_thinker(small_config(hidden, layers))
    model = from_pretrained(save_reference_thinker(reference, workdir / "thinker"))
    inputs = build_batch(builder, batch, frames, audio_seconds)

    tensors = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    for name in ("input_ids", "attention_mask", "feature_attention_mask"):
        tensors[name] = tensors[name].long()

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
        "batch": batch, "frames": frames, "audio_seconds": audio_seconds, "hidden": hidden, "layers": layers,
        "sequence": int(inputs["input_ids"].shape[1]), "flax_forward_s": flax_seconds, "flax_host_plan_s": plan_seconds,
        "torch_forward_s": torch_seconds, "speedup": torch_seconds / flax_seconds, "max_abs_logit_diff": error,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4, help="video frames per clip (even)")
    parser.add_argument("--audio-seconds", type=float, default=4.0)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/forward.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.frames, args.audio_seconds, args.hidden, args.layers, args.repeats = 1, 2, 1.0, 64, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.batch, args.frames, args.audio_seconds, args.hidden, args.layers, args.repeats, Path(tmp))
    table = format_table(
        ["batch", "tokens", "Flax forward (s)", "host planning (s)", "torch forward (s)", "torch / Flax", "max |dlogit|"],
        [(row["batch"], row["sequence"], row["flax_forward_s"], row["flax_host_plan_s"], row["torch_forward_s"],
          f"{row['speedup']:.2f}x", f"{row['max_abs_logit_diff']:.1e}")],
    )
    print(table)
    path = write_results("forward", {"settings": vars(args), "row": row, "table": table}, args.out)
    print(f"wrote {path}")
    return row


if __name__ == "__main__":
    force_host_devices(1)  # before JAX starts; in-process callers (the tests) keep their devices
    main()
