"""Hugging Face safetensors checkpoints -> Flax NNX parameter state, with no PyTorch at run time.

The mapping is generic. A Flax parameter at path `model.layers.0.self_attn.q_proj.kernel` is the
checkpoint tensor `model.layers.0.self_attn.q_proj.weight`, because modules mirror the reference's
attribute names; only the layout differs, and it is decided by the parameter's kind:

* `kernel` <- `weight`: a 2-D weight is transposed (`[out, in]` -> `[in, out]`), and reshaped where the kernel
  keeps heads as an axis (the text decoder's attention: `[hidden, heads, head_dim]`, `[heads, head_dim, hidden]`);
  a convolution weight `[out, in, k]` becomes `[k, in, out]`; a convolution folded into a dense layer (the vision
  patch embedding, `[out, c, t, h, w]`) becomes `[c*t*h*w, out]`;
* `embedding`, `weight`, `bias` <- the same name, unchanged but for a bias of such heads (`[heads, head_dim]`).

Checkpoint names are normalised first: the `thinker.` prefix of full Omni checkpoints is stripped,
transformers 5.x in-memory names (`model.language_model.*`, `model.audio_tower.*`, `model.visual.*`)
become the file names, and `talker.*` / `token2wav.*` tensors are set aside and counted.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor does not match the model; the message names it."""


_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

_SKIPPED_PREFIXES = ("talker.", "token2wav.")


def normalize_key(name: str) -> str | None:
    """The thinker file name of a checkpoint tensor, or None for talker / token2wav tensors."""
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    if name.startswith("thinker."):
        name = name[len("thinker.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    for tower in ("audio_tower.", "visual."):
        if name.startswith("model." + tower):
            return name[len("model.") :]
    return name


@dataclass
class _Entry:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass
class SafetensorsCheckpoint:
    """Lazily readable tensors of a checkpoint directory, under normalised thinker names."""

    directory: Path
    entries: dict[str, _Entry]
    skipped: int = 0
    _maps: dict[Path, np.memmap] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, directory: str | Path) -> SafetensorsCheckpoint:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({err})") from err
            files = sorted({directory / name for name in weight_map.values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"checkpoint directory {directory} holds no *.safetensors files")
        entries: dict[str, _Entry] = {}
        skipped = 0
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index.name} but missing")
            for raw_name, entry in _read_header(file).items():
                name = normalize_key(raw_name)
                if name is None:
                    skipped += 1
                    continue
                if name in entries:
                    raise CheckpointError(f"{file}: tensor {raw_name} duplicates {name} from {entries[name].file}")
                entries[name] = entry
        if skipped:
            logger.info(
                "checkpoint %s: skipped %d talker/token2wav tensors (not part of the thinker)", directory, skipped
            )
        return cls(directory=directory, entries=entries, skipped=skipped)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the memory-mapped file."""
        entry = self.entries[name]
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        raw = self._maps[entry.file][entry.offset : entry.offset + entry.length]
        return raw.view(entry.dtype).reshape(entry.shape)


def _read_header(file: Path) -> dict[str, _Entry]:
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file}: not a safetensors file (unreadable JSON header: {err})") from err
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries[name] = _Entry(file, np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]), base + start, end - start)
    return entries


# --------------------------------------------------------------------------------------------------
# Flax parameter path <-> checkpoint tensor
# --------------------------------------------------------------------------------------------------


def checkpoint_name(path: Iterable[str | int]) -> str:
    """`('model', 'layers', 0, 'mlp', 'up_proj', 'kernel')` -> `'model.layers.0.mlp.up_proj.weight'`."""
    parts = [str(part) for part in path]
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def to_flax_layout(kind: str, tensor: np.ndarray, target_shape: tuple[int, ...], name: str) -> np.ndarray:
    """Rearranges a checkpoint tensor into the layout of a Flax parameter of `kind`."""
    if kind == "kernel":
        if tensor.ndim == 2 and len(target_shape) >= 2:
            tensor = tensor.T
            if len(target_shape) > 2 and is_split_matrix(tensor.shape, target_shape):
                tensor = tensor.reshape(target_shape)  # heads split out of `[in, out]` (row-major: exact)
        elif tensor.ndim > 2 and len(target_shape) == 2:
            tensor = tensor.reshape(tensor.shape[0], -1).T
        elif tensor.ndim == len(target_shape):
            tensor = np.transpose(tensor, tuple(reversed(range(tensor.ndim))))
    elif kind == "bias" and tensor.ndim == 1 and len(target_shape) > 1 and tensor.size == int(np.prod(target_shape)):
        tensor = tensor.reshape(target_shape)
    if tuple(tensor.shape) != tuple(target_shape):
        raise CheckpointError(
            f"tensor {name}: checkpoint shape {tuple(tensor.shape)} does not fit the model's parameter "
            f"of shape {tuple(target_shape)} (after converting the {kind} layout)"
        )
    return tensor


def is_split_matrix(matrix: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether `shape` is the matrix shape `[rows, cols]` with rows and columns each split into axes."""
    return any((int(np.prod(shape[:cut])), int(np.prod(shape[cut:]))) == tuple(matrix) for cut in range(1, len(shape)))


def load_into(
    flat_params: dict[tuple, object],
    checkpoint: SafetensorsCheckpoint,
    *,
    place: Callable[[tuple, np.ndarray], object],
    prefix: str = "",
    unused_ok: Callable[[str], bool] = lambda name: False,
) -> dict[tuple, object]:
    """Reads one tensor per Flax parameter and places it.

    Args:
      flat_params: Flax parameter path -> abstract parameter (anything with `.shape` and `.dtype`).
      checkpoint: the opened checkpoint.
      place: `(path, host array in the parameter's layout) -> device array` (casts and shards).
      prefix: checkpoint name prefix of the module being loaded (`"visual."` for the vision encoder
        alone); only tensors under it are considered.
      unused_ok: names of checkpoint tensors that may be left unread (reported, never silent).

    Returns:
      path -> placed array, for every parameter.

    Raises:
      CheckpointError: a parameter has no tensor, a tensor has no parameter, or shapes disagree.
    """
    expected = {prefix + checkpoint_name(path): path for path in flat_params}
    missing = sorted(name for name in expected if name not in checkpoint)
    if missing:
        shape = tuple(flat_params[expected[missing[0]]].shape)
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} lacks {len(missing)} tensor(s) the model needs, first "
            f"{missing[0]} (model shape {shape}); all: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    unexpected = [name for name in checkpoint.names() if name.startswith(prefix) and name not in expected]
    tolerated = [name for name in unexpected if unused_ok(name)]
    unknown = [name for name in unexpected if not unused_ok(name)]
    if unknown:
        raise CheckpointError(
            f"checkpoint {checkpoint.directory} has {len(unknown)} tensor(s) the model does not know, first "
            f"{unknown[0]} (shape {checkpoint.shape(unknown[0])}); all: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
        )
    if tolerated:
        logger.warning(
            "checkpoint %s: %d tensor(s) not used by this model (first %s)",
            checkpoint.directory,
            len(tolerated),
            tolerated[0],
        )
    placed = {}
    for name, path in expected.items():
        param = flat_params[path]
        tensor = to_flax_layout(str(path[-1]), checkpoint.read(name), tuple(param.shape), name)
        placed[path] = place(path, tensor)
    return placed


def load_module(module, checkpoint: SafetensorsCheckpoint, *, prefix: str = "") -> None:
    """Fills every parameter of an (eagerly built) NNX `module` in place from `checkpoint[prefix...]`.

    For loading a single part, such as one encoder in its parity test; `from_pretrained` loads the
    whole thinker without materialising random weights first.
    """
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    loaded = load_into(
        {path: variable.get_value() for path, variable in flat.items()},
        checkpoint,
        place=lambda path, tensor: jnp.asarray(np.asarray(tensor), dtype=flat[path].get_value().dtype),
        prefix=prefix,
    )
    for path, variable in flat.items():
        variable.set_value(loaded[path])
