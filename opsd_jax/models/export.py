"""Flax thinker parameters -> a Hugging Face thinker checkpoint directory: the inverse of `from_pretrained`.

Every `nnx.Param` goes back to the tensor name and torch layout it was loaded from (`weights`
documents the forward direction): kernels are transposed back (a convolution kernel `[k, in, out]`
becomes `[out, in, k]`), the vision patch-embedding kernel `[c*t*h*w, out]` is unfolded to the Conv3d
weight `[out, c, t, h, w]`, the text decoder's attention kernels and biases, which keep heads as an axis,
are folded back into the checkpoint's matrices and vectors, and embeddings, norms and other biases are
written unchanged. The directory is
thinker-only (`Qwen2_5OmniThinkerForConditionalGeneration`), so transformers and `from_pretrained`
both load it.

Memory: parameters sharded on a mesh are gathered to the host one at a time, and the host holds at
most one shard file's tensors, so a model larger than one device (or the host) exports fine. On
several hosts every process takes part in each gather and process 0 writes.

A thinker with LoRA adapters (`lora.apply_lora`) exports as its merged weights (`export_thinker`), or its
adapters alone as a PEFT adapter directory (`export_peft_adapter`) that peft loads onto the base checkpoint.

Atomicity: the files are written into a hidden sibling directory that is renamed to the final name at
the end, so a crash never leaves a half-written export under that name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from opsd_jax.models import lora, weights
from opsd_jax.models.qwen2_5_omni import Qwen2_5OmniThinker, ThinkerConfig, from_pretrained

logger = logging.getLogger(__name__)

THINKER_ARCHITECTURE = "Qwen2_5OmniThinkerForConditionalGeneration"
THINKER_MODEL_TYPE = "qwen2_5_omni_thinker"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # the Hugging Face default shard size ("5GB")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Files besides config and weights that make a checkpoint directory usable end to end: the tokenizer,
# the processor's settings, the chat template, and the generation defaults (eos / pad ids).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)

_EXPORT_DTYPES = ("float32", "bfloat16", "float16")


class ExportError(weights.CheckpointError):
    """Parameters, config or output directory do not fit an export; the message names which."""


@dataclasses.dataclass(frozen=True)
class ExportedCheckpoint:
    """What `export_thinker` wrote: the final directory, its weight files and totals."""

    directory: Path
    shards: tuple[str, ...]
    num_tensors: int
    total_bytes: int
    dtype: str
    tie_word_embeddings: bool


# --------------------------------------------------------------------------------------------------
# Layout: Flax parameter -> checkpoint tensor
# --------------------------------------------------------------------------------------------------


def folded_kernel_shapes(config: ThinkerConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes of convolutions the port folds into dense kernels, by checkpoint name.

    The vision patch embedding is the reference's Conv3d with kernel = stride = patch:
    `[hidden, in_channels, temporal_patch, patch, patch]` in the checkpoint, `[c*t*h*w, hidden]` here.
    """
    vision = config.vision
    return {
        "visual.patch_embed.proj.weight": (
            vision.hidden_size,
            vision.in_channels,
            vision.temporal_patch_size,
            vision.patch_size,
            vision.patch_size,
        )
    }


def headed_parameter_shapes(config: ThinkerConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes of the text decoder's attention weights, whose heads the port keeps as an axis
    (`opsd_jax.models.text.Qwen2Attention`), by checkpoint name: the projections' `[out, in]` matrices and the
    biases `[heads * head_dim]`."""
    text = config.text
    hidden, q_width = text.hidden_size, text.num_attention_heads * text.head_dim
    kv_width = text.num_key_value_heads * text.head_dim
    shapes = {}
    for layer in range(text.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for proj, width in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
            shapes[f"{prefix}{proj}.weight"] = (width, hidden)
            shapes[f"{prefix}{proj}.bias"] = (width,)
        shapes[f"{prefix}o_proj.weight"] = (hidden, q_width)
    return shapes


def to_checkpoint_layout(
    kind: str, tensor: np.ndarray, name: str, folded_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """The inverse of `weights.to_flax_layout`: a Flax parameter of `kind` in its checkpoint layout.

    Args:
      kind: the parameter's last path element (`kernel`, `embedding`, `weight`, `bias`).
      tensor: the parameter, e.g. `[in, out]` or `[k, in, out]` for a kernel.
      name: its checkpoint name (for error messages).
      folded_shape: the checkpoint shape of a parameter the port stores in another shape: a convolution
        folded into this dense kernel (`folded_kernel_shapes`), or an attention weight or bias whose heads it
        keeps as an axis (`headed_parameter_shapes`); else None.

    Returns:
      a C-contiguous array: kernels with their axes reversed (`[out, in]`, `[out, in, k]`), unfolded to
      `folded_shape`, or with heads folded back (`[hidden, heads, head_dim]` -> `[heads * head_dim, hidden]`);
      everything else unchanged.
    """
    if folded_shape is not None and kind == "bias":
        if tensor.size != int(np.prod(folded_shape)):
            raise ExportError(
                f"tensor {name}: a bias of shape {tuple(tensor.shape)} cannot be the checkpoint's {folded_shape}"
            )
        return np.ascontiguousarray(tensor.reshape(folded_shape))
    if folded_shape is not None and tensor.ndim > len(folded_shape):
        # Heads kept as an axis: `[*in, *out]` is the transposed matrix `[in, out]` with its axes split.
        matrix = tuple(reversed(folded_shape))
        if not weights.is_split_matrix(matrix, tensor.shape):
            raise ExportError(
                f"tensor {name}: a kernel of shape {tuple(tensor.shape)} cannot be folded into the checkpoint's "
                f"{tuple(folded_shape)} the config describes"
            )
        return np.ascontiguousarray(tensor.reshape(matrix).T)
    if folded_shape is not None:
        if (
            kind != "kernel"
            or tensor.ndim != 2
            or tensor.size != int(np.prod(folded_shape))
            or tensor.shape[1] != folded_shape[0]
        ):
            raise ExportError(
                f"tensor {name}: a {kind} of shape {tuple(tensor.shape)} cannot be unfolded to the convolution "
                f"weight {tuple(folded_shape)} the config describes"
            )
        return np.ascontiguousarray(tensor.T.reshape(folded_shape))
    if kind == "kernel":
        tensor = np.transpose(tensor, tuple(reversed(range(tensor.ndim))))
    return np.ascontiguousarray(tensor)


# --------------------------------------------------------------------------------------------------
# Inputs: parameters, config, dtype
# --------------------------------------------------------------------------------------------------


def flat_parameters(source: Qwen2_5OmniThinker | nnx.State | Mapping) -> dict[str, tuple[str, Any]]:
    """Checkpoint name -> (parameter kind, array) for a thinker, an `nnx.State` of its params, or a
    nested dict of arrays (an `nnx.to_pure_dict` or an orbax restore without a target). A thinker with LoRA
    adapters gives its merged weights (`lora.merged_thinker`: kernel + a @ b * alpha / rank, QLoRA's kernels
    dequantized), the plain thinker that computes what it computes."""
    if isinstance(source, nnx.Module):
        source = nnx.state(lora.merged_thinker(source) if lora.is_adapted(source) else source, nnx.Param)
    if isinstance(source, nnx.State):
        items = [
            (tuple(path), variable.get_value())
            for path, variable in nnx.to_flat_state(source)
            if not isinstance(variable, nnx.Variable) or isinstance(variable, nnx.Param)
        ]
    elif isinstance(source, Mapping):
        items = list(_flatten_mapping(source, ()))
    else:
        raise ExportError(
            f"parameters: expected a Qwen2_5OmniThinker, an nnx.State of its params or a nested dict of arrays, "
            f"got {type(source).__name__}"
        )
    return {weights.checkpoint_name(path): (str(path[-1]), value) for path, value in items}


def _flatten_mapping(tree: Mapping, prefix: tuple):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten_mapping(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def thinker_config_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The thinker's transformers config as a dict, from a checkpoint directory or a config dict.

    A full Omni config contributes its `thinker_config`; the talker and token2wav parts are dropped.
    """
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        config_file = Path(source) / "config.json"
        if not config_file.is_file():
            raise ExportError(f"config source {source}: no config.json in that directory")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{config_file}: not valid JSON ({err})") from err
    if "thinker_config" in raw:
        raw = copy.deepcopy(raw["thinker_config"])
    return raw


def export_dtype(dtype: Any) -> np.dtype | None:
    """`None` (keep each parameter's dtype) or one of float32 / bfloat16 / float16 as a numpy dtype."""
    if dtype is None:
        return None
    try:
        resolved = np.dtype(jnp.dtype(dtype))
    except TypeError as err:
        raise ExportError(f"dtype: expected one of {', '.join(_EXPORT_DTYPES)}, got {dtype!r}") from err
    if resolved.name not in _EXPORT_DTYPES:
        raise ExportError(f"dtype: expected one of {', '.join(_EXPORT_DTYPES)}, got {resolved.name}")
    return resolved


def _to_host(value: Any) -> np.ndarray:
    """One parameter as a host array; a sharded array is assembled on the host, never on one device."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def _check_against_config(params: dict[str, tuple[str, Any]], config: ThinkerConfig) -> None:
    """Every parameter the config's thinker has, with its shape, and nothing else."""
    abstract = nnx.eval_shape(lambda: Qwen2_5OmniThinker(config, rngs=nnx.Rngs(0)))
    expected = {name: tuple(value.shape) for name, (_, value) in flat_parameters(abstract).items()}
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise ExportError(
            f"parameters do not match the config's thinker: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unknown)} unknown (first: {unknown[:3]})"
        )
    for name, shape in expected.items():
        got = tuple(np.shape(params[name][1]))
        if got != shape:
            raise ExportError(f"parameter {name}: shape {got}, but the config's thinker has {shape}")


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names (sorted) packed greedily into shards of at most `max_shard_bytes` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes):
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _shard_file(index: int, count: int) -> str:
    return SINGLE_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file (`safetensors.numpy` writes ml_dtypes bfloat16 arrays as BF16)."""
    save_file(tensors, str(path), metadata={"format": "pt"})


def _tokenizer_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ExportError(f"tokenizer_dir {directory}: not a directory")
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not any(path.name in ("tokenizer.json", "vocab.json", "tokenizer_config.json") for path in files):
        raise ExportError(
            f"tokenizer_dir {directory}: holds no tokenizer (expected tokenizer.json, vocab.json or tokenizer_config.json)"
        )
    return files


def _set_dtype(tree: Any, name: str) -> None:
    """Replaces every `dtype` / `torch_dtype` entry of a (nested) config with `name` (as `dtype`)."""
    if isinstance(tree, dict):
        if "torch_dtype" in tree or "dtype" in tree:
            tree.pop("torch_dtype", None)
            tree["dtype"] = name
        for value in tree.values():
            _set_dtype(value, name)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def export_thinker(
    model_or_params: Qwen2_5OmniThinker | nnx.State | Mapping,
    config_source: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> ExportedCheckpoint:
    """Writes a thinker-only Hugging Face checkpoint directory.

    Args:
      model_or_params: the thinker, an `nnx.State` of its `nnx.Param`s, or a nested dict of arrays
        (any of them sharded on a mesh).
      config_source: a checkpoint directory (its config.json) or a config dict, thinker or full Omni,
        describing the architecture. Tied embeddings are decided by the parameters: no `lm_head` ->
        `tie_word_embeddings: true` and no lm_head tensor.
      out_dir: the directory to create; it must not exist unless `overwrite`.
      dtype: None keeps each parameter's dtype; else "float32", "bfloat16" or "float16".
      max_shard_bytes: at most this many tensor bytes per file (one tensor bigger than that gets a file
        of its own); several files come with a `model.safetensors.index.json`.
      tokenizer_dir: a directory whose tokenizer / processor / generation files are copied along.
      overwrite: replace an existing `out_dir` (only once the new export is complete).

    Returns:
      what was written (on processes other than 0, what process 0 wrote).
    """
    out_dir = Path(out_dir)
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes: expected a positive byte count, got {max_shard_bytes}")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"export directory {out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    target_dtype = export_dtype(dtype)
    extra_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []

    params = flat_parameters(model_or_params)
    tied = "lm_head.weight" not in params
    hf_config = thinker_config_dict(config_source)
    source_name = "the config dict" if isinstance(config_source, Mapping) else f"{Path(config_source) / 'config.json'}"
    config = dataclasses.replace(ThinkerConfig.from_hf(hf_config, source=source_name), tie_word_embeddings=tied)
    _check_against_config(params, config)
    folded = folded_kernel_shapes(config) | headed_parameter_shapes(config)

    def written_dtype(value: Any) -> np.dtype:
        own = np.dtype(value.dtype)
        return target_dtype if target_dtype is not None and jnp.issubdtype(own, jnp.floating) else own

    sizes = {name: int(np.prod(np.shape(value))) * written_dtype(value).itemsize for name, (_, value) in params.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = [_shard_file(index, len(shards)) for index in range(len(shards))]
    dtype_name = written_dtype(params["model.embed_tokens.weight"][1]).name
    summary = ExportedCheckpoint(out_dir, tuple(files), len(params), sum(sizes.values()), dtype_name, tied)

    with _staging_directory(out_dir) as staging:
        for file, names in zip(files, shards):
            tensors = {}
            for name in names:
                kind, value = params[name]
                host = _to_host(value).astype(written_dtype(value), copy=False)
                tensors[name] = to_checkpoint_layout(kind, host, name, folded.get(name))
            if staging is not None:
                _write_shard(staging / file, tensors)
        if staging is not None:
            if len(files) > 1:
                index = {
                    "metadata": {"total_size": summary.total_bytes},
                    "weight_map": {name: file for file, names in zip(files, shards) for name in names},
                }
                (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            hf_config.update(
                architectures=[THINKER_ARCHITECTURE], model_type=THINKER_MODEL_TYPE, tie_word_embeddings=tied
            )
            if isinstance(hf_config.get("text_config"), dict):
                hf_config["text_config"]["tie_word_embeddings"] = tied
            _set_dtype(hf_config, dtype_name)
            hf_config["dtype"] = dtype_name
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
            for path in extra_files:
                shutil.copyfile(path, staging / path.name)
    logger.info(
        "exported %d tensors (%d bytes, %s) in %d file(s) to %s",
        summary.num_tensors,
        summary.total_bytes,
        dtype_name,
        len(files),
        out_dir,
    )
    return summary


@contextlib.contextmanager
def _staging_directory(out_dir: Path) -> Iterator[Path | None]:
    """A hidden sibling of `out_dir` that process 0 writes into (None on other processes), renamed to
    `out_dir` when the block completes and removed when it raises; all processes meet at the end."""
    staging = None
    if jax.process_index() == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp's private 0o700 would stay on the published directory
    try:
        yield staging
        if staging is not None:
            _publish(staging, out_dir)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"opsd_jax export {out_dir}")


def _publish(staging: Path, out_dir: Path) -> None:
    """Renames the finished staging directory to `out_dir`; an old `out_dir` is removed only after."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    retired.rmdir()
    out_dir.rename(retired)
    staging.rename(out_dir)
    shutil.rmtree(retired)


# --------------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------------

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's serialized names: its wrapper's path to the base model's modules


@dataclasses.dataclass(frozen=True)
class ExportedAdapter:
    """What `export_peft_adapter` wrote: the directory, the adapted modules (transformers' names), rank, alpha."""

    directory: Path
    modules: tuple[str, ...]
    rank: int
    alpha: float
    total_bytes: int
    dtype: str


def transformers_module_name(name: str) -> str:
    """The module that checkpoint name `name` (e.g. `model.layers.0.mlp.up_proj`) loads into in transformers'
    `Qwen2_5OmniThinkerForConditionalGeneration` (transformers 5, which the project pins): the text model
    nests as `model.language_model`, the encoders under `model.` (its conversion mapping for
    qwen2_5_omni_thinker); the names PEFT saves and loads adapters by."""
    head, _, rest = name.partition(".")
    if head == "model":
        return f"model.language_model.{rest}"
    if head in ("visual", "audio_tower"):
        return f"model.{name}"
    return name


def export_peft_adapter(
    adapted: nnx.Module,
    out_dir: str | Path,
    *,
    base_model: str,
    dtype: Any = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> ExportedAdapter:
    """Writes the adapters of a LoRA thinker as a PEFT adapter directory: `adapter_config.json` (LoRA, `r`,
    `lora_alpha`, `target_modules` = the adapted layers, no dropout) and `adapter_model.safetensors`
    (`base_model.model.NAME.lora_A.weight` = a^T `[rank, in]`, `...lora_B.weight` = b^T `[out, rank]` for each
    adapted module NAME, `transformers_module_name`: what PEFT itself saves for the thinker), which `peft.PeftModel.from_pretrained` loads onto the base
    thinker (transformers' `Qwen2_5OmniThinkerForConditionalGeneration`): PEFT adds `B(A(x)) * alpha / r`,
    the adapted layer's own `x @ a @ b * alpha / rank`.

    Args:
      adapted: the thinker with adapters (`lora.apply_lora`), sharded or not.
      out_dir: the directory to create; it must not exist unless `overwrite`.
      base_model: what `base_model_name_or_path` names: the base checkpoint the adapters were trained on.
      dtype: None keeps the adapters' dtype; else "float32", "bfloat16" or "float16".
      tokenizer_dir: a directory whose tokenizer / processor / generation files are copied along.
      overwrite: replace an existing `out_dir` (only once the new export is complete).

    Raises:
      ExportError: `adapted` has no adapters, its base kernels are quantized (QLoRA: PEFT would add the
        adapters to the unquantized base, another model than the one trained), or an adapted layer is a
        folded convolution (PEFT adapts the Conv3d itself, with other shapes).
    """
    out_dir = Path(out_dir)
    if not lora.is_adapted(adapted):
        raise ExportError("PEFT export: the thinker has no LoRA adapters (a run with model.lora set trains them)")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"export directory {out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    target_dtype = export_dtype(dtype)
    extra_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []
    rank, alpha = lora.lora_settings(adapted)
    layers = {weights.checkpoint_name(path): layer for path, layer in lora.adapted_layers(adapted)}
    modules = tuple(transformers_module_name(name.removesuffix(".weight")) for name in layers)
    quantized = [name for name, layer in layers.items() if lora.is_quantized(layer)]
    if quantized:
        raise ExportError(
            f"PEFT export: the adapters of {len(quantized)} layers ({quantized[0]}, ...) were trained on quantized "
            "base kernels (QLoRA); PEFT would add them to the unquantized base, another model: export merged weights"
        )
    folded = sorted(set(layers) & set(folded_kernel_shapes(adapted.config)))
    if folded:
        raise ExportError(f"PEFT export: {folded[0]} is a convolution in transformers; PEFT cannot load its adapters")

    tensors = {}
    for layer, module in zip(layers.values(), modules):
        for suffix, variable in (("lora_A", layer.kernel_lora_a), ("lora_B", layer.kernel_lora_b)):
            host = _to_host(variable.get_value())
            written = target_dtype if target_dtype is not None else host.dtype
            tensors[f"{PEFT_PREFIX}{module}.{suffix}.weight"] = np.ascontiguousarray(host.T.astype(written))
    dtype_name = next(iter(tensors.values())).dtype.name
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(modules),  # whole module names: PEFT adapts exactly these
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    with _staging_directory(out_dir) as staging:
        if staging is not None:
            _write_shard(staging / PEFT_WEIGHTS_FILE, tensors)
            (staging / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
            for path in extra_files:
                shutil.copyfile(path, staging / path.name)
    total = sum(tensor.nbytes for tensor in tensors.values())
    logger.info("exported the adapters of %d layers (rank %d, %d bytes) to %s", len(modules), rank, total, out_dir)
    return ExportedAdapter(out_dir, modules, rank, float(alpha), total, dtype_name)


def export_roundtrip(model_or_params, config_source, out_dir: str | Path, **export_kwargs) -> Qwen2_5OmniThinker:
    """Exports, loads the export back with `from_pretrained` (float32) and checks that every parameter
    equals its source bit for bit in the written dtype. Returns the reloaded thinker.

    Raises:
      ExportError: naming the first parameter that did not survive the round trip.
    """
    summary = export_thinker(model_or_params, config_source, out_dir, **export_kwargs)
    reloaded = from_pretrained(summary.directory)
    written_dtypes = {
        name: entry.dtype for name, entry in weights.SafetensorsCheckpoint.open(summary.directory).entries.items()
    }
    original = flat_parameters(model_or_params)
    back = flat_parameters(reloaded)
    if set(back) != set(original):
        raise ExportError(f"round trip: reloaded names differ: {sorted(set(back) ^ set(original))[:8]}")
    for name, (_, value) in original.items():
        written = written_dtypes[name]
        expected = _to_host(value).astype(written)
        got = _to_host(back[name][1]).astype(written)
        if not np.array_equal(expected.view(np.uint8), got.view(np.uint8)):
            diff = np.max(np.abs(expected.astype(np.float32) - got.astype(np.float32)))
            raise ExportError(f"round trip: parameter {name} changed (max abs difference {diff})")
    return reloaded
