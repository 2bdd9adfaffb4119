"""Every program a training run compiles, built from abstract inputs at a config's shapes and compiled
for a TPU topology (or any device list), with what each compiled program reports.

The programs are the trainer's own (`opsd_jax.opsd.step.make_train_step`,
`opsd_jax.sampling.sampler.compile_generation`), called with `jax.ShapeDtypeStruct`s that carry the
shardings the trainer gives the real arrays (`param_shardings`, `step_batch_shardings`,
`input_shardings`), so what compiles here is what the run compiles there:

* `train_step`: the update over `grad_accum_steps` micro-batches (memory);
* `train_micro_step`: the same update over one micro-batch (XLA's cost model: the micro-batch loop is
  a `while`, whose time the cost model leaves out), when `grad_accum_steps > 1`;
* `rollout_prefill` / `rollout_decode`: the student's sampling of one micro-batch's rollouts (the whole
  step's with `sampling.rollout_batch: step`);
* `eval_prefill` / `eval_decode`: greedy answers of the held-out evaluation.
* `reader_prefill` / `reader_decode`: `opsd-jax eval` / `generate` from the run: the same greedy answers
  with the parameters alone on the mesh, in bfloat16 (`opsd_jax.trained.load_thinker`), nothing else resident.
Teacher scoring runs inside the update (one batched forward), so it has no program of its own.

A prompt is laid out as the chat template lays out a clip (`opsd_jax.data.chat_template`): the video's
placeholders interleaved with its audio track's, text tokens around them, left-padded to the config's
length; the media arrays have the shapes of the dataset's clips (`ClipShape`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opsd_jax.compile_check.hlo import summarize
from opsd_jax.config import Config, ConfigError
from opsd_jax.data.audio_features import HOP_LENGTH, SAMPLING_RATE
from opsd_jax.data.chat_template import VideoPart, audio_in_video_runs, audio_token_count, vision_token_count
from opsd_jax.models import lora
from opsd_jax.models.precision import in_compute_dtype
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig, ThinkerInputs, input_shardings
from opsd_jax.opsd import step as opsd_step
from opsd_jax.sampling.decode_weights import generation_model
from opsd_jax.sampling.sampler import compile_generation, sampling_settings
from opsd_jax.sharding import make_mesh, param_shardings
from opsd_jax.sharding.topology import Chip

logger = logging.getLogger(__name__)

TEXT_TOKEN = 9  # an ordinary token id for the template, subtitle, instruction and rationale text
PAD_TOKEN = 151643  # <|endoftext|>
EOS_TOKEN = 151645  # <|im_end|>


@dataclasses.dataclass(frozen=True)
class ClipShape:
    """The static shape of a dataset's clips and of the text around them.

    The defaults are the MER builder's (`opsd_jax.data.builders.ClipConfig`: 16 frames of 224 x 224,
    30 s of audio), which the shipped configs' budgets assume; `text_tokens` is the student prompt's
    text (system prompt, subtitle, instruction), `rationale_tokens` what the teacher's adds.
    """

    num_frames: int = 16
    height: int = 224
    width: int = 224
    audio_seconds: float = 30.0
    sample_fps: float = 2.0
    text_tokens: int = 160
    rationale_tokens: int = 320


@dataclasses.dataclass
class ProgramReport:
    """What one compiled program reports, per chip. Bytes are bytes; FLOPs are per run of the program."""

    name: str
    description: str
    compiled: bool = False
    error: str | None = None
    compile_seconds: float = 0.0
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    hbm_bytes: float = 0.0
    xla_flops: float = 0.0  # cost_analysis: loop bodies counted once
    flops: float = 0.0  # per run: loop bodies times their trip counts (see `analyse`)
    cost_model_seconds: float | None = None  # XLA's TPU cost model; loop bodies counted once
    # Instructions the cost model does not price (`hlo.UNPRICED_CUSTOM_CALLS`): it gives -1 s for each, added back
    # into `cost_model_seconds` (those priced at 0).
    unpriced_custom_calls: int = 0
    # Pallas kernels per run: the cost model prices them at about nothing and `xla_flops` / `flops` leave their
    # FLOPs out (for the splash attention kernel see `opsd_jax.models.splash`).
    pallas_kernel_calls: int = 0
    compute_seconds: float = 0.0  # xla_flops at the chip's bf16 peak: the cost model's own counting
    bytes_accessed: float = 0.0  # XLA's count: every operand and result, on-chip memory included
    loop_hbm_bytes: float = 0.0  # one iteration of the program's open-ended loop (the decode), HBM only
    collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    largest_loop_collective: float = 0.0
    loops: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)
    per_token: dict[str, float] | None = None

    @property
    def peak(self) -> float:
        return self.memory.get("peak", 0.0) + self.memory.get("resident", 0.0)

    @property
    def spare(self) -> float:
        """The fraction of HBM left at the program's peak."""
        return 1.0 - self.peak / self.hbm_bytes if self.hbm_bytes else 0.0


def bytes_per_chip(tree: Any) -> float:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s / arrays (the largest shard)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_thinker(thinker: ThinkerConfig, config: Config, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its variables as sharded `ShapeDtypeStruct`s, as `from_pretrained` places them
    (every floating-point parameter stored in `model.param_dtype`); with `model.lora`, the thinker as
    `lora.apply_lora` adapts it (adapters beside the base weights, QLoRA's kernels quantized, `base_dtype`
    dtype's base weights in `model.dtype`)."""
    dtype = jnp.dtype(config.model.dtype)
    param_dtype = jnp.dtype(config.model.param_dtype)

    def build() -> Qwen2_5OmniThinker:
        model = Qwen2_5OmniThinker(
            thinker,
            dtype=dtype,
            rngs=nnx.Rngs(0),
            remat=config.model.remat,
            remat_policy=config.model.remat_policy,
            attention=config.model.attention,
        )
        return model if config.model.lora is None else lora.apply_lora(model, config.model.lora)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
        state,
    )
    if config.model.lora is not None and config.model.lora.base_dtype == "dtype":  # as `apply_lora` casts the base
        state = in_compute_dtype(state, dtype, where=lambda path: not lora.is_adapter(path))
    return graphdef, _abstract(state, param_shardings(state, mesh, config.mesh.axis_rules()))


def abstract_train_state(
    params: nnx.State, config: Config, mesh: Mesh, frozen: nnx.State | None = None
) -> tuple[opsd_step.TrainState, Any]:
    """The trainer's `init_state` as sharded `ShapeDtypeStruct`s (optimizer moments follow their
    parameters, scalars replicated), and the optimizer. With LoRA `params` are the adapters and `frozen` the
    base weights; a frozen teacher is then the base itself (no copy), as `init_state` keeps it. The teacher's
    copy is `opsd_step.teacher_copy`'s, as `init_state` makes it (its leaves placed as their parameters)."""
    tx = opsd_step.make_optimizer(config.train, params)
    teacher_params = opsd_step.teacher_copy(
        params,
        config.teacher,
        train_encoders=config.train.train_encoders,
        dtype=jnp.dtype(config.model.dtype),
        adapted=frozen is not None,
    )

    def init(p):
        return opsd_step.TrainState(step=jnp.int32(0), params=p, opt_state=tx.init(p), teacher_params=None)

    shapes = jax.eval_shape(init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_tree = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax_param_shardings(shapes.opt_state, params, replicated)
    shardings = opsd_step.TrainState(step=replicated, params=param_tree, opt_state=opt_shardings, teacher_params=None)
    return _abstract(shapes, shardings).replace(teacher_params=teacher_params, frozen=frozen), tx


def optax_param_shardings(opt_state: Any, params: Any, replicated: NamedSharding) -> Any:
    """Shardings of an optimizer state: a leaf whose key path ends with a parameter's path (Adam's moments,
    under whatever chain or partition of transforms) and has its shape takes that parameter's sharding,
    as `tx.init` on the placed parameters gives it; everything else (counts) is replicated."""

    def names(path) -> tuple[str, ...]:
        return tuple(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)

    by_path = {names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    depth = max(map(len, by_path), default=0)

    def sharding(path, leaf):
        key = names(path)
        for start in range(max(len(key) - depth, 0), len(key)):
            param = by_path.get(key[start:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, opt_state)


def prompt_ids(
    thinker: ThinkerConfig,
    grid: tuple[int, int, int],
    second_per_grid: float,
    audio_frames: int,
    *,
    text_tokens: int,
    length: int,
    use_audio_in_video: bool,
    setting: str = "data.prompt_length",
) -> np.ndarray:
    """One clip's prompt `[length]`, left-padded: text, the clip's placeholders as the chat template lays
    them out, text. The count of real tokens must fit `length`."""
    ids = thinker.positions
    video_part = VideoPart(grid, second_per_grid, audio_frames if use_audio_in_video else None)
    if use_audio_in_video:
        runs = audio_in_video_runs(
            video_part, position_id_per_seconds=ids.position_id_per_seconds, seconds_per_chunk=ids.seconds_per_chunk
        )
        body = [ids.video_token_id if kind == "video" else ids.audio_token_id for kind, n in runs for _ in range(n)]
        media = [
            ids.vision_start_token_id,
            ids.audio_start_token_id,
            *body,
            ids.audio_end_token_id,
            ids.vision_end_token_id,
        ]
    else:
        media = (
            [ids.vision_start_token_id]
            + [ids.video_token_id] * vision_token_count(grid)
            + [ids.vision_end_token_id]
            + [ids.audio_start_token_id]
            + [ids.audio_token_id] * audio_token_count(audio_frames)
            + [ids.audio_end_token_id]
        )
    head = text_tokens // 2
    tokens = [TEXT_TOKEN] * head + media + [TEXT_TOKEN] * (text_tokens - head)
    if len(tokens) > length:
        raise ConfigError(
            f"{setting}: a clip's prompt has {len(tokens)} tokens ({len(media)} of media, {text_tokens} of "
            f"text), more than {length}; raise {setting} or plan shorter clips or text"
        )
    return np.asarray([PAD_TOKEN] * (length - len(tokens)) + tokens, np.int32)


def prepared_prompts(
    model: Qwen2_5OmniThinker,
    thinker: ThinkerConfig,
    clips: int,
    clip: ClipShape,
    *,
    length: int,
    text_tokens: int,
    use_audio_in_video: bool,
    setting: str,
) -> ThinkerInputs:
    """`clips` prompts with their media, prepared on the host as the trainer prepares a micro-batch."""
    vision = thinker.vision
    grid = (
        clip.num_frames // vision.temporal_patch_size,
        clip.height // vision.patch_size,
        clip.width // vision.patch_size,
    )
    second_per_grid = vision.temporal_patch_size / clip.sample_fps
    mel_frames = int(round(clip.audio_seconds * SAMPLING_RATE)) // HOP_LENGTH
    row = prompt_ids(
        thinker,
        grid,
        second_per_grid,
        mel_frames,
        text_tokens=text_tokens,
        length=length,
        use_audio_in_video=use_audio_in_video,
        setting=setting,
    )
    ids = np.repeat(row[None], clips, axis=0)
    patch_width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return model.prepare_inputs(
        ids,
        attention_mask=(ids != PAD_TOKEN).astype(np.int32),
        pixel_values_videos=np.zeros((clips * math.prod(grid), patch_width), np.float32),
        video_grid_thw=np.asarray([grid] * clips),
        video_second_per_grid=np.full((clips,), second_per_grid, np.float32),
        input_features=np.zeros((clips, thinker.audio.num_mel_bins, mel_frames), np.float32),
        feature_attention_mask=np.ones((clips, mel_frames), np.int32),
        use_audio_in_video=use_audio_in_video,
    )


def _abstract_inputs(inputs: ThinkerInputs) -> ThinkerInputs:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), inputs)


def abstract_step_batch(
    student: ThinkerInputs, teacher: ThinkerInputs, config: Config, mesh: Mesh, micro_batches: int
) -> opsd_step.StepBatch:
    """`micro_batches` stacked micro-batches of the config's sizes, sharded as `place_step_batch` shards them."""
    prompts = student.input_ids.shape[0]
    rows = prompts * config.sampling.num_samples
    new, answer = config.sampling.max_new_tokens, config.data.answer_length
    batch = opsd_step.StepBatch(
        student=_abstract_inputs(student),
        teacher=_abstract_inputs(teacher),
        completion=jax.ShapeDtypeStruct((rows, new), jnp.int32),
        completion_mask=jax.ShapeDtypeStruct((rows, new), jnp.bool_),
        sampler_logprobs=jax.ShapeDtypeStruct((rows, new), jnp.float32),
        rewards=jax.ShapeDtypeStruct((rows,), jnp.float32),
        label_ids=jax.ShapeDtypeStruct((prompts, answer), jnp.int32),
        label_mask=jax.ShapeDtypeStruct((prompts, answer), jnp.bool_),
    )
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((micro_batches,) + x.shape, x.dtype), batch)
    return _abstract(stacked, opsd_step.step_batch_shardings(stacked, mesh, config.mesh.axis_rules()))


def analyse(report: ProgramReport, compiled: jax.stages.Compiled, chip: Chip, *, resident: float = 0.0) -> None:
    """Fills `report` from a compiled program: memory, FLOPs, cost model, collectives."""
    memory = compiled.memory_analysis()
    report.memory = {
        "arguments": float(memory.argument_size_in_bytes),
        "outputs": float(memory.output_size_in_bytes),
        "aliased": float(memory.alias_size_in_bytes),
        "temporaries": float(memory.temp_size_in_bytes),
        "code": float(memory.generated_code_size_in_bytes),
    }
    report.memory["peak"] = (
        report.memory["arguments"]
        + report.memory["outputs"]
        - report.memory["aliased"]
        + report.memory["temporaries"]
        + report.memory["code"]
    )
    report.memory["resident"] = float(resident)
    report.hbm_bytes = float(chip.hbm_bytes)
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else (costs or {})
    report.xla_flops = float(costs.get("flops", 0.0))
    report.bytes_accessed = float(costs.get("bytes accessed", 0.0))
    hlo = summarize(compiled.as_text())
    report.unpriced_custom_calls = hlo.unpriced_custom_calls
    report.pallas_kernel_calls = hlo.pallas_kernel_calls
    seconds = float(costs["optimal_seconds"]) + hlo.unpriced_custom_calls if "optimal_seconds" in costs else -1.0
    report.loops = hlo.loops
    # The cost model gives no valid time for a `while` (it counts its body once): only loop-free
    # programs, or loops of known trip count whose bodies the FLOPs below scale, get a time.
    report.cost_model_seconds = seconds if seconds > 0 and all(n is not None for _, n in hlo.loops) else None
    report.compute_seconds = report.xla_flops / chip.bf16_flops
    report.flops = report.xla_flops + hlo.uncounted_loop_flops
    report.collectives = hlo.by_kind()
    open_ended = [hlo.loop_hbm_bytes[body] for body, trips in hlo.loops if trips is None]
    report.loop_hbm_bytes = max(open_ended, default=0.0)
    report.largest_loop_collective = hlo.largest(in_loop=True)
    report.compiled = True


def _failure(err: Exception) -> str:
    """A compiler failure in one line: the finding a report carries."""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}"


def _compile(report: ProgramReport, build: Callable[[], jax.stages.Compiled], chip: Chip, resident: float = 0.0):
    began = time.perf_counter()
    try:
        compiled = build()
    except Exception as err:  # noqa: BLE001 - a compiler failure is the finding; report it, keep going
        report.error = _failure(err)
        report.compile_seconds = time.perf_counter() - began
        logger.warning("%s did not compile: %s", report.name, report.error)
        return None
    report.compile_seconds = time.perf_counter() - began
    analyse(report, compiled, chip, resident=resident)
    return compiled


def check_config(
    config: Config,
    thinker: ThinkerConfig,
    chip: Chip,
    devices: Sequence[jax.Device],
    *,
    clip: ClipShape = ClipShape(),
    programs: Sequence[str] | None = None,
    on_program: Callable[[ProgramReport], None] | None = None,
) -> list[ProgramReport]:
    """Compiles `config`'s programs for `devices` (a topology's), returns one report per program.

    `programs` limits the work to the named ones (see the module docstring); `on_program` is called as
    each finishes (progress).
    """
    mesh = make_mesh(config.mesh, devices)
    wanted = set(programs) if programs else None
    reports: list[ProgramReport] = []

    def record(report: ProgramReport) -> None:
        reports.append(report)
        if on_program is not None:
            on_program(report)

    def run(report: ProgramReport, build, resident: float = 0.0):
        if wanted is not None and report.name not in wanted:
            return None
        compiled = _compile(report, build, chip, resident)
        record(report)
        return compiled

    graphdef, params = abstract_thinker(thinker, config, mesh)  # every variable: what generation runs on
    if config.model.lora is None:
        state, tx = abstract_train_state(params, config, mesh)
    else:  # the adapters train, the base weights are the state's `frozen` (`opsd_step.init_state`)
        adapters, frozen = params.split(nnx.LoRAParam, ...)
        state, tx = abstract_train_state(adapters, config, mesh, frozen=frozen)
    model = nnx.merge(graphdef, params)  # host-side planning reads only the config
    accumulation = config.train.grad_accum_steps
    prompts = config.train.batch_size // accumulation
    teacher_length = config.data.teacher_prompt_length or config.data.prompt_length

    def student_prompts(count: int) -> ThinkerInputs:
        return prepared_prompts(
            model,
            thinker,
            count,
            clip,
            length=config.data.prompt_length,
            text_tokens=clip.text_tokens,
            use_audio_in_video=config.data.use_audio_in_video,
            setting="data.prompt_length",
        )

    student = student_prompts(prompts)
    teacher = prepared_prompts(
        model,
        thinker,
        prompts,
        clip,
        length=teacher_length,
        text_tokens=clip.text_tokens + clip.rationale_tokens,
        use_audio_in_video=config.data.use_audio_in_video,
        setting="data.teacher_prompt_length" if config.data.teacher_prompt_length else "data.prompt_length",
    )
    settings = opsd_step.StepSettings(
        graphdef=graphdef,
        tx=tx,
        loss=config.loss,
        teacher=config.teacher,
        train_encoders=config.train.train_encoders,
        mesh=mesh,
        rules=config.mesh.axis_rules(),
    )
    step_fn = opsd_step.make_train_step(settings, state)

    def train(micro_batches: int):
        batch = abstract_step_batch(student, teacher, config, mesh, micro_batches)
        return lambda: step_fn.lower(state, batch).compile()

    step_report = ProgramReport(
        "train_step",
        f"update over {accumulation} micro-batch(es) of {prompts} prompts x {config.sampling.num_samples} rollouts",
    )
    step = run(step_report, train(accumulation))
    if accumulation > 1:
        # The accumulation loop is a `while` whose body (a micro-batch) XLA counts once: k times the micro-step's
        # FLOPs, element-wise ones included (the step's own count scales the loop's matmuls alone; it stands where
        # the micro-step does not compile).
        micro = ProgramReport("train_micro_step", f"update over 1 micro-batch of {prompts} prompts (cost model)")
        if run(micro, train(1)) is not None and step is not None:
            step_report.flops = accumulation * micro.flops

    # Generation runs on a compute-dtype copy of the decoder (LoRA's adapters merged into it when it is made)
    # while the rest of the state (optimizer moments, the teacher's copy, the master weights and adapters the
    # copy replaces) stays in HBM.
    _, generation = generation_model(graphdef, params, model.dtype)  # what `generate` runs on (abstract here)
    taken = {id(leaf) for leaf in jax.tree.leaves(generation)}  # the leaves it takes as they are, not copies
    resident = bytes_per_chip(state.opt_state) + bytes_per_chip(state.teacher_params)
    resident += bytes_per_chip([master for master in jax.tree.leaves(params) if id(master) not in taken])
    sampling = config.sampling

    def generation_inputs(count: int) -> tuple[ThinkerInputs, jax.ShapeDtypeStruct]:
        prompts_in = student if count == prompts else student_prompts(count)
        inputs = _abstract_inputs(prompts_in)
        inputs = _abstract(inputs, input_shardings(inputs, mesh, rules=config.mesh.axis_rules()))
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), count))
        return inputs, jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    reader = dataclasses.replace(
        config, model=dataclasses.replace(config.model, dtype="bfloat16", param_dtype="bfloat16", remat=False)
    )
    # The rollouts decode one micro-batch's prompts, or the whole step's (`sampling.rollout_batch: step`).
    rollout_prompts = config.train.batch_size if sampling.rollout_batch == "step" else prompts
    for name, count, new, samples, temperature, (graph, weights), beside in (
        (
            "rollout",
            rollout_prompts,
            sampling.max_new_tokens,
            sampling.num_samples,
            sampling.temperature,
            (graphdef, params),
            resident,
        ),
        ("eval", prompts, sampling.eval_max_new_tokens, 1, 0.0, (graphdef, params), resident),
        ("reader", prompts, sampling.eval_max_new_tokens, 1, 0.0, (None, None), 0.0),
    ):
        if wanted is not None and not {f"{name}_prefill", f"{name}_decode"} & wanted:
            continue
        inputs, keys = generation_inputs(count)
        if graph is None:
            graph, weights = abstract_thinker(thinker, reader, mesh)
        settings_g = sampling_settings(
            max_new_tokens=new,
            temperature=temperature,
            top_k=sampling.top_k if temperature else None,
            top_p=sampling.top_p if temperature else None,
            eos_token_id=EOS_TOKEN,
            pad_token_id=PAD_TOKEN,
            num_samples=samples,
        )
        prefill = ProgramReport(f"{name}_prefill", f"{count} prompts of {config.data.prompt_length} tokens")
        decode = ProgramReport(f"{name}_decode", f"{count * samples} rows x {new} new tokens (loop body = one token)")
        began = time.perf_counter()
        error = None
        try:
            compiled = compile_generation(
                graph, weights, inputs, keys, settings=settings_g, mesh=mesh, rules=config.mesh.axis_rules()
            )
        except Exception as err:  # noqa: BLE001 - reported as both programs' failure
            compiled, error = (None, None), _failure(err)
        for report, program in zip((prefill, decode), compiled):
            report.compile_seconds = time.perf_counter() - began
            if program is None:
                report.error = error
            else:
                analyse(report, program, chip, resident=beside)
                if report is decode:
                    report.per_token = decode_per_token(report, generation_model(graph, weights, model.dtype)[1], chip)
            record(report)
    return reports


def decode_per_token(report: ProgramReport, params: nnx.State, chip: Chip) -> dict:
    """One decode step (one iteration of the loop) against its HBM floor.

    The floor reads each of the loop's arguments once per token: the parameters it uses (XLA drops
    the encoders' from a decode program's arguments), the KV cache and the rows' state, per chip. The
    step's own traffic is `loop_hbm_bytes`, HBM reads and writes counted from the HLO
    (`opsd_jax.compile_check.hlo`); XLA's bytes accessed, which also counts on-chip memory, whole
    tables for gathers and whole caches for in-place writes, is kept beside it for reference.
    """
    floor_bytes = report.memory.get("arguments", 0.0)
    floor = floor_bytes / chip.hbm_bandwidth
    seconds = report.loop_hbm_bytes / chip.hbm_bandwidth
    loop = {kind: row for kind, row in report.collectives.items() if row["loop_count"]}
    return {
        "hbm_bytes": report.loop_hbm_bytes,
        "floor_bytes": floor_bytes,
        "weight_bytes": bytes_per_chip(params),  # every generation parameter as stored, encoders included
        "seconds_at_hbm_bandwidth": seconds,
        "floor_seconds": floor,
        "ratio_to_floor": seconds / floor if floor else 0.0,
        "xla_bytes_accessed": report.bytes_accessed,
        "xla_ratio_to_floor": report.bytes_accessed / floor_bytes if floor_bytes else 0.0,
        "collective_bytes": sum(row["loop_bytes"] for row in loop.values()),
        "collective_count": sum(row["loop_count"] for row in loop.values()),
        "largest_collective": report.largest_loop_collective,
    }
