"""Optimiser: AdamW, a warm-up + cosine schedule and selectable gradient clipping.

Matches the CTM reference training loop: AdamW (eps 1e-8), linear warm-up from ~0 to `lr` over
`warmup_steps`, cosine to `end_lr` (eta_min 1e-7) at `total_steps`, and gradient clipping that is
either a fixed global-norm bound or autoclip's QuantileClip (the reference parity run), which clips
to a quantile of the recent history of gradient norms.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from core.errors import ConfigError
from core.tree_paths import path_str

CLIP_MODES = ("none", "global_norm", "quantile")
QUANTILE_SCOPES = ("per_parameter", "global")
SCHEDULES = ("cosine", "constant")

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); QuantileClip calls it.
_TORCH_CLIP_EPS = 1e-6


# ------------------------------------------------------------------------------------------------
# Quantile clipping (autoclip QuantileClip)


class QuantileClipState(NamedTuple):
    """Ring buffer of the last `history_length` pre-clip gradient norms.

    `history` has the structure of the params (one (H,) buffer per leaf) for the per-parameter
    scope, or is a single (H,) array for the global scope. `count` is how many norms were recorded.
    """

    history: Any
    count: jax.Array


def history_quantile(history: jax.Array, count: jax.Array, quantile: float) -> jax.Array:
    """`torch.quantile(history[:count], q)` (linear interpolation) over a fixed-size buffer.

    Entries past `count` are unused slots; they sort to the end as +inf and the interpolation
    indices never reach them. Returns +inf while the history is empty (no clipping on step one).
    """
    size = history.shape[-1]
    n = jnp.minimum(count, size)
    valid = jnp.arange(size) < n
    ordered = jnp.sort(jnp.where(valid, history, jnp.inf), axis=-1)
    rank = quantile * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
    below = jnp.floor(rank).astype(jnp.int32)
    above = jnp.ceil(rank).astype(jnp.int32)
    weight = rank - below.astype(jnp.float32)
    lo = jnp.take(ordered, below, axis=-1)
    hi = jnp.take(ordered, above, axis=-1)
    # Written as lo + w*(hi-lo) like torch.lerp, but guarded so a zero weight never meets inf.
    value = jnp.where(weight > 0, lo + weight * (hi - lo), lo)
    return jnp.where(n > 0, value, jnp.inf)


def _clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6))."""
    return jnp.minimum(1.0, threshold / (norm + _TORCH_CLIP_EPS))


def quantile_clip(
    quantile: float = 0.9, history_length: int = 1000, scope: str = "per_parameter"
) -> optax.GradientTransformation:
    """autoclip's QuantileClip as an optax transformation.

    Each step the gradient is clipped (torch `clip_grad_norm_` semantics) to the `quantile` of the
    norms recorded on earlier steps, then its pre-clip norm joins the history (the last
    `history_length` norms are kept). The first step is not clipped. `scope='per_parameter'` is
    autoclip's default (`global_threshold=False`, what the CTM parity run used): every parameter
    tensor has its own history and threshold. `scope='global'` uses the global norm instead.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"optim.clip_quantile={quantile!r} is invalid: must lie in [0, 1]")
    if history_length < 1:
        raise ConfigError(f"optim.clip_history={history_length!r} is invalid: must be >= 1")
    if scope not in QUANTILE_SCOPES:
        raise ConfigError(
            f"optim.clip_scope={scope!r} is invalid: allowed: {', '.join(QUANTILE_SCOPES)}"
        )
    per_parameter = scope == "per_parameter"

    def init_fn(params: Any) -> QuantileClipState:
        empty = lambda: jnp.zeros((history_length,), jnp.float32)
        history = jax.tree.map(lambda _: empty(), params) if per_parameter else empty()
        return QuantileClipState(history=history, count=jnp.zeros([], jnp.int32))

    def record(history: jax.Array, norm: jax.Array, count: jax.Array) -> jax.Array:
        return history.at[count % history_length].set(norm.astype(jnp.float32))

    def update_fn(
        updates: Any, state: QuantileClipState, params: Any = None
    ) -> tuple[Any, QuantileClipState]:
        del params
        count = state.count
        if per_parameter:
            norms = jax.tree.map(lambda g: jnp.linalg.norm(g.ravel()), updates)
            thresholds = jax.tree.map(lambda h: history_quantile(h, count, quantile), state.history)
            updates = jax.tree.map(
                lambda g, n, t: (g * _clip_scale(n, t)).astype(g.dtype), updates, norms, thresholds
            )
            history = jax.tree.map(lambda h, n: record(h, n, count), state.history, norms)
        else:
            norm = optax.tree.norm(updates)
            scale = _clip_scale(norm, history_quantile(state.history, count, quantile))
            updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
            history = record(state.history, norm, count)
        return updates, QuantileClipState(history=history, count=count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------------------------
# Schedule, weight-decay mask, full optimiser


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up from `warmup_init_lr` to `lr`, then cosine to `end_lr` at `total_steps`."""
    lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
    init = float(optim.get("warmup_init_lr", 0.0))
    if optim["schedule"] == "cosine":
        # optax's decay_steps counts the warm-up too, as the reference's total iterations do.
        return optax.warmup_cosine_decay_schedule(
            init_value=init,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=total_steps,
            end_value=float(optim["end_lr"]),
        )
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(init, lr, warmup), optax.constant_schedule(lr)], [warmup]
    )


def decay_mask_fn(exclude: tuple[str, ...]) -> Callable[[Any], Any] | None:
    """Mask for AdamW's weight decay: False for params whose path matches any `exclude` regex."""
    if not exclude:
        return None
    patterns = [re.compile(p) for p in exclude]

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(p.search(path_str(path)) for p in patterns), params
        )

    return mask


def validate_optim_config(optim: Mapping[str, Any], total_steps: int) -> None:
    """Raises ConfigError (one line, naming the field) for values the optimiser cannot use."""

    def fail(field: str, allowed: str) -> None:
        raise ConfigError(f"optim.{field}={optim[field]!r} is invalid: {allowed}")

    if not float(optim["lr"]) > 0:
        fail("lr", "must be > 0")
    if optim["schedule"] not in SCHEDULES:
        fail("schedule", f"allowed: {', '.join(SCHEDULES)}")
    if not 0 <= int(optim["warmup_steps"]) < total_steps:
        fail("warmup_steps", f"must lie in [0, train.total_steps={total_steps})")
    if float(optim["end_lr"]) < 0:
        fail("end_lr", "must be >= 0")
    if float(optim["weight_decay"]) < 0:
        fail("weight_decay", "must be >= 0")
    if not float(optim["eps"]) > 0:
        fail("eps", "must be > 0")
    for name in ("b1", "b2"):
        if not 0 <= float(optim[name]) < 1:
            fail(name, "must lie in [0, 1)")
    for pattern in optim["weight_decay_exclude"]:
        try:
            re.compile(pattern)
        except re.error as e:
            fail("weight_decay_exclude", f"{pattern!r} is not a regular expression ({e})")
    if optim["clip"] not in CLIP_MODES:
        fail("clip", f"allowed: {', '.join(CLIP_MODES)}")
    if optim["clip"] == "global_norm" and not float(optim["max_grad_norm"]) > 0:
        fail("max_grad_norm", "must be > 0 with clip='global_norm'")
    if optim["clip"] == "quantile":
        if not 0 <= float(optim["clip_quantile"]) <= 1:
            fail("clip_quantile", "must lie in [0, 1]")
        if int(optim["clip_history"]) < 1:
            fail("clip_history", "must be >= 1")
        if optim["clip_scope"] not in QUANTILE_SCOPES:
            fail("clip_scope", f"allowed: {', '.join(QUANTILE_SCOPES)}")


FROZEN, TRAINABLE = "frozen", "trainable"


def trainable_mask(params: Any, trainable: Callable[[str], bool] | None) -> Any:
    """A tree of bools like `params`: True where `trainable(path)` (everything when None)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: trainable is None or bool(trainable(path_str(path))), params
    )


def freeze(
    tx: optax.GradientTransformation, trainable: Callable[[str], bool]
) -> optax.GradientTransformation:
    """`tx` on the params whose path `trainable` accepts; zero updates for the others.

    `optax.multi_transform` hands `tx` only the trainable leaves (the frozen ones are masked
    out), so clipping norms, weight decay and Adam's moments cover the trainable params alone,
    and frozen params get `set_to_zero`, whose state is empty: no moments are allocated.
    """

    def labels(params: Any) -> Any:
        mask = trainable_mask(params, trainable)
        return jax.tree.map(lambda t: TRAINABLE if t else FROZEN, mask)

    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def make_optimizer(
    optim: Mapping[str, Any],
    total_steps: int,
    trainable: Callable[[str], bool] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clipping -> AdamW) and its learning-rate schedule, from the `optim` config section.

    With `trainable` (a predicate on param paths, see `freeze`) the other params stay frozen.
    """
    validate_optim_config(optim, total_steps)
    schedule = make_schedule(optim, total_steps)
    clip = optim["clip"]
    if clip == "global_norm":
        clipper = optax.clip_by_global_norm(float(optim["max_grad_norm"]))
    elif clip == "quantile":
        clipper = quantile_clip(
            float(optim["clip_quantile"]), int(optim["clip_history"]), optim["clip_scope"]
        )
    else:
        clipper = optax.identity()
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=float(optim["b1"]),
        b2=float(optim["b2"]),
        eps=float(optim["eps"]),
        weight_decay=float(optim["weight_decay"]),
        mask=decay_mask_fn(tuple(optim["weight_decay_exclude"])),
    )
    tx = optax.chain(clipper, adamw)
    if trainable is not None:
        tx = freeze(tx, trainable)
    return tx, schedule
