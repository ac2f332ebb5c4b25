"""Qwen2-family decoder with ParScale's P parallel streams (Chen et al., 2025), in Flax Linen.

    x_p   = Embed(tokens)                       replicated P times, stream-major: row p*B + b
    h_p   = Decoder(x_p; prefix_p)              every layer attends to its own 48 learned K/V
                                                slots of stream p, then to the real tokens
    w     = softmax_P(MLP(stack_p(h_p) hidden-major)) * (1 - eps) + eps / P    (float32)
    logits = LMHead(sum_p w_p h_p)

The streams share every backbone weight; P = 1 has no prefixes and no aggregator and is exactly
Qwen2 (RMSNorm pre-norm, rotate-half RoPE, grouped-query attention with q/k/v biases, SwiGLU).

Decoding uses a preallocated KV cache (`KVCache`): slots [0, n_prefix) hold the prefixes, token t
of the (left-padded) sequence sits at slot n_prefix + t, for every one of the P*B rows. The
buffers are head-major, (P*B, kv_heads, slots, head_dim), the layout the attention's batched
matmuls read directly: with slots before heads, XLA:CPU transposed every layer's whole key and
value buffers at every decode step (11 of 79 ms of a P = 8, batch-1 step of bench.parscale_decode).

`scan_layers=True` runs the decoder layers as one `nn.scan`-ned layer: every layer parameter gets a
leading layer axis (under 'layers' instead of 'layers_0', 'layers_1', ...; `stack_layer_params` /
`unstack_layer_params` convert between the two layouts) and the cache's keys and values are one
(layers, P*B, kv_heads, slots, head_dim) array each, scanned with the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from parscale_jax.config import ParScaleConfig
from parscale_jax.parallel import Aggregator, replicate_streams, unfold_streams
from parscale_jax.sharding_rules import PARAM_AXES

Array = jax.Array

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows stay finite


def dtype_of(config: ParScaleConfig) -> Any:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


@flax.struct.dataclass
class KVCache:
    """Keys/values per layer, head-major (P*B, kv_heads, n_prefix + max_len, head_dim): a tuple of
    num_hidden_layers arrays, or one (layers, P*B, kv_heads, n_prefix + max_len, head_dim) array
    with scan_layers; which token slots hold real tokens (B, max_len), and how many tokens have
    been written."""

    keys: tuple[Array, ...] | Array
    values: tuple[Array, ...] | Array
    token_valid: Array
    length: Array

    @property
    def max_len(self) -> int:
        return self.token_valid.shape[1]


@flax.struct.dataclass
class LMOutput:
    """logits (B, S, V) (S = 1 with last_only); the cache after this call (or None); with
    return_internals: per-stream final normed hidden states (P*B, S, H), the aggregator's stream
    weights (B, S, P) (None when P = 1), and the aggregated hidden state (B, S, H)."""

    logits: Array
    cache: KVCache | None = None
    stream_hidden: Array | None = None
    aggregate_weights: Array | None = None
    hidden: Array | None = None


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: normalise in float32, cast back, then scale."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotate-half rotary embedding: x (N, S, heads, hd), positions (N, S)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, S, hd/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    implementation: str = "einsum",
    heads_major: bool = False,
) -> Array:
    """Grouped-query attention. q (N, S, nh, hd); k, v (N, T, kvh, hd), or (N, kvh, T, hd) with
    heads_major (the KV cache's layout); mask (N, S, T) bool.

    'einsum': the grouped einsums below, logits and softmax in float32. Otherwise
    `jax.nn.dot_product_attention` with that implementation ('xla', 'cudnn'; 'auto': None, JAX
    picks), which also takes the logits and softmax in float32 and handles the groups itself."""
    if heads_major and implementation != "einsum":
        # dot_product_attention takes (N, T, heads, hd) only.
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        heads_major = False
    if implementation != "einsum":
        n, s, nh, hd = q.shape
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask[:, None],
            implementation=None if implementation == "auto" else implementation,
        )
        return out.reshape(n, s, nh * hd)
    n, s, nh, hd = q.shape
    kvh = k.shape[1 if heads_major else 2]
    q = q.reshape(n, s, kvh, nh // kvh, hd)
    kv_spec = "nktd" if heads_major else "ntkd"
    logits = jnp.einsum(f"nskgd,{kv_spec}->nkgst", q, k).astype(jnp.float32) / math.sqrt(hd)
    logits = jnp.where(mask[:, None, None], logits, MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"nkgst,{kv_spec}->nskgd", weights, v)
    return out.reshape(n, s, nh * hd)


def dense(features: int, name: str, use_bias: bool, dtype: Any) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class Attention(nn.Module):
    config: ParScaleConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, layer_cache: Any = None):
        """x (P*B, S, H). Without a cache, keys are [prefix; tokens]; with one, (keys, values,
        length), the new keys are written head-major at slot n_prefix + length and the whole
        buffer is attended (masked)."""
        cfg = self.config
        dt = dtype_of(cfg)
        nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.kv_head_dim
        n, s, _ = x.shape
        q = dense(nh * hd, "q_proj", True, dt)(x).reshape(n, s, nh, hd)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = dense(kvh * hd, "k_proj", True, dt)(x).reshape(n, s, kvh, hd)
        v = dense(kvh * hd, "v_proj", True, dt)(x).reshape(n, s, kvh, hd)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)

        if layer_cache is None:
            if cfg.n_prefix:
                prefix_k, prefix_v = self.prefixes(n)
                k = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
                v = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
            new_cache = None
        else:
            cache_k, cache_v, length = layer_cache
            start = (0, 0, cfg.n_prefix + length, 0)
            k = jnp.swapaxes(k, 1, 2).astype(cache_k.dtype)  # the S new slots, head-major
            v = jnp.swapaxes(v, 1, 2).astype(cache_v.dtype)
            k = jax.lax.dynamic_update_slice(cache_k, k, start)
            v = jax.lax.dynamic_update_slice(cache_v, v, start)
            new_cache = (k, v)
        out = attend(q, k, v, mask, cfg.attention, heads_major=layer_cache is not None)
        return dense(cfg.hidden_size, "o_proj", False, dt)(out), new_cache

    def prefixes(self, rows: int) -> tuple[Array, Array]:
        """The per-stream K/V prefixes broadcast stream-major to (rows, n_tokens, kvh, hd)."""
        cfg = self.config
        shape = (cfg.parscale_n, cfg.num_key_value_heads, cfg.parscale_n_tokens, cfg.kv_head_dim)
        init = nn.initializers.normal(0.02)
        prefix_k = self.param("prefix_k", init, shape, jnp.float32)
        prefix_v = self.param("prefix_v", init, shape, jnp.float32)
        return prefix_rows(prefix_k, rows), prefix_rows(prefix_v, rows)


class MLP(nn.Module):
    config: ParScaleConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dt = dtype_of(cfg)
        gate = dense(cfg.intermediate_size, "gate_proj", False, dt)(x)
        up = dense(cfg.intermediate_size, "up_proj", False, dt)(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.hidden_size, "down_proj", False, dt)(hidden)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, (x, positions, mask, length, kv) -> (x, new kv): kv is this
    layer's (keys, values) cache buffers (None without a cache), length the tokens already in
    it. The signature is nn.scan's (carry first; the rest broadcast, kv scanned)."""

    config: ParScaleConfig

    @nn.compact
    def __call__(self, x, positions, mask, length=None, kv=None):
        cfg = self.config
        layer_cache = None if kv is None else (*kv, length)
        attn_out, new_cache = Attention(cfg, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), positions, mask, layer_cache
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


def remat_layer(config: ParScaleConfig) -> type[nn.Module]:
    """DecoderLayer under `config.remat_policy` ('none': the plain class). Inside nn.scan the
    recomputation cannot be CSE'd across iterations, so prevent_cse is off there (as JAX
    recommends for scanned checkpoints)."""
    if config.remat_policy == "none":
        return DecoderLayer
    policies = {
        "full": None,  # jax.checkpoint's default: save nothing but the layer's inputs
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": (
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        ),
    }
    return nn.remat(
        DecoderLayer, policy=policies[config.remat_policy], prevent_cse=not config.scan_layers
    )


def scanned_layers(config: ParScaleConfig, name: str = "layers") -> nn.Module:
    """The num_hidden_layers decoder layers as one nn.scan over a stacked layer axis (axis 0 of
    every parameter and of the cache's keys and values); positions, mask and length are shared."""
    return nn.scan(
        remat_layer(config),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=config.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, name=name)


class ParScaleLM(nn.Module):
    """Qwen2ForCausalLM / Qwen2ParScaleForCausalLM."""

    config: ParScaleConfig
    # Logical axis names of every parameter, for the trainer's sharding (a path-regex table).
    param_axes: ClassVar = PARAM_AXES

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            dtype=dtype_of(cfg),
        )
        if cfg.scan_layers:
            self.layers = scanned_layers(cfg)
        else:
            layer = remat_layer(cfg)
            self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if cfg.parscale_n > 1:
            self.aggregate_layer = Aggregator(
                cfg.parscale_n, cfg.parscale_attn_smooth, dtype=dtype_of(cfg)
            )
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, "lm_head", False, dtype_of(cfg))

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_internals: bool = False,
        segment_ids: Array | None = None,
    ) -> LMOutput:
        """input_ids (B, S). attention_mask (B, S) marks real tokens (left padding is 0).
        position_ids default to cumsum(mask) - 1 clamped at 0 (HF generate's rule), counted from
        the start of the cache when one is given.

        segment_ids (B, S), for packed training sequences without a cache: a token attends only
        to earlier tokens of its own segment (mark padding 0 in attention_mask too); the
        prefixes stay visible to every token. Pass each document's own positions with it."""
        cfg = self.config
        p = cfg.parscale_n
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        valid = attention_mask.astype(bool)

        if cache is None:
            if position_ids is None:
                position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
            causal = jnp.tril(jnp.ones((s, s), bool))
            token_mask = causal[None] & valid[:, None, :]  # (B, S, S)
            if segment_ids is not None:
                # Padding queries (segment 0) keep the plain mask so no softmax row is empty;
                # their outputs carry no loss.
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                token_mask &= same | (segment_ids[:, :, None] == 0)
            prefix_mask = jnp.ones((b, s, cfg.n_prefix), bool)
            mask = jnp.concatenate([prefix_mask, token_mask], axis=-1)
            new_valid = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids is for packed training sequences, not decoding")
            length = cache.length
            new_valid = jax.lax.dynamic_update_slice(cache.token_valid, valid, (0, length))
            if position_ids is None:
                written = jnp.sum(cache.token_valid, axis=1, keepdims=True)
                position_ids = jnp.maximum(written + jnp.cumsum(attention_mask, axis=1) - 1, 0)
            slot = jnp.arange(cache.max_len)
            query_slot = length + jnp.arange(s)
            token_mask = (slot[None, :] <= query_slot[:, None])[None] & new_valid[:, None, :]
            prefix_mask = jnp.ones((b, s, cfg.n_prefix), bool)
            mask = jnp.concatenate([prefix_mask, token_mask], axis=-1)

        # The embedding runs once; its output is replicated P times, stream-major. The hidden
        # states' logical constraints are no-ops unless sharding rules are active.
        x = replicate_streams(self.embed_tokens(input_ids), p)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        positions = replicate_streams(position_ids, p)
        mask = replicate_streams(mask, p)
        length = None if cache is None else cache.length
        if cfg.scan_layers:
            kv = None if cache is None else (cache.keys, cache.values)
            x, updated = self.layers(x, positions, mask, length, kv)
            new_keys, new_values = (None, None) if updated is None else updated
        else:
            new_keys, new_values = [], []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                x, updated = layer(x, positions, mask, length, kv)
                if updated is not None:
                    new_keys.append(updated[0])
                    new_values.append(updated[1])
            new_keys, new_values = tuple(new_keys), tuple(new_values)
        if last_only:
            x = x[:, -1:]
        stream_hidden = self.norm(x)

        agg_weights = None
        if p > 1:
            hidden, agg_weights = self.aggregate_layer(
                unfold_streams(stream_hidden, p), return_weights=True
            )
        else:
            hidden = stream_hidden
        if cfg.tie_word_embeddings:
            # Contract against the (V, H) table as stored: Embed.attend's dot with its transpose
            # makes XLA:CPU copy the transposed table every decode step (4x slower at batch 1).
            table = self.embed_tokens.embedding.astype(hidden.dtype)
            logits = jnp.einsum("bsh,vh->bsv", hidden, table)
        else:
            logits = self.lm_head(hidden)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_keys, new_values, new_valid, cache.length + s)
        return LMOutput(
            logits=logits.astype(jnp.float32),
            cache=new_cache,
            stream_hidden=stream_hidden if return_internals else None,
            aggregate_weights=agg_weights if return_internals else None,
            hidden=hidden if return_internals else None,
        )


def prefix_rows(prefix: Array, rows: int) -> Array:
    """A (P, kvh, n_tokens, hd) prefix as cache rows (rows, n_tokens, kvh, hd), stream-major."""
    per_stream = jnp.swapaxes(prefix, 1, 2)
    return jnp.repeat(per_stream, rows // prefix.shape[0], axis=0)


def prefix_cache_rows(prefix: Array, rows: int) -> Array:
    """A (..., P, kvh, n_tokens, hd) prefix as head-major cache rows (..., rows, kvh, n_tokens,
    hd), stream-major (row p*B + b holds stream p): the stored layout, repeated B times."""
    axis = prefix.ndim - 4
    return jnp.repeat(prefix, rows // prefix.shape[axis], axis=axis)


def init_cache(
    config: ParScaleConfig, params: dict[str, Any], batch_size: int, max_len: int
) -> KVCache:
    """An empty cache for B sequences of up to max_len tokens, the prefixes written in front."""
    rows = config.parscale_n * batch_size
    shape = (rows, config.num_key_value_heads, config.n_prefix + max_len, config.kv_head_dim)
    dt = dtype_of(config)

    def buffer(prefix: Array | None, layers: tuple[int, ...] = ()) -> Array:
        empty = jnp.zeros((*layers, *shape), dt)
        if prefix is None:
            return empty
        written = prefix_cache_rows(prefix, rows).astype(dt)
        return jax.lax.dynamic_update_slice(empty, written, (0,) * empty.ndim)

    def prefix(attn: dict[str, Any], name: str) -> Array | None:
        return attn[name] if config.n_prefix else None

    if config.scan_layers:
        attn = params["layers"]["self_attn"]
        layers = (config.num_hidden_layers,)
        keys, values = (
            buffer(prefix(attn, "prefix_k"), layers),
            buffer(prefix(attn, "prefix_v"), layers),
        )
    else:
        attns = [params[f"layers_{i}"]["self_attn"] for i in range(config.num_hidden_layers)]
        keys = tuple(buffer(prefix(a, "prefix_k")) for a in attns)
        values = tuple(buffer(prefix(a, "prefix_v")) for a in attns)
    return KVCache(keys, values, jnp.zeros((batch_size, max_len), bool), jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------
# The two parameter layouts of the decoder layers (scan_layers False / True)

SCANNED = "layers"  # the nn.scan-ned stack's name in the params tree (scan_layers=True)


def is_scanned(params: Mapping[str, Any]) -> bool:
    """True when `params` hold the decoder layers stacked (scan_layers=True)."""
    return SCANNED in params


def stack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """'layers_0', ..., 'layers_{L-1}' -> one 'layers' subtree whose leaves have a leading layer
    axis (the scan_layers=True layout); already stacked params come back unchanged."""
    if is_scanned(params):
        return dict(params)
    count = sum(1 for name in params if name.startswith("layers_"))
    per_layer = [params[f"layers_{i}"] for i in range(count)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, SCANNED: jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}


def unstack_layer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `stack_layer_params`: one 'layers_{i}' subtree per layer."""
    if not is_scanned(params):
        return dict(params)
    stacked = params[SCANNED]
    count = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != SCANNED}
    return {
        **rest,
        **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)},
    }


def params_for(config: ParScaleConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` in the layer layout `config.scan_layers` asks for (converted when needed)."""
    return stack_layer_params(params) if config.scan_layers else unstack_layer_params(params)
