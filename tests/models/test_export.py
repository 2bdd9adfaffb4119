"""Export of the Flax thinker to a Hugging Face directory: transformers loads it and computes the Flax
model's logits (float32, <= 1e-4), tied and untied, text and video + audio; bf16, sharded, mesh and
crash behaviour; the `opsd-jax export` command."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from opsd_jax import export_cli
from opsd_jax.config import MeshConfig
from opsd_jax.models import export, weights
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.sharding import make_mesh
from opsd_jax.testing.tokenizer import build_tiny_tokenizer
from tests.models.test_qwen2_5_omni import multimodal_case, reference_multimodal_logits

TOLERANCE = 1e-4  # float32 logits, transformers on the export vs the Flax model that was exported
IDS = np.array([[5, 17, 99, 3, 42, 7, 150, 8], [0, 0, 0, 61, 62, 63, 64, 65]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5], np.int32)
REAL = MASK.astype(bool)


def flax_text_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


def torch_text_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(IDS).long(), attention_mask=torch.from_numpy(MASK).long()
        ).logits.numpy()


def load_in_transformers(directory):
    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def perturb(model, seed: int) -> None:
    """Moves every parameter by ~2% of its own scale, so an export that copied the input files would fail."""
    rng = np.random.default_rng(seed)
    for _path, variable in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda item: str(item[0])):
        value = np.asarray(variable.get_value())
        scale = 0.02 * (np.abs(value).mean() + 1e-3)
        variable.set_value(jnp.asarray(value + scale * rng.standard_normal(value.shape).astype(np.float32)))


@pytest.fixture(scope="module", params=["tiny_untied", "tiny_tied"])
def exported(request, tmp_path_factory):
    """The perturbed Flax model of a tiny thinker, its export and the export loaded in transformers."""
    reference, checkpoint = request.getfixturevalue(request.param)
    model = from_pretrained(checkpoint)
    perturb(model, seed=len(request.param))
    out = tmp_path_factory.mktemp(request.param + "_export") / "export"
    summary = export.export_thinker(model, checkpoint, out)
    return types.SimpleNamespace(
        name=request.param,
        reference=reference,
        checkpoint=checkpoint,
        model=model,
        out=out,
        summary=summary,
        hf=load_in_transformers(out),
    )


# ------------------------------------------------------------------------------ layout


def test_layout_is_the_inverse_of_to_flax_layout():
    rng = np.random.default_rng(0)
    # (kind, checkpoint tensor, Flax shape, the shape export is told where the port reshapes: `folded_shape`)
    cases = [
        ("kernel", rng.standard_normal((6, 4)), (4, 6), None),  # Linear [out, in]
        ("kernel", rng.standard_normal((5, 3, 3)), (3, 3, 5), None),  # Conv1d [out, in, k]
        ("kernel", rng.standard_normal((8, 3, 2, 4, 4)), (96, 8), (8, 3, 2, 4, 4)),  # Conv3d folded to a dense kernel
        ("embedding", rng.standard_normal((10, 4)), (10, 4), None),
        ("weight", rng.standard_normal(7), (7,), None),
        ("bias", rng.standard_normal(7), (7,), None),
        # Attention weights with heads as an axis: q_proj [heads * head_dim, hidden] -> [hidden, heads, head_dim],
        # o_proj [hidden, heads * head_dim] -> [heads, head_dim, hidden], a bias [heads * head_dim] -> [heads, head_dim].
        ("kernel", rng.standard_normal((12, 8)), (8, 3, 4), (12, 8)),
        ("kernel", rng.standard_normal((8, 12)), (3, 4, 8), (8, 12)),
        ("bias", rng.standard_normal(12), (3, 4), (12,)),
    ]
    for kind, torch_layout, flax_shape, folded in cases:
        flax_layout = weights.to_flax_layout(kind, torch_layout, flax_shape, "t")
        assert flax_layout.shape == flax_shape
        back = export.to_checkpoint_layout(kind, flax_layout, "t", folded)
        assert back.flags.c_contiguous
        np.testing.assert_array_equal(back, torch_layout)
    # q_proj [heads * head_dim, hidden]: the row-major split of its transpose, hidden first.
    q = rng.standard_normal((12, 8))
    np.testing.assert_array_equal(weights.to_flax_layout("kernel", q, (8, 3, 4), "q")[:, 1, 2], q[1 * 4 + 2])
    with pytest.raises(export.ExportError, match=r"tensor visual\.x: a kernel of shape \(10, 8\) cannot be unfolded"):
        export.to_checkpoint_layout("kernel", np.zeros((10, 8)), "visual.x", (8, 3, 2, 4, 4))
    with pytest.raises(export.ExportError, match=r"tensor q: a kernel of shape \(8, 3, 5\) cannot be folded"):
        export.to_checkpoint_layout("kernel", np.zeros((8, 3, 5)), "q", (12, 8))


def test_bfloat16_tensors_are_written_as_safetensors_bf16_with_torch_rounding(tmp_path):
    values = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32) * 3
    export._write_shard(tmp_path / "t.safetensors", {"w": values.astype(ml_dtypes.bfloat16)})
    header = weights._read_header(tmp_path / "t.safetensors")
    assert header["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    from safetensors.torch import load_file as load_torch

    loaded = load_torch(str(tmp_path / "t.safetensors"))["w"]
    assert loaded.dtype == torch.bfloat16
    # Bit-identical to torch's own float32 -> bfloat16 rounding (round to nearest even).
    assert torch.equal(loaded, torch.from_numpy(values).to(torch.bfloat16))


# ------------------------------------------------------------------------------ transformers parity


def test_transformers_logits_on_left_padded_text_match_flax(exported):
    flax = flax_text_logits(exported.model)
    got = torch_text_logits(exported.hf)
    assert np.abs(got - flax)[REAL].max() <= TOLERANCE
    # The perturbation reached the export: the unmodified reference computes something else.
    assert np.abs(torch_text_logits(exported.reference) - got)[REAL].max() > 1e-2


def test_transformers_logits_on_video_with_audio_match_flax(exported, tiny_prompt_builder):
    inputs = multimodal_case(tiny_prompt_builder, "video_with_audio")
    flax = np.asarray(exported.model(**inputs))
    got = reference_multimodal_logits(exported.hf, inputs)
    real = inputs["attention_mask"].astype(bool)
    assert np.abs(got - flax)[real].max() <= TOLERANCE
    assert np.abs(reference_multimodal_logits(exported.reference, inputs) - got)[real].max() > 1e-2


def test_thinker_only_config_and_tied_head(exported):
    config = json.loads((exported.out / "config.json").read_text())
    tied = exported.name == "tiny_tied"
    assert config["architectures"] == ["Qwen2_5OmniThinkerForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_omni_thinker"
    assert config["tie_word_embeddings"] is tied and config["text_config"]["tie_word_embeddings"] is tied
    assert config["dtype"] == "float32"
    names = set(load_file(str(exported.out / "model.safetensors")))
    assert ("lm_head.weight" in names) is not tied
    assert names == set(weights.SafetensorsCheckpoint.open(exported.checkpoint).names())
    assert exported.summary.tie_word_embeddings is tied and exported.summary.shards == ("model.safetensors",)
    assert sorted(p.name for p in exported.out.iterdir()) == ["config.json", "model.safetensors"]


def test_full_omni_config_gives_the_same_thinker_config(exported, tmp_path):
    thinker = json.loads((exported.checkpoint / "config.json").read_text())
    full = {
        "architectures": ["Qwen2_5OmniForConditionalGeneration"],
        "model_type": "qwen2_5_omni",
        "thinker_config": thinker,
        "talker_config": {"hidden_size": 8},
        "enable_audio_output": True,
    }
    export.export_thinker(exported.model, full, tmp_path / "from_full")
    assert (tmp_path / "from_full" / "config.json").read_text() == (exported.out / "config.json").read_text()


# ------------------------------------------------------------------------------ dtypes, shards, mesh


def test_bfloat16_export_round_trips_and_stays_close(tiny_untied, tmp_path):
    _, checkpoint = tiny_untied
    model = from_pretrained(checkpoint)
    perturb(model, seed=3)
    reloaded = export.export_roundtrip(model, checkpoint, tmp_path / "bf16", dtype="bfloat16")
    entries = weights.SafetensorsCheckpoint.open(tmp_path / "bf16").entries
    assert {entry.dtype for entry in entries.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = load_in_transformers(tmp_path / "bf16")  # bf16 tensors upcast exactly to float32
    same_weights = np.abs(torch_text_logits(hf) - flax_text_logits(reloaded))[REAL].max()
    assert same_weights <= TOLERANCE
    full = flax_text_logits(model)
    rounding = np.abs(torch_text_logits(hf) - full)[REAL].max()
    assert 0 < rounding <= 0.02 * np.abs(full).max()


def test_sharded_export_writes_an_index_and_loads(exported, tmp_path):
    out = tmp_path / "sharded"
    export.export_roundtrip(exported.model, exported.checkpoint, out, max_shard_bytes=120_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        tensors = load_file(str(out / shard))
        assert {name for name, file in index["weight_map"].items() if file == shard} == set(tensors)
        size = sum(t.nbytes for t in tensors.values())
        assert size <= 120_000 or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    np.testing.assert_array_equal(torch_text_logits(load_in_transformers(out)), torch_text_logits(exported.hf))


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied"])
def test_export_from_an_eight_device_mesh_equals_single_device_byte_for_byte(fixture, request, tmp_path):
    assert jax.device_count() == 8
    _, checkpoint = request.getfixturevalue(fixture)
    sharded = from_pretrained(checkpoint, mesh=make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    q_kernel = sharded.model.layers[0].self_attn.q_proj.kernel[...]
    assert len(q_kernel.sharding.device_set) == 8 and not q_kernel.sharding.is_fully_replicated
    export.export_thinker(sharded, checkpoint, tmp_path / "mesh", max_shard_bytes=300_000)
    export.export_thinker(from_pretrained(checkpoint), checkpoint, tmp_path / "single", max_shard_bytes=300_000)
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(files) >= 4 and files == sorted(p.name for p in (tmp_path / "mesh").iterdir())
    for name in files:
        assert (tmp_path / "mesh" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    # An unmodified load exports exactly the tensors it was loaded from.
    source = load_file(str(checkpoint / "model.safetensors"))
    exported_tensors = {k: v for f in (tmp_path / "single").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert sorted(exported_tensors) == sorted(source)
    for name, tensor in source.items():
        np.testing.assert_array_equal(exported_tensors[name], tensor, err_msg=name)


# ------------------------------------------------------------------------------ atomicity and errors


def test_crash_mid_export_leaves_no_directory(exported, tmp_path, monkeypatch):
    real_writer, calls = export._write_shard, []

    def failing_writer(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_writer(path, tensors)

    monkeypatch.setattr(export, "_write_shard", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        export.export_thinker(exported.model, exported.checkpoint, tmp_path / "out", max_shard_bytes=120_000)
    assert calls[0].parent.name.startswith(".out.partial-")  # the first shard was written, then removed
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_refused_or_replaced_once_complete(exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(export.ExportError, match=r"export directory .*/out already exists; pass overwrite=True"):
        export.export_thinker(exported.model, exported.checkpoint, out)
    export.export_thinker(exported.model, exported.checkpoint, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_tokenizer_files_are_copied(exported, tmp_path):
    build_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "unrelated.bin").write_bytes(b"x")
    export.export_thinker(exported.model, exported.checkpoint, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    copied = sorted(set(p.name for p in (tmp_path / "out").iterdir()) - {"config.json", "model.safetensors"})
    assert "tokenizer.json" in copied and "unrelated.bin" not in copied
    for name in copied:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()
    with pytest.raises(export.ExportError, match=r"tokenizer_dir .*: holds no tokenizer"):
        export.export_thinker(exported.model, exported.checkpoint, tmp_path / "x", tokenizer_dir=exported.checkpoint)


def test_parameters_that_do_not_fit_the_config_are_named(tiny_untied, tiny_tied, tmp_path):
    model = from_pretrained(tiny_untied[1])
    with pytest.raises(export.ExportError, match=r"12 missing \(first: \['model\.layers\.2\."):
        export.export_thinker(model, tiny_tied[1], tmp_path / "out")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["model"]["norm"]["weight"] = np.ones(65, np.float32)
    with pytest.raises(export.ExportError, match=r"parameter model\.norm\.weight: shape \(65,\), but .* \(64,\)"):
        export.export_thinker(params, tiny_untied[1], tmp_path / "out")
    with pytest.raises(export.ExportError, match="dtype: expected one of float32, bfloat16, float16, got int8"):
        export.export_thinker(model, tiny_untied[1], tmp_path / "out", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_pure_dict_params_export_like_the_module(exported, tmp_path):
    params = nnx.to_pure_dict(nnx.state(exported.model, nnx.Param))
    export.export_thinker(params, exported.checkpoint, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (exported.out / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------ opsd-jax export


def test_cli_exports_bfloat16_shards_with_tokenizer(tiny_untied, tmp_path, capsys):
    reference, checkpoint = tiny_untied
    build_tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--tokenizer-dir",
        str(tmp_path / "tok"),
        "--max-shard-size",
        "300KB",
    ]
    assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "exported 136 tensors" in printed and "bfloat16" in printed and "tokenizer.json" in printed
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    logits = torch_text_logits(load_in_transformers(out))
    assert np.abs(logits - torch_text_logits(reference))[REAL].max() <= 0.02 * np.abs(logits).max()


def test_cli_rejects_what_it_cannot_load(tmp_path, capsys):
    assert export_cli.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint " + str(tmp_path / "nope") + ": does not exist" in capsys.readouterr().err
    (tmp_path / "orbax" / "100").mkdir(parents=True)
    assert export_cli.main(["--checkpoint", str(tmp_path / "orbax"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a Hugging Face checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parse_size():
    assert export_cli.parse_size("5GB") == 5_000_000_000
    assert export_cli.parse_size("512MiB") == 512 * 2**20
    assert export_cli.parse_size("1000") == 1000
    for bad in ("0", "5XB", "-1GB", "big"):
        with pytest.raises(Exception, match=f"expected a positive size .* got '{bad}'"):
            export_cli.parse_size(bad)
