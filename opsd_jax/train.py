"""The training run: data -> rollouts -> teacher scores -> update, with evaluation, logs and checkpoints.

Every process of a multi-host run executes this same program on its shard of the data. Per step:

1. the next batch of clips from the grain pipeline (this process's shard), its student and teacher
   prompts tokenized to one length bucket and prepared (`prepare_inputs`) per micro-batch;
2. `num_samples` rollouts per prompt from the live student (`opsd_jax.sampling.generate`), with a
   PRNG key folded from the run's key and the step, so a resumed run samples what the uninterrupted
   one would have;
3. one jitted update (`opsd_jax.opsd.step`): student forward, teacher forward, loss, optax, EMA.

Checkpoints (`opsd_jax.checkpoint`) hold the state and the iterator position; SIGTERM (TPU
preemption) saves and exits cleanly; `resume=True` continues from the newest complete checkpoint.
Only process 0 writes logs (JSONL and TensorBoard) and shows the progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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

from opsd_jax.checkpoint import RunCheckpointer, abstract_like
from opsd_jax.config import Config
from opsd_jax.data.builders import load_split
from opsd_jax.data.chat_template import PromptBuilder
from opsd_jax.data.pipeline import PipelineConfig, ProcessorInputs, make_iterator
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, from_pretrained
from opsd_jax.opsd import step as opsd_step
from opsd_jax.opsd.prompts import encode_clip_batch
from opsd_jax.sampling import GenerationOutput, generate
from opsd_jax.sharding import make_mesh, to_host

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


def predicted_label(text: str, vocabulary: list[str]) -> str | None:
    """The label of a free-text answer: within the `<answer>` part if present, the vocabulary word that
    comes last (an explanation names its conclusion last, after any cue it weighs against)."""
    lowered = text.lower()
    start, end = lowered.find("<answer>"), lowered.find("</answer>")
    if start >= 0 and end > start:
        lowered = lowered[start + len("<answer>") : end]
    hits = [(lowered.rfind(word), word) for word in vocabulary if word in lowered]
    return max(hits)[1] if hits else None


def classification_scores(predicted: list[str | None], truth: list[str], vocabulary: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over `vocabulary` (an unparseable answer counts as wrong)."""
    correct = [p == t for p, t in zip(predicted, truth)]
    f1s = []
    for label in vocabulary:
        tp = sum(p == label and t == label for p, t in zip(predicted, truth))
        fp = sum(p == label and t != label for p, t in zip(predicted, truth))
        fn = sum(p != label and t == label for p, t in zip(predicted, truth))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(correct)) if correct else 0.0, "macro_f1": float(np.mean(f1s))}


def _stable_hash(text: str) -> int:
    """A process-independent 31-bit hash (Python's `hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


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
    from jax.experimental import multihost_utils

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


class MetricsWriter:
    """JSONL and TensorBoard event files under the run directory; a no-op on every process but 0."""

    def __init__(self, directory: epath.Path):
        self.enabled = jax.process_index() == 0
        self.handle = None
        self.board = None
        if self.enabled:
            directory.mkdir(parents=True, exist_ok=True)
            self.handle = (directory / "metrics.jsonl").open("a")
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(str(directory / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.handle.flush()
        for name, value in metrics.items():
            self.board.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            self.board.close()


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
        self.mesh = make_mesh(config.mesh)
        dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
        param_dtype = jnp.bfloat16 if config.model.param_dtype == "bfloat16" else jnp.float32
        self.model = model if model is not None else from_pretrained(
            config.model.checkpoint, dtype=dtype, mesh=self.mesh, param_dtype=param_dtype, remat=config.model.remat
        )
        self.builder = PromptBuilder.from_pretrained(config.model.checkpoint)
        self.output_dir = epath.Path(config.run.output_dir)  # local or gs://: every host must see it
        params = nnx.state(self.model, nnx.Param)
        self.tx = opsd_step.make_optimizer(config.train, params)
        self.settings = opsd_step.StepSettings(
            graphdef=nnx.graphdef(self.model), tx=self.tx, loss=config.loss, teacher=config.teacher,
            train_encoders=config.train.train_encoders, mesh=self.mesh,
        )
        self.state = opsd_step.init_state(self.model, self.tx, config.teacher, self.mesh)
        self.step_fn = opsd_step.make_train_step(self.settings, self.state)
        self.key = jax.random.key(config.train.seed)
        self.checkpointer = RunCheckpointer(
            self.output_dir / "checkpoints", keep_last=config.run.keep_last, keep_best=config.run.keep_best,
            best_metric=config.run.best_metric, async_save=config.run.async_checkpointing,
        )
        self.iterator = self._train_iterator()
        self.vocabulary: list[str] | None = None
        self._stop = False

    # ---------------------------------------------------------------------------------------- data

    def _train_iterator(self):
        data = self.config.data
        local_batch = self.config.train.batch_size // jax.process_count()
        if local_batch * jax.process_count() != self.config.train.batch_size:
            raise ValueError(
                f"train.batch_size: {self.config.train.batch_size} prompts do not split over {jax.process_count()} processes"
            )
        source = load_split(data.train_dir, data.train_split)
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
            inputs = encode_clip_batch(
                self.builder, part, self.config.prompt, length=self.config.data.prompt_length,
                use_audio_in_video=self.config.data.use_audio_in_video, with_teacher=True,
                teacher_length=self.config.data.teacher_prompt_length,
            )
            if not self.config.teacher.use_rationale:
                inputs["teacher_input_ids"] = inputs["input_ids"]
                inputs["teacher_attention_mask"] = inputs["attention_mask"]
            out.append((inputs, part))
        return out

    def _prepare(self, inputs: dict[str, Any]):
        media = {name: value for name, value in inputs.items() if not name.startswith(("input_ids", "attention_mask", "teacher_"))}
        student = self.model.prepare_inputs(inputs["input_ids"], attention_mask=inputs["attention_mask"], **media)
        teacher = self.model.prepare_inputs(inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"], **media)
        return student, teacher

    # -------------------------------------------------------------------------------------- a step

    def _label_ids(self, clips: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """The reference answers (`prompt.answer_template`, then EOS), right-padded: for the cross-entropy terms."""
        tokenizer = self.builder.tokenizer

        def target(clip: dict[str, Any]) -> str:
            answer = self.config.prompt.answer_template.format(label=str(clip.get("label", "")))
            return f"{clip.get('rationale', '')} {answer}" if self.config.teacher.label_ce_target == "rationale" else answer

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
        return np.asarray([float(predicted_label(text, vocabulary) == str(clips[i // group].get("label", "")))
                           for i, text in enumerate(texts)], np.float32)

    def _vocabulary(self) -> list[str]:
        if self.vocabulary is None:
            source = load_split(self.config.data.train_dir, self.config.data.train_split)
            labels = {str(source[i]["label"].decode() if isinstance(source[i]["label"], bytes) else source[i]["label"])
                      for i in range(len(source))}
            self.vocabulary = sorted(label for label in labels if label)
        return self.vocabulary

    def _no_rollouts(self, prompts: int) -> GenerationOutput:
        """Empty completions for objectives that need none (pure cross-entropy): no sampling cost."""
        rows, new = prompts * self.config.sampling.num_samples, self.config.sampling.max_new_tokens
        zeros = jnp.zeros((rows, new), jnp.float32)
        return GenerationOutput(tokens=jnp.full((rows, new), self.builder.pad_token_id, jnp.int32), logprobs=zeros,
                                model_logprobs=zeros, mask=jnp.zeros((rows, new), bool))

    def make_step_batch(self, clips: list[dict[str, Any]], step: int) -> opsd_step.StepBatch:
        sampling = self.config.sampling
        teacher = self.config.teacher
        micro = []
        for index, (inputs, part) in enumerate(self._micro_batches(clips)):
            student, teacher_inputs = self._prepare(inputs)
            # One key per clip, from its id: rollouts do not depend on the process layout or batch order.
            step_key = jax.random.fold_in(self.key, step)
            key = jnp.stack([jax.random.fold_in(step_key, _stable_hash(str(clip["id"]))) for clip in part])
            if teacher.distill_weight == 0 and teacher.label_pg_weight == 0:
                out = self._no_rollouts(len(part))
            else:
                out = generate(
                    self.model, student, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, eos_token_id=self.builder.tokenizer.eos_token_id,
                    pad_token_id=self.builder.pad_token_id, num_samples=sampling.num_samples, seed=key, mesh=self.mesh,
                )
            tokens, mask = to_host(out.tokens), to_host(out.mask)
            rewards = self._rewards(tokens, mask, part) if teacher.label_pg_weight > 0 else np.zeros(len(tokens), np.float32)
            label_ids, label_mask = self._label_ids(part)
            micro.append(opsd_step.StepBatch(
                student=student, teacher=teacher_inputs, completion=out.tokens, completion_mask=out.mask,
                sampler_logprobs=out.logprobs, rewards=jnp.asarray(rewards), label_ids=jnp.asarray(label_ids),
                label_mask=jnp.asarray(label_mask),
            ))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro)
        return opsd_step.place_step_batch(stacked, self.mesh)

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
        the answer names none). Prompts as in `evaluate`."""
        data = self.config.data
        source = load_split(eval_dir or data.eval_dir, data.eval_split)
        count = min(len(source), data.eval_clips) if data.eval_clips else len(source)
        processor = ProcessorInputs()
        vocabulary = self._vocabulary()
        rows: list[dict[str, str | None]] = []
        batch_size = max(1, self.config.train.batch_size // self.config.train.grad_accum_steps)
        for start in range(0, count, batch_size):
            clips = [processor(source[i]) for i in range(start, min(count, start + batch_size))]
            inputs = encode_clip_batch(self.builder, clips, self.config.prompt, length=data.prompt_length,
                                       use_audio_in_video=data.use_audio_in_video, with_teacher=with_rationale,
                                       teacher_length=data.teacher_prompt_length)
            if with_rationale:
                inputs["input_ids"] = inputs.pop("teacher_input_ids")
                inputs["attention_mask"] = inputs.pop("teacher_attention_mask")
            ids = inputs.pop("input_ids")
            out = generate(self.model, {"input_ids": ids, **inputs}, max_new_tokens=self.config.sampling.eval_max_new_tokens,
                           temperature=0.0, eos_token_id=self.builder.tokenizer.eos_token_id,
                           pad_token_id=self.builder.pad_token_id, mesh=self.mesh)
            tokens, mask = to_host(out.tokens), to_host(out.mask)
            for clip, row, m in zip(clips, tokens, mask):
                text = self.builder.tokenizer.decode(row[m], skip_special_tokens=True)
                rows.append({"id": str(clip["id"]), "subtitle": str(clip.get("subtitle", "")),
                             "label": str(clip["label"]), "predicted": predicted_label(text, vocabulary)})
        return rows

    # ------------------------------------------------------------------------------------- the loop

    def restore(self) -> int:
        """Continues from the newest complete checkpoint; returns the step to run next (0 if none)."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return 0
        state, meta = self.checkpointer.restore(latest, abstract_like(self.state), data_iterator=self.iterator)
        self.state = state
        if meta.get("rng") is not None:
            self.key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        nnx.update(self.model, self.state.params)
        return int(latest)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        logger.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self._stop = True

    def save(self, step: int, metrics: dict[str, float] | None = None, *, force: bool = False) -> None:
        self.checkpointer.save(step, self.state, data_iterator=self.iterator, rng=self.key, metrics=metrics, force=force)

    def run(self, *, resume: bool = False, max_steps: int | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainingSummary:
        """Trains until `train.total_steps` (or `max_steps` more steps), then writes a summary."""
        from tqdm import tqdm

        config = self.config
        start = self.restore() if resume else 0
        end = config.train.total_steps if max_steps is None else min(config.train.total_steps, start + max_steps)
        writer = MetricsWriter(self.output_dir / "logs")
        if jax.process_index() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        losses: list[float] = []
        evals: list[dict[str, float]] = []
        metrics: dict[str, float] = {}
        began = time.perf_counter()
        bar = tqdm(total=end - start, desc="train", unit="step", disable=jax.process_index() != 0)
        step = start
        try:
            while step < end and not self._stop:
                clips = _clips(gather_global_batch(next(self.iterator)))
                batch = self.make_step_batch(clips, step)
                self.state, device_metrics = self.step_fn(self.state, batch)
                nnx.update(self.model, self.state.params)
                step += 1
                metrics = {f"train/{k}": float(v) for k, v in jax.device_get(device_metrics).items()}
                losses.append(metrics["train/loss"])
                if step % config.run.eval_every == 0 or step == end:
                    evaluation = self.evaluate()
                    if evaluation:
                        evals.append({"step": step, **evaluation})
                        metrics.update(evaluation)
                if step % config.run.log_every == 0 or step == end:
                    writer.write(step, metrics)
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
        summary = TrainingSummary(steps=step, losses=losses, final_metrics=metrics, eval_history=evals,
                                  seconds=time.perf_counter() - began, preempted=self._stop)
        if jax.process_index() == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2))
            logger.info("trained to step %d in %.1fs; final %s", step, summary.seconds, metrics)
        return summary


def train(config: Config, *, resume: bool = False, max_steps: int | None = None) -> TrainingSummary:
    """Runs `opsd-jax train`."""
    trainer = Trainer(config)
    try:
        return trainer.run(resume=resume, max_steps=max_steps)
    finally:
        trainer.checkpointer.close()
