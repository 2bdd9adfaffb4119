"""Which of the thinker's weights may be stored in the compute dtype without changing any output.

The layers of the text decoder and output head (`Linear`, `Embed`, `RMSNorm`) cast each weight to the
compute dtype (`model.dtype`) where they use it, so those weights stored in that dtype give the same
outputs from half the bytes of float32 ones. The encoders' LayerNorms compute from float32 weights:
theirs must stay as they are. One exception in training: the step's output head
(`Qwen2_5OmniThinker.head_kernel`: the fused loss, the teacher's scores) multiplies the kernel as it
is stored (`scoring.head_logits`, float32 accumulation), so there a float32 kernel computes in float32;
generation's head (`logits`, a `Linear` or `Embed.attend`) casts it.

`Linear` and `Embed` cast to their own dtype, `RMSNorm` to its input's: the compute dtype too, in an
adapted model (LoRA) as well (an adapted `Linear` casts its output, float32 adapters' delta included).

Used by generation's decode copy (`opsd_jax.sampling.decode_weights.generation_model`: every decoder weight),
a frozen teacher's copy (`opsd_jax.opsd.step.teacher_copy`: the decoder's weights but the step's output head)
and LoRA's `base_dtype: dtype` (`opsd_jax.models.lora`: the same base weights as the frozen teacher's copy).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

DECODER_PARAMS = ("model", "lm_head")  # the thinker's attributes: text decoder, untied output head
UNTIED_HEAD = ("lm_head", "kernel")
TIED_HEAD = ("model", "embed_tokens", "embedding")


def param_names(path: tuple) -> tuple:
    """A parameter's key path (of `jax.tree_util`, or `nnx.to_flat_state`'s) as names (dict keys, attribute
    names, sequence indices), without the trailing `value` of an NNX variable's leaf."""
    names = tuple(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))) for entry in path)
    return names[:-1] if names[-1:] == ("value",) else names


def is_decoder_param(path: tuple) -> bool:
    """Whether a key path leads into the text decoder or the output head, whose layers cast at use."""
    return bool(path) and param_names(path[:1])[0] in DECODER_PARAMS


def head_path(state: Any) -> tuple[str, ...]:
    """The path of the step's output head kernel in the state of a whole thinker (or of its base weights):
    `lm_head/kernel`, or the embedding table when the embeddings are tied (the state has no `lm_head`)."""
    tied = not any(param_names(path)[:2] == UNTIED_HEAD for path, _ in jax.tree_util.tree_leaves_with_path(state))
    return TIED_HEAD if tied else UNTIED_HEAD


def casts_at_use(path: tuple, head: tuple[str, ...]) -> bool:
    """Whether every forward (generation, the training step's student and teacher) casts this parameter to the
    compute dtype before using it: a decoder weight other than the step's output head `head` (`head_path`)."""
    return is_decoder_param(path) and param_names(path) != head


def in_compute_dtype(
    state: Any, dtype: Any, *, where: Callable[[tuple], bool] = lambda path: True, copy: bool = False
) -> Any:
    """`state` (arrays, or `jax.ShapeDtypeStruct`s) with its floating-point `casts_at_use` leaves, among those
    `where(path)` selects, in `dtype`: the same outputs from fewer bytes. Leaves already in `dtype` and all
    others are kept as they are, or copied with `copy` (the result then shares no buffer with `state`)."""
    dtype = jnp.dtype(dtype)
    head = head_path(state)

    def convert(path, x):
        cast = casts_at_use(path, head) and where(path) and jnp.issubdtype(x.dtype, jnp.floating)
        target = dtype if cast else x.dtype
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, target, sharding=x.sharding)
        if target != x.dtype:
            return x.astype(target)
        return jnp.copy(x) if copy else x

    return jax.tree_util.tree_map_with_path(convert, state)
