"""The run configs in configs/: each loads and validates for its slice's device count, shards whole rows
onto every device, and carries a memory budget that matches its own settings and fits the device."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

from benchmarks.costs import MODELS, kv_bytes_per_token, memory_budget, mesh_sizes
from opsd_jax.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# Configs written before the `# devices: N` convention (the demo runs on conftest's 8 host devices).
DEVICES_WITHOUT_HEADER = {"demo_tiny.yaml": 8}


def header(path: Path, key: str) -> str | None:
    match = re.search(rf"^# {key}: (.+)$", path.read_text(), re.MULTILINE)
    return match.group(1).strip() if match else None


def declared_devices(path: Path) -> int:
    value = header(path, "devices")
    if value is None:
        assert path.name in DEVICES_WITHOUT_HEADER, f"{path.name}: add a '# devices: N' line (jax.device_count())"
        return DEVICES_WITHOUT_HEADER[path.name]
    return int(value)


@pytest.fixture(scope="module", params=CONFIGS, ids=[path.name for path in CONFIGS])
def loaded(request):
    path = request.param
    devices = declared_devices(path)
    return path, devices, load_config(path, num_devices=devices)


def test_there_are_named_run_configs():
    names = {path.name for path in CONFIGS}
    for expected in (
        "qwen2_5_omni_3b_v5e16.yaml",
        "qwen2_5_omni_7b_v5p64.yaml",
        "qwen2_5_omni_7b_v4_32.yaml",
        "gpu_1x_h100.yaml",
        "qwen2_5_omni_7b_lora_gpu_1x_h100.yaml",
        "qwen2_5_omni_7b_lora_v5e8.yaml",
    ):
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
    config = load_config(
        None,
        [
            "teacher.mode=live",
            "mesh.fsdp=1",
            "train.batch_size=1",
            "sampling.num_samples=1",
            "data.prompt_length=8",
            "sampling.max_new_tokens=1",
        ],
        num_devices=1,
    )
    state, _ = memory_budget(config, MODELS["7b"], {"data": 1, "fsdp": 1, "tensor": 1})
    assert state == pytest.approx(121.85 + 2.63, abs=0.01)


def test_the_teachers_copy_is_budgeted_as_the_step_keeps_it():
    """`opsd_jax.opsd.step.teacher_copy`: the trained weights only (decoder and head, 7.6156 B at 7B; the encoders'
    1.3162 B only when trained), an EMA teacher's in float32, a frozen one's decoder in bfloat16 (its output head,
    3584 x 152064, and trained encoders in float32)."""
    small = ["mesh.fsdp=1", "train.batch_size=1", "sampling.num_samples=1", "data.prompt_length=8"]
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    trainable, encoders, head = 7.6156e9, 1.3162e9, 3584 * 152_064

    def teacher(*overrides: str) -> float:
        config = load_config(None, [*small, "model.dtype=bfloat16", *overrides], num_devices=1)
        live = load_config(None, [*small, "model.dtype=bfloat16", *overrides, "teacher.mode=live"], num_devices=1)
        return memory_budget(config, MODELS["7b"], one)[0] - memory_budget(live, MODELS["7b"], one)[0]

    frozen = (trainable - head) * 2 + head * 4
    assert teacher("teacher.mode=frozen") == pytest.approx(frozen / 1e9, abs=1e-6)
    assert teacher("teacher.mode=ema") == pytest.approx(trainable * 4 / 1e9, abs=1e-6)
    trained = ["train.train_encoders=true"]
    assert teacher("teacher.mode=frozen", *trained) == pytest.approx((frozen + encoders * 4) / 1e9, abs=1e-6)
    assert teacher("teacher.mode=ema", *trained) == pytest.approx((trainable + encoders) * 4 / 1e9, abs=1e-6)
    for model, kib in (("7b", 56), ("3b", 36)):
        assert kv_bytes_per_token(MODELS[model]) == kib * 1024


def test_lora_memory_budget_counts_the_base_in_its_dtype_and_the_adapters():
    # Rank 16 on q, k, v, o ([3584, 3584], [3584, 512] x 2, [3584, 3584]) and gate, up, down ([3584, 18944] x 2,
    # [18944, 3584]) of the 7B's 28 layers: a [in, 16] + b [16, out] each.
    adapters = 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    kernels = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    assert (adapters, kernels) == (40_370_176, 6_525_288_448)
    everything = 8.9318e9  # the 7B thinker's parameters, encoders included: all of them are the frozen base
    small = ["mesh.fsdp=1", "train.batch_size=1", "sampling.num_samples=1", "data.prompt_length=8"]
    one = {"data": 1, "fsdp": 1, "tensor": 1}

    def state(*overrides: str) -> float:
        config = load_config(None, [*small, "model.lora.rank=16", *overrides], num_devices=1)
        return memory_budget(config, MODELS["7b"], one)[0]

    # float32 base, float32 adapters with Adam moments and gradients; a frozen teacher is the base: no copy.
    assert state("teacher.mode=frozen") == pytest.approx((everything * 4 + adapters * 16) / 1e9, abs=1e-6)
    assert state("teacher.mode=ema") == pytest.approx((everything * 4 + adapters * 20) / 1e9, abs=1e-6)
    # bfloat16 parameters: base and adapters (qwix gives them the kernel's dtype) at 2 B.
    assert state("model.param_dtype=bfloat16") == pytest.approx((everything * 2 + adapters * 8) / 1e9, abs=1e-6)
    # QLoRA int8: the adapted kernels at 1 B with one float32 scale per output channel.
    scales = 28 * (2 * 3584 + 2 * 512 + 2 * 18944 + 3584)
    int8 = (everything - kernels) * 4 + kernels + scales * 4 + adapters * 16
    assert state("model.lora.base_dtype=int8") == pytest.approx(int8 / 1e9, abs=1e-6)
    # base_dtype dtype: the decoder's base weights in the compute dtype (bfloat16), the output head ([3584, 152064],
    # multiplied as stored by the step) and the encoders (1.3162 B) in float32, the adapters in float32.
    head, encoders = 3584 * 152_064, 1.3162e9
    cast = (everything - encoders - head) * 2 + (head + encoders) * 4 + adapters * 16
    assert state("model.dtype=bfloat16", "model.lora.base_dtype=dtype") == pytest.approx(cast / 1e9, abs=1e-6)
    with pytest.raises(ValueError, match="budgets the default model.lora.target_modules only"):
        state("model.lora.target_modules=lm_head")


def test_lora_budget_counts_the_adapters_apply_lora_makes(tiny_untied):
    """The budget's projection shapes are the adapted thinker's own (the tiny one: its adapters counted)."""
    import dataclasses
    import math

    from flax import nnx

    from benchmarks.costs import decoder_projections
    from opsd_jax.models import lora
    from opsd_jax.models.qwen2_5_omni import from_pretrained
    from opsd_jax.settings import LoraConfig

    base = from_pretrained(tiny_untied[1])
    text = base.config.text
    dims = {
        "hidden": text.hidden_size,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "intermediate": text.intermediate_size,
        "layers": text.num_hidden_layers,
    }
    shapes, layers = decoder_projections(dims)
    adapted = lora.apply_lora(base, dataclasses.replace(LoraConfig(), rank=3))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam)))
    assert counted == layers * 3 * sum(inputs + outputs for inputs, outputs in shapes)
    # Each kernel as the matrix its adapters flatten it to (attention keeps heads as an axis: `[hidden, heads, head_dim]`).
    kernels = [(math.prod(layer.in_shape), math.prod(layer.out_shape)) for _, layer in lora.adapted_layers(adapted)]
    assert sorted(kernels) == sorted(shapes * layers)
    assert all(
        math.prod(layer.kernel.get_value().shape) == math.prod(m)
        for (_, layer), m in zip(lora.adapted_layers(adapted), kernels)
    )


def test_tpu_and_gpu_configs_name_their_slice(loaded):
    """A TPU or GPU config names its topology (compile-check compiles for it); its chips are the config's devices."""
    from opsd_jax.sharding.topology import parse_topology, topology_chips

    path, devices, config = loaded
    if header(path, "hbm_gb") is None or "demo" in path.name:
        assert config.mesh.topology is None
        return
    assert config.mesh.topology is not None, f"{path.name}: set mesh.topology (e.g. v5p:4x4x2, h100:1)"
    assert topology_chips(config.mesh.topology) == devices
    assert parse_topology(config.mesh.topology)[0].platform == ("cuda" if "gpu" in path.name else "tpu")
