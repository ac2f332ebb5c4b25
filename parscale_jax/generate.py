"""Cached generation for the ParScale LM: one jit-compiled prefill + decode loop.

The command line is `launch.generate` (`python -m launch.generate --checkpoint=DIR --prompt=...`).

The prompt batch may be left-padded (attention_mask 0 on the pads). The cache is preallocated for
prompt + new tokens and holds the P per-stream prefixes in front; the prefill computes logits only
at the last position. Sampling: greedy (temperature 0), or temperature with optional top-k and
top-p (nucleus) filtering. Sequences that emit a stop token are padded with `pad_id` afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from core.errors import ConfigError
from parscale_jax.config import ParScaleConfig
from parscale_jax.model import ParScaleLM, init_cache

Array = jax.Array


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Masks logits outside the top-k and outside the smallest set with probability >= top_p
    (the most likely token always survives)."""
    masked = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, masked, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Probability mass strictly before each token: a token stays while that is below top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, masked)
    return logits


def next_token(logits: Array, key: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """(B, V) logits -> (B,) tokens."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "stop_tokens",
        "pad_id",
    ),
)
def _generate(
    params: Any,
    prompt_ids: Array,
    attention_mask: Array,
    key: Array,
    *,
    config: ParScaleConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_tokens: tuple[int, ...],
    pad_id: int,
) -> Array:
    model = ParScaleLM(config)
    batch, prompt_len = prompt_ids.shape
    cache = init_cache(config, params, batch, prompt_len + max_new_tokens)
    out = model.apply({"params": params}, prompt_ids, attention_mask, cache=cache, last_only=True)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def emit(logits: Array, finished: Array, step: int):
        token = next_token(logits[:, -1], jax.random.fold_in(key, step), temperature, top_k, top_p)
        token = jnp.where(finished, pad_id, token)
        return token, finished | jnp.isin(token, stops)

    first, finished = emit(out.logits, jnp.zeros((batch,), bool), 0)

    def decode(carry, step):
        cache, token, finished = carry
        out = model.apply({"params": params}, token[:, None], cache=cache)
        new, finished = emit(out.logits, finished, step)
        return (out.cache, new, finished), new

    _, rest = jax.lax.scan(decode, (out.cache, first, finished), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    config: ParScaleConfig,
    params: Any,
    prompt_ids: Array,
    attention_mask: Array | None = None,
    max_new_tokens: int = 16,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
) -> Array:
    """(B, S) prompt ids (left-padded where attention_mask is 0) -> (B, max_new_tokens) new ids."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ConfigError(
            f"sampling settings invalid: temperature={temperature} (>= 0), "
            f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1])"
        )
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(prompt_ids)
    return _generate(
        params,
        prompt_ids,
        jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(seed),
        config=config,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=int(pad_id),
    )


def at_parscale_n(
    config: ParScaleConfig, params: dict[str, Any], n: int
) -> tuple[ParScaleConfig, dict[str, Any]]:
    """The same backbone run with n streams, where the checkpoint's weights allow it.

    P = 1 drops the prefixes and the aggregator (the shared backbone alone: what dynamic parallel
    scaling serves); the checkpoint's own P keeps everything. Any other P would need prefixes and
    an aggregator trained for it.
    """
    if n == config.parscale_n:
        return config, params
    if n != 1:
        raise ConfigError(
            f"parscale_n={n} is not possible with this checkpoint: its prefixes "
            f"and aggregator were trained for P={config.parscale_n}; use 1 (the "
            f"shared backbone alone) or {config.parscale_n}"
        )
    backbone = {}
    for name, value in params.items():
        if name == "aggregate_layer":
            continue
        if name.startswith("layers_"):
            attn = {k: v for k, v in value["self_attn"].items() if not k.startswith("prefix_")}
            value = {**value, "self_attn": attn}
        backbone[name] = value
    return dataclasses.replace(config, parscale_n=1), backbone
