"""The training run: data -> rollouts -> teacher scores -> update, with evaluation, logs and checkpoints.

Every process of a multi-host run executes this same program on its shard of the data. Per step:

1. the next batch of clips from the grain pipeline (this process's shard), its student and teacher
   prompts tokenized to one length bucket and prepared (`prepare_inputs`) per micro-batch;
2. `num_samples` rollouts per prompt from the live student (`opsd_jax.generation.decode`), with a
   PRNG key folded from the run's key and the step, so a resumed run samples what the uninterrupted
   one would have;
3. one jitted update (`opsd_jax.opsd.step`): student forward, teacher forward, loss, optax, EMA.

Checkpoints (`opsd_jax.checkpoint`) hold the state and the iterator position; SIGTERM (TPU
preemption) saves and exits cleanly; `resume=True` continues from the newest complete checkpoint.
Only process 0 writes logs (JSONL and TensorBoard) and shows the progress bar.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from opsd_jax.checkpoint import RunCheckpointer, abstract_like
from opsd_jax.config import Config, ConfigError
from opsd_jax.data.audio_features import feature_frames
from opsd_jax.data.builders import load_split
from opsd_jax.data.chat_template import PromptBuilder
from opsd_jax.data.pipeline import PipelineConfig, ProcessorInputs, make_iterator
from opsd_jax.data.vision_inputs import TEMPORAL_PATCH_SIZE
from opsd_jax.eval.extract import answer_text
from opsd_jax.eval.metrics import accuracy, macro_f1
from opsd_jax.generation import Decoding, decode
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, from_pretrained
from opsd_jax.models.weights import CheckpointError
from opsd_jax.monitor import MetricsWriter, matmul_parameters, peak_flops, step_model_flops
from opsd_jax.opsd import step as opsd_step
from opsd_jax.opsd.diagnostics import inspect_rollouts, markdown, rollout_records
from opsd_jax.opsd.prompts import encode_clip_batch, prompt_lengths
from opsd_jax.sampling import GenerationOutput
from opsd_jax.sharding import make_mesh, to_host
from opsd_jax.sharding.topology import topology_chips

logger = logging.getLogger(__name__)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the environment describes a multi-process run.

    On Cloud TPU VMs (`TPU_WORKER_ID` is set) JAX finds its peers itself; elsewhere set
    `OPSD_COORDINATOR` (host:port), `OPSD_NUM_PROCESSES` and `OPSD_PROCESS_ID` on every process.
    Must run before anything asks JAX about devices.
    """
    if jax.distributed.is_initialized():
        return
    if "OPSD_COORDINATOR" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["OPSD_COORDINATOR"],
            num_processes=int(os.environ["OPSD_NUM_PROCESSES"]),
            process_id=int(os.environ["OPSD_PROCESS_ID"]),
        )
    elif "TPU_WORKER_ID" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()


def check_slice(config: Config) -> None:
    """On a TPU, the slice must be the one `mesh.topology` names (its memory budget and compile check are). A GPU
    config's topology is what its budget and compile check are for; on more GPUs `mesh.fsdp: -1` shards it."""
    topology = config.mesh.topology
    if topology and jax.default_backend() == "tpu" and jax.device_count() != topology_chips(topology):
        raise ConfigError(
            f"mesh.topology: the config is written for {topology} ({topology_chips(topology)} chips) but "
            f"this slice has {jax.device_count()} devices; use a config for this slice or set mesh.topology"
        )


def predicted_label(text: str, vocabulary: list[str]) -> str | None:
    """The label of a free-text answer: within its answer part (`opsd-jax eval`'s `answer_text`: the last
    `<answer>` block, else all of it), the vocabulary word that comes last (an explanation names its
    conclusion last, after any cue it weighs against)."""
    lowered = answer_text(text).lower()
    hits = [(lowered.rfind(word), word) for word in vocabulary if word in lowered]
    return max(hits)[1] if hits else None


def classification_scores(predicted: list[str | None], truth: list[str], vocabulary: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over `vocabulary` (an unparseable answer, None, counts as wrong)."""
    correct = accuracy(np.asarray(truth, object), np.asarray(predicted, object)) if truth else 0.0
    return {"accuracy": correct, "macro_f1": macro_f1(truth, predicted, vocabulary)}


def label_vocabulary(dataset_dir: str, split: str) -> list[str]:
    """The sorted non-empty labels of a built split, read without decoding any clip's media."""
    source = load_split(dataset_dir, split, decode_media=False)
    labels = {
        str(label.decode() if isinstance(label, bytes) else label)
        for label in (source[i]["label"] for i in range(len(source)))
    }
    return sorted(label for label in labels if label)


def _stable_hash(text: str) -> int:
    """A process-independent 31-bit hash (Python's `hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def _media(inputs: dict[str, Any]) -> dict[str, Any]:
    """The media arrays of `encode_clip_batch`'s output (everything but the prompts' ids and masks)."""
    return {
        name: value
        for name, value in inputs.items()
        if not name.startswith(("input_ids", "attention_mask", "teacher_"))
    }


def _clips(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A host batch (arrays stacked on axis 0) -> one dict per clip."""
    size = len(batch["id"])
    return [{name: value[i] for name, value in batch.items()} for i in range(size)]


def gather_global_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Every process's host batch -> the global batch (process-major rows), on every process.

    Each host decodes and preprocesses only its shard; the ready arrays are then all-gathered so that
    every process plans the same global batch (prompts are sharded over the mesh again at placement;
    media stay replicated). Text fields travel as UTF-8 bytes padded to the longest.
    """
    if jax.process_count() == 1:
        return batch

    gathered: dict[str, Any] = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf":
            stacked = multihost_utils.process_allgather(value)  # [processes, local, ...]
            gathered[name] = np.asarray(stacked).reshape((-1,) + value.shape[1:])
            continue
        encoded = [str(v).encode() for v in value.reshape(-1)]
        width = int(np.max(multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=0)))))
        table = np.zeros((len(encoded), max(width, 1)), np.uint8)
        for row, data in enumerate(encoded):
            table[row, : len(data)] = np.frombuffer(data, np.uint8)
        everything = np.asarray(multihost_utils.process_allgather(table)).reshape(-1, max(width, 1))
        gathered[name] = np.asarray([bytes(row).rstrip(b"\0").decode() for row in everything], dtype=object)
    return gathered


@dataclasses.dataclass
class TrainingSummary:
    steps: int
    losses: list[float]
    final_metrics: dict[str, float]
    eval_history: list[dict[str, float]]
    seconds: float
    preempted: bool


class Trainer:
    """The stateful shell around the pure step: model, data, checkpoints, logs."""

    def __init__(self, config: Config, *, model: Qwen2_5OmniThinker | None = None):
        initialize_distributed()
        self.config = config
        check_slice(config)
        self.mesh = make_mesh(config.mesh)
        self.rules = config.mesh.axis_rules()  # resolved once: every placement below follows the config's table
        dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
        param_dtype = jnp.bfloat16 if config.model.param_dtype == "bfloat16" else jnp.float32
        self.model = (
            model
            if model is not None
            else from_pretrained(
                config.model.checkpoint,
                dtype=dtype,
                mesh=self.mesh,
                rules=self.rules,
                param_dtype=param_dtype,
                remat=config.model.remat,
                remat_policy=config.model.remat_policy,
                attention=config.model.attention,
            )
        )
        if config.model.lora is not None:  # adapters on the frozen base: one copy of it serves all (models.lora)
            self.model = lora.apply_lora(
                self.model, config.model.lora, seed=config.train.seed, mesh=self.mesh, rules=self.rules
            )
        self.builder = PromptBuilder.from_pretrained(config.model.checkpoint)
        self.output_dir = epath.Path(config.run.output_dir)  # local or gs://: every host must see it
        params = nnx.state(self.model, lora.trainable_filter(self.model))
        self.tx = opsd_step.make_optimizer(config.train, params)
        self.schedule = opsd_step.learning_rate_schedule(config.train)
        self.settings = opsd_step.StepSettings(
            graphdef=nnx.graphdef(self.model),
            tx=self.tx,
            loss=config.loss,
            teacher=config.teacher,
            train_encoders=config.train.train_encoders,
            mesh=self.mesh,
            rules=self.rules,
        )
        self.state = opsd_step.init_state(
            self.model, self.tx, config.teacher, self.mesh, train_encoders=config.train.train_encoders
        )
        self.step_fn = opsd_step.make_train_step(self.settings, self.state)
        self.key = jax.random.key(config.train.seed)
        self.checkpointer = RunCheckpointer(
            self.output_dir / "checkpoints",
            keep_last=config.run.keep_last,
            keep_best=config.run.keep_best,
            best_metric=config.run.best_metric,
            async_save=config.run.async_checkpointing,
        )
        self.iterator = self._train_iterator()
        self.eval_indices: list[int] | None = None  # the held-out clips whose prompts fit (all of them by default)
        if config.data.eval_dir:
            source = load_split(config.data.eval_dir, config.data.eval_split)
            fitting = clips_that_fit(
                self.builder, config, config.data.eval_dir, config.data.eval_split, source, teacher=False
            )
            self.eval_indices = list(range(len(source))) if fitting is None else fitting
        self.vocabulary: list[str] | None = None
        self._stop = False
        thinker = self.model.config
        self.matmul_parameters = matmul_parameters(
            params,
            tied_head=thinker.tie_word_embeddings,
            vocab_size=thinker.text.vocab_size,
            hidden_size=thinker.text.hidden_size,
        )
        self.peak_flops = peak_flops(self.mesh.devices.reshape(-1).tolist())
        if self.peak_flops is None:
            logger.warning(
                "no peak FLOP/s known for device kind %r: perf/mfu is not logged",
                self.mesh.devices.reshape(-1)[0].device_kind,
            )
        self.rollout_time = RolloutTime()

    # ---------------------------------------------------------------------------------------- data

    def _train_iterator(self):
        data = self.config.data
        local_batch = self.config.train.batch_size // jax.process_count()
        if local_batch * jax.process_count() != self.config.train.batch_size:
            raise ValueError(
                f"train.batch_size: {self.config.train.batch_size} prompts do not split over {jax.process_count()} processes"
            )
        source = load_split(data.train_dir, data.train_split)
        fitting = clips_that_fit(self.builder, self.config, data.train_dir, data.train_split, source, teacher=True)
        source = source if fitting is None else Subset(source, fitting)
        pipeline = PipelineConfig(batch_size=local_batch, seed=self.config.train.seed, worker_count=data.worker_count)
        return make_iterator(source, pipeline, preprocess=ProcessorInputs())

    def _micro_batches(self, clips: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Splits a batch of clips into `grad_accum_steps` micro-batches of tokenized model inputs."""
        k = self.config.train.grad_accum_steps
        size = len(clips) // k
        out = []
        for index in range(k):
            part = clips[index * size : (index + 1) * size]
            for clip in part:
                clip.setdefault("rationale", "")
            inputs = self._encode(part, with_teacher=True)
            if not self.config.teacher.use_rationale:
                inputs["teacher_input_ids"] = inputs["input_ids"]
                inputs["teacher_attention_mask"] = inputs["attention_mask"]
            out.append((inputs, part))
        return out

    def _encode(self, clips: list[dict[str, Any]], *, with_teacher: bool) -> dict[str, Any]:
        """Clips -> the model call's arrays (`encode_clip_batch`) at the run's prompt lengths."""
        return encode_clip_batch(
            self.builder,
            clips,
            self.config.prompt,
            length=self.config.data.prompt_length,
            use_audio_in_video=self.config.data.use_audio_in_video,
            with_teacher=with_teacher,
            teacher_length=self.config.data.teacher_prompt_length,
        )

    def _prepare_student(self, inputs: dict[str, Any]):
        return self.model.prepare_inputs(inputs["input_ids"], attention_mask=inputs["attention_mask"], **_media(inputs))

    def _prepare(self, inputs: dict[str, Any]):
        student = self._prepare_student(inputs)
        media = _media(inputs)
        teacher = self.model.prepare_inputs(
            inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"], **media
        )
        return student, teacher

    # -------------------------------------------------------------------------------------- a step

    def _label_ids(self, clips: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The reference answers (`prompt.answer_template`, then EOS), right-padded: for the cross-entropy terms."""
        tokenizer = self.builder.tokenizer

        def target(clip: dict[str, Any]) -> str:
            answer = self.config.prompt.answer_template.format(label=str(clip.get("label", "")))
            return (
                f"{clip.get('rationale', '')} {answer}"
                if self.config.teacher.label_ce_target == "rationale"
                else answer
            )

        width = self.config.data.answer_length  # static: one compiled step for every batch
        rows = [(tokenizer(target(c))["input_ids"] + [tokenizer.eos_token_id])[-width:] for c in clips]
        ids = np.full((len(rows), width), self.builder.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask

    def _rewards(self, tokens: np.ndarray, mask: np.ndarray, clips: list[dict[str, Any]]) -> np.ndarray:
        """1 where a rollout's answer names the clip's label (the label-reward ablation)."""
        vocabulary = self._vocabulary()
        group = tokens.shape[0] // len(clips)
        texts = [self.builder.tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(tokens, mask)]
        return np.asarray(
            [
                float(predicted_label(text, vocabulary) == str(clips[i // group].get("label", "")))
                for i, text in enumerate(texts)
            ],
            np.float32,
        )

    def _vocabulary(self) -> list[str]:
        if self.vocabulary is None:
            self.vocabulary = label_vocabulary(self.config.data.train_dir, self.config.data.train_split)
        return self.vocabulary

    def _no_rollouts(self, prompts: int) -> GenerationOutput:
        """Empty completions for objectives that need none (pure cross-entropy): no sampling cost."""
        rows, new = prompts * self.config.sampling.num_samples, self.config.sampling.max_new_tokens
        zeros = jnp.zeros((rows, new), jnp.float32)
        return GenerationOutput(
            tokens=jnp.full((rows, new), self.builder.pad_token_id, jnp.int32),
            logprobs=zeros,
            model_logprobs=zeros,
            mask=jnp.zeros((rows, new), bool),
        )

    def _rollouts(self, student, keys: jax.Array) -> GenerationOutput:
        """`num_samples` rollouts of each prompt of `student` (prepared inputs), one key per prompt."""
        sampling = self.config.sampling
        decoding = Decoding(
            sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.num_samples
        )
        return decode(self.model, student, decoding, builder=self.builder, mesh=self.mesh, rules=self.rules, seed=keys)

    def _step_rollouts(self, clips: list[dict[str, Any]], keys: jax.Array) -> GenerationOutput:
        """The rollouts of every prompt of the step in one decode (`sampling.rollout_batch: step`)."""
        return self._rollouts(self._prepare_student(self._encode(clips, with_teacher=False)), keys)

    def make_step_batch(self, clips: list[dict[str, Any]], step: int) -> opsd_step.StepBatch:
        teacher = self.config.teacher
        samples = self.config.sampling.num_samples
        parts = self._micro_batches(clips)
        # One key per clip, from its id: rollouts do not depend on the process layout, the batch order or
        # whether the step's rows are decoded together (`sampling.rollout_batch`).
        step_key = jax.random.fold_in(self.key, step)
        keys = [
            jnp.stack([jax.random.fold_in(step_key, _stable_hash(str(c["id"]))) for c in part]) for _, part in parts
        ]
        prepared = [self._prepare(inputs) for inputs, _ in parts]
        began = time.perf_counter()
        if teacher.distill_weight == 0 and teacher.label_pg_weight == 0:
            outs = [self._no_rollouts(len(part)) for _, part in parts]
        elif self.config.sampling.rollout_batch == "step" and len(parts) > 1:
            whole = self._step_rollouts([clip for _, part in parts for clip in part], jnp.concatenate(keys))
            bounds = np.cumsum([0] + [len(part) * samples for _, part in parts])
            outs = [jax.tree.map(lambda x, a=a, b=b: x[a:b], whole) for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            outs = [self._rollouts(student, key) for (student, _), key in zip(prepared, keys)]
        host = [(to_host(out.tokens), to_host(out.mask)) for out in outs]  # waits for the rollouts
        self.rollout_time.add(time.perf_counter() - began, int(sum(mask.sum() for _, mask in host)))
        micro = []
        for (_, part), (student, teacher_inputs), out, (tokens, mask) in zip(parts, prepared, outs, host):
            rewards = (
                self._rewards(tokens, mask, part) if teacher.label_pg_weight > 0 else np.zeros(len(tokens), np.float32)
            )
            label_ids, label_mask = self._label_ids(part)
            micro.append(
                opsd_step.StepBatch(
                    student=student,
                    teacher=teacher_inputs,
                    completion=out.tokens,
                    completion_mask=out.mask,
                    sampler_logprobs=out.logprobs,
                    rewards=jnp.asarray(rewards),
                    label_ids=jnp.asarray(label_ids),
                    label_mask=jnp.asarray(label_mask),
                )
            )
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro)
        return opsd_step.place_step_batch(stacked, self.mesh, self.rules)

    def step_performance(self, step: int, seconds: float, tokens: dict[str, int]) -> dict[str, float]:
        """The learning rate of update `step` (1-based), the step's wall time (data, rollouts and update), the
        rollouts' tokens per second and the step's model FLOPs (`step_model_flops`) and their utilisation of
        the mesh's peak (`perf/mfu`, when the devices' peak is known)."""
        rollouts = self.rollout_time
        flops = step_model_flops(self.matmul_parameters, num_samples=self.config.sampling.num_samples, **tokens)
        out = {
            "train/lr": float(self.schedule(step - 1)),
            "perf/step_seconds": seconds,
            "perf/rollout_seconds": rollouts.seconds,
            "perf/rollout_tokens_per_second": rollouts.tokens / rollouts.seconds if rollouts.seconds else 0.0,
            "perf/model_tflops": flops / 1e12,
        }
        if self.peak_flops:
            out["perf/mfu"] = flops / (seconds * self.peak_flops)
        return out

    def inspect_rollouts(
        self, batch: opsd_step.StepBatch, clips: list[dict[str, Any]], step: int
    ) -> list[dict[str, Any]]:
        """The G rollouts of the step's first prompt, scored (`opsd_jax.opsd.diagnostics`): what
        `rollouts.jsonl` holds."""
        first = jax.tree.map(lambda x: x[0], batch)  # micro-batch 0, whose first G rows are clip 0's rollouts
        rows = self.config.sampling.num_samples
        scored = inspect_rollouts(
            self.state.params,
            self.state.teacher_params,
            first,
            settings=self.settings,
            rows=rows,
            frozen=self.state.frozen,
        )
        scored = {name: to_host(value) for name, value in scored.items()}
        tokens, mask = to_host(first.completion)[:rows], to_host(first.completion_mask)[:rows]
        decode = functools.partial(self.builder.tokenizer.decode, skip_special_tokens=False)
        return rollout_records(step, str(clips[0]["id"]), tokens, mask, scored, decode)

    # ------------------------------------------------------------------------------------ evaluation

    def evaluate(self, *, with_rationale: bool = False) -> dict[str, float]:
        """Greedy answers on held-out clips: accuracy and macro-F1.

        The student's prompt (no rationale) by default: what inference sees. `with_rationale=True` scores
        the teacher's prompt instead (the clips' `rationale` field), to measure what the teacher knows.
        """
        if not self.config.data.eval_dir:
            return {}
        rows = self.predict(with_rationale=with_rationale)
        scores = classification_scores([r["predicted"] for r in rows], [r["label"] for r in rows], self._vocabulary())
        return {f"eval/{name}": value for name, value in scores.items()}

    def predict(self, eval_dir: str | None = None, *, with_rationale: bool = False) -> list[dict[str, str | None]]:
        """Greedy answers on the first `data.eval_clips` clips of `eval_dir` (default `data.eval_dir`),
        split `data.eval_split`: per clip its `id`, `subtitle`, `label` and `predicted` label (None when
        the answer names none). Prompts as in `evaluate`; clips left out for their length
        (`data.skip_long_prompts`) stay out of the default split."""
        data = self.config.data
        source = load_split(eval_dir or data.eval_dir, data.eval_split)
        own_split = eval_dir is None and self.eval_indices is not None
        indices = self.eval_indices if own_split else list(range(len(source)))
        count = min(len(indices), data.eval_clips) if data.eval_clips else len(indices)
        processor = ProcessorInputs()
        vocabulary = self._vocabulary()
        rows: list[dict[str, str | None]] = []
        batch_size = max(1, self.config.train.batch_size // self.config.train.grad_accum_steps)
        for start in range(0, count, batch_size):
            clips = [processor(source[indices[i]]) for i in range(start, min(count, start + batch_size))]
            inputs = self._encode(clips, with_teacher=with_rationale)
            if with_rationale:
                inputs["input_ids"] = inputs.pop("teacher_input_ids")
                inputs["attention_mask"] = inputs.pop("teacher_attention_mask")
            ids = inputs.pop("input_ids")
            out = decode(
                self.model,
                {"input_ids": ids, **inputs},
                Decoding(self.config.sampling.eval_max_new_tokens),  # greedy
                builder=self.builder,
                mesh=self.mesh,
                rules=self.rules,
            )
            tokens, mask = to_host(out.tokens), to_host(out.mask)
            for clip, row, m in zip(clips, tokens, mask):
                text = self.builder.tokenizer.decode(row[m], skip_special_tokens=True)
                rows.append(
                    {
                        "id": str(clip["id"]),
                        "subtitle": str(clip.get("subtitle", "")),
                        "label": str(clip["label"]),
                        "predicted": predicted_label(text, vocabulary),
                    }
                )
        return rows

    # ------------------------------------------------------------------------------------- the loop

    def restore(self, step: int | None = None, *, required: bool = False) -> int:
        """Continues from checkpoint `step`, or the newest one that restores (skipping, with a warning, those
        that do not); returns the step to run next. With no checkpoint at all: 0, said in one line, or with
        `required` a `CheckpointError` (a mistyped run.output_dir must not restart a run unnoticed)."""
        if step is None and not self.checkpointer.all_steps():
            message = f"no checkpoint in {self.checkpointer.directory} to resume from"
            if required:
                raise CheckpointError(f"{message} (--require-checkpoint); check run.output_dir")
            logger.warning("%s: starting at step 0", message)
            return 0
        state, meta = self.checkpointer.restore(step, abstract_like(self.state.saved()), data_iterator=self.iterator)
        logger.info("resuming from checkpoint step %d of %s", int(meta["step"]), self.checkpointer.directory)
        self.state = state.replace(frozen=self.state.frozen)
        if meta.get("rng") is not None:
            self.key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        opsd_step.sync_model(self.model, self.state)
        return int(meta["step"])

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        logger.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self._stop = True

    def _check_finite(self, step: int, metrics: dict[str, float]) -> None:
        """Stops the run (`TrainingDiverged`, before anything of this step is logged or saved) when the loss or
        the gradient norm of `step` is NaN or infinite."""
        bad = [
            f"{name} = {metrics[name]}"
            for name in ("train/loss", "train/grad_norm")
            if name in metrics and not math.isfinite(metrics[name])
        ]
        if bad:
            raise TrainingDiverged(step, ", ".join(bad), self.checkpointer.latest_step())

    def save(self, step: int, metrics: dict[str, float] | None = None, *, force: bool = False) -> None:
        """Starts a checkpoint of the current state; refuses (`TrainingDiverged`) parameters that are not all
        finite, so a diverged step never rotates a good checkpoint out of `run.keep_last`."""
        if not bool(_all_finite(self.state.params)):
            self.checkpointer.wait()
            raise TrainingDiverged(step, "parameters hold NaN or inf", self.checkpointer.latest_step())
        self.checkpointer.save(
            step,
            self.state.saved(),
            data_iterator=self.iterator,
            rng=self.key,
            metrics=metrics,
            force=force,
            base_checkpoint=self.config.model.checkpoint if self.state.frozen is not None else None,
        )

    def run(
        self,
        *,
        resume: bool = False,
        max_steps: int | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        resume_step: int | None = None,
        require_checkpoint: bool = False,
    ) -> TrainingSummary:
        """Trains until `train.total_steps` (or `max_steps` more steps), then writes a summary.

        `resume` continues from checkpoint `resume_step` (default: the newest that restores); without it the
        output directory must not hold another run (`RunDirectoryError`; `clear_run_directory` empties it).
        """
        config = self.config
        if resume or resume_step is not None or require_checkpoint:
            start = self.restore(resume_step, required=require_checkpoint)
        else:
            existing = existing_run_files(self.output_dir, self.checkpointer.all_steps())
            if existing:
                raise RunDirectoryError(self.output_dir, existing)
            start = 0
        end = config.train.total_steps if max_steps is None else min(config.train.total_steps, start + max_steps)
        writer = MetricsWriter(self.output_dir / "logs", wandb_project=config.run.wandb_project, run_config=config)
        if jax.process_index() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(self.output_dir, config)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        losses: list[float] = []
        evals: list[dict[str, float]] = []
        metrics: dict[str, float] = {}
        began = time.perf_counter()
        bar = tqdm(total=end - start, desc="train", unit="step", disable=jax.process_index() != 0)
        step = start
        every = config.run.log_rollouts_every
        try:
            while step < end and not self._stop:
                step_began = time.perf_counter()
                self.rollout_time = RolloutTime()
                clips = _clips(gather_global_batch(next(self.iterator)))
                batch = self.make_step_batch(clips, step)
                tokens = step_token_counts(batch)
                rollouts = None
                if every and (step + 1) % every == 0:  # on the parameters that sampled them, before the update
                    inspected = time.perf_counter()
                    rollouts = self.inspect_rollouts(batch, clips, step + 1)
                    step_began += time.perf_counter() - inspected  # not part of the step's time
                self.state, device_metrics = self.step_fn(self.state, batch)
                opsd_step.sync_model(self.model, self.state)
                step += 1
                metrics = {f"train/{k}": float(v) for k, v in jax.device_get(device_metrics).items()}
                self._check_finite(step, metrics)
                metrics.update(self.step_performance(step, time.perf_counter() - step_began, tokens))
                losses.append(metrics["train/loss"])
                if rollouts is not None:
                    writer.write_records(step, "rollouts", rollouts, markdown(rollouts))
                if step % config.run.eval_every == 0 or step == end:
                    evaluation = self.evaluate()
                    if evaluation:
                        evals.append({"step": step, **evaluation})
                        metrics.update(evaluation)
                if step % config.run.log_every == 0 or step == end:
                    writer.write(step, metrics)
                    if jax.process_index() == 0:
                        logger.info("step %d of %d: %s", step, end, describe_step(metrics))
                if on_step is not None:
                    on_step(step, metrics)
                if step % config.run.save_every == 0 or step == end or self._stop:
                    self.save(step, metrics, force=self._stop)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                bar.update(1)
        finally:
            bar.close()
            self.checkpointer.wait()
            writer.close()
            signal.signal(signal.SIGTERM, previous)
        summary = TrainingSummary(
            steps=step,
            losses=losses,
            final_metrics=metrics,
            eval_history=evals,
            seconds=time.perf_counter() - began,
            preempted=self._stop,
        )
        if jax.process_index() == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2))
            logger.info("trained to step %d in %.1fs; final %s", step, summary.seconds, metrics)
        return summary


@dataclasses.dataclass
class RolloutTime:
    """The wall time of a step's rollouts (sampling until the tokens are on the host) and the tokens sampled."""

    seconds: float = 0.0
    tokens: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds += seconds
        self.tokens += tokens


def step_token_counts(batch: opsd_step.StepBatch) -> dict[str, int]:
    """The tokens a step computes on (padding left out): the student's and the teacher's prompts (once per
    prompt) and the sampled completions; `step_model_flops`'s arguments."""
    count = lambda x: int(np.sum(to_host(x)))  # noqa: E731
    return {
        "prompt_tokens": count(batch.student.attention_mask),
        "teacher_prompt_tokens": count(batch.teacher.attention_mask),
        "completion_tokens": count(batch.completion_mask),
    }


def describe_step(metrics: dict[str, float]) -> str:
    """One log line of a step's metrics: loss, learning rate, time, rollout throughput, MFU, evaluation."""
    parts = [
        f"loss {metrics['train/loss']:.4g}",
        f"lr {metrics['train/lr']:.3g}",
        f"{metrics['perf/step_seconds']:.2f} s",
        f"{metrics['perf/rollout_tokens_per_second']:.0f} rollout tokens/s",
    ]
    if "perf/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
    parts += [f"{name} {value:.4g}" for name, value in sorted(metrics.items()) if name.startswith("eval/")]
    return ", ".join(parts)


class Subset:
    """The examples `indices` of a random-access source, as a source (for grain)."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[self.indices[index]]


def clips_that_fit(
    builder: PromptBuilder, config: Config, directory: str, split: str, source, *, teacher: bool
) -> list[int] | None:
    """Checks every clip's prompt length against the buckets (`data.prompt_length`, and with `teacher`
    `data.teacher_prompt_length`) before training starts: an index pass over the text fields, the media
    token counts from the static frame shape and each clip's audio length.

    Returns None when every clip fits, else the indices that do (with `data.skip_long_prompts`, logging
    what was left out). Raises `ConfigError` naming the clips, their lengths and the setting to change.
    """
    data = config.data
    index = load_split(directory, split, decode_media=False)
    if not len(index):
        return None
    first = source[0]
    grid = ProcessorInputs()(first)["video_grid_thw"]  # every clip of a dataset has the same frame shape
    max_samples = np.asarray(first["audio"]).size
    text = lambda value: value.decode() if isinstance(value, bytes) else str(value)  # noqa: E731
    ids, clips = [], []
    for i in range(len(index)):
        example = index[i]
        ids.append(text(example["id"]))
        clips.append(
            dict(
                video_grid_thw=grid,
                video_second_per_grid=TEMPORAL_PATCH_SIZE / float(example["sample_fps"]),
                audio_frames=feature_frames(int(example["audio_length"]), max_samples),
                subtitle=text(example["subtitle"]),
                rationale=text(example["rationale"]) if teacher else "",
            )
        )
    lengths = prompt_lengths(builder, clips, config.prompt, use_audio_in_video=data.use_audio_in_video)
    teacher_limit = data.teacher_prompt_length or data.prompt_length
    over = [
        i for i in range(len(ids)) if lengths[i, 0] > data.prompt_length or (teacher and lengths[i, 1] > teacher_limit)
    ]
    if not over:
        return None
    where = f"{directory} ({split})"
    named = ", ".join(
        f"{ids[i]!r} ({lengths[i, 0]} student" + (f", {lengths[i, 1]} teacher" if teacher else "") + " tokens)"
        for i in over[:5]
    ) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
    limits = f"data.prompt_length={data.prompt_length}" + (
        f" / data.teacher_prompt_length={teacher_limit}" if teacher else ""
    )
    if data.skip_long_prompts:
        logger.warning(
            "left out %d of %d clips of %s whose prompts exceed %s (data.skip_long_prompts): %s",
            len(over),
            len(ids),
            where,
            limits,
            named,
        )
        left_out = set(over)
        return [i for i in range(len(ids)) if i not in left_out]
    needed = f"data.prompt_length to {max(int(lengths[over, 0].max()), data.prompt_length)}" + (
        f" and data.teacher_prompt_length to {max(int(lengths[over, 1].max()), teacher_limit)}" if teacher else ""
    )
    raise ConfigError(
        f"{where}: {len(over)} of {len(ids)} clips have prompts longer than {limits}: {named}; raise "
        f"{needed}, or set data.skip_long_prompts=true to leave them out"
    )


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss, gradient norm or parameters; the run stops without saving it."""

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        kept = (
            "no checkpoint was saved" if last_checkpoint is None else f"the last checkpoint is step {last_checkpoint}"
        )
        super().__init__(
            f"step {step}: {what}; stopped without saving this step ({kept}); lower train.lr or "
            "train.max_grad_norm, or check the data of this step"
        )
        self.step = step


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every float array of `tree` holds only finite values (one fused reduction)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class RunDirectoryError(ConfigError):
    """`run.output_dir` already holds a run and neither resuming nor overwriting it was asked for."""

    def __init__(self, directory: epath.Path, existing: list[str]):
        super().__init__(
            f"run.output_dir {directory} already holds a run ({', '.join(existing)}); continue it with --resume, "
            "pick a new run.output_dir, or replace it with --overwrite"
        )


def save_run_config(directory: epath.Path, config: Config) -> None:
    """`directory/config.yaml`: the resolved config of the run, what its readers (`opsd_jax.trained`) take."""
    (directory / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


RUN_FILES = ("config.yaml", "summary.json", "logs", "checkpoints")  # what a run writes under its output_dir


def existing_run_files(directory: epath.Path, steps: list[int] | None = None) -> list[str]:
    """What of a previous run `directory` holds: its files, and its checkpoints (`steps`, when a checkpoint
    manager already listed them; else any entry of checkpoints/)."""
    found = [name for name in ("config.yaml", "summary.json", "logs/metrics.jsonl") if (directory / name).exists()]
    checkpoints = directory / "checkpoints"
    if steps:
        found.append(f"checkpoints of steps {', '.join(map(str, sorted(steps)))}")
    elif steps is None and checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    return found


def clear_run_directory(directory: str | os.PathLike) -> None:
    """Removes what a run wrote under `directory` (`RUN_FILES`), nothing else; on process 0, the others wait."""
    directory = epath.Path(directory)
    if jax.process_index() == 0:
        for name in RUN_FILES:
            path = directory / name
            if path.is_dir():
                path.rmtree()
            elif path.exists():
                path.unlink()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("opsd_jax.train.clear_run_directory")


def train(
    config: Config,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    resume_step: int | None = None,
    require_checkpoint: bool = False,
    overwrite: bool = False,
) -> TrainingSummary:
    """Runs `opsd-jax train`. A run directory that already holds a run is refused before the model loads,
    unless `resume` (continue it) or `overwrite` (clear it first)."""
    initialize_distributed()
    output_dir = epath.Path(config.run.output_dir)
    resuming = resume or resume_step is not None or require_checkpoint
    if overwrite and resuming:
        raise ConfigError("--overwrite and --resume / --step / --require-checkpoint exclude each other")
    if overwrite:
        clear_run_directory(output_dir)
    elif not resuming and (existing := existing_run_files(output_dir)):
        raise RunDirectoryError(output_dir, existing)
    trainer = Trainer(config)
    try:
        return trainer.run(
            resume=resume, max_steps=max_steps, resume_step=resume_step, require_checkpoint=require_checkpoint
        )
    finally:
        trainer.checkpointer.close()
