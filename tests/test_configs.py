"""The run configs in configs/: each loads and validates for its slice's device count, shards whole rows
onto every device, and carries a memory budget that matches its own settings and fits the device."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from opsd_jax.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Configs written before the `# devices: N` convention (the demo runs on conftest's 8 host devices).
DEVICES_WITHOUT_HEADER = {"demo_tiny.yaml": 8}

# Reference §8.1 of Qwen2.5-Omni: trainable = text decoder + lm_head (budgeted untied), frozen = encoders.
MODELS = {
    "3b": dict(trainable=3_085.9e6 + 311.2e6, encoders=637.7e6 + 668.7e6, layers=36, hidden=2048, heads=16,
               kv_heads=2, head_dim=128, vocab=151_936),
    "7b": dict(trainable=7_070.6e6 + 545.0e6, encoders=639.6e6 + 676.6e6, layers=28, hidden=3584, heads=28,
               kv_heads=4, head_dim=128, vocab=152_064),
}
TEACHER_BYTES = {"live": 0, "frozen": 2, "ema": 4}  # frozen: a bf16 copy; ema: a float32 copy


def header(path: Path, key: str) -> str | None:
    match = re.search(rf"^# {key}: (.+)$", path.read_text(), re.MULTILINE)
    return match.group(1).strip() if match else None


def declared_devices(path: Path) -> int:
    value = header(path, "devices")
    if value is None:
        assert path.name in DEVICES_WITHOUT_HEADER, f"{path.name}: add a '# devices: N' line (jax.device_count())"
        return DEVICES_WITHOUT_HEADER[path.name]
    return int(value)


def mesh_sizes(config: Config, devices: int) -> dict[str, int]:
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    fixed = 1
    for size in sizes.values():
        fixed *= size if size != -1 else 1
    return {name: devices // fixed if size == -1 else size for name, size in sizes.items()}


def memory_budget(config: Config, model: dict, mesh: dict[str, int]) -> tuple[float, float]:
    """(state, activations) in GB per device, the arithmetic written out in the configs' comments.

    State: trainable x 16 B (bf16 param + fp32 master + fp32 Adam m, v + bf16 grad) + frozen encoders x 2 B
    + the teacher's copy, sharded over fsdp x tensor. Activations of one micro-step, rows sharded over
    data x fsdp: remat-kept layer inputs (2h B per token and layer), one recomputed layer (34h B per
    token), float32 attention scores and probabilities of one layer, three vocab chunks of float32
    logits (student, teacher, gradient) and the rollouts' KV cache.
    """
    trainable, frozen = model["trainable"], model["encoders"]
    if config.train.train_encoders:
        trainable, frozen = trainable + frozen, 0.0
    state = trainable * 16 + frozen * 2 + model["trainable"] * TEACHER_BYTES[config.teacher.mode]
    state /= mesh["fsdp"] * mesh["tensor"]

    prompts = config.train.batch_size // config.train.grad_accum_steps
    rows = prompts * config.sampling.num_samples // (mesh["data"] * mesh["fsdp"])
    length = config.data.prompt_length + config.sampling.max_new_tokens
    tokens = rows * length
    kv_bytes_per_token = model["layers"] * 2 * model["kv_heads"] * model["head_dim"] * 2
    activations = (
        tokens * model["layers"] * 2 * model["hidden"]
        + tokens * 34 * model["hidden"]
        + 2 * rows * model["heads"] // mesh["tensor"] * length**2 * 4
        + 3 * rows * config.loss.chunk_size * model["vocab"] * 4
        + rows * length * kv_bytes_per_token
    )
    return state / 1e9, activations / 1e9


@pytest.fixture(scope="module", params=CONFIGS, ids=[path.name for path in CONFIGS])
def loaded(request):
    path = request.param
    devices = declared_devices(path)
    return path, devices, load_config(path, num_devices=devices)


def test_there_are_named_run_configs():
    names = {path.name for path in CONFIGS}
    for expected in ("qwen2_5_omni_3b_v5e16.yaml", "qwen2_5_omni_7b_v5p64.yaml", "qwen2_5_omni_7b_v4_32.yaml",
                     "gpu_1x_h100.yaml"):
        assert expected in names


def test_config_validates_for_its_device_count_and_not_for_others(loaded):
    path, devices, config = loaded
    sizes = mesh_sizes(config, devices)
    assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == devices
    fixed = 1
    for size in (config.mesh.data, config.mesh.fsdp, config.mesh.tensor):
        fixed *= size if size != -1 else 1
    if fixed > 1:  # with only -1 and 1s every count is valid; otherwise one more device is not
        with pytest.raises(ConfigError, match="mesh"):
            load_config(path, num_devices=devices + 1)


def test_every_device_gets_whole_rows(loaded):
    path, devices, config = loaded
    sizes = mesh_sizes(config, devices)
    prompts = config.train.batch_size // config.train.grad_accum_steps
    rows = prompts * config.sampling.num_samples
    assert rows % (sizes["data"] * sizes["fsdp"]) == 0, f"{path.name}: {rows} rows on {sizes}"
    assert config.data.prompt_length in config.sampling.prompt_buckets, path.name


def test_slice_configs_run_in_bfloat16_with_placeholder_paths(loaded):
    path, _, config = loaded
    if header(path, "model") is None:
        return  # the CPU demo: float32 parity, its own checkpoint
    assert config.model.dtype == "bfloat16"
    for value in (config.model.checkpoint, config.data.train_dir, config.run.output_dir):
        assert value.startswith(("/data/", "gs://YOUR_BUCKET/")), f"{path.name}: {value}"


def test_memory_budget_matches_the_settings_and_fits(loaded):
    path, devices, config = loaded
    model = header(path, "model")
    if model is None:
        assert path.name in DEVICES_WITHOUT_HEADER  # only the tiny demo has no budget
        return
    written = re.fullmatch(r"state ([\d.]+) \+ activations ([\d.]+) = ([\d.]+)", header(path, "budget_gb"))
    assert written, f"{path.name}: expected '# budget_gb: state S + activations A = T'"
    state, activations, total = map(float, written.groups())
    expected_state, expected_activations = memory_budget(config, MODELS[model], mesh_sizes(config, devices))
    assert state == pytest.approx(expected_state, abs=0.006), path.name
    assert activations == pytest.approx(expected_activations, abs=0.006), path.name
    assert total == pytest.approx(state + activations, abs=0.011), path.name
    hbm = float(header(path, "hbm_gb"))
    assert total < 0.85 * hbm, f"{path.name}: {total} GB of {hbm} GB leaves too little for XLA's temporaries"


def test_memory_budget_arithmetic_against_reference_figures():
    # Reference §8.2: 16 B/param full fine-tune of the 7B thinker with frozen encoders is ~122 GB, and the
    # KV cache is 56 KiB per token (7B) and 36 KiB per token (3B).
    config = load_config(None, ["teacher.mode=live", "mesh.fsdp=1", "train.batch_size=1", "sampling.num_samples=1",
                                "data.prompt_length=8", "sampling.max_new_tokens=1"], num_devices=1)
    state, _ = memory_budget(config, MODELS["7b"], {"data": 1, "fsdp": 1, "tensor": 1})
    assert state == pytest.approx(121.85 + 2.63, abs=0.01)
    for model, kib in (("7b", 56), ("3b", 36)):
        dims = MODELS[model]
        assert dims["layers"] * 2 * dims["kv_heads"] * dims["head_dim"] * 2 == kib * 1024
