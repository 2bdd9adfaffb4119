"""`opsd-jax compile-check` on a small TPU topology (v5e:2x2), without a TPU: the tiny thinker's train step,
rollout and evaluation programs compile, the report is filled, no parameter-sized gather sits inside the
decode loop, and a config too large for the slice exits non-zero naming the program. The HLO summary's counts
(collectives by trip count, HBM bytes, matmul taps, custom calls the cost model does not price), and the splash
attention kernel compiled for the slice."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from opsd_jax.cli import main
from opsd_jax.compile_check.hlo import summarize
from opsd_jax.compile_check.programs import bytes_per_chip
from opsd_jax.config import ConfigError, load_config
from opsd_jax.models import lora
from opsd_jax.models.layers import CausalSegments
from opsd_jax.models.precision import is_decoder_param
from opsd_jax.models.qwen2_5_omni import from_pretrained
from opsd_jax.models.splash import splash_attention
from opsd_jax.opsd import step as opsd_step
from opsd_jax.sharding import MeshConfig, activation_sharding, make_mesh
from opsd_jax.sharding.topology import TopologyError, parse_topology, topology_devices

TOPOLOGY = "v5e:2x2"
CLIP = [
    "--frames",
    "4",
    "--frame-size",
    "56x56",
    "--audio-seconds",
    "2",
    "--text-tokens",
    "40",
    "--rationale-tokens",
    "60",
]
CONFIG = """
model: {{checkpoint: "{checkpoint}", dtype: bfloat16, param_dtype: float32, remat: true}}
mesh: {{data: 1, fsdp: -1, tensor: 1, topology: "v5e:2x2"}}
train: {{batch_size: 8, grad_accum_steps: 2, lr: 1.0e-5, total_steps: 10}}
sampling: {{num_samples: 2, max_new_tokens: 8, eval_max_new_tokens: 4, rollout_batch: step}}
teacher: {{mode: ema}}
loss: {{divergence: gjsd, beta: 0.5, chunk_size: 4}}
data: {{prompt_length: 256, answer_length: 4}}
"""


@pytest.fixture(scope="module")
def report(tiny_untied, tmp_path_factory):
    """One compile-check of the tiny thinker's config (every program): exit code and JSON report."""
    root = tmp_path_factory.mktemp("compile_check")
    config = root / "tiny.yaml"
    config.write_text(CONFIG.format(checkpoint=tiny_untied[1]))
    out = root / "report.json"
    code = main(["compile-check", "--config", str(config), "--out", str(out), *CLIP])
    return code, json.loads(out.read_text()), tiny_untied[1]


def test_every_program_compiles_and_the_report_is_filled(report):
    code, result, checkpoint = report
    assert code == 0
    programs = {p["name"]: p for p in result["programs"]}
    assert set(programs) == {
        "train_step",
        "train_micro_step",
        "rollout_prefill",
        "rollout_decode",
        "eval_prefill",
        "eval_decode",
        "reader_prefill",
        "reader_decode",
    }
    for program in programs.values():
        assert program["compiled"], program["error"]
        assert program["memory"]["arguments"] > 0 and program["peak"] > 0
        assert program["xla_flops"] > 0 and program["flops"] >= program["xla_flops"]
        assert 0 < program["spare"] < 1
    # The update over two micro-batches counts the micro-step's FLOPs twice (the accumulation loop's trips).
    assert programs["train_step"]["flops"] == pytest.approx(2 * programs["train_micro_step"]["flops"])
    # FSDP over 4 chips: the train step gathers weights, and reduces each trained weight's gradient once (in
    # bfloat16, whole within the FSDP group, as XLA partitions it) beside small activation and loss reductions:
    # rows stay sharded at the layer boundaries, so activations are not split into partial sums, and the
    # scoring forward runs the prompts' and the continuations' tokens through each weight together
    # (`JointTokens`). Run by parts, each weight's gradient was reduced twice: 1.9x these bytes (411 vs 263 KB).
    micro = programs["train_micro_step"]["collectives"]
    assert micro["all-gather"]["count"] > 0
    params = nnx.to_flat_state(nnx.state(from_pretrained(checkpoint), nnx.Param))
    trained_bf16_bytes = 2 * sum(leaf.get_value().size for path, leaf in params if is_decoder_param(path))
    assert micro["all-reduce"]["bytes"] < 1.5 * trained_bf16_bytes
    assert programs["train_micro_step"]["cost_model_seconds"] > 0
    # Generation runs beside the optimizer moments and the EMA teacher, which stay in HBM.
    assert programs["rollout_decode"]["memory"]["resident"] > 0
    # One decode over the step's 8 prompts x 2 samples (`rollout_batch: step`); evaluation per micro-batch.
    assert programs["rollout_decode"]["description"].startswith("16 rows")
    assert programs["eval_decode"]["description"].startswith("4 rows")
    decode = programs["rollout_decode"]["per_token"]
    assert decode["hbm_bytes"] > 0 and decode["floor_seconds"] > 0 and decode["ratio_to_floor"] > 0
    # XLA's count includes the on-chip memory, where the tiny model's weights stay between tokens.
    assert decode["xla_bytes_accessed"] > decode["hbm_bytes"]
    # `opsd-jax eval` from the run: the weights alone, all in bfloat16, on the mesh. Generation during
    # training reads a bfloat16 copy of the decoder too, beside the encoders' float32 masters.
    reader, during_training = programs["reader_decode"], programs["eval_decode"]
    assert reader["memory"]["resident"] == 0
    assert reader["per_token"]["weight_bytes"] < during_training["per_token"]["weight_bytes"]
    assert reader["per_token"]["weight_bytes"] < reader["memory"]["arguments"]


def test_no_parameter_sized_gather_inside_the_decode_loop(report):
    _, result, checkpoint = report
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    text = config.get("text_config", config.get("thinker_config", {}).get("text_config"))
    # A gathered weight's buffer is the whole kernel: q_proj [hidden, hidden], even if gathered in bfloat16.
    smallest_kernel = 2 * text["hidden_size"] * text["hidden_size"]
    for name in ("rollout_decode", "eval_decode", "reader_decode"):
        program = next(p for p in result["programs"] if p["name"] == name)
        # Collectives inside the loop move a few rows' activations (here ~1.5 KB each), each less than any
        # one weight: no parameter is gathered per token (a gathered kernel alone would be >= its size).
        largest = program["largest_loop_collective"]
        assert 0 < largest < smallest_kernel, f"{name} moves {largest} B at once per token: {program['collectives']}"


def test_a_config_too_large_for_the_slice_exits_non_zero_naming_the_program(report, tmp_path, capsys):
    _, _, checkpoint = report
    config = tmp_path / "huge.yaml"
    config.write_text(CONFIG.format(checkpoint=checkpoint))
    # 64k-token prompts: the prefill's attention scores alone are 64k x 64k per head.
    code = main(
        [
            "compile-check",
            "--config",
            str(config),
            "--programs",
            "eval_prefill",
            *CLIP,
            "data.prompt_length=65536",
            "train.batch_size=16",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "eval_prefill" in err and ("does not fit" in err or "does not compile" in err)


def test_a_lora_config_compiles_with_the_base_alone_beside_its_adapters(tiny_untied, tmp_path):
    """LoRA's train step and rollouts compile from abstract adapted states (`nnx.eval_shape`), the rollouts on the
    merged decode copy, as a full fine-tune's: the frozen base once
    (a frozen teacher is the base), beside the adapters' float32 masters and Adam moments; the full fine-tune
    of the same config holds its parameters, two Adam moments of the decoder and the teacher's copy (here
    534.2 KB per chip, 62.6 KB of it the teacher's bfloat16 copy of the decoder, against LoRA's 320.1 KB)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(checkpoint=tiny_untied[1]))
    programs = ["--programs", "train_step", "rollout_prefill", "rollout_decode", *CLIP, "teacher.mode=frozen"]
    results = {}
    for name, overrides in (("full", []), ("lora", ["model.lora.rank=4", "model.lora.alpha=8"])):
        out = tmp_path / f"{name}.json"
        assert main(["compile-check", "--config", str(config), "--out", str(out), *programs, *overrides]) == 0
        results[name] = {p["name"]: p for p in json.loads(out.read_text())["programs"]}
    for program in results["lora"].values():
        assert program["compiled"], program["error"]
    # float32 masters under bfloat16 compute: the rollouts decode the merged kernels in generation's bfloat16 copy
    # (`decode_weights.generation_model`), the very arrays a full fine-tune's rollouts read, and no adapter.
    decode = {name: results[name]["rollout_decode"] for name in results}
    assert decode["lora"]["memory"]["arguments"] == decode["full"]["memory"]["arguments"]
    assert decode["lora"]["per_token"]["collective_count"] == decode["full"]["per_token"]["collective_count"]
    # The step's arguments are its state and its batch (the same in both): LoRA saves at least the difference of
    # the states' sizes, counted from the trainer's own init_state on the tiny thinker, placed on a mesh of the
    # slice's 4 chips (measured: 222.7 KB saved, states differ by 214.1 KB; the other 8.6 KB of the full
    # fine-tune's arguments are XLA's count, not traced further).
    states = {}
    for name, overrides in (("full", []), ("lora", ["model.lora.rank=4", "model.lora.alpha=8"])):
        settings = load_config(config, ["teacher.mode=frozen", *overrides], num_devices=4)
        mesh = make_mesh(settings.mesh, jax.devices()[:4])
        model = from_pretrained(
            tiny_untied[1],
            dtype=jnp.dtype(settings.model.dtype),  # as the trainer loads it: the frozen teacher's copy is in dtype
            param_dtype=jnp.dtype(settings.model.param_dtype),
            mesh=mesh,
            rules=settings.mesh.axis_rules(),
        )
        if settings.model.lora is not None:
            model = lora.apply_lora(model, settings.model.lora, mesh=mesh, rules=settings.mesh.axis_rules())
        tx = opsd_step.make_optimizer(settings.train, nnx.state(model, lora.trainable_filter(model)))
        states[name] = bytes_per_chip(
            opsd_step.init_state(model, tx, settings.teacher, mesh, train_encoders=settings.train.train_encoders)
        )
    arguments = {name: results[name]["train_step"]["memory"]["arguments"] for name in results}
    assert arguments["full"] - arguments["lora"] >= states["full"] - states["lora"] > 0


@pytest.mark.parametrize("counter", [jnp.int32, jnp.uint32])  # u32: the loops of XLA's windowed matmuls
def test_hlo_counts_a_collective_in_a_loop_by_its_trip_count(counter):
    _, devices = topology_devices(TOPOLOGY)
    mesh = Mesh(np.asarray(devices).reshape(4), ("x",))
    sharded = NamedSharding(mesh, PartitionSpec("x"))

    def body(_, carry):
        # A shift along the sharded axis moves rows between chips: a collective every iteration.
        return jax.lax.with_sharding_constraint(jnp.roll(jnp.sin(carry), 1, axis=0), sharded)

    fn = jax.jit(
        lambda x: jax.lax.fori_loop(counter(0), counter(5), body, x), in_shardings=sharded, out_shardings=sharded
    )
    compiled = fn.lower(jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=sharded)).compile()
    summary = summarize(compiled.as_text())
    assert [count for _, count in summary.loops] == [5]
    assert summary.collectives and all(c.in_loop and c.executions == 5 for c in summary.collectives)
    totals = summary.by_kind()
    assert sum(row["count"] for row in totals.values()) == 5 * len(summary.collectives)
    assert all(row["loop_bytes"] == row["bytes"] > 0 for row in totals.values())


@pytest.mark.parametrize("counter", [jnp.int32, jnp.uint32])
def test_hlo_reads_a_loop_counters_start_and_step(counter):
    """A counter that starts at 1 and steps by 2 below 9 runs 4 times (XLA's bidirectional windowed matmuls step
    theirs by 2 from 0: a count of the limit alone doubled their FLOPs and collective-permutes)."""
    _, devices = topology_devices(TOPOLOGY)
    mesh = Mesh(np.asarray(devices).reshape(4), ("x",))
    sharded = NamedSharding(mesh, PartitionSpec("x"))

    def body(carry):
        step, x = carry
        return step + counter(2), jax.lax.with_sharding_constraint(jnp.roll(jnp.sin(x), 1, axis=0), sharded)

    fn = jax.jit(
        lambda x: jax.lax.while_loop(lambda carry: carry[0] < counter(9), body, (counter(1), x))[1],
        in_shardings=sharded,
        out_shardings=sharded,
    )
    compiled = fn.lower(jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=sharded)).compile()
    text = compiled.as_text()
    assert "known_trip_count" not in text  # the count comes from the condition, the carry and the body
    summary = summarize(text)
    assert [count for _, count in summary.loops] == [4]
    assert summary.collectives and all(c.executions == 4 for c in summary.collectives)


def test_topology_names_are_checked():
    assert parse_topology("v5p:4x4x2")[1] == (4, 4, 2)
    for bad in ("v5p", "v9:2x2", "v5e:2xq", "v5e:0x2"):
        with pytest.raises(TopologyError):
            parse_topology(bad)
    with pytest.raises(ConfigError, match="mesh.topology"):
        load_config(None, ["mesh.topology=v7:2x2"], num_devices=None)


def test_gpu_topologies_name_a_count_and_are_described_by_the_cuda_plugin_or_say_how_to_get_it():
    """`h100:N`: N GPUs on one host. With the CUDA plugin (`opsd-jax[cuda]`) their compile-only devices come from
    the card's description, no GPU needed; without it the error names the extra."""
    import importlib.util

    from opsd_jax.sharding.topology import topology_devices

    chip, grid = parse_topology("h100:1")
    assert chip.platform == "cuda" and grid == (1,) and chip.hbm_bytes == pytest.approx(81.24e9, rel=1e-3)
    for bad in ("h100:2x2", "h100:0", "a100:1"):
        with pytest.raises(TopologyError):
            parse_topology(bad)
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
    except ModuleNotFoundError:  # no jax_plugins package at all
        plugin = None
    if plugin is None:
        with pytest.raises(TopologyError, match=r"opsd-jax\[cuda\]"):
            topology_devices("h100:1")
    else:
        _, devices = topology_devices("h100:1")
        assert len(devices) == 1 and "H100" in devices[0].device_kind


def test_a_mesh_that_does_not_fill_the_slice_is_a_one_line_error(report, tmp_path, capsys):
    _, _, checkpoint = report
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.format(checkpoint=checkpoint))
    assert main(["compile-check", "--config", str(config), "mesh.fsdp=8"]) == 2
    assert "mesh" in capsys.readouterr().err


def test_hlo_counts_what_a_loop_iteration_moves_through_hbm():
    """A decode-like loop: gather 8 rows of a 512 MB table, multiply by a 128 MB weight (too large for the
    chip's on-chip memory: read from HBM every iteration), write one row of a 1 GB cache in place. One
    iteration moves the weight and a few rows, not the table or the cache."""
    _, devices = topology_devices(TOPOLOGY)
    replicated = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())

    def decode(table, weight, cache, steps):
        def body(carry):
            i, cache, ids = carry
            y = jnp.tanh(table[ids] @ weight)
            cache = jax.lax.dynamic_update_slice(cache, y[:1], (i, 0))
            return i + 1, cache, (ids * 7 + jnp.argmax(y, -1).astype(jnp.int32)) % table.shape[0]

        start = (jnp.int32(0), cache, jnp.arange(8, dtype=jnp.int32))
        return jax.lax.while_loop(lambda carry: carry[0] < steps, body, start)[1]

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    weight = spec((1024, 65536))
    compiled = (
        jax.jit(decode, donate_argnums=2)
        .lower(spec((262144, 1024)), weight, spec((8192, 65536)), spec((), jnp.int32))
        .compile()
    )
    summary = summarize(compiled.as_text())
    [(body, trips)] = summary.loops
    weight_bytes = 1024 * 65536 * 2
    assert trips is None  # stops on a traced count: no known trip count
    assert weight_bytes <= summary.loop_hbm_bytes[body] < weight_bytes + 4e6


def test_hlo_counts_a_batched_matmul_written_as_a_dilated_convolution_by_its_real_taps():
    """TPU HLO writes attention's grouped-query einsum as a convolution whose batch dimensions are dilated
    inputs under windows as wide as them: each output element meets one real input element per window.
    Inside a loop of 3, the FLOPs XLA's count leaves out are 2 x the einsum's, not 2 x its window size."""
    _, devices = topology_devices(TOPOLOGY)
    replicated = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())
    b, q, k, g, d, s = 2, 256, 4, 7, 128, 512

    def scores(queries, keys):
        def body(i, total):
            scaled = queries * (i + 1).astype(queries.dtype)
            return total + jnp.einsum("bqkgd,bskd->bkgqs", scaled, keys, preferred_element_type=jnp.float32)

        return jax.lax.fori_loop(0, 3, body, jnp.zeros((b, k, g, q, s), jnp.float32))

    compiled = (
        jax.jit(scores)
        .lower(
            jax.ShapeDtypeStruct((b, q, k, g, d), jnp.bfloat16, sharding=replicated),
            jax.ShapeDtypeStruct((b, s, k, d), jnp.bfloat16, sharding=replicated),
        )
        .compile()
    )
    text = compiled.as_text()
    assert "lhs_dilate" in text  # the form this test is about (else XLA changed how it writes the einsum)
    assert summarize(text).uncounted_loop_flops == 2 * (2 * b * q * k * g * d * s)


def test_hlo_scales_a_matmul_in_nested_loops_by_both_trip_counts():
    """A matmul inside a loop of 3 inside a loop of 2 runs 6 times; XLA's count has it once, so 5 are left out
    (the loss's chunk loop around XLA's windowed matmul has this shape)."""
    _, devices = topology_devices(TOPOLOGY)
    replicated = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())
    m, k, n = 256, 512, 384

    def nested(x, w):
        def inner(j, total):
            return total + (x * (j + 1).astype(x.dtype)) @ w

        def outer(i, total):
            return jax.lax.fori_loop(0, 3, inner, total * (i + 1).astype(total.dtype))

        return jax.lax.fori_loop(0, 2, outer, jnp.zeros((m, n), jnp.float32))

    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated)  # noqa: E731
    summary = summarize(jax.jit(nested).lower(spec((m, k)), spec((k, n))).compile().as_text())
    assert sorted(trips for _, trips in summary.loops) == [2, 3]
    assert summary.uncounted_loop_flops == 5 * (2 * m * k * n)


UNPRICED_AND_PALLAS_HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %kernel = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", backend_config={}
  %joined = f32[8] custom-call(%kernel), custom_call_target="ConcatBitcast"
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]) tuple(%next, %joined)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8] parameter(0)
  %joined = f32[8] custom-call(%x), custom_call_target="ConcatBitcast"
  %zero = s32[] constant(0)
  %t = (s32[], f32[8]) tuple(%zero, %joined)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_hlo_counts_unpriced_custom_calls_as_the_cost_model_does_and_pallas_kernels_per_run():
    summary = summarize(UNPRICED_AND_PALLAS_HLO)
    assert summary.loops == [("body", 3)]
    # XLA's cost analysis takes a loop body once: the entry's ConcatBitcast and the body's, one each.
    assert summary.unpriced_custom_calls == 2
    assert summary.pallas_kernel_calls == 3  # the kernel runs once per iteration


def test_the_splash_kernel_compiles_for_the_slice_on_the_rows_and_heads_each_chip_holds():
    _, devices = topology_devices(TOPOLOGY)
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2), devices)
    heads = NamedSharding(mesh, PartitionSpec("fsdp", None, "tensor", None))
    rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
    query = jax.ShapeDtypeStruct((4, 256, 4, 128), jnp.bfloat16, sharding=heads)
    key = jax.ShapeDtypeStruct((4, 384, 2, 128), jnp.bfloat16, sharding=heads)
    query_segments = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)
    key_segments = jax.ShapeDtypeStruct((4, 384), jnp.int32, sharding=rows)

    def loss(q, k, v, query_segments, key_segments):
        with activation_sharding(mesh):
            out = splash_attention(q, k, v, CausalSegments(query_segments, key_segments, offset=128), scale=0.1)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(heads, heads, heads))
    compiled = step.lower(query, key, key, query_segments, key_segments).compile()
    summary = summarize(compiled.as_text())
    assert summary.pallas_kernel_calls == 2  # forward, and the fused backward (dq, dk, dv)
    # Each chip runs the kernel on its rows and heads: nothing gathers the queries, keys or values.
    assert not any(c.kind == "all-gather" for c in summary.collectives)


def test_the_abstract_lora_thinker_stores_its_base_as_apply_lora_does(tiny_untied):
    """`model.lora.base_dtype: dtype`: compile-check's abstract thinker has the dtypes of the thinker the trainer
    adapts (kernels and embeddings of the decoder in bfloat16; norms, output head, encoders, adapters float32)."""
    from opsd_jax.compile_check.programs import abstract_thinker
    from opsd_jax.models.qwen2_5_omni import read_config

    overrides = ["model.dtype=bfloat16", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.base_dtype=dtype"]
    settings = load_config(None, [f"model.checkpoint={tiny_untied[1]}", "mesh.fsdp=-1", *overrides], num_devices=8)
    mesh = make_mesh(settings.mesh, jax.devices()[:8])
    _, abstract = abstract_thinker(read_config(tiny_untied[1]), settings, mesh)
    model = from_pretrained(tiny_untied[1], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    adapted = lora.apply_lora(model, settings.model.lora)
    dtypes = {path: x.get_value().dtype for path, x in nnx.to_flat_state(nnx.state(adapted))}
    assert {path: x.get_value().dtype for path, x in nnx.to_flat_state(abstract)} == dtypes
    assert {dtypes[("model", "layers", 0, "mlp", "up_proj", key)] for key in ("kernel", "kernel_lora_a")} == {
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float32),
    }
