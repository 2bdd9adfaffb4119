"""One OmniOPSD step, phase by phase, against the same step written the way PyTorch trainers write it.

A step is: the student samples G rollouts per prompt (rollout); the teacher scores those tokens with
the privileged prompt (teacher scoring); the student's forward and backward, the loss and an AdamW
update (update). Both implementations start from the same weights (one `save_pretrained` directory),
the same prompts and the same lengths, in one process, on this CPU:

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

Each side's own work: the two loops do not compute the same FLOPs for the same step. opsd-jax runs
each prompt once with its KV cache shared by the G rollouts, the output head only on completion
positions and one prefill per prompt (`costs.step_flops`); the PyTorch loop repeats every prompt and
its media for each rollout in `generate`, the teacher and the student, with the head over every
position (`costs.repeated_step_flops`). Both are counted from the model's shapes and checked against
each framework's own count: XLA's cost analysis of the compiled opsd-jax programs, PyTorch's flop
counter over one PyTorch step (for `omni` the encoders' share is each framework's count of one pass of
its encoders over the batch's clips). Utilisation: each side's FLOPs per second of its own time over
this machine's matrix-multiply peak, measured at the start of each run (the best of float32
`jnp.dot` at a few sizes). So opsd-jax's lead splits into work not done (work ratio) and speed at the
work done (utilisation ratio): time ratio = work ratio x utilisation of opsd-jax / utilisation of PyTorch.

Phases: prepare (the host-side planning of the batch's prompts: opsd-jax's `prepare_inputs` for the
student and teacher prompts, as the trainer's loop runs it per batch; PyTorch: repeating the prompts
for their rollouts and making them tensors), rollout, teacher scoring, update; total is all four.

Spread: `--repeats` independent runs, each in a process of its own (fresh weights load, compilation,
allocator and thread pools), each timing `--steps` steps of both sides after a warm-up step; the
report gives the median over runs of each run's median and the range over runs, for times, ratios and
utilisation.

Scaling (`--scaling`): the opsd-jax step on 1, 2, 4 and 8 forced host devices, FSDP over all of them,
prompts scaled with the devices; each count runs in its own process (the device count is fixed when
JAX starts).

    python -m benchmarks.step              # tiny, small and omni, 3 runs + scaling; writes benchmarks/results/step.json
    python -m benchmarks.step --quick      # tiny sizes, 2 runs of one step (the smoke test)
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

from benchmarks.common import (
    RESULTS,
    force_host_devices,
    format_table,
    median_seconds,
    with_host_device_count,
    write_results,
)

SIZES: dict[str, dict[str, Any]] = {
    # model: keyword arguments of `tiny_thinker_config_dict` (text) or of `forward.small_config` (with
    # `media`: the encoders widened); step: `StepShape` fields (with media, the prompt lengths follow
    # from the clips); media: keyword arguments of `forward.synthetic_clips`.
    "tiny": dict(
        model=dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=256,
            mrope_section=(2, 3, 3),
        ),
        step=dict(prompts=2, samples=4, prompt_len=32, teacher_len=64, completion_len=16),
    ),
    "small": dict(
        model=dict(
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=2,
            intermediate_size=1408,
            vocab_size=32768,
            mrope_section=(8, 12, 12),
        ),
        step=dict(prompts=4, samples=4, prompt_len=96, teacher_len=160, completion_len=32),
    ),
    # The small decoder (same shapes as "small") with video and audio encoders; 4 s clips of 8 frames of 112^2.
    "omni": dict(
        model=dict(hidden=512, layers=8, vocab_size=32768),
        media=dict(frames=8, fps=2, size=112),
        step=dict(prompts=4, samples=4, completion_len=32),
    ),
}
QUICK: dict[str, dict[str, Any]] = {  # the smoke test's sizes
    "tiny": dict(SIZES["tiny"], step=dict(prompts=2, samples=2, prompt_len=8, teacher_len=12, completion_len=4)),
    "omni": dict(
        model=dict(hidden=64, layers=1),
        media=dict(frames=2, fps=2, size=56),
        step=dict(prompts=2, samples=2, completion_len=4),
    ),
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
        seconds = median_seconds(lambda a=a: dot(a, a).block_until_ready(), repeats=repeats)
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
        teacher_text = {
            "input_ids": student.pop("teacher_input_ids"),
            "attention_mask": student.pop("teacher_attention_mask"),
        }
        teacher = {**student, **teacher_text}
        step = StepShape(
            **size["step"], prompt_len=student["input_ids"].shape[1], teacher_len=teacher["input_ids"].shape[1]
        )
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

    rows = {
        name: np.repeat(value, repeats, axis=0)
        for name, value in inputs.items()
        if name
        in (
            "input_ids",
            "attention_mask",
            "input_features",
            "feature_attention_mask",
            "video_grid_thw",
            "video_second_per_grid",
        )
    }
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
        from opsd_jax.models.scoring import chunked_scores
        from opsd_jax.opsd import step as opsd_step
        from opsd_jax.opsd.teacher import teacher_signal
        from opsd_jax.sharding import make_mesh

        step = workload.step
        self.step, self.has_media = step, workload.has_media
        self.media_token_ids = jnp.asarray(media_token_ids(workload), jnp.int32)
        self.config = load_config(
            None,
            [
                "train.lr=1e-5",
                "train.warmup_steps=0",
                "teacher.mode=frozen",
                "loss.divergence=gjsd",
                "loss.beta=0.5",
                "loss.is_clip=null",
                f"loss.chunk_size={step.completion_len}",
                f"train.batch_size={step.prompts}",
                f"sampling.num_samples={step.samples}",
                f"sampling.max_new_tokens={step.completion_len}",
                "mesh.data=1",
                "mesh.fsdp=-1",
            ],
            num_devices=devices,
        )
        self.mesh = make_mesh(self.config.mesh, jax.devices()[:devices])
        self.model = from_pretrained(workload.checkpoint, mesh=self.mesh)
        params = nnx.state(self.model, nnx.Param)
        tx = opsd_step.make_optimizer(self.config.train, params)
        settings = opsd_step.StepSettings(
            graphdef=nnx.graphdef(self.model),
            tx=tx,
            loss=self.config.loss,
            teacher=self.config.teacher,
            train_encoders=False,
            mesh=self.mesh,
        )
        self.state = opsd_step.init_state(
            self.model, tx, self.config.teacher, self.mesh, train_encoders=settings.train_encoders
        )
        self.train_step = opsd_step.make_train_step(settings, self.state)
        self.workload = workload
        self.keys = jax.random.split(jax.random.key(0), step.prompts)
        loss_config, graphdef = self.config.loss, settings.graphdef

        def score(params, teacher_params, batch):
            """The teacher's scoring alone: hidden states over [teacher prompt | completion], token logprobs
            (the teacher's copy holds the trained weights: the rest are the student's, `student_and_teacher`)."""
            teacher = nnx.merge(graphdef, opsd_step.overlay(params, teacher_params))
            signal = teacher_signal(teacher, batch.teacher, batch.completion, batch.completion_mask, loss_config)
            return chunked_scores(
                signal.hidden,
                signal.head_kernel,
                batch.completion,
                top_k=1,
                temperature=1.0,
                chunk_size=loss_config.chunk_size,
            ).token_logprobs

        self.score = jax.jit(score)
        self._executables: dict[str, Any] = {}

    def prepare(self):
        """The host-side planning of the batch's student and teacher prompts (media layouts, placeholder
        checks, positions), as the trainer's loop does for every batch (`Trainer._prepare`)."""
        import jax

        return jax.block_until_ready(
            (self.model.prepare_inputs(**self.workload.student), self.model.prepare_inputs(**self.workload.teacher))
        )

    def rollout(self, inputs):
        """Samples the rollouts and places them as the trainer's `StepBatch` (one micro-batch: `[1, ...]`)."""
        import jax
        import jax.numpy as jnp

        from opsd_jax.opsd import step as opsd_step
        from opsd_jax.sampling import generate

        step, (student, teacher) = self.step, inputs
        out = generate(
            self.model,
            student,
            max_new_tokens=step.completion_len,
            temperature=1.0,
            eos_token_id=NEVER,
            pad_token_id=0,
            num_samples=step.samples,
            seed=self.keys,
            mesh=self.mesh,
        )
        completion = jnp.where(jnp.isin(out.tokens, self.media_token_ids), PLAIN_TOKEN, out.tokens)
        micro = opsd_step.StepBatch(
            student=student,
            teacher=teacher,
            completion=completion,
            completion_mask=out.mask,
            sampler_logprobs=out.model_logprobs,
            rewards=jnp.zeros(step.rows, jnp.float32),
            label_ids=jnp.zeros((step.prompts, 1), jnp.int32),
            label_mask=jnp.zeros((step.prompts, 1), bool),
        )
        return jax.block_until_ready(opsd_step.place_step_batch(jax.tree.map(lambda x: x[None], micro), self.mesh))

    def _compiled(self, name: str, function, *args):
        """`function` compiled ahead of time for `args` once and kept: the timed calls and XLA's cost
        analysis then use one executable (a second `lower().compile()` would compile it again)."""
        if name not in self._executables:
            self._executables[name] = function.lower(*args).compile()
        return self._executables[name]

    def scoring(self, inputs, batch):
        """The teacher's token logprobs of the rollouts (`inputs` travel in `batch`)."""
        import jax

        del inputs

        args = (self.state.params, self.state.teacher_params, jax.tree.map(lambda x: x[0], batch))
        return jax.block_until_ready(self._compiled("teacher", self.score, *args)(*args))

    def update(self, inputs, batch, scored=None) -> dict[str, Any]:
        """The trainer's jitted step (teacher scoring included: `scored` is not used; `inputs` travel in
        `batch`), then the sampling model takes the new parameters, as `Trainer.run` does."""
        import jax
        from flax import nnx

        del inputs, scored
        self.state, metrics = self._compiled("train_step", self.train_step, self.state, batch)(self.state, batch)
        nnx.update(self.model, self.state.params)
        return jax.block_until_ready(metrics)

    def xla_flops(self, inputs, batch) -> dict[str, float]:
        """XLA's FLOP count of the train step, of teacher scoring and of the media encoders alone (one
        call over the batch's clips; 0 for text prompts), as compiled for `batch`."""
        import jax

        micro = jax.tree.map(lambda x: x[0], batch)
        encode = jax.jit(lambda model, student: model.encode_media(student))
        return {
            "train_step": xla_flops(self._compiled("train_step", self.train_step, self.state, batch)),
            "teacher": xla_flops(
                self._compiled("teacher", self.score, self.state.params, self.state.teacher_params, micro)
            ),
            "encoders": xla_flops(encode.lower(self.model, inputs[0]).compile()) if self.has_media else 0.0,
        }


class TorchStep:
    """The PyTorch peer: transformers generate, a no-grad teacher forward, TRL's GJSD, AdamW; the media
    encoders frozen, as in the opsd-jax step (`train.train_encoders: false`)."""

    def __init__(self, workload: Workload, lr: float = 1e-5):
        import copy

        import torch
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration
        from trl.experimental.gkd import GKDTrainer

        self.torch, self.step = torch, workload.step
        self.student = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            workload.checkpoint, dtype=torch.float32
        )
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)  # frozen copy of the start
        for name, parameter in self.student.named_parameters():
            if ".audio_tower." in f".{name}" or ".visual." in f".{name}":
                parameter.requires_grad_(False)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        self.loss_fn = GKDTrainer.generalized_jsd_loss
        self.workload = workload
        self.media_token_ids = torch.tensor(media_token_ids(workload), dtype=torch.long)
        torch.manual_seed(0)

    def prepare(self) -> dict[str, dict[str, Any]]:
        """The loop's host-side work on a batch: every prompt (with its media) repeated for its G
        rollouts, as TRL's trainers do, and the arrays made torch tensors. (Positions and media layouts
        are computed inside transformers' forward, so they are timed in the phases that call it.)"""
        from opsd_jax.testing.reference import torch_inputs

        return {
            who: torch_inputs(repeat_prompts(getattr(self.workload, who), self.step.samples))
            for who in ("student", "teacher")
        }

    def rollout(self, inputs):
        """`[B * G, C]` sampled completion tokens (prompt-major)."""
        torch, step = self.torch, self.step
        self.student.eval()
        with torch.no_grad():
            out = self.student.generate(
                **inputs["student"],
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=step.completion_len,
                min_new_tokens=step.completion_len,
                eos_token_id=None,
                pad_token_id=0,
            )
        completion = out[:, inputs["student"]["input_ids"].shape[1] :]
        return torch.where(torch.isin(completion, self.media_token_ids), PLAIN_TOKEN, completion)

    def _completion_logits(self, model, prompt, completion):
        """Logits predicting each completion token: `[B * G, C, V]` from one forward over [prompt | completion]."""
        torch = self.torch
        ids = torch.cat([prompt["input_ids"], completion], dim=1)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
        logits = model(**{**prompt, "input_ids": ids, "attention_mask": mask}).logits
        return logits[:, prompt["input_ids"].shape[1] - 1 : -1]

    def scoring(self, inputs, completion):
        with self.torch.no_grad():
            return self._completion_logits(self.teacher, inputs["teacher"], completion)

    def loss(self, inputs, completion, teacher_logits):
        student_logits = self._completion_logits(self.student, inputs["student"], completion)
        return self.loss_fn(student_logits, teacher_logits, labels=completion, beta=0.5, temperature=1.0)

    def update(self, inputs, completion, teacher_logits) -> float:
        self.student.train()
        loss = self.loss(inputs, completion, teacher_logits)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _count(self, run) -> tuple[Any, float]:
        """`run()` and PyTorch's own FLOP count of it (`torch.utils.flop_counter`: matmuls, convolutions
        and attention, backward included). The CPU attention kernel is counted with the formulas the
        counter uses for the GPU kernels (dense scores over all keys)."""
        from torch.utils import flop_counter

        aten = self.torch.ops.aten

        def attention(query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query, key, value)

        def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

        cpu_kernels = {
            aten._scaled_dot_product_flash_attention_for_cpu: attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward,
        }
        with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_kernels) as counter:
            result = run()
        return result, float(counter.get_total_flops())

    def encoder_flops(self) -> float:
        """PyTorch's count of one pass of the media encoders over the batch's clips (each prompt's once;
        0 for text prompts): the PyTorch side's own encoder work, as XLA's count is opsd-jax's."""
        from opsd_jax.testing.reference import torch_inputs

        if "pixel_values_videos" not in self.workload.student:
            return 0.0
        inputs = torch_inputs(self.workload.student)
        with self.torch.no_grad():
            _, flops = self._count(
                lambda: (
                    self.student.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]),
                    self.student.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"]),
                )
            )
        return flops

    def counted_flops(self) -> dict[str, float]:
        """PyTorch's count of one step (an extra one, which trains), phase by phase: rollout, teacher
        and student (its update)."""
        inputs = self.prepare()
        completion, rollout = self._count(lambda: self.rollout(inputs))
        scored, teacher = self._count(lambda: self.scoring(inputs, completion))
        _, student = self._count(lambda: self.update(inputs, completion, scored))
        return {"rollout": rollout, "teacher": teacher, "student": student}


PHASES = ("prepare", "rollout", "teacher", "update")  # timed one after the other
REPORTED = PHASES + ("train_step", "total")  # train step: teacher + update; total: all four


def phase_times(runner: JaxStep | TorchStep, steps: int) -> dict[str, Any]:
    """Median seconds of each phase (prepare, rollout, teacher scoring, update) over `steps` steps after
    a warm-up step (compilation). Every call returns finished work (JAX results are blocked on)."""
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for index in range(steps + 1):
        clock = [time.perf_counter()]
        inputs = runner.prepare()
        clock.append(time.perf_counter())
        rollout = runner.rollout(inputs)
        clock.append(time.perf_counter())
        scored = runner.scoring(inputs, rollout)
        clock.append(time.perf_counter())
        runner.update(inputs, rollout, scored)
        clock.append(time.perf_counter())
        if index:
            for phase, begin, finish in zip(PHASES, clock, clock[1:]):
                times[phase].append(finish - begin)
    seconds: dict[str, Any] = {phase: statistics.median(values) for phase, values in times.items()}
    seconds["runs"] = {phase: sorted(values) for phase, values in times.items()}  # the spread behind each median
    if isinstance(runner, JaxStep):
        # The jitted train step runs the teacher too: its update is the train step less the scoring.
        seconds["train_step"] = seconds["update"]
        seconds["runs"]["train_step"] = seconds["runs"].pop("update")
        seconds["update"] = max(seconds["train_step"] - seconds["teacher"], 0.0)
    else:
        seconds["train_step"] = seconds["teacher"] + seconds["update"]
    seconds["total"] = seconds["prepare"] + seconds["rollout"] + seconds["train_step"]
    return seconds


def loss_agreement(jax_runner: JaxStep, torch_runner: TorchStep) -> tuple[dict[str, float], Any, Any]:
    """Both losses at the starting weights on the same (opsd-jax) rollouts; returns them, opsd-jax's
    prepared inputs and its batch."""
    import numpy as np

    inputs = jax_runner.prepare()
    batch = jax_runner.rollout(inputs)
    torch_completion = torch_runner.torch.from_numpy(np.array(batch.completion[0])).long()
    torch_in = torch_runner.prepare()
    with torch_runner.torch.no_grad():
        torch_loss = float(
            torch_runner.loss(torch_in, torch_completion, torch_runner.scoring(torch_in, torch_completion))
        )
    jax_loss = float(jax_runner.update(inputs, batch)["loss"])
    return {"jax_loss": jax_loss, "torch_loss": torch_loss, "abs_diff": abs(jax_loss - torch_loss)}, inputs, batch


def utilisation(flops: dict[str, float], seconds: dict[str, float], peak: float) -> dict[str, float]:
    """Each phase's FLOPs per second over the matmul peak: rollout, train step (teacher + update) and the
    whole step (prepare included)."""
    work = {"rollout": flops["rollout"], "train_step": flops["model_train"], "total": flops["total"]}
    return {phase: value / seconds[phase] / peak for phase, value in work.items()}


def measure(
    name: str, size: dict[str, Any], steps: int, workdir: Path, peak: float, count_torch: bool
) -> dict[str, Any]:
    """One run of one config: both implementations timed, each side's work counted (and checked: XLA's
    count of the compiled programs; PyTorch's flop counter over one extra step when `count_torch`)."""
    from benchmarks.costs import DecoderShape, repeated_step_flops, step_flops

    workload = make_workload(name, size, workdir)
    step = workload.step
    jax_runner, torch_runner = JaxStep(workload, devices=1), TorchStep(workload)
    agreement, inputs, batch = loss_agreement(jax_runner, torch_runner)
    measured_xla = jax_runner.xla_flops(inputs, batch)
    jax_times = phase_times(jax_runner, steps)
    torch_times = phase_times(torch_runner, steps)
    torch_counted = torch_runner.counted_flops() if count_torch else None

    shape = DecoderShape.from_text_config(jax_runner.model.config.text)
    # The media encoders' share, each side's own: one pass over the batch's clips as XLA counts opsd-jax's
    # encoders and as PyTorch's flop counter counts transformers' (their vision attention differs: banded
    # blocks of 3 segments here, exact variable-length windows there).
    encoders = {"jax": measured_xla["encoders"], "torch": torch_runner.encoder_flops()}
    flops = {
        "jax": step_flops(shape, step, encoders=encoders["jax"]),
        "torch": repeated_step_flops(shape, step, encoders=encoders["torch"]),
    }
    # What each compiled program computes. The train step's two metric head products (the sampled tokens'
    # logprobs) repeat the loss's own products when the loss runs in one chunk, as here, and XLA computes
    # them once: its count is the model FLOPs. With several chunks (the real configs) they cost extra.
    counted = {"train_step": flops["jax"]["model_train"], "teacher": flops["jax"]["teacher"]}
    check = {
        "jax": {
            phase: {
                "counted": counted[phase],
                "measured": measured_xla[phase],
                "measured_over_counted": measured_xla[phase] / counted[phase],
            }
            for phase in counted
        }
    }
    if torch_counted:
        check["torch"] = {
            phase: {
                "counted": flops["torch"][phase],
                "measured": value,
                "measured_over_counted": value / flops["torch"][phase],
            }
            for phase, value in torch_counted.items()
        }
    return {
        "config": name,
        "media": size.get("media"),
        "step": dataclasses.asdict(step),
        "shape": dataclasses.asdict(shape),
        "jax_s": jax_times,
        "torch_s": torch_times,
        "speedup": {phase: torch_times[phase] / max(jax_times[phase], 1e-9) for phase in REPORTED},
        "completion_tokens_per_s": {
            "jax": step.completion_tokens / jax_times["total"],
            "torch": step.completion_tokens / torch_times["total"],
        },
        "flops": flops,
        # How much more the PyTorch loop computes than opsd-jax for the same step.
        "work_ratio": {
            phase: flops["torch"][key] / flops["jax"][key]
            for phase, key in (("rollout", "rollout"), ("train_step", "model_train"), ("total", "total"))
        },
        "flops_check": check,
        "utilisation": {
            side: utilisation(flops[side], times, peak) for side, times in (("jax", jax_times), ("torch", torch_times))
        },
        "loss_agreement": agreement,
    }


def run_worker(
    names: list[str], sizes: dict[str, Any], steps: int, workdir: Path, count_torch: bool, peak_sizes: tuple[int, ...]
) -> dict[str, Any]:
    """One independent run (a process of its own): this machine's matmul peak, then every config. The
    load average before and after (1, 5, 15 minutes) records whether other work shared the cores."""
    load_before = os.getloadavg()
    peak = matmul_peak(sizes=peak_sizes)
    rows = [measure(name, sizes[name], steps, workdir, peak["flops_per_s"], count_torch) for name in names]
    return {"matmul_peak": peak, "rows": rows, "load_average": {"before": load_before, "after": os.getloadavg()}}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config over the independent runs: the median and range of each run's phase times, ratios
    and utilisation; the counted work and its checks (the same in every run) from the first run."""
    summaries = []
    for index, first in enumerate(runs[0]["rows"]):
        rows = [run["rows"][index] for run in runs]
        static = ("config", "media", "step", "shape", "flops", "work_ratio", "flops_check", "loss_agreement")
        summaries.append(
            {
                **{key: first[key] for key in static},
                "runs": len(rows),
                **{
                    side: {phase: spread([r[side][phase] for r in rows]) for phase in REPORTED}
                    for side in ("jax_s", "torch_s", "speedup")
                },
                "utilisation": {
                    side: {
                        phase: spread([r["utilisation"][side][phase] for r in rows])
                        for phase in first["utilisation"][side]
                    }
                    for side in first["utilisation"]
                },
                "completion_tokens_per_s": {
                    side: spread([r["completion_tokens_per_s"][side] for r in rows])
                    for side in first["completion_tokens_per_s"]
                },
                "loss_abs_diff_max": max(r["loss_agreement"]["abs_diff"] for r in rows),
            }
        )
    return summaries


# ------------------------------------------------------------------------------------------ scaling


def scaling_worker(
    devices: int, name: str, size: dict[str, Any], prompts_per_device: int, steps: int, workdir: Path
) -> dict[str, Any]:
    """Runs in a child process started with `devices` forced host devices: the opsd-jax step only."""
    import jax

    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} host devices, JAX sees {jax.device_count()}")
    size = dict(size, step=dict(size["step"], prompts=prompts_per_device * devices))
    workload = make_workload(name, size, workdir)
    times = phase_times(JaxStep(workload, devices=devices), steps)
    return {
        "devices": devices,
        "prompts": workload.step.prompts,
        "seconds": times,
        "completion_tokens_per_s": workload.step.completion_tokens / times["total"],
    }


def _child(arguments: list[str], devices: int) -> dict[str, Any]:
    """`python -m benchmarks.step ARGUMENTS` in its own process on `devices` forced host devices (the
    device count is fixed when JAX starts); returns the JSON it prints last."""
    env = {**os.environ, "XLA_FLAGS": with_host_device_count(os.environ.get("XLA_FLAGS", ""), devices)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.step", *arguments],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"benchmarks.step {' '.join(arguments[:2])} on {devices} device(s) failed:\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scaling_child(
    name: str, size: dict[str, Any], devices: int, prompts_per_device: int, steps: int, workdir: Path
) -> dict[str, Any]:
    return _child(
        [
            "--scaling-worker",
            str(devices),
            "--configs",
            name,
            "--prompts-per-device",
            str(prompts_per_device),
            "--steps",
            str(steps),
            "--workdir",
            str(workdir),
            "--sizes",
            json.dumps({name: size}),
        ],
        devices,
    )


def scaling(
    name: str, size: dict[str, Any], device_counts: list[int], prompts_per_device: int, steps: int, workdir: Path
) -> list[dict[str, Any]]:
    """The opsd-jax step with `prompts_per_device x devices` prompts on each device count (FSDP over all of
    them), and as the control the same prompts on one device: their ratio is what sharding costs here."""
    rows = []
    for devices in device_counts:
        row = _scaling_child(name, size, devices, prompts_per_device, steps, workdir)
        control = row if devices == 1 else _scaling_child(name, size, 1, prompts_per_device * devices, steps, workdir)
        row["one_device_same_prompts_s"] = control["seconds"]["total"]
        row["one_device_same_prompts_phases_s"] = {k: v for k, v in control["seconds"].items() if k != "runs"}
        row["sharded_over_one_device"] = row["seconds"]["total"] / control["seconds"]["total"]
        rows.append(row)
        print(
            f"  scaling: {devices} device(s), {row['prompts']} prompts: {row['seconds']['total']:.3f} s "
            f"(one device: {control['seconds']['total']:.3f} s)",
            flush=True,
        )
    base = rows[0]["completion_tokens_per_s"]
    for row in rows:
        row["throughput_vs_one_device"] = row["completion_tokens_per_s"] / base
    return rows


# ------------------------------------------------------------------------------------------- report


def tables(rows: list[dict[str, Any]], scaled: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """The phase table, the work table, the checks and (when run) the scaling table, from `summarise`'s
    rows and the runs' own records (matmul peak, load average)."""

    def ranged(value: dict[str, float], scale: float = 1.0, unit: str = "", digits: str = ".3g") -> str:
        text = f"{scale * value['median']:{digits}}{unit}"
        if value["min"] != value["max"]:
            text += f" ({scale * value['min']:{digits}}-{scale * value['max']:{digits}})"
        return text

    percent = dict(scale=100, unit="%", digits=".0f")
    phases = format_table(
        ["config", "phase", "opsd-jax (s)", "PyTorch (s)", "PyTorch / opsd-jax"],
        [
            (
                r["config"],
                phase.replace("_", " "),
                ranged(r["jax_s"][phase]),
                ranged(r["torch_s"][phase]),
                ranged(r["speedup"][phase], unit="x", digits=".2f"),
            )
            for r in rows
            for phase in ("prepare", "rollout", "teacher", "update", "total")
        ],
    )
    keys = {"rollout": "rollout", "train_step": "model_train", "total": "total"}
    work = format_table(
        [
            "config",
            "phase",
            "GFLOP opsd-jax",
            "GFLOP PyTorch",
            "work PyTorch / opsd-jax",
            "time PyTorch / opsd-jax",
            "utilisation opsd-jax",
            "utilisation PyTorch",
        ],
        [
            (
                r["config"],
                phase.replace("_", " "),
                r["flops"]["jax"][key] / 1e9,
                r["flops"]["torch"][key] / 1e9,
                f"{r['work_ratio'][phase]:.2f}x",
                ranged(r["speedup"][phase], unit="x", digits=".2f"),
                ranged(r["utilisation"]["jax"][phase], **percent),
                ranged(r["utilisation"]["torch"][phase], **percent),
            )
            for r in rows
            for phase, key in keys.items()
        ],
    )

    def measured(check: dict[str, Any], side: str, phase: str) -> str:
        return f"{check[side][phase]['measured_over_counted']:.3f}" if phase in check.get(side, {}) else "-"

    checks = format_table(
        [
            "config",
            "completion tok/s opsd-jax",
            "completion tok/s PyTorch",
            "XLA / counted (opsd-jax train step)",
            "torch counter / counted (PyTorch rollout, teacher, student)",
            "|loss diff| (max over runs)",
        ],
        [
            (
                r["config"],
                ranged(r["completion_tokens_per_s"]["jax"]),
                ranged(r["completion_tokens_per_s"]["torch"]),
                measured(r["flops_check"], "jax", "train_step"),
                ", ".join(measured(r["flops_check"], "torch", phase) for phase in ("rollout", "teacher", "student")),
                f"{r['loss_abs_diff_max']:.1e}",
            )
            for r in rows
        ],
    )
    peaks = [run["matmul_peak"] for run in runs]
    rates = [peak["flops_per_s"] / 1e9 for peak in peaks]
    loads = ", ".join(f"{run['load_average']['before'][0]:.1f}/{run['load_average']['after'][0]:.1f}" for run in runs)
    text = (
        f"{phases}\n\n{work}\n\n{checks}\n\n{len(peaks)} independent run(s): medians over runs (min-max in "
        f"brackets) of each run's median step; matmul peak (float32 jnp.dot, per run): "
        + ", ".join(f"{rate:.1f}" for rate in rates)
        + f" GFLOP/s; load average before/after each run: {loads}"
    )
    if scaled:
        text += "\n\n" + format_table(
            [
                "devices",
                "prompts",
                "rollout (s)",
                "train step (s)",
                "completion tok/s",
                "throughput vs 1 device",
                "same prompts, 1 device (s)",
                "sharded / 1 device",
            ],
            [
                (
                    s["devices"],
                    s["prompts"],
                    s["seconds"]["rollout"],
                    s["seconds"]["train_step"],
                    s["completion_tokens_per_s"],
                    f"{s['throughput_vs_one_device']:.2f}",
                    s["one_device_same_prompts_s"],
                    f"{s['sharded_over_one_device']:.2f}",
                )
                for s in scaled
            ],
        )
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,small,omni", help="comma-separated subset of: " + ", ".join(SIZES))
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="independent runs, each in a process of its own measuring both sides (the median and "
        "range over runs are reported)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps per side in each run, after a warm-up step (each run reports their median)",
    )
    parser.add_argument("--scaling", default="1,2,4,8", help="device counts for the scaling run ('' to skip)")
    parser.add_argument("--scaling-config", default="small", choices=sorted(SIZES))
    parser.add_argument("--prompts-per-device", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny and omni at tiny sizes, 2 runs of 1 step, scaling of tiny on 1 and 2 devices (the smoke test)",
    )
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/step.json)")
    parser.add_argument("--workdir", type=Path, help="where the saved weights go (default: a temporary directory)")
    parser.add_argument("--scaling-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-torch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scaling_worker:  # started by `scaling` with XLA_FLAGS set for its device count
        row = scaling_worker(
            args.scaling_worker,
            args.configs,
            json.loads(args.sizes)[args.configs],
            args.prompts_per_device,
            args.steps,
            args.workdir,
        )
        print(json.dumps(row))
        return row
    if args.run_worker:  # one independent run, started by `main` on one device
        run = run_worker(
            args.configs.split(","),
            json.loads(args.sizes),
            args.steps,
            args.workdir,
            args.count_torch,
            (256,) if args.quick else (1024, 2048, 3072),
        )
        print(json.dumps(run, default=str))
        return run

    sizes = dict(SIZES)
    if args.quick:
        args.configs, args.repeats, args.steps, args.scaling, args.scaling_config = "tiny,omni", 2, 1, "1,2", "tiny"
        sizes.update(QUICK)
    names = args.configs.split(",")
    if unknown := [name for name in names if name not in sizes]:
        parser.error(
            f"--configs: unknown {', '.join(unknown)}; expected a comma-separated subset of {', '.join(SIZES)}"
        )
    if args.repeats < 1 or args.steps < 1:
        parser.error(f"--repeats and --steps: expected at least 1, got {args.repeats} and {args.steps}")
    chosen = {name: sizes[name] for name in names}

    def report(runs: list[dict[str, Any]], scaled: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        """Writes what is measured so far (after every run, so that a long job stopped early keeps its
        finished runs; `complete` says whether all of them and the scaling ran)."""
        rows = summarise(runs)
        payload = {
            "settings": vars(args) | {"sizes": chosen},
            "complete": complete,
            "matmul_peak": [run["matmul_peak"] for run in runs],
            "rows": rows,
            "runs": runs,
            "scaling": scaled,
            "table": tables(rows, scaled, runs),
        }
        write_results("step", payload, args.out)
        return payload

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        runs = []
        for index in range(args.repeats):
            # PyTorch's flop counter checks the PyTorch count once, in the first run (an extra, untimed step).
            arguments = (
                [
                    "--run-worker",
                    "--configs",
                    args.configs,
                    "--steps",
                    str(args.steps),
                    "--workdir",
                    str(workdir),
                    "--sizes",
                    json.dumps(chosen),
                ]
                + ["--count-torch"] * (index == 0)
                + ["--quick"] * args.quick
            )
            runs.append(_child(arguments, devices=1))
            print(
                f"  run {index + 1}/{args.repeats}: PyTorch / opsd-jax "
                + ", ".join(f"{r['config']} {r['speedup']['total']:.2f}x" for r in runs[-1]["rows"]),
                flush=True,
            )
            report(runs, [], complete=False)
        counts = [int(n) for n in args.scaling.split(",") if n]
        scaled = (
            scaling(
                args.scaling_config, sizes[args.scaling_config], counts, args.prompts_per_device, args.steps, workdir
            )
            if counts
            else []
        )
    payload = report(runs, scaled, complete=True)
    print(payload["table"])
    print(f"wrote {args.out or RESULTS / 'step.json'}")
    return payload


if __name__ == "__main__":
    if "--scaling-worker" not in sys.argv:
        force_host_devices(1)  # before JAX starts: the measured step runs on one device
    main()
