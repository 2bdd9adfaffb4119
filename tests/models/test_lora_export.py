"""`opsd-jax export` of a LoRA run, through a run directory as training leaves it (`write_tiny_run`): merged full
weights that transformers loads, and a PEFT adapter directory that transformers + peft load onto the base
checkpoint, both computing the adapted model's logits (float32, <= 1e-4) on text and on video with audio (the
encoders' layers adapted too); a QLoRA run's merged (dequantized) export; what cannot be exported is refused in
one line before any model loads."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file

from opsd_jax import export_cli
from opsd_jax.models import export, lora
from opsd_jax.testing.tiny_run import tiny_run_directory
from tests.models.test_export import (
    REAL,
    TOLERANCE,
    flax_text_logits,
    load_in_transformers,
    torch_text_logits,
)
from tests.models.test_qwen2_5_omni import multimodal_case, reference_multimodal_logits

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "teacher.mode=frozen")
# Layers of every part of the thinker, under each name transformers 5 moves (text model, both encoders, head).
EVERY_PART = (
    "model.lora.target_modules=model/layers/1/mlp/up_proj|visual/blocks/0/attn/q|audio_tower/layers/0/fc1|lm_head"
)


def lora_run(checkpoint, directory, *overrides: str):
    """A LoRA run directory on `checkpoint` (one saved step) and its adapted thinker as export loads it."""
    run = tiny_run_directory(checkpoint, directory, *LORA, *overrides, steps=(1,))
    return types.SimpleNamespace(dir=run, model=export_cli.load_trained_params(run).params)


@pytest.fixture(scope="module")
def decoder_run(tiny_checkpoint, tmp_path_factory):
    return lora_run(tiny_checkpoint, tmp_path_factory.mktemp("lora_decoder") / "run")


@pytest.fixture(scope="module")
def every_part_run(tiny_checkpoint, tmp_path_factory):
    return lora_run(tiny_checkpoint, tmp_path_factory.mktemp("lora_every_part") / "run", EVERY_PART)


def run_export(run, out, *flags: str) -> None:
    assert export_cli.main(["--checkpoint", str(run.dir), "--out", str(out), *flags]) == 0


def load_peft(base_checkpoint, adapter_dir):
    return PeftModel.from_pretrained(load_in_transformers(base_checkpoint), adapter_dir).eval()


def test_merged_export_computes_the_adapted_model(decoder_run, tiny_checkpoint, tiny_untied, tmp_path, capsys):
    assert lora.is_adapted(decoder_run.model)
    run_export(decoder_run, tmp_path / "merged")
    assert "exported 136 tensors" in capsys.readouterr().out  # the plain thinker's tensors, no adapter
    flax = flax_text_logits(decoder_run.model)
    got = torch_text_logits(load_in_transformers(tmp_path / "merged"))
    assert np.abs(got - flax)[REAL].max() <= TOLERANCE
    # The adapters reached the export: the base model computes something else.
    assert np.abs(torch_text_logits(tiny_untied[0]) - got)[REAL].max() > 1e-2
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_peft_adapter_on_the_base_computes_the_adapted_model(decoder_run, tiny_checkpoint, tiny_untied, tmp_path):
    out = tmp_path / "peft"
    run_export(decoder_run, out, "--format", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(tiny_checkpoint)
    tensors = load_file(out / "adapter_model.safetensors")
    q = decoder_run.model.model.layers[0].self_attn.q_proj
    np.testing.assert_array_equal(
        tensors["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"],
        np.asarray(q.kernel_lora_a[...]).T,
    )
    assert len(tensors) == 2 * 7 * 2  # a and b of 7 projections in each of 2 layers
    got = torch_text_logits(load_peft(tiny_checkpoint, out))
    assert np.abs(got - flax_text_logits(decoder_run.model))[REAL].max() <= TOLERANCE
    assert np.abs(torch_text_logits(tiny_untied[0]) - got)[REAL].max() > 1e-2


def test_every_part_of_the_thinker_exports_both_ways(every_part_run, tiny_checkpoint, tiny_prompt_builder, tmp_path):
    """Adapters on the text model, both encoders and the head, whose module names transformers 5 moves."""
    assert [path for path, _ in lora.adapted_layers(every_part_run.model)] == [
        ("audio_tower", "layers", 0, "fc1"),
        ("lm_head",),
        ("model", "layers", 1, "mlp", "up_proj"),
        ("visual", "blocks", 0, "attn", "q"),
    ]
    inputs = multimodal_case(tiny_prompt_builder, "video_with_audio")
    flax = np.asarray(every_part_run.model(**inputs))
    real = inputs["attention_mask"].astype(bool)
    run_export(every_part_run, tmp_path / "merged")
    run_export(every_part_run, tmp_path / "peft", "--format", "peft")
    merged = reference_multimodal_logits(load_in_transformers(tmp_path / "merged"), inputs)
    peft = reference_multimodal_logits(load_peft(tiny_checkpoint, tmp_path / "peft"), inputs)
    base = reference_multimodal_logits(load_in_transformers(tiny_checkpoint), inputs)
    assert np.abs(merged - flax)[real].max() <= TOLERANCE
    assert np.abs(peft - flax)[real].max() <= TOLERANCE
    assert np.abs(base - flax)[real].max() > 1e-2


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_qlora_exports_merged_dequantized_weights_and_is_refused_for_peft(
    base_dtype, tiny_checkpoint, tmp_path, capsys
):
    """qwix computes with the dequantized kernels, so the merged export holds to the same 1e-4 (measured: 2.6e-6
    int8, 2.3e-6 nf4, logits up to 3.3)."""
    run = lora_run(tiny_checkpoint, tmp_path / "run", f"model.lora.base_dtype={base_dtype}")
    run_export(run, tmp_path / "merged")
    got = torch_text_logits(load_in_transformers(tmp_path / "merged"))
    assert np.abs(got - flax_text_logits(run.model))[REAL].max() <= TOLERANCE
    capsys.readouterr()
    assert export_cli.main(["--checkpoint", str(run.dir), "--out", str(tmp_path / "peft"), "--format", "peft"]) == 2
    err = capsys.readouterr().err
    assert f"model.lora.base_dtype {base_dtype} (QLoRA)" in err and "use --format merged" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "peft").exists()
    with pytest.raises(export.ExportError, match=r"trained on quantized base kernels \(QLoRA\)"):
        export.export_peft_adapter(run.model, tmp_path / "peft", base_model=str(tiny_checkpoint))


def test_what_peft_cannot_hold_is_refused_before_any_model_loads(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    full = tiny_run_directory(tiny_checkpoint, tmp_path / "full", steps=(1,))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(export_cli, "load_thinker", no_loading)
    cases = [
        ([str(tiny_checkpoint)], "is a Hugging Face checkpoint directory, which holds no LoRA adapters"),
        ([str(full)], "config.yaml has no model.lora (the run trained every weight"),
        ([str(full), "--max-shard-size", "1GB"], "--max-shard-size: applies to --format merged"),
    ]
    for (checkpoint, *flags), message in cases:
        argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "out"), "--format", "peft", *flags]
        assert export_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(export.ExportError, match="the thinker has no LoRA adapters"):
        export.export_peft_adapter(nnx.Module(), tmp_path / "out", base_model="x")


def test_peft_names_are_the_transformers_modules(tiny_untied):
    modules = dict(tiny_untied[0].named_modules())
    for name in ("model.layers.1.mlp.up_proj", "visual.blocks.0.attn.q", "audio_tower.layers.0.fc1", "lm_head"):
        assert isinstance(modules[export.transformers_module_name(name)], torch.nn.Linear), name
