"""The thinker's text decoder: a Qwen2 decoder with 3-axis multimodal rotary positions (M-RoPE).

Attribute paths mirror the reference checkpoint (`model.layers.{i}.self_attn.q_proj`, ...), so the
generic loader in `opsd_jax.models.weights` maps every tensor without a per-layer table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from opsd_jax.models.layers import (
    CausalSegments,
    Embed,
    Linear,
    RMSNorm,
    apply_rotary,
    dot_product_attention,
    swiglu,
)
from opsd_jax.models.splash import splash_attention
from opsd_jax.sharding import (
    AxisRules,
    activation_axis_parts,
    activation_batch_shards,
    constrain,
    constrain_activation,
)

T = TypeVar("T")

# Layer-boundary activation layouts (logical axes; see `opsd_jax.sharding.activation_sharding`).
HIDDEN_AXES = ("batch", "length", "activation_embed")
# The KV cache `[batch, max_len, kv_heads, head_dim]`: rows on the batch axes, KV heads on `kv_heads` (by default
# (data, fsdp) and tensor), so that each chip holds the keys and values of the heads it computes.
CACHE_AXES = ("batch", None, "kv_heads", None)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text_config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"text_config: mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = {self.head_dim // 2}"
            )

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> TextConfig:
        """From the `text_config` block of a transformers config.json (4.x or 5.x spelling)."""
        try:
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))),
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            )
        except KeyError as err:
            raise KeyError(f"text_config.{err.args[0]}") from None


def mrope_cos_sin(
    position_ids: jax.Array, *, head_dim: int, theta: float, mrope_section: tuple[int, int, int], dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for 3-axis positions.

    Args:
      position_ids: `[3, batch, seq]` (temporal, height, width) positions.

    Returns:
      cos, sin: `[batch, seq, head_dim]` in `dtype`. Frequency slot j takes its angle from axis 0 for
      the first `mrope_section[0]` slots, axis 1 for the next `mrope_section[1]`, axis 2 for the rest.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [head_dim/2]
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, batch, seq, head_dim/2]
    bounds = [0, mrope_section[0], mrope_section[0] + mrope_section[1], head_dim // 2]
    angles = jnp.concatenate([angles[axis, ..., bounds[axis] : bounds[axis + 1]] for axis in range(3)], axis=-1)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


@struct.dataclass
class LayerCache:
    """One layer's static-shape KV cache: `key`/`value` `[batch, max_len, kv_heads, head_dim]`."""

    key: jax.Array
    value: jax.Array


def constrain_cache(cache: list[LayerCache], mesh: Mesh | None, rules: AxisRules | None) -> list[LayerCache]:
    """Pins every layer's cache to `CACHE_AXES` on `mesh` under `rules` (unchanged without a mesh)."""
    return jax.tree.map(lambda x: constrain(x, CACHE_AXES, mesh, rules), cache)


# The attention implementations of the scoring forward (`TextModel.prefix_and_continuations`): XLA's
# (`dot_product_attention`) or the fused splash kernel (`opsd_jax.models.splash`, TPU; interpreted elsewhere).
ATTENTION_KERNELS = ("xla", "splash")
# What a rematerialised layer keeps for its backward pass (`ModelConfig.remat_policy`): its input alone ("full"),
# or also the outputs of its projections and MLP matmuls and the rotated queries and keys ("save_dots"), so that
# the backward recomputes only the other element-wise work and attention, not the layer's matmuls nor the rotary
# embedding the attention's backward reads (7B on v5p, a quarter of the depth: cost model 0.5212 -> 0.5186 s for
# 0.57 GB more at the peak; keeping the normalised inputs as well priced worse, 0.5198 s). Attention's own scores
# are never kept (XLA's are batched dots, which the policy does not save; the splash kernel is no dot).
REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("rotated_queries", "rotated_keys"),
    ),
}


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, attention: str = "xla"):
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention: expected one of {list(ATTENTION_KERNELS)}, got {attention!r}")
        self.attention = attention
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # Heads as an axis of the kernels (`[hidden, heads, head_dim]`, `[heads, head_dim, hidden]`), not folded into
        # one: the projections then write, and the output projection reads, the head-major layout of the splash
        # kernel directly. With `[hidden, heads * head_dim]` kernels XLA copied each query, key and the kernel's
        # output between the two layouts, in every pass (compiled for the 7B on v5p, a quarter of the depth:
        # cost model 0.5429 -> 0.5354 s per micro-batch).
        q_heads, kv_heads = (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
        kw = dict(dtype=dtype, rngs=rngs)
        self.q_proj = Linear(cfg.hidden_size, q_heads, use_bias=True, axes=("embed", "heads", None), **kw)
        self.k_proj = Linear(cfg.hidden_size, kv_heads, use_bias=True, axes=("embed", "kv_heads", None), **kw)
        self.v_proj = Linear(cfg.hidden_size, kv_heads, use_bias=True, axes=("embed", "kv_heads", None), **kw)
        self.o_proj = Linear(q_heads, cfg.hidden_size, use_bias=False, axes=("heads", None, "embed"), **kw)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | CausalSegments,
        cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """`x [batch, seq, hidden]`; `mask` boolean `[batch, seq, kv_len]`, or `CausalSegments` (the scoring
        forward), which runs the module's `attention` kernel (a dense mask always runs XLA's).

        With a cache, the new keys and values are written at `cache_index` (a scalar int32) and the
        queries attend over the whole cache (`kv_len = max_len`), the mask deciding what is visible.
        """
        q, k, v = self.project(x, cos, sin)
        out, cache = self.attend(q, k, v, mask, cache, cache_index)
        return self.o_proj(out), cache

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`x [batch, seq, hidden]` -> rotated queries `[batch, seq, heads, head_dim]`, rotated keys and values
        `[batch, seq, kv_heads, head_dim]`; `cos`, `sin` `[batch, seq, head_dim]`. Token by token."""
        heads = functools.partial(constrain_activation, logical_axes=("batch", "length", "activation_heads", None))
        kv_heads = functools.partial(
            constrain_activation, logical_axes=("batch", "length", "activation_kv_heads", None)
        )
        q, k, v = heads(self.q_proj(x)), kv_heads(self.k_proj(x)), kv_heads(self.v_proj(x))
        q = checkpoint_name(apply_rotary(q, cos, sin), "rotated_queries")
        k = checkpoint_name(apply_rotary(k, cos, sin), "rotated_keys")
        return q, k, v

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | CausalSegments,
        cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attention of projected `q`, `k`, `v` (`project`) -> `[batch, seq, heads, head_dim]` before the output
        projection, and the updated cache (see `__call__`)."""
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = LayerCache(
                key=jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype), start),
                value=jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype), start),
            )
            k, v = cache.key, cache.value
        scale = self.head_dim**-0.5
        if isinstance(mask, CausalSegments) and self.attention == "splash":
            out = splash_attention(q, k, v, mask, scale=scale)
        else:
            dense = mask.dense() if isinstance(mask, CausalSegments) else mask
            out = dot_product_attention(q, k, v, dense, scale=scale)
        return out, cache


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = swiglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(constrain_activation(hidden, ("batch", "length", "activation_mlp")))


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, attention: str = "xla"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis="norm", dtype=dtype)
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, rngs=rngs, attention=attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis="norm", dtype=dtype)
        self.mlp = Qwen2MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        return self.after_attention(x, attn_out), cache

    def after_attention(self, x: jax.Array, attn_out: jax.Array) -> jax.Array:
        """The layer from its attention output on: residual, MLP, residual. Token by token."""
        x = constrain_activation(x + attn_out, HIDDEN_AXES)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain_activation(x, HIDDEN_AXES)


class TextModel(nnx.Module):
    """Embedding, decoder layers and final norm (the reference's `model.*` tensors)."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        remat: bool = False,
        remat_policy: str = "full",
        attention: str = "xla",
    ):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy: expected one of {list(REMAT_POLICIES)}, got {remat_policy!r}")
        self.config = cfg
        self.dtype = dtype
        # Recompute each layer's activations in the backward pass instead of keeping them (only the
        # layer inputs stay alive, and with "save_dots" its matmuls' outputs): what long multimodal sequences
        # need on an accelerator.
        self.remat = remat
        self.remat_policy = remat_policy
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), dtype=dtype, rngs=rngs)
        # The scoring forward's attention kernel (`ATTENTION_KERNELS`); prefill and decode always run XLA's.
        self.attention = attention
        self.layers = nnx.List(
            [Qwen2DecoderLayer(cfg, dtype=dtype, rngs=rngs, attention=attention) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis="norm", dtype=dtype)

    def init_cache(
        self, batch: int, length: int, *, mesh: Mesh | None = None, rules: AxisRules | None = None
    ) -> list[LayerCache]:
        """Empty KV caches, one per layer, `[batch, length, kv_heads, head_dim]` each in the compute dtype.

        With a `mesh` (inside a jitted program) they are laid out by `CACHE_AXES` under the logical-axis table
        `rules` (the run's `MeshConfig.axis_rules`; default: the default table).
        """
        cfg = self.config
        shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
        cache = [
            LayerCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(cfg.num_hidden_layers)
        ]
        return constrain_cache(cache, mesh, rules)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        mask: jax.Array,
        cache: list[LayerCache] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Decoder stack.

        Args:
          inputs_embeds: `[batch, seq, hidden]`.
          position_ids: `[3, batch, seq]` M-RoPE positions.
          mask: boolean `[batch, seq, kv_len]`, True where a query may attend to a key.
          cache: per-layer KV caches, or None for a cache-free forward.
          cache_index: int32 scalar, the cache column where this call's first token is written.

        Returns:
          hidden states after the final norm `[batch, seq, hidden]`, and the updated caches.
        """
        cfg = self.config
        cos, sin = mrope_cos_sin(
            position_ids, head_dim=cfg.head_dim, theta=cfg.rope_theta, mrope_section=cfg.mrope_section, dtype=self.dtype
        )
        x = constrain_activation(inputs_embeds.astype(self.dtype), HIDDEN_AXES)
        new_cache = [] if cache is not None else None

        def run(i: int, graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
            layer_cache = None if cache is None else cache[i]
            if self.remat:
                remat_layer = _REMAT_LAYER[self.remat_policy]
                x, layer_cache = remat_layer(graphdef, state, x, cos, sin, mask, layer_cache, cache_index)
            else:
                x, layer_cache = nnx.merge(graphdef, state)(x, cos, sin, mask, layer_cache, cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)
            return x

        x = _through_layers(self.layers, x, run)
        return self.norm(x), new_cache

    def prefix_and_continuations(
        self,
        prefix_embeds: jax.Array,
        prefix_positions: jax.Array,
        prefix_mask: CausalSegments,
        embeds: jax.Array,
        positions: jax.Array,
        mask: CausalSegments,
    ) -> tuple[jax.Array, jax.Array]:
        """Prompts and, in the same pass over the layers, several continuations of each.

        Equal to a forward over the prompts into a KV cache followed by a forward of the continuations
        over that cache repeated for each (`__call__` twice), but each layer runs the prompts and the
        continuations while its weights are at hand: under FSDP a layer's weights are gathered once per
        pass instead of once for the prompts and once more for the continuations, and no layer's cache
        outlives the layer. Where the batch axes split both alike, their tokens pass through each weight
        together (`JointTokens`), so that each weight's gradient is reduced once.

        Args:
          prefix_embeds: `[B, P, hidden]` the prompts; prefix_positions `[3, B, P]`; prefix_mask `[B, P]` queries
            over `[B, P + C]` keys, a cache that has the continuations' columns too (offset 0).
          embeds: `[B * G, C, hidden]` the continuations, prompt-major (G per prompt); positions
            `[3, B * G, C]`; mask `[B * G, C]` queries over `[B * G, P + C]` keys, the prompt's then its own
            (offset P).

        Both masks are `CausalSegments`, which the layers' attention runs with the model's `attention` kernel.

        Returns:
          hidden states after the final norm: the prompts' `[B, P, hidden]`, the continuations' `[B * G, C, hidden]`.
        """
        cfg = self.config
        rope = functools.partial(
            mrope_cos_sin,
            head_dim=cfg.head_dim,
            theta=cfg.rope_theta,
            mrope_section=cfg.mrope_section,
            dtype=self.dtype,
        )
        prefix_rope, rope_ = rope(prefix_positions), rope(positions)
        x = constrain_activation(prefix_embeds.astype(self.dtype), HIDDEN_AXES)
        y = constrain_activation(embeds.astype(self.dtype), HIDDEN_AXES)
        tokens = JointTokens.of(x, y)
        if tokens is not None:
            # One token matrix through every layer: see `JointTokens`.
            h = constrain_activation(tokens.join(x, y), HIDDEN_AXES)
            rope_ = tuple(tokens.join(a, b) for a, b in zip(prefix_rope, rope_))
            layer = _REMAT_JOINT_LAYER[self.remat_policy] if self.remat else _joint_layer
            h = _through_layers(
                self.layers,
                h,
                lambda _, graphdef, state, h: layer(graphdef, state, tokens, h, rope_, prefix_mask, mask),
            )
            return tokens.split(self.norm(h))
        layer = _REMAT_PREFIX_LAYER[self.remat_policy] if self.remat else _prefix_layer
        x, y = _through_layers(
            self.layers,
            (x, y),
            lambda _, graphdef, state, xy: layer(graphdef, state, xy[0], prefix_rope, prefix_mask, xy[1], rope_, mask),
        )
        return self.norm(x), self.norm(y)


@dataclasses.dataclass(frozen=True)
class JointTokens:
    """Prompts `[B, P, ...]` and their continuations `[B * G, C, ...]` as one token matrix
    `[S, B / S * P + B * G / S * C, ...]`, where S is the number of parts the batch axes split rows into.

    Every step of a decoder layer but attention works token by token, so the scoring forward can run each
    weight over the prompts' and the continuations' tokens in one matmul. What that buys is in the backward:
    a weight used once has one gradient, reduced over the chips once (one reduce-scatter under FSDP); used
    twice, XLA reduces each use's partial gradient separately, twice the traffic (the 7B v5p step's weight
    gradient all-reduces, compiled: issue 15). Each chip's rows of the two stay on it: splitting rows into
    S shards is a local reshape when S divides B, and each shard's prompt tokens sit before its continuations'.
    """

    batch: int
    prompt_len: int
    rows: int
    length: int
    shards: int

    @classmethod
    def of(cls, x: jax.Array, y: jax.Array) -> JointTokens | None:
        """The join of `x [B, P, ...]` and `y [B * G, C, ...]` on the active activation mesh, or None:
        * when the batch axes split the prompts and the continuations differently (fewer prompts than batch
          shards: the prompts are replicated), where the join would move rows between chips;
        * under tensor parallelism (the MLP's activations split), where XLA windows the joined matmuls over the
          tensor axis instead: compiled for the 3B on v5e-16 (fsdp 8 x tensor 2), a quarter-depth micro-batch's
          collective-permutes rose from 3.27 to 4.15 GB and its cost-model time from 0.255 to 0.278 s, and the
          full step peaked at 17.45 GB of 17.18 (14.07 by parts)."""
        shards = activation_batch_shards(x.shape[0])
        if shards != activation_batch_shards(y.shape[0]) or activation_axis_parts("activation_mlp") > 1:
            return None
        return cls(x.shape[0], x.shape[1], y.shape[0], y.shape[1], shards)

    def join(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """`x [B, P, ...]`, `y [B * G, C, ...]` -> `[S, tokens, ...]`, each shard's prompts then continuations."""
        shard = lambda a: a.reshape(self.shards, -1, *a.shape[2:])  # noqa: E731
        return jnp.concatenate([shard(x), shard(y)], axis=1)

    def split(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The inverse of `join`: `[S, tokens, ...]` -> `[B, P, ...]`, `[B * G, C, ...]`."""
        cut = self.batch // self.shards * self.prompt_len
        return (
            h[:, :cut].reshape(self.batch, self.prompt_len, *h.shape[2:]),
            h[:, cut:].reshape(self.rows, self.length, *h.shape[2:]),
        )


def _through_layers(layers: Sequence[nnx.Module], carry: T, run: Callable[[int, nnx.GraphDef, nnx.State, T], T]) -> T:
    """`carry = run(i, graphdef, state, carry)` for each layer i (split into its graph and state), in order, with each
    layer's weights prefetched at most one layer ahead.

    Under FSDP each layer all-gathers its weights; left free, XLA's TPU scheduler starts every layer's gathers early
    to overlap them with compute, and the gathered copies of all layers stay alive together (the compiled step's
    peak then sits at the HBM size whatever the activations need). Tying the next layer's parameters to this
    layer's input (`carry`, every array of it) lets its gathers overlap this layer, no earlier.
    """
    split = [nnx.split(layer) for layer in layers]
    for i, (graphdef, state) in enumerate(split):
        if i + 1 < len(split):
            carry, next_state = jax.lax.optimization_barrier((carry, split[i + 1][1]))
            split[i + 1] = (split[i + 1][0], next_state)
        carry = run(i, graphdef, state, carry)
    return carry


def _attend_prompts_then_continuations(attention: Qwen2Attention, x_qkv, x_mask, y_qkv, y_mask):
    """Attention of prompts (projected `x_qkv`, `[B, P, ...]` each) over their own keys and values (this layer's
    cache), then of their continuations (`y_qkv`, `[B * G, C, ...]`) over the prompt's (the cache repeated G times)
    and their own -> both outputs before the output projection."""
    (qx, kx, vx), (qy, ky, vy) = x_qkv, y_qkv
    batch, prompt_len = qx.shape[:2]
    rows, length = qy.shape[:2]
    shape = (batch, prompt_len + length, attention.num_kv_heads, attention.head_dim)
    cache = LayerCache(jnp.zeros(shape, kx.dtype), jnp.zeros(shape, kx.dtype))
    out_x, cache = attention.attend(qx, kx, vx, x_mask, cache, jnp.int32(0))
    # A static repeat count lowers to a broadcast; `total_repeat_length` would make it a gather, which
    # libtpu's all-reduce-scatter fusion fails on under FSDP (RET_CHECK in hlo_instruction.cc).
    cache = jax.tree.map(functools.partial(jnp.repeat, repeats=rows // batch, axis=0), cache)
    out_y, _ = attention.attend(qy, ky, vy, y_mask, cache, jnp.int32(prompt_len))
    return out_x, out_y


def _joint_layer(graphdef, state, tokens: JointTokens, h, rope, x_mask, y_mask):
    """One layer over joined tokens `h [S, T, hidden]` (`JointTokens`, rotary tables `rope` joined alike):
    the projections and the MLP over all tokens at once, attention apart (`_attend_prompts_then_continuations`)."""
    layer = nnx.merge(graphdef, state)
    attention = layer.self_attn
    q, k, v = attention.project(layer.input_layernorm(h), *rope)
    (qx, qy), (kx, ky), (vx, vy) = tokens.split(q), tokens.split(k), tokens.split(v)
    out_x, out_y = _attend_prompts_then_continuations(attention, (qx, kx, vx), x_mask, (qy, ky, vy), y_mask)
    return layer.after_attention(h, attention.o_proj(tokens.join(out_x, out_y)))


def _rematerialised(layer: Callable, static_argnums: tuple[int, ...]) -> dict[str, Callable]:
    """`layer` under `jax.checkpoint` with each of `REMAT_POLICIES`, by the policy's name."""
    return {name: jax.checkpoint(layer, static_argnums=static_argnums, policy=p) for name, p in REMAT_POLICIES.items()}


_REMAT_JOINT_LAYER = _rematerialised(_joint_layer, static_argnums=(0, 2))


def _prefix_layer(graphdef, state, x, x_rope, x_mask, y, y_rope, y_mask):
    """One layer over prompts `x [B, P, h]` and their continuations `y [B * G, C, h]` apart, attention as in
    `_attend_prompts_then_continuations`: where the two cannot be joined (`JointTokens.of`)."""
    layer = nnx.merge(graphdef, state)
    attention = layer.self_attn
    x_qkv = attention.project(layer.input_layernorm(x), *x_rope)
    y_qkv = attention.project(layer.input_layernorm(y), *y_rope)
    out_x, out_y = _attend_prompts_then_continuations(attention, x_qkv, x_mask, y_qkv, y_mask)
    return layer.after_attention(x, attention.o_proj(out_x)), layer.after_attention(y, attention.o_proj(out_y))


_REMAT_PREFIX_LAYER = _rematerialised(_prefix_layer, static_argnums=(0,))


def _layer(graphdef, state, x, cos, sin, mask, cache, cache_index):
    """One decoder layer as a pure function of its parameters, for `_REMAT_LAYER`: rematerialised in the backward.

    Pure (split / merge inside) rather than `nnx.remat` on the module: a module merged outside a
    `lax.while_loop` (the sampler's decode loop) cannot be mutated by `nnx.remat` inside the loop body,
    which lives at another trace level.
    """
    return nnx.merge(graphdef, state)(x, cos, sin, mask, cache, cache_index)


_REMAT_LAYER = _rematerialised(_layer, static_argnums=(0,))


def prefill_mask(attention_mask: jax.Array, cache_length: int) -> jax.Array:
    """`[batch, seq]` 0/1 padding mask of a prompt written from cache column 0 -> boolean `[batch, seq, cache_length]`:
    `causal_padding_mask` over the prompt's columns; the columns after it (not yet written) are hidden."""
    return jnp.pad(causal_padding_mask(attention_mask), ((0, 0), (0, 0), (0, cache_length - attention_mask.shape[-1])))


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """`[batch, seq]` 0/1 padding mask -> boolean `[batch, seq, seq]` causal mask that hides padded keys.

    Padded query rows keep their own diagonal so that no row is empty; their outputs are ignored.
    """
    seq = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    keys = attention_mask.astype(bool)[:, None, :]
    return (causal[None] & keys) | jnp.eye(seq, dtype=bool)[None]
