"""One OmniOPSD step, phase by phase, against the same step written the way PyTorch trainers write it.

A step is: the student samples G rollouts per prompt (rollout); the teacher scores those tokens with
the privileged prompt (teacher scoring); the student's forward and backward, the loss and an AdamW
update (update). Both implementations start from the same weights (one `save_pretrained` directory),
the same prompts and the same lengths, in this process, on this CPU:

* opsd-jax: `opsd_jax.sampling.generate` (prefill once per prompt, jitted decode loop), then the
  trainer's jitted `train_step` (`opsd_jax/opsd/step.py`), which runs the teacher and the student with
  the prompt's KV cache shared by its G rollouts and the vocab-chunked fused loss. Teacher scoring is
  timed on its own (the same `teacher_signal` jitted alone); update = train step - teacher scoring.
* PyTorch peer: transformers `generate(num_return_sequences=G)`, the frozen teacher's forward over
  `[teacher prompt | completion]` under `torch.no_grad()`, the student's forward with gradient,
  TRL's `generalized_jsd_loss` on the completion logits, clipping and `torch.optim.AdamW`.

Both compute the same loss (full-vocabulary generalized JSD, beta 0.5, token mean, no importance
clipping); the script checks it on the same tokens and prints the difference. The `tiny` and `small`
configs prompt with text (random token ids); `omni` is the small decoder with video and audio encoders
prompted with `synthetic_affect` clips (video with its audio track, subtitle, instruction; the
teacher's prompt adds the clip's rationale), the encoders frozen on both sides.

FLOPs: counted from the model's shapes (`benchmarks/costs.py`) and cross-checked against XLA's cost
analysis of the compiled programs (for `omni` the encoders' share is XLA's count of the encoders alone). Utilisation: the train step's model FLOPs (teacher forward, student
forward and backward) per second over this machine's matrix-multiply peak, measured in the same run
(the best of float32 `jnp.dot` at a few sizes).

Scaling (`--scaling`): the opsd-jax step on 1, 2, 4 and 8 forced host devices, FSDP over all of them,
prompts scaled with the devices; each count runs in its own process (the device count is fixed when
JAX starts).

    python -m benchmarks.step              # tiny, small and omni configs + scaling; writes benchmarks/results/step.json
    python -m benchmarks.step --quick      # tiny sizes, one repeat (the smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import force_host_devices, format_table, median_seconds, with_host_device_count, write_results

SIZES: dict[str, dict[str, Any]] = {
    # model: keyword arguments of `tiny_thinker_config_dict` (text) or of `forward.small_config` (with
    # `media`: the encoders widened); step: `StepShape` fields (with media, the prompt lengths follow
    # from the clips); media: keyword arguments of `forward.synthetic_clips`.
    "tiny": dict(model=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                            vocab_size=256, mrope_section=(2, 3, 3)),
                 step=dict(prompts=2, samples=4, prompt_len=32, teacher_len=64, completion_len=16)),
    "small": dict(model=dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                             vocab_size=32768, mrope_section=(8, 12, 12)),
                  step=dict(prompts=4, samples=4, prompt_len=96, teacher_len=160, completion_len=32)),
    # The small decoder (same shapes as "small") with video and audio encoders; 4 s clips of 8 frames of 112^2.
    "omni": dict(model=dict(hidden=512, layers=8, vocab_size=32768),
                 media=dict(frames=8, fps=2, size=112),
                 step=dict(prompts=4, samples=4, completion_len=32)),
}
QUICK: dict[str, dict[str, Any]] = {  # the smoke test's sizes
    "tiny": dict(SIZES["tiny"], step=dict(prompts=2, samples=2, prompt_len=8, teacher_len=12, completion_len=4)),
    "omni": dict(model=dict(hidden=64, layers=1), media=dict(frames=2, fps=2, size=56),
                 step=dict(prompts=2, samples=2, completion_len=4)),
}
NEVER = -1  # an end-of-sequence id no row emits: every rollout runs the full length
PLAIN_TOKEN = 1  # what a sampled media placeholder becomes (see `media_token_ids`)


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> dict[str, Any]:
    """This machine's float32 matrix-multiply rate (FLOP/s): the best of jitted `jnp.dot` at `sizes`."""
    import jax
    import jax.numpy as jnp

    rates = {}
    dot = jax.jit(jnp.dot)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        seconds = median_seconds(lambda: dot(a, a).block_until_ready(), repeats=repeats)
        rates[n] = 2 * n**3 / seconds
    best = max(rates, key=rates.get)
    return {"flops_per_s": rates[best], "size": best, "by_size": rates}


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled program by XLA's cost analysis (summed over its modules)."""
    analysis = compiled.cost_analysis()
    analyses = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    return float(sum(a.get("flops", 0.0) for a in analyses if a))


@dataclasses.dataclass
class Workload:
    """The weights on disk and the prompts of one benchmark cell, as the model call's arguments."""

    checkpoint: Path
    step: Any  # costs.StepShape
    student: dict[str, Any]  # input_ids / attention_mask [B, P] int32, and the media arrays (omni)
    teacher: dict[str, Any]  # the teacher's prompts [B, P_teacher] over the same media

    @property
    def has_media(self) -> bool:
        return "pixel_values_videos" in self.student


def make_workload(name: str, size: dict[str, Any], workdir: Path) -> Workload:
    """Saves the config's weights under `workdir` (once) and builds its prompts (seeded)."""
    import numpy as np

    from benchmarks.costs import StepShape
    from benchmarks.forward import build_batch, small_config, synthetic_clips
    from opsd_jax.data.chat_template import PromptBuilder
    from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, tiny_thinker_config_dict
    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    checkpoint = workdir / name
    media = size.get("media")
    if not (checkpoint / "config.json").is_file():
        config = small_config(**size["model"]) if media else tiny_thinker_config_dict(**size["model"])
        save_reference_thinker(build_reference_thinker(config), checkpoint)
    if media:
        if not (workdir / "tokenizer").is_dir():
            build_tiny_tokenizer(workdir / "tokenizer")
        clips = synthetic_clips(size["step"]["prompts"], **media)
        student = build_batch(PromptBuilder.from_pretrained(workdir / "tokenizer"), clips, with_teacher=True)
        teacher_text = {"input_ids": student.pop("teacher_input_ids"), "attention_mask": student.pop("teacher_attention_mask")}
        teacher = {**student, **teacher_text}
        step = StepShape(**size["step"], prompt_len=student["input_ids"].shape[1], teacher_len=teacher["input_ids"].shape[1])
        return Workload(checkpoint, step, student, teacher)
    step = StepShape(**size["step"])
    rng = np.random.default_rng(0)
    # Ids below the tiny configs' media placeholders (200...): plain text prompts.
    ids = {"student": (step.prompts, step.prompt_len), "teacher": (step.prompts, step.teacher_len)}
    prompts = {who: rng.integers(0, 200, shape).astype(np.int32) for who, shape in ids.items()}
    return Workload(checkpoint, step, *({"input_ids": x, "attention_mask": np.ones_like(x)} for x in prompts.values()))


def media_token_ids(workload: Workload) -> list[int]:
    """The placeholder and boundary ids of the media, when the prompts have media (else none).

    Random weights sample them now and then; transformers' forward then scatters media features into
    every placeholder of `[prompt | completion]` and fails on the count, and its positions miscount
    media. Both sides replace them in the completions by `PLAIN_TOKEN` before scoring (a trained model
    does not emit them; the opsd-jax step itself embeds any sampled id as text)."""
    from opsd_jax.models.positions import PositionConfig

    if not workload.has_media:
        return []
    ids = PositionConfig.from_hf(json.loads((workload.checkpoint / "config.json").read_text()))
    return [getattr(ids, field.name) for field in dataclasses.fields(ids) if field.name.endswith("_token_id")]


def repeat_prompts(inputs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The model call's arguments with every prompt (and its media) repeated `repeats` times in a row,
    prompt-major: what a PyTorch trainer feeds `generate` and the scoring forwards for G rollouts."""
    import numpy as np

    rows = {name: np.repeat(value, repeats, axis=0) for name, value in inputs.items()
            if name in ("input_ids", "attention_mask", "input_features", "feature_attention_mask",
                        "video_grid_thw", "video_second_per_grid")}
    if "pixel_values_videos" in inputs:  # patches are concatenated per video: repeat each video's block
        sizes = np.prod(inputs["video_grid_thw"], axis=-1)
        videos = np.split(inputs["pixel_values_videos"], np.cumsum(sizes)[:-1])
        rows["pixel_values_videos"] = np.concatenate([video for video in videos for _ in range(repeats)])
    return {**inputs, **rows}


class JaxStep:
    """The opsd-jax step on a mesh of the first `devices` devices (FSDP), its phases callable apart."""

    def __init__(self, workload: Workload, devices: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from opsd_jax.config import load_config
        from opsd_jax.models.qwen2_5_omni import from_pretrained
        from opsd_jax.opsd import step as opsd_step
        from opsd_jax.opsd.losses import chunked_teacher_scores
        from opsd_jax.opsd.teacher import teacher_signal
        from opsd_jax.sharding import make_mesh

        step = workload.step
        self.step, self.has_media = step, workload.has_media
        self.media_token_ids = jnp.asarray(media_token_ids(workload), jnp.int32)
        self.config = load_config(None, [
            "train.lr=1e-5", "train.warmup_steps=0", "teacher.mode=frozen", "loss.divergence=gjsd", "loss.beta=0.5",
            "loss.is_clip=null", f"loss.chunk_size={step.completion_len}", f"train.batch_size={step.prompts}",
            f"sampling.num_samples={step.samples}", f"sampling.max_new_tokens={step.completion_len}",
            "mesh.data=1", "mesh.fsdp=-1",
        ], num_devices=devices)
        self.mesh = make_mesh(self.config.mesh, jax.devices()[:devices])
        self.model = from_pretrained(workload.checkpoint, mesh=self.mesh)
        params = nnx.state(self.model, nnx.Param)
        tx = opsd_step.make_optimizer(self.config.train, params)
        settings = opsd_step.StepSettings(graphdef=nnx.graphdef(self.model), tx=tx, loss=self.config.loss,
                                          teacher=self.config.teacher, train_encoders=False, mesh=self.mesh)
        self.state = opsd_step.init_state(self.model, tx, self.config.teacher, self.mesh)
        self.train_step = opsd_step.make_train_step(settings, self.state)
        # Host-side planning once (the trainer's data loader does it per batch, off the step's path).
        self.student = self.model.prepare_inputs(**workload.student)
        self.teacher = self.model.prepare_inputs(**workload.teacher)
        self.keys = jax.random.split(jax.random.key(0), step.prompts)
        loss_config, graphdef = self.config.loss, settings.graphdef

        def score(teacher_params, batch):
            """The teacher's scoring alone: hidden states over [teacher prompt | completion], token logprobs."""
            teacher = nnx.merge(graphdef, teacher_params)
            signal = teacher_signal(teacher, batch.teacher, batch.completion, batch.completion_mask, loss_config)
            return chunked_teacher_scores(signal["teacher_hidden"], signal["teacher_head_kernel"], batch.completion,
                                          top_k=1, temperature=1.0, chunk_size=loss_config.chunk_size).token_logprobs

        self.score = jax.jit(score)
        self._executables: dict[str, Any] = {}

    def rollout(self):
        """Samples the rollouts and places them as the trainer's `StepBatch` (one micro-batch: `[1, ...]`)."""
        import jax
        import jax.numpy as jnp

        from opsd_jax.opsd import step as opsd_step
        from opsd_jax.sampling import generate

        step = self.step
        out = generate(self.model, self.student, max_new_tokens=step.completion_len, temperature=1.0,
                       eos_token_id=NEVER, pad_token_id=0, num_samples=step.samples, seed=self.keys, mesh=self.mesh)
        completion = jnp.where(jnp.isin(out.tokens, self.media_token_ids), PLAIN_TOKEN, out.tokens)
        micro = opsd_step.StepBatch(
            student=self.student, teacher=self.teacher, completion=completion, completion_mask=out.mask,
            sampler_logprobs=out.model_logprobs, rewards=jnp.zeros(step.rows, jnp.float32),
            label_ids=jnp.zeros((step.prompts, 1), jnp.int32), label_mask=jnp.zeros((step.prompts, 1), bool))
        return jax.block_until_ready(opsd_step.place_step_batch(jax.tree.map(lambda x: x[None], micro), self.mesh))

    def _compiled(self, name: str, function, *args):
        """`function` compiled ahead of time for `args` once and kept: the timed calls and XLA's cost
        analysis then use one executable (a second `lower().compile()` would compile it again)."""
        if name not in self._executables:
            self._executables[name] = function.lower(*args).compile()
        return self._executables[name]

    def scoring(self, batch):
        import jax

        args = (self.state.teacher_params, jax.tree.map(lambda x: x[0], batch))
        return jax.block_until_ready(self._compiled("teacher", self.score, *args)(*args))

    def update(self, batch, scored=None) -> dict[str, Any]:
        """The trainer's jitted step (teacher scoring included: `scored` is not used), then the sampling
        model takes the new parameters, as `Trainer.run` does."""
        import jax
        from flax import nnx

        del scored
        self.state, metrics = self._compiled("train_step", self.train_step, self.state, batch)(self.state, batch)
        nnx.update(self.model, self.state.params)
        return jax.block_until_ready(metrics)

    def xla_flops(self, batch) -> dict[str, float]:
        """XLA's FLOP count of the train step, of teacher scoring and of the media encoders alone (one
        call over the batch's clips; 0 for text prompts), as compiled for `batch`."""
        import jax

        micro = jax.tree.map(lambda x: x[0], batch)
        encode = jax.jit(lambda model, inputs: model.encode_media(inputs))
        return {"train_step": xla_flops(self._compiled("train_step", self.train_step, self.state, batch)),
                "teacher": xla_flops(self._compiled("teacher", self.score, self.state.teacher_params, micro)),
                "encoders": xla_flops(encode.lower(self.model, self.student).compile()) if self.has_media else 0.0}


class TorchStep:
    """The PyTorch peer: transformers generate, a no-grad teacher forward, TRL's GJSD, AdamW; the media
    encoders frozen, as in the opsd-jax step (`train.train_encoders: false`)."""

    def __init__(self, workload: Workload, lr: float = 1e-5):
        import copy

        import torch
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration
        from trl.experimental.gkd import GKDTrainer

        from opsd_jax.testing.reference import torch_inputs

        self.torch, self.step = torch, workload.step
        self.student = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(workload.checkpoint, dtype=torch.float32)
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)  # frozen copy of the start
        for name, parameter in self.student.named_parameters():
            if ".audio_tower." in f".{name}" or ".visual." in f".{name}":
                parameter.requires_grad_(False)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        self.loss_fn = GKDTrainer.generalized_jsd_loss
        # Every prompt repeated for its G rollouts.
        self.student_rows, self.teacher_rows = (torch_inputs(repeat_prompts(inputs, workload.step.samples))
                                                for inputs in (workload.student, workload.teacher))
        self.media_token_ids = torch.tensor(media_token_ids(workload), dtype=torch.long)
        torch.manual_seed(0)

    def rollout(self):
        """`[B * G, C]` sampled completion tokens (prompt-major)."""
        torch, step = self.torch, self.step
        self.student.eval()
        with torch.no_grad():
            out = self.student.generate(
                **self.student_rows, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=step.completion_len, min_new_tokens=step.completion_len, eos_token_id=None, pad_token_id=0)
        completion = out[:, self.student_rows["input_ids"].shape[1]:]
        return torch.where(torch.isin(completion, self.media_token_ids), PLAIN_TOKEN, completion)

    def _completion_logits(self, model, prompt, completion):
        """Logits predicting each completion token: `[B * G, C, V]` from one forward over [prompt | completion]."""
        torch = self.torch
        ids = torch.cat([prompt["input_ids"], completion], dim=1)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
        logits = model(**{**prompt, "input_ids": ids, "attention_mask": mask}).logits
        return logits[:, prompt["input_ids"].shape[1] - 1 : -1]

    def scoring(self, completion):
        with self.torch.no_grad():
            return self._completion_logits(self.teacher, self.teacher_rows, completion)

    def loss(self, completion, teacher_logits):
        student_logits = self._completion_logits(self.student, self.student_rows, completion)
        return self.loss_fn(student_logits, teacher_logits, labels=completion, beta=0.5, temperature=1.0)

    def update(self, completion, teacher_logits) -> float:
        self.student.train()
        loss = self.loss(completion, teacher_logits)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def phase_times(runner: JaxStep | TorchStep, repeats: int) -> dict[str, float]:
    """Median seconds of rollout, teacher scoring and update over `repeats` steps after a warm-up step
    (compilation). Every call returns finished work (JAX results are blocked on)."""
    times: dict[str, list[float]] = {"rollout": [], "teacher": [], "update": []}
    for index in range(repeats + 1):
        start = time.perf_counter()
        rollout = runner.rollout()
        middle = time.perf_counter()
        scored = runner.scoring(rollout)
        after_scoring = time.perf_counter()
        runner.update(rollout, scored)
        end = time.perf_counter()
        if index:
            times["rollout"].append(middle - start)
            times["teacher"].append(after_scoring - middle)
            times["update"].append(end - after_scoring)
    seconds: dict[str, Any] = {phase: statistics.median(values) for phase, values in times.items()}
    seconds["runs"] = {phase: sorted(values) for phase, values in times.items()}  # the spread behind each median
    if isinstance(runner, JaxStep):
        # The jitted train step runs the teacher too: its update is the train step less the scoring.
        seconds["train_step"] = seconds["update"]
        seconds["runs"]["train_step"] = seconds["runs"].pop("update")
        seconds["update"] = max(seconds["train_step"] - seconds["teacher"], 0.0)
    else:
        seconds["train_step"] = seconds["teacher"] + seconds["update"]
    seconds["total"] = seconds["rollout"] + seconds["train_step"]
    return seconds


def loss_agreement(jax_runner: JaxStep, torch_runner: TorchStep) -> tuple[dict[str, float], Any]:
    """Both losses at the starting weights on the same (opsd-jax) rollouts; returns them and the batch."""
    import numpy as np

    batch = jax_runner.rollout()
    torch_completion = torch_runner.torch.from_numpy(np.array(batch.completion[0])).long()
    with torch_runner.torch.no_grad():
        torch_loss = float(torch_runner.loss(torch_completion, torch_runner.scoring(torch_completion)))
    jax_loss = float(jax_runner.update(batch)["loss"])
    return {"jax_loss": jax_loss, "torch_loss": torch_loss, "abs_diff": abs(jax_loss - torch_loss)}, batch


def measure(name: str, size: dict[str, Any], repeats: int, workdir: Path, peak: float) -> dict[str, Any]:
    from benchmarks.costs import DecoderShape, step_flops

    workload = make_workload(name, size, workdir)
    step = workload.step
    jax_runner, torch_runner = JaxStep(workload, devices=1), TorchStep(workload)
    agreement, batch = loss_agreement(jax_runner, torch_runner)
    measured_xla = jax_runner.xla_flops(batch)
    jax_times = phase_times(jax_runner, repeats)
    torch_times = phase_times(torch_runner, repeats)

    shape = DecoderShape.from_text_config(jax_runner.model.config.text)
    flops = step_flops(shape, step)
    # The media encoders' share (XLA's count of one call over the batch's clips; opsd-jax runs them once
    # per prompt: once in the rollout's prefill, once in the train step, whose teacher shares the
    # student's features, and once in the teacher program timed alone).
    encoders = measured_xla["encoders"]
    flops.update(encoders=encoders, rollout=flops["rollout"] + encoders, teacher=flops["teacher"] + encoders,
                 model_train=flops["model_train"] + encoders, total=flops["total"] + 2 * encoders)
    # What each compiled program computes. The train step's two metric head products (the sampled tokens'
    # logprobs) repeat the loss's own products when the loss runs in one chunk, as here, and XLA computes
    # them once: its count is the model FLOPs. With several chunks (the real configs) they cost extra.
    counted = {"train_step": flops["model_train"], "teacher": flops["teacher"]}
    return {
        "config": name, "media": size.get("media"), "step": dataclasses.asdict(step), "shape": dataclasses.asdict(shape),
        "jax_s": jax_times, "torch_s": torch_times,
        "speedup": {phase: torch_times[phase] / max(jax_times[phase], 1e-9)
                    for phase in ("rollout", "teacher", "update", "train_step", "total")},
        "completion_tokens_per_s": {"jax": step.completion_tokens / jax_times["total"],
                                    "torch": step.completion_tokens / torch_times["total"]},
        "flops": flops,
        "flops_check": {phase: {"counted": counted[phase], "xla": measured_xla[phase],
                                "xla_over_counted": measured_xla[phase] / counted[phase]} for phase in counted},
        "utilisation": {
            "train_step": flops["model_train"] / jax_times["train_step"] / peak,
            "train_step_torch": flops["model_train"] / torch_times["train_step"] / peak,
            "rollout": flops["rollout"] / jax_times["rollout"] / peak,
            "rollout_torch": flops["rollout"] / torch_times["rollout"] / peak,
        },
        "loss_agreement": agreement,
    }


# ------------------------------------------------------------------------------------------ scaling


def scaling_worker(devices: int, name: str, size: dict[str, Any], prompts_per_device: int, repeats: int,
                   workdir: Path) -> dict[str, Any]:
    """Runs in a child process started with `devices` forced host devices: the opsd-jax step only."""
    import jax

    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} host devices, JAX sees {jax.device_count()}")
    size = dict(size, step=dict(size["step"], prompts=prompts_per_device * devices))
    workload = make_workload(name, size, workdir)
    times = phase_times(JaxStep(workload, devices=devices), repeats)
    return {"devices": devices, "prompts": workload.step.prompts, "seconds": times,
            "completion_tokens_per_s": workload.step.completion_tokens / times["total"]}


def _run_worker(name: str, size: dict[str, Any], devices: int, prompts_per_device: int, repeats: int,
                workdir: Path) -> dict[str, Any]:
    """One `scaling_worker` in its own process (the device count is fixed when JAX starts)."""
    env = {**os.environ, "XLA_FLAGS": with_host_device_count(os.environ.get("XLA_FLAGS", ""), devices)}
    command = [sys.executable, "-m", "benchmarks.step", "--scaling-worker", str(devices), "--configs", name,
               "--prompts-per-device", str(prompts_per_device), "--repeats", str(repeats), "--workdir", str(workdir),
               "--size", json.dumps(size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"scaling worker on {devices} devices failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(name: str, size: dict[str, Any], device_counts: list[int], prompts_per_device: int, repeats: int,
            workdir: Path) -> list[dict[str, Any]]:
    """The opsd-jax step with `prompts_per_device x devices` prompts on each device count (FSDP over all of
    them), and as the control the same prompts on one device: their ratio is what sharding costs here."""
    rows = []
    for devices in device_counts:
        row = _run_worker(name, size, devices, prompts_per_device, repeats, workdir)
        control = row if devices == 1 else _run_worker(name, size, 1, prompts_per_device * devices, repeats, workdir)
        row["one_device_same_prompts_s"] = control["seconds"]["total"]
        row["one_device_same_prompts_phases_s"] = {k: v for k, v in control["seconds"].items() if k != "runs"}
        row["sharded_over_one_device"] = row["seconds"]["total"] / control["seconds"]["total"]
        rows.append(row)
        print(f"  scaling: {devices} device(s), {row['prompts']} prompts: {row['seconds']['total']:.3f} s "
              f"(one device: {control['seconds']['total']:.3f} s)", flush=True)
    base = rows[0]["completion_tokens_per_s"]
    for row in rows:
        row["throughput_vs_one_device"] = row["completion_tokens_per_s"] / base
    return rows


# ------------------------------------------------------------------------------------------- report


def tables(rows: list[dict[str, Any]], scaled: list[dict[str, Any]], peak: dict[str, Any]) -> str:
    def spread(times: dict[str, Any], phase: str) -> str:
        runs = times["runs"].get(phase)
        return f"{runs[0]:.3g}-{runs[-1]:.3g}" if runs else ""

    phases = format_table(
        ["config", "phase", "opsd-jax (s)", "PyTorch (s)", "PyTorch / opsd-jax", "opsd-jax runs (s)", "PyTorch runs (s)"],
        [(r["config"], phase, r["jax_s"][phase], r["torch_s"][phase], f"{r['speedup'][phase]:.2f}x",
          spread(r["jax_s"], "train_step" if phase == "update" else phase), spread(r["torch_s"], phase))
         for r in rows for phase in ("rollout", "teacher", "update", "total")],
    )
    work = format_table(
        ["config", "completion tok/s opsd-jax", "completion tok/s PyTorch", "train-step GFLOP (counted)",
         "XLA / counted", "utilisation opsd-jax", "utilisation PyTorch", "|loss diff|"],
        [(r["config"], r["completion_tokens_per_s"]["jax"], r["completion_tokens_per_s"]["torch"],
          r["flops"]["model_train"] / 1e9, f"{r['flops_check']['train_step']['xla_over_counted']:.3f}",
          f"{100 * r['utilisation']['train_step']:.1f}%", f"{100 * r['utilisation']['train_step_torch']:.1f}%",
          f"{r['loss_agreement']['abs_diff']:.1e}") for r in rows],
    )
    text = f"{phases}\n\n{work}\n\nmatmul peak (float32 jnp.dot {peak['size']}^2): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s"
    if scaled:
        text += "\n\n" + format_table(
            ["devices", "prompts", "rollout (s)", "train step (s)", "completion tok/s", "throughput vs 1 device",
             "same prompts, 1 device (s)", "sharded / 1 device"],
            [(s["devices"], s["prompts"], s["seconds"]["rollout"], s["seconds"]["train_step"],
              s["completion_tokens_per_s"], f"{s['throughput_vs_one_device']:.2f}", s["one_device_same_prompts_s"],
              f"{s['sharded_over_one_device']:.2f}") for s in scaled],
        )
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,small,omni", help="comma-separated subset of: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (the median is reported)")
    parser.add_argument("--scaling", default="1,2,4,8", help="device counts for the scaling run ('' to skip)")
    parser.add_argument("--scaling-config", default="small", choices=sorted(SIZES))
    parser.add_argument("--prompts-per-device", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="tiny and omni at tiny sizes, one repeat, scaling of tiny on 1 and 2 devices (the smoke test)")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/step.json)")
    parser.add_argument("--workdir", type=Path, help="where the saved weights go (default: a temporary directory)")
    parser.add_argument("--scaling-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scaling_worker:  # started by `scaling` with XLA_FLAGS set for its device count
        row = scaling_worker(args.scaling_worker, args.configs, json.loads(args.size), args.prompts_per_device,
                             args.repeats, args.workdir)
        print(json.dumps(row))
        return row

    sizes = dict(SIZES)
    if args.quick:
        args.configs, args.repeats, args.scaling, args.scaling_config = "tiny,omni", 1, "1,2", "tiny"
        sizes.update(QUICK)
    names = args.configs.split(",")
    if unknown := [name for name in names if name not in sizes]:
        parser.error(f"--configs: unknown {', '.join(unknown)}; expected a comma-separated subset of {', '.join(SIZES)}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        peak = matmul_peak(sizes=(256,) if args.quick else (1024, 2048, 3072))
        rows = []
        for name in names:
            rows.append(measure(name, sizes[name], args.repeats, workdir, peak["flops_per_s"]))
            print(f"  measured {name}: PyTorch / opsd-jax {rows[-1]['speedup']['total']:.2f}x", flush=True)
        counts = [int(n) for n in args.scaling.split(",") if n]
        scaled = (scaling(args.scaling_config, sizes[args.scaling_config], counts, args.prompts_per_device, args.repeats,
                          workdir) if counts else [])
    text = tables(rows, scaled, peak)
    print(text)
    payload = {"settings": vars(args) | {"sizes": {name: sizes[name] for name in names}}, "matmul_peak": peak,
               "rows": rows, "scaling": scaled, "table": text}
    path = write_results("step", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    if "--scaling-worker" not in sys.argv:
        force_host_devices(1)  # before JAX starts: the measured step runs on one device
    main()
