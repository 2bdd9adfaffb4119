"""Config loading: YAML + dotted overrides, types, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from opsd_jax.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_are_typed(tmp_path):
    config = load_config(
        write(tmp_path, "train:\n  lr: 0.1\n"), ["train.lr=1e-5", "mesh.fsdp=4", "mesh.tensor=2"], num_devices=8
    )
    assert config.train.lr == pytest.approx(1e-5) and isinstance(config.train.lr, float)
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, 4, 2)
    assert load_config(None, ["train.total_steps=5", "train.warmup_steps=4"], num_devices=None).train.total_steps == 5


def test_config_is_frozen():
    config = load_config(None, num_devices=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  lrr: 1.0\n", [], r"train\.lrr: unknown key"),
        ("", ["optim.lr=1"], r"optim: unknown key"),
        ("train:\n  lr: fast\n", [], r"train\.lr: expected a number, got str 'fast'"),
        ("train:\n  batch_size: 2.5\n", [], r"train\.batch_size: expected an integer"),
        ("model:\n  dtype: float16\n", [], r"model\.dtype: expected one of \['float32', 'bfloat16'\]"),
        ("", ["train.lr=-1"], r"train\.lr: expected a positive learning rate"),
        ("", ["train.warmup_steps=2000"], r"train\.warmup_steps"),
        ("train: 3\n", [], r"train: expected a mapping"),
        ("", ["train.lr"], r"override 'train.lr': expected key.sub=value"),
        ("", ["train.lr=0.1", "train.lr.x=1"], r"train\.lr is a value, not a section"),
        ("", ["train.lr.x=1"], r"train\.lr: expected a number, got dict"),
        ("", ["run.log_rollouts_every=-1"], r"run\.log_rollouts_every: expected >= 0 \(0 = never\), got -1"),
        ("", ["run.wandb_project= "], r"run\.wandb_project: expected a project name"),
        ("", ["model.lora.base_dtype=float16"], r"model\.lora\.base_dtype: expected one of \['param_dtype', 'dtype'"),
        ("", ["model.remat_policy=save_dots"], r"^model\.remat_policy: save_dots applies with model\.remat: true"),
        ("", ["model.remat_policy=dots"], r"^model\.remat_policy: expected one of \['full', 'save_dots'\]"),
        (
            "",
            ["model.lora.base_dtype=dtype", "model.dtype=float32", "model.param_dtype=bfloat16"],
            r"^model\.lora\.base_dtype: dtype would store the base weights in model\.dtype float32, wider than",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides, num_devices=8)


@pytest.mark.parametrize(
    "overrides, devices, message",
    [
        (["mesh.fsdp=4", "mesh.tensor=1"], 8, r"mesh: data x fsdp x tensor = 1 x 4 x 1 = 4, but 8 devices"),
        (["mesh.fsdp=-1", "mesh.tensor=3"], 8, r"mesh\.fsdp: -1 cannot fill the mesh"),
        (["mesh.data=-1", "mesh.fsdp=-1"], 8, r"at most one axis may be -1"),
        (["mesh.tensor=0"], 8, r"mesh\.tensor: expected a positive size"),
        (["mesh.logical_axis_rules.embedd=fsdp"], 8, r"mesh\.logical_axis_rules\.embedd: unknown logical axis"),
        (["mesh.logical_axis_rules.embed=model"], 8, r"mesh\.logical_axis_rules\.embed: unknown mesh axis 'model'"),
    ],
)
def test_impossible_mesh_fails_at_load(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, num_devices=devices)


def test_mesh_takes_the_device_count_from_jax_by_default():
    import jax

    config = load_config(None, ["mesh.fsdp=-1", "mesh.tensor=2"])
    assert config.mesh.tensor == 2 and jax.device_count() == 8
    with pytest.raises(ConfigError, match="but 8 devices"):
        load_config(None, ["mesh.fsdp=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


def test_shipped_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert load_config("demo_tiny", num_devices=None) == load_config("demo_tiny.yaml", num_devices=None)
    assert load_config("demo_tiny", num_devices=None).train.lr == 2.0e-3
    with pytest.raises(ConfigError, match=r"config file nope does not exist \(nor is it a shipped config: .*demo_tiny"):
        load_config("nope", num_devices=None)


def test_string_overrides_are_taken_as_text():
    config = load_config(
        None,
        ["prompt.privileged_template=Evidence: {rationale}", "prompt.system_prompt=Be brief: ok"],
        num_devices=None,
    )
    assert config.prompt.privileged_template == "Evidence: {rationale}"
    assert config.prompt.system_prompt == "Be brief: ok"
    assert load_config(None, ["prompt.system_prompt=null"], num_devices=None).prompt.system_prompt is None


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=nan",
        "train.max_grad_norm=inf",
        "train.weight_decay=.nan",
        "sampling.temperature=-.inf",
        "teacher.distill_weight=NaN",
        "loss.beta=inf",
    ],
)
def test_non_finite_floats_are_refused(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        load_config(None, [override], num_devices=None)


def test_non_finite_floats_in_yaml_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.lr: expected a finite number, got nan"):
        load_config(write(tmp_path, "train:\n  lr: .nan\n"), num_devices=None)


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' on line 3 \(first on line 2\)"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"), num_devices=None)


def test_non_utf8_is_named_and_a_bom_is_read(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  # café\n  lr: 0.1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{path}:2: not UTF-8 text \(byte 0xe9"):
        load_config(path, num_devices=None)
    path.write_bytes("\ufefftrain:\n  lr: 0.25\n".encode("utf-8"))
    assert load_config(path, num_devices=None).train.lr == 0.25


def test_sampling_and_loss_temperatures_must_agree_when_the_ratio_corrects():
    # The ratio divides the student at loss.temperature by the distribution rollouts are drawn from.
    with pytest.raises(ConfigError, match=r"sampling.temperature \(0.7\) differs from loss.temperature \(1.0\)"):
        load_config(None, ["sampling.temperature=0.7"], num_devices=None)
    agreed = load_config(
        None, ["sampling.temperature=0.7", "loss.temperature=0.7", "sampling.top_k=20"], num_devices=None
    )
    assert agreed.loss.temperature == agreed.sampling.temperature == 0.7
    # Without a ratio (no correction, or no distillation term) the two may differ.
    load_config(None, ["sampling.temperature=0.7", "loss.is_clip=null"], num_devices=None)
    load_config(
        None, ["sampling.temperature=0.7", "teacher.distill_weight=0", "teacher.label_pg_weight=1"], num_devices=None
    )


def test_a_wandb_project_without_wandb_is_refused_at_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"run\.wandb_project: 'mine' is set but wandb is not installed"):
        load_config(None, ["run.wandb_project=mine"], num_devices=None)
