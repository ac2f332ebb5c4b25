"""Adaptive compute at inference: stop each example at its first confident tick.

`adaptive_forward` runs the CTM's ticks one at a time in a `jax.lax.while_loop`. After each tick,
every example whose certainty (1 - normalised entropy, `certainties[:, 1]`) reaches `threshold`
is finished: its prediction and certainty are frozen at that tick. The loop ends as soon as every
example has finished or after `max_ticks` ticks; examples that never reach the threshold keep the
prediction of the last tick run. `max_ticks` may exceed the trained `config.iterations`: the tick
parameters are shared across ticks, so more ticks just continue the recurrence.

Finished examples are masked, not removed: the batch keeps its shape, so a finished example's
state keeps being updated (and ignored) until the whole batch stops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from core.errors import ConfigError
from ctm_jax.model import CTM, CTMTick, cast_floating
from ctm_jax.modules import nlm_weights

Array = jax.Array


@flax.struct.dataclass
class AdaptiveOutput:
    """predictions (B, out_dims) logits at each example's exit tick; certainties (B, 2) there;
    exit_tick (B,) int32, 1-based ticks the example used; ticks_run () int32, ticks the batch ran
    (the largest exit tick)."""

    predictions: Array
    certainties: Array
    exit_tick: Array
    ticks_run: Array


def adaptive_forward(
    model: CTM,
    variables: Mapping[str, Any],
    x: Array,
    threshold: float | Array,
    max_ticks: int | None = None,
) -> AdaptiveOutput:
    """Inference (deterministic) forward that stops each example at its first tick with
    certainty >= `threshold`, and the batch once all have stopped or after `max_ticks` ticks
    (default: the trained `config.iterations`). Jittable; `threshold` may be traced.

    threshold <= 0 stops everyone after tick 1; threshold > 1 runs all `max_ticks` ticks and
    returns the last tick's outputs.
    """
    limit = model.config.iterations if max_ticks is None else int(max_ticks)
    if limit < 1:
        raise ConfigError(f"max_ticks={max_ticks!r} is invalid: must be >= 1")
    carry, ctx = model.apply(variables, x, train=False, initial_state_only=True)
    tick = CTMTick(model.config, deterministic=True, track=False)
    tick_variables = cast_floating(
        nlm_weights({"params": variables["params"]["ticks"]}, to_loop=True), model.compute_dtype
    )

    def run_tick(state: dict[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
        return tick.apply(tick_variables, state, ctx)

    read_outs = jax.eval_shape(run_tick, carry)[1]
    batch = x.shape[0]
    init = {
        "state": carry,
        "t": jnp.zeros((), jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "exit_tick": jnp.zeros((batch,), jnp.int32),
        **{k: jnp.zeros(v.shape, v.dtype) for k, v in read_outs.items()},
    }

    def cond(loop: dict[str, Any]) -> Array:
        return (loop["t"] < limit) & ~jnp.all(loop["done"])

    def body(loop: dict[str, Any]) -> dict[str, Any]:
        state, ys = run_tick(loop["state"])
        t = loop["t"] + 1
        running = ~loop["done"]
        frozen = {k: jnp.where(running[:, None], ys[k], loop[k]) for k in read_outs}
        return {
            "state": state,
            "t": t,
            "done": loop["done"] | (ys["certainties"][:, 1] >= threshold),
            "exit_tick": jnp.where(running, t, loop["exit_tick"]),
            **frozen,
        }

    final = jax.lax.while_loop(cond, body, init)
    return AdaptiveOutput(
        predictions=final["predictions"],
        certainties=final["certainties"],
        exit_tick=final["exit_tick"],
        ticks_run=final["t"],
    )
