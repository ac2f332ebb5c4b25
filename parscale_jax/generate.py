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
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core.errors import ConfigError
from parscale_jax.config import ParScaleConfig
from parscale_jax.model import ParScaleLM, init_cache

Array = jax.Array


def check_settings(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """ConfigError naming the first impossible generation setting (one line each)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature={temperature} is invalid: must be >= 0 (0: greedy)")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} is invalid: must be >= 0 (0: no top-k filter)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} is invalid: must lie in (0, 1] (1: no nucleus filter)")


def prompt_limit(config: ParScaleConfig, max_new_tokens: int) -> int:
    """The longest prompt (tokens) that leaves room for `max_new_tokens` within the model's
    max_position_embeddings (the KV cache holds prompt + new tokens, the prefixes aside);
    ConfigError when not even one prompt token fits."""
    limit = config.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} is invalid: must be < the model's "
            f"max_position_embeddings={config.max_position_embeddings} (room for the prompt)"
        )
    return limit


def check_length(config: ParScaleConfig, prompt_len: int, max_new_tokens: int) -> None:
    """ConfigError when a prompt batch of `prompt_len` positions (padding included) plus
    `max_new_tokens` does not fit in max_position_embeddings."""
    limit = prompt_limit(config, max_new_tokens)
    if prompt_len > limit:
        raise ConfigError(
            f"prompt length {prompt_len} is invalid: must be <= {limit} "
            f"(max_position_embeddings={config.max_position_embeddings} - "
            f"max_new_tokens={max_new_tokens})"
        )
    if prompt_len < 1:
        raise ConfigError("prompt length 0 is invalid: give at least one token")


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
    check_settings(max_new_tokens, temperature, top_k, top_p)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    check_length(config, prompt_ids.shape[1], max_new_tokens)
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
        if name == "layers" or name.startswith("layers_"):  # stacked (scan_layers) or not
            attn = {k: v for k, v in value["self_attn"].items() if not k.startswith("prefix_")}
            value = {**value, "self_attn": attn}
        backbone[name] = value
    return dataclasses.replace(config, parscale_n=1), backbone


# ------------------------------------------------------------------------------------------------
# Per-row sampling: one key per row, excluded continuations, log-probabilities


def _pick(adjusted: Array, key: Array, temperature: Array, top_k: int, top_p: float) -> Array:
    """One row: (V,) temperature-scaled (and exclusion-adjusted) logits -> the next token; greedy
    when temperature is 0 (a traced scalar, so that a temperature sweep compiles once)."""
    sampled = jax.random.categorical(key, filter_logits(adjusted[None], top_k, top_p)[0])
    return jnp.where(temperature > 0, sampled, jnp.argmax(adjusted)).astype(jnp.int32)


def _suffix_probabilities(
    model: ParScaleLM,
    params: Any,
    prompt_ids: Array,
    attention_mask: Array,
    forbidden: Array,
    forbidden_len: Array,
    scale: Array,
    max_new_tokens: int,
) -> Array:
    """(B, F, W): entry t of sequence f of row b is the probability (under logits / scale) that
    row b, having generated f[:t + 1], goes on to generate the rest of f within the budget:
    prod_{t < s < min(len_f, max_new_tokens)} p(f[s] | prompt, f[:s]). One teacher-forced pass
    over prompt + f for every (row, sequence)."""
    batch, count, width = forbidden.shape
    prompt_len = prompt_ids.shape[1]
    seqs = jnp.concatenate(
        [jnp.repeat(prompt_ids, count, axis=0), forbidden.reshape(batch * count, width)], axis=1
    )
    real = jnp.arange(width)[None, :] < forbidden_len.reshape(-1, 1)
    mask = jnp.concatenate([jnp.repeat(attention_mask, count, axis=0), real], axis=1)
    logits = model.apply({"params": params}, seqs, mask.astype(jnp.int32)).logits
    # Position prompt_len - 1 + s predicts f[s].
    logits = logits[:, prompt_len - 1 : prompt_len - 1 + width].astype(jnp.float32) / scale
    logp = jnp.take_along_axis(
        jax.nn.log_softmax(logits, axis=-1), forbidden.reshape(-1, width, 1), axis=-1
    )[..., 0]
    within = real & (jnp.arange(width)[None, :] < max_new_tokens)
    logp = jnp.where(within, logp, 0.0).reshape(batch, count, width)
    # after[t] = sum_{s > t} logp[s]
    after = jnp.cumsum(logp[..., ::-1], axis=-1)[..., ::-1] - logp
    return jnp.exp(after)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "max_new_tokens",
        "top_k",
        "top_p",
        "stop_tokens",
        "pad_id",
        "exclude",
    ),
)
def _generate_rows(
    params: Any,
    prompt_ids: Array,
    attention_mask: Array,
    keys: Array,
    forbidden: Array,
    forbidden_len: Array,
    temperature: Array,
    *,
    config: ParScaleConfig,
    max_new_tokens: int,
    top_k: int,
    top_p: float,
    stop_tokens: tuple[int, ...],
    pad_id: int,
    exclude: bool,
) -> tuple[Array, Array, Array]:
    model = ParScaleLM(config)
    batch, prompt_len = prompt_ids.shape
    width = forbidden.shape[2]
    rows = jnp.arange(batch)
    scale = jnp.where(temperature > 0, temperature, 1.0)
    if exclude:
        rest = _suffix_probabilities(
            model,
            params,
            prompt_ids,
            attention_mask,
            forbidden,
            forbidden_len,
            scale,
            max_new_tokens,
        )
    cache = init_cache(config, params, batch, prompt_len + max_new_tokens)
    out = model.apply({"params": params}, prompt_ids, attention_mask, cache=cache, last_only=True)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    steps = jnp.arange(max_new_tokens)
    # (steps, B) keys fold_in(keys[b], step), made once outside the loop.
    step_keys = jax.vmap(lambda s: jax.vmap(lambda k: jax.random.fold_in(k, s))(keys))(steps)

    def emit(logits: Array, finished: Array, match: Array, step: Array, keys_now: Array):
        logits = logits[:, -1].astype(jnp.float32)
        adjusted = logits / scale
        at = jnp.minimum(step, width - 1)
        if exclude:
            # P(the answer ends up forbidden | this token): the forbidden sequences that the
            # generated tokens still follow and that continue with it; their probabilities are
            # disjoint, so the token keeps p * (1 - their sum) (0: it completes one).
            live = match & (step < forbidden_len)
            doomed = (
                jnp.zeros(logits.shape, jnp.float32)
                .at[rows[:, None], forbidden[:, :, at]]
                .add(jnp.where(live, rest[:, :, at], 0.0))
            )
            adjusted = adjusted + jnp.log(jnp.maximum(1.0 - doomed, 0.0))
        token = jax.vmap(lambda x, k: _pick(x, k, temperature, top_k, top_p))(adjusted, keys_now)
        token = jnp.where(finished, pad_id, token)
        logp = jnp.where(finished, 0.0, jax.nn.log_softmax(logits, axis=-1)[rows, token])
        match = match & (step < forbidden_len) & (forbidden[:, :, at] == token[:, None])
        return token, logp, ~finished, finished | jnp.isin(token, stops), match

    def decode(carry, xs):
        # One step: pick a token from the last logits, then run it through the model (the run
        # after the last token is wasted; it keeps a single copy of the step in the program).
        cache, logits, finished, match = carry
        token, logp, counted, finished, match = emit(logits, finished, match, *xs)
        out = model.apply({"params": params}, token[:, None], cache=cache)
        return (out.cache, out.logits, finished, match), (token, logp, counted)

    init = (out.cache, out.logits, jnp.zeros((batch,), bool), forbidden_len > 0)
    _, (tokens, logps, counted) = jax.lax.scan(decode, init, (steps, step_keys))
    lengths = jnp.sum(counted, axis=0, dtype=jnp.int32)
    return tokens.T, jnp.sum(logps, axis=0), lengths


def generate_rows(
    config: ParScaleConfig,
    params: Any,
    prompt_ids: Array,
    attention_mask: Array | None,
    keys: Array,
    max_new_tokens: int = 16,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    forbidden: Sequence[Sequence[Sequence[int]]] | None = None,
) -> tuple[Array, Array, Array]:
    """Like `generate`, but every row samples with its own key and may exclude continuations.

    Row b's token at step s is drawn with `fold_in(keys[b], s)` from its own logits, so a row's
    output depends on its prompt and key only, never on the other rows.

    Exclusion: `forbidden[b]` lists token sequences row b must not generate as its whole
    continuation (an answer + the stop token; a text the budget cuts off counts as ended there).
    Row b then samples from the model conditioned on avoiding them: token v after the generated
    prefix y gets probability p(v | y) * (1 - sum of P(rest of f | y v) over the forbidden f
    that continue y with v), computed under the sampling distribution (logits / temperature, or
    the model's own at temperature 0) from one teacher-forced pass over each forbidden sequence.
    A token that completes a forbidden sequence gets 0. This is exact conditional sampling for
    plain temperature sampling (top-k / top-p filter the adjusted logits afterwards), and greedy
    decoding takes the most likely token under that conditional: it leaves a forbidden answer
    where the model is least sure of it, instead of merely refusing to end it (which would make
    it append a digit: "153" -> "1532").

    Returns (tokens (B, max_new_tokens) padded with pad_id after a stop token, the sum of the
    generated tokens' log-probabilities under the model's own distribution (temperature 1, no
    filtering or exclusion; the stop token included) (B,), and the number of generated tokens,
    stop token included (B,)).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    check_length(config, prompt_ids.shape[1], max_new_tokens)
    batch = prompt_ids.shape[0]
    if attention_mask is None:
        attention_mask = jnp.ones_like(prompt_ids)
    if keys.shape != (batch,):
        raise ConfigError(f"keys.shape={keys.shape} is invalid: need one key per row ({batch},)")
    rows = list(forbidden) if forbidden is not None else [[] for _ in range(batch)]
    if len(rows) != batch:
        raise ConfigError(f"forbidden has {len(rows)} rows, the prompts {batch}")
    # Sequences longer than max_new_tokens + 1 can never be generated: left out. The arrays are
    # (B, F, max_new_tokens + 1) with F a power of two >= 4, so that few shapes compile; without
    # any sequence the exclusion is compiled out.
    width = max_new_tokens + 1
    rows = [[list(seq) for seq in row if 0 < len(seq) <= width] for row in rows]
    count = 4
    while count < max(len(row) for row in rows):
        count *= 2
    ids = np.zeros((batch, count, width), np.int32)
    lengths = np.zeros((batch, count), np.int32)
    for b, row in enumerate(rows):
        for f, seq in enumerate(row):
            ids[b, f, : len(seq)] = seq
            lengths[b, f] = len(seq)
    return _generate_rows(
        params,
        prompt_ids,
        jnp.asarray(attention_mask, jnp.int32),
        keys,
        jnp.asarray(ids),
        jnp.asarray(lengths),
        jnp.float32(temperature),
        config=config,
        max_new_tokens=max_new_tokens,
        top_k=int(top_k),
        top_p=float(top_p),
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=int(pad_id),
        exclude=any(rows),
    )
