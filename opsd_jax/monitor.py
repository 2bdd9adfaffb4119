"""What a run shows while it runs: each step's throughput and model-FLOPs utilisation, and
the metric backends (JSONL, TensorBoard, optionally Weights & Biases).

MFU = the step's model FLOPs / (its wall time x the devices' peak). The peak comes from a table by device
kind (TPU generations from `opsd_jax.sharding.topology.CHIPS`, GPUs below); on the CPU it is measured once
per process (`measured_cpu_flops`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
import uuid
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from opsd_jax.opsd.step import is_encoder_path
from opsd_jax.sharding.topology import CHIPS

logger = logging.getLogger(__name__)

# Dense bfloat16 matmul peaks per device, FLOP/s (vendor figures, without sparsity), by a substring of
# `jax.Device.device_kind`; the first match wins (H200 before H100's "H1" cannot clash: full names).
GPU_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12))
# `device_kind` of TPUs -> generation in `CHIPS` (one device per chip; v4 and v5p run their two
# TensorCores as one device, whose peak is the chip's).
TPU_KINDS = (
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("v5p", "v5p"),
    ("v5", "v5p"),
    ("v4", "v4"),
)


@functools.cache
def measured_cpu_flops(size: int = 1024, repeats: int = 5) -> float:
    """The CPU's float32 matmul throughput, FLOP/s: the best of `repeats` timed runs of one jitted `size` x
    `size` matmul on the first CPU device, after a warm-up run that compiles it (2 size^3 FLOPs per run).

    XLA's CPU backend runs one matmul on all the cores the process may use, and the forced host devices of
    a test share those cores, so this is the peak of the whole process, not of one device.
    """
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def device_peak_flops(device: jax.Device) -> float | None:
    """One device's peak FLOP/s from the tables (None for a kind they do not hold)."""
    kind = device.device_kind.lower()
    if device.platform == "tpu":
        return next((CHIPS[generation].bf16_flops for part, generation in TPU_KINDS if part in kind), None)
    if device.platform == "gpu":
        return next((peak for part, peak in GPU_PEAKS if part.lower() in kind), None)
    return None


def peak_flops(devices: Sequence[jax.Device]) -> float | None:
    """The summed peak of `devices` (FLOP/s): the table's per device, or on the CPU the measured figure once
    (the devices share the cores). None when a device's kind is in no table."""
    if all(device.platform == "cpu" for device in devices):
        return measured_cpu_flops()
    peaks = [device_peak_flops(device) for device in devices]
    if any(peak is None for peak in peaks):
        return None
    return float(sum(peaks))


def matmul_parameters(params: Any, *, tied_head: bool, vocab_size: int, hidden_size: int) -> int:
    """Parameters that do a multiply-add per token in the language model: every parameter of the thinker but
    the media encoders' and the input embedding's (a lookup), plus the output head when it is the tied
    embedding. `params`: the model's `nnx.State` of parameters."""
    count = sum(
        int(math.prod(value.shape))
        for path, value in nnx.to_flat_state(params)
        if not is_encoder_path(path) and "embed_tokens" not in map(str, path)
    )
    return count + (vocab_size * hidden_size if tied_head else 0)


def step_model_flops(
    parameters: int, *, prompt_tokens: int, teacher_prompt_tokens: int, completion_tokens: int, num_samples: int
) -> float:
    """Model FLOPs of one training step, 2 per parameter per token forward and 4 backward, on the tokens the
    step uses (no padding): the rollouts' prefill (the prompts once) and decode (each completion token);
    the student's forward and backward and the teacher's forward over each rollout's prompt and completion.
    Attention's score FLOPs and the media encoders are left out (small beside the matmuls at these lengths),
    so this is a lower bound."""
    rollouts = 2 * parameters * (prompt_tokens + completion_tokens)
    student = 6 * parameters * (num_samples * prompt_tokens + completion_tokens)
    teacher = 2 * parameters * (num_samples * teacher_prompt_tokens + completion_tokens)
    return float(rollouts + student + teacher)


class MetricsWriter:
    """JSONL and TensorBoard event files under the run directory, and Weights & Biases when `wandb_project`
    is set (the same scalars); a no-op on every process but 0.

    Locally the JSONL file is appended to line by line. An object store (gs://) has no append (opening an
    object for appending starts it anew: a resumed run lost every earlier line), so there the whole file is
    rewritten, and the TensorBoard events (written to a local temporary directory) copied up, at most every
    `upload_every_s` seconds and when the writer closes. (tensorboardX's own gs:// writer uploads again when
    garbage-collected at interpreter exit, retrying for minutes if the bucket is unreachable by then.)
    A resumed run continues its Weights & Biases run (its id is kept in `wandb_id` beside the JSONL).
    """

    def __init__(
        self,
        directory: epath.Path,
        *,
        upload_every_s: float = 30.0,
        wandb_project: str | None = None,
        run_config: Any = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = directory / "metrics.jsonl"
        self.remote = "://" in str(directory)
        self.upload_every_s = upload_every_s
        self.board_dir = directory / "tensorboard"
        self.handle = None
        self.board = None
        self.wandb = None
        if self.enabled:
            directory.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter  # imports torch where installed (seconds): only a writer pays

            if self.remote:
                self.text = self.path.read_text() if self.path.exists() else ""
                self.uploaded = time.monotonic()
                self.staging = epath.Path(tempfile.mkdtemp(prefix="opsd-jax-tensorboard-"))
                self.board = SummaryWriter(str(self.staging))
            else:
                self.handle = self.path.open("a")
                self.board = SummaryWriter(str(self.board_dir))
            if wandb_project:
                self.wandb = _start_wandb(directory, wandb_project, run_config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.text += line
            if time.monotonic() - self.uploaded >= self.upload_every_s:
                self._upload()
        else:
            self.handle.write(line)
            self.handle.flush()
        for name, value in metrics.items():
            self.board.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def write_records(self, step: int, name: str, records: Sequence[dict[str, Any]], text: str) -> None:
        """`records` appended to `NAME.jsonl` beside metrics.jsonl, and `text` (Markdown) under the tag `name` in
        TensorBoard's text panel and in Weights & Biases."""
        if not self.enabled:
            return
        path = self.path.parent / f"{name}.jsonl"
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if self.remote:  # no append on an object store: rewritten (every run.log_rollouts_every steps only)
            path.write_text((path.read_text() if path.exists() else "") + lines)
        else:
            with path.open("a") as handle:
                handle.write(lines)
        self.board.add_text(name, text, step)
        if self.wandb is not None:
            self.wandb.log({name: text}, step=step)

    def _upload(self) -> None:
        self.path.write_text(self.text)
        self.board.flush()
        self.board_dir.mkdir(parents=True, exist_ok=True)
        for event_file in self.staging.iterdir():
            (self.board_dir / event_file.name).write_bytes(event_file.read_bytes())
        self.uploaded = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.board.close()
            if self.remote:
                self._upload()
                self.staging.rmtree()
            else:
                self.handle.close()
            if self.wandb is not None:
                self.wandb.finish()


def _start_wandb(directory: epath.Path, project: str, run_config: Any):
    """A Weights & Biases run in `project`, its files under `directory/wandb` (offline with WANDB_MODE=offline)."""
    import wandb  # the config checked that it is installed

    id_file = directory / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    local = str(directory) if "://" not in str(directory) else tempfile.mkdtemp(prefix="opsd-jax-wandb-")
    config = dataclasses.asdict(run_config) if dataclasses.is_dataclass(run_config) else run_config
    return wandb.init(project=project, id=run_id, resume="allow", dir=local, config=config)
