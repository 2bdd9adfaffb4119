"""A shipped run config brought down to a tiny thinker and tiny clips, so that its first step runs on the CPU.

`build_tiny_run_files` writes what a run reads from disk: a tiny thinker checkpoint with the tiny
tokenizer, and a TFDS dataset of tiny generated clips (`train` and `test` splits). `shrink_config`
points a config at them and shrinks its sizes, keeping every setting that decides which code runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from etils import epath
from flax import nnx

from opsd_jax.checkpoint import RunCheckpointer
from opsd_jax.config import Config, ConfigError, load_config
from opsd_jax.data.builders import SyntheticAffectConfig, build_synthetic_affect, load_split
from opsd_jax.data.chat_template import PromptBuilder
from opsd_jax.data.pipeline import ProcessorInputs
from opsd_jax.models import lora
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.opsd import step as opsd_step
from opsd_jax.opsd.prompts import encode_clip_batch
from opsd_jax.sharding import make_mesh
from opsd_jax.testing.tokenizer import build_tiny_tokenizer
from opsd_jax.train import save_run_config

LABELS = ("happy", "sad")
# Prompt buckets are rounded up to this multiple, so that configs with the same prompt wording (and so
# the same longest prompt) compile the same shapes and share programs through the XLA cache.
PROMPT_BUCKET_MULTIPLE = 64
TINY_NEW_TOKENS = 4  # rollout and evaluation answer lengths: the decode loop runs, a few steps suffice
# Every setting `shrink_config` replaces (dotted); it keeps all others.
REPLACED_FIELDS = frozenset(
    {
        "model.checkpoint",
        "mesh.data",
        "mesh.fsdp",
        "mesh.tensor",
        "train.batch_size",
        "sampling.max_new_tokens",
        "sampling.eval_max_new_tokens",
        "sampling.prompt_buckets",
        "data.train_dir",
        "data.eval_dir",
        "data.train_split",
        "data.eval_split",
        "data.prompt_length",
        "data.teacher_prompt_length",
        "data.eval_clips",
        "run.output_dir",
    }
)


def tiny_affect_clips(split: str, config, *, train_clips: int = 8, test_clips: int = 4) -> Iterator[dict]:
    """Random clips (frames, 0.5 s of noise audio) of alternating labels, with a subtitle and a rationale."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    for index in range(train_clips if split == "train" else test_clips):
        label = LABELS[index % 2]
        yield dict(
            id=f"{split}{index}",
            frames=rng.integers(0, 256, config.frame_shape, dtype=np.uint8),
            sample_fps=2.0,
            audio=0.1 * rng.standard_normal(6000).astype(np.float32),
            task="basic",
            label=label,
            subtitle="hi" if label == "happy" else "oh",
            dataset="toy",
            rationale=f"it is {label}",
        )


def build_tiny_affect_dataset(directory: Path, *, train_clips: int = 8, test_clips: int = 4) -> Path:
    """A TFDS dataset of `tiny_affect_clips` (2 frames of 28 x 28: one video token; 0.5 s of audio);
    returns its directory (what `data.train_dir` names)."""
    generator = functools.partial(tiny_affect_clips, train_clips=train_clips, test_clips=test_clips)
    return build_synthetic_affect(
        Path(directory),
        SyntheticAffectConfig(
            name="toy",
            num_frames=2,
            height=28,
            width=28,
            max_audio_seconds=0.5,
            generator=generator,
            splits=("train", "test"),
        ),
    )


@dataclasses.dataclass(frozen=True)
class TinyRunFiles:
    """What a tiny run reads: a thinker checkpoint directory (with tokenizer) and a dataset directory."""

    checkpoint: Path
    dataset: Path
    train_clips: int


def build_tiny_run_files(root: Path, thinker: Path, *, train_clips: int = 8, test_clips: int = 4) -> TinyRunFiles:
    """Copies the saved tiny `thinker` (e.g. `opsd_jax.testing.reference.save_reference_thinker`'s output)
    under `root`, adds the tiny tokenizer, and builds the tiny dataset beside it."""
    root = Path(root)
    checkpoint = root / "thinker"
    shutil.copytree(thinker, checkpoint)
    build_tiny_tokenizer(checkpoint)
    dataset = build_tiny_affect_dataset(root / "data", train_clips=train_clips, test_clips=test_clips)
    return TinyRunFiles(checkpoint=checkpoint, dataset=dataset, train_clips=train_clips)


def longest_prompts(config: Config, files: TinyRunFiles) -> tuple[int, int]:
    """(student, teacher) token counts of the longest prompts of the tiny dataset (both splits) under
    `config`'s prompt wording and audio layout: what the shrunk length buckets must hold."""
    builder = PromptBuilder.from_pretrained(files.checkpoint)
    processor = ProcessorInputs()
    clips = []
    for split in ("train", "test"):
        source = load_split(files.dataset, split)
        clips += [processor(source[i]) for i in range(len(source))]
    inputs = encode_clip_batch(
        builder, clips, config.prompt, length=None, with_teacher=True, use_audio_in_video=config.data.use_audio_in_video
    )
    return inputs["input_ids"].shape[1], inputs["teacher_input_ids"].shape[1]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def shrink_mesh_axes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """A config's mesh axes brought to `num_devices` (a power of two >= 8 covers up to three split axes).

    Every axis the config splits stays split: a fixed size above 1 becomes 2, the -1 axis (or, without
    one, the config's largest axis) takes the remaining devices, and axes of size 1 stay 1.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    auto = [name for name, size in sizes.items() if size == -1]
    rest = auto[0] if auto else max(sizes, key=lambda name: sizes[name])
    shrunk = {name: (1 if size == 1 else 2) for name, size in sizes.items() if name != rest}
    fixed = math.prod(shrunk.values())
    if num_devices % fixed or num_devices // fixed < (2 if sizes[rest] != 1 else 1):
        raise ValueError(f"mesh {sizes} cannot keep its split axes on {num_devices} devices")
    shrunk[rest] = num_devices // fixed
    return shrunk["data"], shrunk["fsdp"], shrunk["tensor"]


def shrink_config(
    config: Config,
    files: TinyRunFiles,
    *,
    output_dir: str | Path,
    num_devices: int,
    prompt_lengths: tuple[int, int],
) -> Config:
    """`config` at tiny scale on `num_devices` CPU devices, pointed at `files`. Pure.

    Kept (every field not in `REPLACED_FIELDS`), because they decide which code runs or what it computes: `model.dtype`, `model.param_dtype`,
    `model.remat`, `model.attention`; the whole `teacher` section (mode, EMA rate, rationale or not, every loss weight),
    `loss` and `prompt` sections; `sampling.num_samples` (G), temperature, top-k, top-p;
    `train.grad_accum_steps` (the number of micro-batches the step's scan accumulates),
    `train.train_encoders` and the optimizer settings (learning rate, schedule, clipping, decay, Adam);
    `data.use_audio_in_video`, `data.answer_length`, `data.worker_count` (grain worker processes), and
    whether the teacher has its own prompt bucket; the `run` section's checkpointing (async or not, what
    is kept, best metric) and cadences (a one-step run evaluates, logs and saves at its last step anyway);
    `mesh.logical_axis_rules`.

    Replaced, because a tiny model on the CPU needs them smaller or the files are elsewhere:
      * `model.checkpoint`, `data.train_dir` / `eval_dir` and their splits, `run.output_dir`: `files`
        and `output_dir` (the architecture comes from the tiny checkpoint);
      * `mesh`: `shrink_mesh_axes` (every axis the config splits stays split, on `num_devices`);
      * `train.batch_size`: `grad_accum_steps` micro-batches of the fewest prompts whose G rollouts
        split evenly over the batch-carrying devices (data x fsdp), so rows are really sharded as on the
        slice; never more prompts than the tiny dataset's training split holds per step;
      * `data.prompt_length` (and `teacher_prompt_length` when the config sets one): the longest tiny
        prompts of this config's wording (`prompt_lengths`, from `longest_prompts`), rounded up to
        `PROMPT_BUCKET_MULTIPLE`; without a teacher bucket one bucket holds both prompts, as on the
        slice; `sampling.prompt_buckets` is that one bucket;
      * `sampling.max_new_tokens` / `eval_max_new_tokens`: `TINY_NEW_TOKENS`;
      * `data.eval_clips`: one evaluation batch (the step's prompts per micro-batch).
    """
    student, teacher = prompt_lengths
    data, fsdp, tensor = shrink_mesh_axes(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
    batch_devices = data * fsdp
    samples = config.sampling.num_samples
    prompts = batch_devices // math.gcd(samples, batch_devices)  # fewest prompts with rows % batch_devices == 0
    micro_batches = config.train.grad_accum_steps
    if prompts * micro_batches > files.train_clips:
        raise ConfigError(
            f"train.grad_accum_steps: {micro_batches} micro-batches of {prompts} prompts need {prompts * micro_batches} "
            f"training clips; the tiny dataset has {files.train_clips}"
        )
    if config.data.teacher_prompt_length is None:
        prompt_length, teacher_length = _round_up(max(student, teacher), PROMPT_BUCKET_MULTIPLE), None
    else:
        prompt_length = _round_up(student, PROMPT_BUCKET_MULTIPLE)
        teacher_length = max(prompt_length, _round_up(teacher, PROMPT_BUCKET_MULTIPLE))
    shrunk = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, checkpoint=str(files.checkpoint)),
        mesh=dataclasses.replace(config.mesh, data=data, fsdp=fsdp, tensor=tensor),
        train=dataclasses.replace(config.train, batch_size=prompts * micro_batches),
        sampling=dataclasses.replace(
            config.sampling,
            max_new_tokens=TINY_NEW_TOKENS,
            eval_max_new_tokens=TINY_NEW_TOKENS,
            prompt_buckets=(prompt_length,),
        ),
        data=dataclasses.replace(
            config.data,
            train_dir=str(files.dataset),
            eval_dir=str(files.dataset),
            train_split="train",
            eval_split="test",
            prompt_length=prompt_length,
            teacher_prompt_length=teacher_length,
            eval_clips=prompts,
        ),
        run=dataclasses.replace(config.run, output_dir=str(output_dir)),
    )
    shrunk.validate(num_devices)
    return shrunk


def write_tiny_run(config: Config, steps: tuple[int, ...] = (1,), *, noise: float = 0.05) -> list:
    """A run directory (`config.run.output_dir`) as `opsd-jax train` leaves it, without running a step: its
    config.yaml and a sealed checkpoint of the train state (`opsd_jax.opsd.step.init_state`, what
    `TrainState.saved` keeps) per step, the trained parameters plus `noise` x N(0, 1) (another draw per step),
    so that a reader that ignored the checkpoint, or took another step, would hold other parameters. The
    trained parameters are the base checkpoint's, or with `model.lora` the adapters on it (`lora_b` no longer
    zero: the adapted model differs from its base). Returns the saved parameter trees (numpy, float32), one
    per step."""
    output_dir = epath.Path(config.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(output_dir, config)
    mesh = make_mesh(config.mesh)
    model = from_pretrained(config.model.checkpoint, mesh=mesh, rules=config.mesh.axis_rules())
    if config.model.lora is not None:
        model = lora.apply_lora(
            model, config.model.lora, seed=config.train.seed, mesh=mesh, rules=config.mesh.axis_rules()
        )
    params = nnx.state(model, lora.trainable_filter(model))
    tx = opsd_step.make_optimizer(config.train, params)
    checkpointer = RunCheckpointer(output_dir / "checkpoints", keep_last=len(steps), keep_best=0, async_save=False)
    saved = []
    for step in steps:
        rng = np.random.default_rng(step)
        noisy = jax.tree.map(
            lambda x, rng=rng: jax.device_put(
                np.asarray(x) + noise * rng.standard_normal(x.shape).astype(np.float32), x.sharding
            ),
            params,
        )
        nnx.update(model, noisy)
        state = opsd_step.init_state(model, tx, config.teacher, mesh, train_encoders=config.train.train_encoders)
        base = config.model.checkpoint if state.frozen is not None else None
        checkpointer.save(step, state.saved(), rng=jax.random.key(0), base_checkpoint=base)
        saved.append(jax.tree.map(np.asarray, noisy))
    checkpointer.close()
    return saved


def tiny_run_directory(checkpoint: Path, output_dir: Path, *overrides: str, steps: tuple[int, ...] = (1, 2)) -> Path:
    """`write_tiny_run` of the default config on `checkpoint` with `overrides`, its mesh over every device;
    returns the run directory."""
    config = load_config(
        None, [f"model.checkpoint={checkpoint}", f"run.output_dir={output_dir}", "mesh.fsdp=-1", *overrides]
    )
    write_tiny_run(config, steps)
    return Path(output_dir)
