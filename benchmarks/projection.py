"""What a step of the 7B thinker should cost on a TPU slice: FLOPs, time and memory, from shapes alone.

No TPU is needed (none was available to measure on): the arithmetic uses the FLOP counter that
`benchmarks/step.py` checks against XLA on the CPU (`benchmarks/costs.py`), the memory budget the run
configs carry, and the chips' published figures (Cloud TPU documentation: v5e 197 TFLOP/s bf16,
16 GiB HBM at 819 GB/s, ICI 1,600 Gbps; v5p 459 TFLOP/s bf16, 95 GiB HBM at 2,765 GB/s, ICI 4,800 Gbps).

Per step (one optimizer update of `train.batch_size` prompts, G rollouts each):
* decoder FLOPs by phase (rollout, teacher scoring, student forward + backward, and the recomputed
  forward that per-layer remat adds), plus the frozen encoders' forwards (2 x parameters x tokens per
  pass; each clip is encoded twice: in the rollout's prefill and once in the train step, where the
  teacher shares the student's features);
* time of each phase at an assumed 40% of peak;
* the rollout's floor set by memory traffic, which FLOPs ignore: every decode step reads the full bf16
  decoder weights from HBM, and under FSDP (as the configs shard it) first all-gathers them over ICI
  unless XLA hoists the gathers out of the decode loop (then the weights must fit whole on a chip);
* memory per chip from `costs.memory_budget`.

    python -m benchmarks.projection      # prints the table, writes benchmarks/results/projection.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from benchmarks.common import format_table, write_results
from benchmarks.costs import MODELS, DecoderShape, StepShape, kv_bytes_per_token, memory_budget, mesh_sizes, step_flops

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # B/s
    ici_bandwidth: float  # B/s, one direction, per chip


CHIPS = {
    "v5e": Chip("v5e", 197e12, 16 * 2**30, 819e9, 1_600e9 / 8),
    "v5p": Chip("v5p", 459e12, 95 * 2**30, 2_765e9, 4_800e9 / 8),
}

# (slice, chip, devices, config file, overrides): the 7B thinker with the v5p-64 config's step (64 prompts
# x 8 rollouts of 512 tokens after 2,048-token prompts). v5e-16 has 1/6 of the HBM: FSDP over all 16
# chips, a bf16 frozen teacher instead of the float32 EMA one, and 16 micro-steps of 4 prompts.
SLICES = [
    ("v5p-64", "v5p", 32, "qwen2_5_omni_7b_v5p64.yaml", []),
    ("v5e-16", "v5e", 16, "qwen2_5_omni_7b_v5p64.yaml",
     ["mesh.data=1", "teacher.mode=frozen", "train.grad_accum_steps=16"]),
]
UTILISATION = 0.4
VISION_TOKENS, AUDIO_TOKENS = 2048, 1500  # encoder tokens per clip: 16 frames of 224^2 (patches), 30 s (frames)


def project(slice_name: str, chip: Chip, devices: int, config_file: str, overrides: list[str]) -> dict[str, Any]:
    from opsd_jax.config import load_config

    config = load_config(CONFIGS / config_file, overrides, num_devices=devices)
    model = MODELS["7b"]
    shape = DecoderShape.from_model("7b")
    prompt_len = config.data.prompt_length
    step = StepShape(prompts=config.train.batch_size, samples=config.sampling.num_samples, prompt_len=prompt_len,
                     teacher_len=config.data.teacher_prompt_length or prompt_len,
                     completion_len=config.sampling.max_new_tokens)
    flops = step_flops(shape, step)
    # Per-layer remat runs the student's forward a second time in the backward.
    remat = flops["student"] / 3 if config.model.remat else 0.0
    # Each clip is encoded in the rollout's prefill and in the train step; the teacher shares the student's
    # features unless its encoders can differ (trained encoders and a frozen / EMA copy): `opsd/step.py`.
    passes = 2 if config.teacher.mode == "live" or not config.train.train_encoders else 3
    encoders = passes * step.prompts * 2 * (model["vision"] * VISION_TOKENS + model["audio"] * AUDIO_TOKENS)
    phases = {"rollout": flops["rollout"], "teacher": flops["teacher"], "student": flops["student"] + remat,
              "metrics": flops["metrics"], "encoders": encoders}
    total = sum(phases.values())
    slice_rate = devices * chip.peak_flops * UTILISATION
    seconds = {phase: value / slice_rate for phase, value in phases.items()}

    # The rollout's memory-traffic floor: per decode step, each chip reads the bf16 decoder weights and its
    # rows' KV cache from HBM; under FSDP it first receives the weights it lacks over ICI.
    mesh = mesh_sizes(config, devices)
    weights = 2 * shape.decoder_weights
    micro_steps = config.train.grad_accum_steps
    rows_per_chip = step.rows // micro_steps // (mesh["data"] * mesh["fsdp"])
    kv = rows_per_chip * (prompt_len + step.completion_len) * kv_bytes_per_token(model)
    decode_steps = micro_steps * (step.completion_len - 1)
    hbm_floor = decode_steps * (weights + kv) / chip.hbm_bandwidth
    gathered = weights * (mesh["fsdp"] - 1) / mesh["fsdp"]
    ici_floor = decode_steps * gathered / chip.ici_bandwidth
    state, activations = memory_budget(config, model, mesh)
    hoisted_fits = state + activations + weights / 1e9 < 0.85 * chip.hbm_bytes / 1e9
    rollout = max(seconds["rollout"], hbm_floor if hoisted_fits else max(hbm_floor, ici_floor))
    step_seconds = rollout + sum(v for k, v in seconds.items() if k != "rollout")
    return {
        "slice": slice_name, "chip": dataclasses.asdict(chip), "devices": devices, "config": config_file,
        "overrides": overrides, "step": dataclasses.asdict(step), "mesh": mesh, "micro_steps": micro_steps,
        "flops": phases, "flops_total": total, "seconds_at_40pct": seconds,
        "rollout_floor_s": {"hbm": hbm_floor, "ici_per_step_gathers": ici_floor, "weights_fit_whole": hoisted_fits},
        "rollout_s": rollout, "step_s": step_seconds,
        "completion_tokens_per_s": step.completion_tokens / step_seconds,
        "memory_gb_per_chip": {"state": state, "activations": activations, "total": state + activations,
                               "hbm": chip.hbm_bytes / 1e9},
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/projection.json)")
    args = parser.parse_args(argv)
    rows = [project(name, CHIPS[chip], devices, config, overrides) for name, chip, devices, config, overrides in SLICES]
    peta = 1e15
    table = format_table(
        ["slice", "PFLOP per step: rollout / teacher / student (+remat) / encoders = total", "step at 40% of peak (s)",
         "rollout memory floor: HBM / with ICI gathers (s)", "step with the floor (s)", "completion tok/s",
         "memory per chip (GB)"],
        [(r["slice"],
          " / ".join(f"{r['flops'][k] / peta:.2f}" for k in ("rollout", "teacher", "student", "encoders"))
          + f" = {r['flops_total'] / peta:.1f}",
          f"{sum(r['seconds_at_40pct'].values()):.1f}",
          f"{r['rollout_floor_s']['hbm']:.1f} / {r['rollout_floor_s']['ici_per_step_gathers']:.1f}",
          f"{r['step_s']:.1f}", f"{r['completion_tokens_per_s']:,.0f}",
          f"{r['memory_gb_per_chip']['total']:.1f} of {r['memory_gb_per_chip']['hbm']:.1f}") for r in rows],
    )
    print(table)
    path = write_results("projection", {"utilisation": UTILISATION, "rows": rows, "table": table}, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
