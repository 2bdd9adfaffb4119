"""Can a thinker's encoders see the demo's cues? Linear probes of their outputs, without the language model.

`python -m opsd_jax.demo.perception CHECKPOINT` draws fresh synthetic clips (`synthetic.make_clip`, no video
coding), runs the checkpoint's vision and audio encoders on them, and fits a ridge-regression probe of the
face's valence and of the voice's arousal on each modality's tokens (mean over tokens of the RMS-normalised
outputs, as the language model's first norm sees them). High probe accuracy with an arm at chance on that
cue means the encoders carry it and the language model does not learn to read it (README, "The demo's result").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from opsd_jax.data.audio_features import audio_to_inputs
from opsd_jax.data.synthetic import EMOTIONS, FPS, VALENCE_AROUSAL, make_clip
from opsd_jax.data.vision_inputs import video_to_inputs
from opsd_jax.models.audio import prepare_audio
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.models.vision import vision_plan


def ridge_probe_accuracy(features: np.ndarray, targets: np.ndarray, fit: int, ridge: float = 1.0) -> float:
    """Held-out accuracy of a ridge-regression probe: `features [N, D]`, `targets [N]` bool; rows `[:fit]`
    fit the probe (features standardised with their statistics), rows `[fit:]` score it. Solved in the
    dual (an `[fit, fit]` system), so D may be large."""
    features = np.asarray(features, np.float64)
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-6
    x = np.c_[(features - mean) / std, np.ones(len(features))]
    signs = np.where(np.asarray(targets[:fit], bool), 1.0, -1.0)
    alpha = np.linalg.solve(x[:fit] @ x[:fit].T + ridge * np.eye(fit), signs)
    predicted = x[fit:] @ (x[:fit].T @ alpha) > 0
    return float(np.mean(predicted == np.asarray(targets[fit:], bool)))


def encoder_tokens(model, clip: dict) -> dict[str, np.ndarray]:
    """`{"video": [hidden], "audio": [hidden]}`: each encoder's output tokens RMS-normalised, then averaged."""
    video = video_to_inputs(clip["frames"], float(clip["fps"]))
    audio = audio_to_inputs(clip["audio"], max_samples=len(clip["audio"]))
    chunks, plan = prepare_audio(audio["input_features"], audio["feature_attention_mask"], model.config.audio)
    outputs = {
        "video": model.visual(
            jnp.asarray(video["pixel_values_videos"]), vision_plan(video["video_grid_thw"], model.config.vision)
        ),
        "audio": model.audio_tower(jnp.asarray(chunks), plan),
    }
    pooled = {}
    for name, tokens in outputs.items():
        tokens = np.asarray(tokens, np.float64)
        pooled[name] = (tokens / np.sqrt((tokens**2).mean(-1, keepdims=True) + 1e-12)).mean(0)
    return pooled


def probe_encoders(model, clips: int = 200, seed: int = 0, fit_fraction: float = 0.75) -> dict[str, float]:
    """`{"video/valence", "video/arousal", "audio/valence", "audio/arousal"}`: held-out probe accuracy of
    each cue from each modality's tokens, over `clips` fresh clips (balanced labels, chance 0.5)."""
    rng = np.random.default_rng(seed)
    labels = [EMOTIONS[i % len(EMOTIONS)] for i in range(clips)]
    pooled = [encoder_tokens(model, make_clip(rng, label, fps=FPS)) for label in labels]
    cues = {
        "valence": np.array([VALENCE_AROUSAL[label][0] == "positive" for label in labels]),
        "arousal": np.array([VALENCE_AROUSAL[label][1] == "high" for label in labels]),
    }
    fit = int(clips * fit_fraction)
    return {
        f"{modality}/{cue}": ridge_probe_accuracy(np.stack([p[modality] for p in pooled]), targets, fit)
        for modality in ("video", "audio")
        for cue, targets in cues.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opsd_jax.demo.perception",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a thinker checkpoint directory (e.g. outputs/demo/seed0/thinker_warm or a run's export)",
    )
    parser.add_argument(
        "--clips", type=int, default=200, help="fresh clips, 3/4 fit and 1/4 scored (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clips < 8:
        parser.error(f"--clips: expected at least 8, got {args.clips}")
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"checkpoint: {args.checkpoint} holds no config.json")

    scores = probe_encoders(from_pretrained(args.checkpoint), args.clips, args.seed)
    for name, value in scores.items():
        print(f"{name}: {100 * value:.1f}% of held-out clips (chance 50%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
