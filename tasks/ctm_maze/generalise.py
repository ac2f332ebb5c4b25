"""Generalisation of a maze CTM to larger mazes and more ticks.

The output head predicts a fixed number of actions (the trained route length), so a maze whose
route is longer cannot be solved in one go. As in the CTM paper's generalisation analysis (the
reference's `run.py --actions gen`, at most 20 re-applications), the model is re-applied from
where its walk ended: each application predicts route_length actions (at its most certain tick),
the actions are walked from the red start through corridors (stopping before the first move into
a wall or off the image, at the goal, or when the actions run out), then the image is repainted
with the start marker moved to the reached cell (the old start painted as corridor) and the model
runs again. An example is solved if its walk reaches the goal in any application.

An example also stops once an application leaves its start marker where it was (no progress):
the repainted image would be identical, so a deterministic model would repeat itself.

More ticks: the CTM's parameters do not depend on `iterations` (the tick parameters are shared
and the start state/trace are sized by d_model and memory_length), so a trained model runs with
`dataclasses.replace(config, iterations=T)` for any T.

Images here are float (B, H, W, 3) in [0, 1]; `ctm_predictor` applies the model's input scaling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from core.errors import ConfigError
from ctm_jax.model import CTM
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.metrics import walk_route

Array = jax.Array
N_ACTIONS = 5

# images (B, H, W, 3) in [0, 1] -> actions (B, route_length) int.
Predict = Callable[[Array], Array]


@flax.struct.dataclass
class ReapplyResult:
    """Per example: solved (B,) bool, in any application; applications (B,) int32 model runs
    used; steps (B,) int32 valid moves walked over all applications; solved_single (B,) bool,
    solved by the first application alone (the plain solve metric); first_actions (B, R), the
    first application's actions; final_images (B, H, W, 3), the last image each example saw."""

    solved: Array
    applications: Array
    steps: Array
    solved_single: Array
    first_actions: Array
    final_images: Array


def _red(image: Array) -> Array:
    return (image[..., 0] > 0.5) & (image[..., 1] < 0.5) & (image[..., 2] < 0.5)


def move_start(image: Array, position: Array) -> Array:
    """(H, W, 3) image in [0, 1] with the red start repainted as corridor (white) and the pixel
    at `position` (row, col) painted red."""
    white = jnp.where(_red(image)[..., None], jnp.ones_like(image), image)
    red = jnp.asarray([1.0, 0.0, 0.0], image.dtype)
    return white.at[position[0], position[1]].set(red)


@jax.jit
def apply_actions(images: Array, actions: Array) -> tuple[Array, Array, Array, Array]:
    """One application's walk for a batch: (repainted images, solved, steps, moved).

    images (B, H, W, 3) in [0, 1], actions (B, R). `moved` says whether the walk ended off the
    start cell; repainted images have the start at the walk's end.
    """

    def one(image: Array, route: Array) -> tuple[Array, Array, Array, Array]:
        start = jnp.argwhere(_red(image), size=1)[0].astype(jnp.int32)
        end, solved, steps = walk_route(image, route)
        return move_start(image, end), solved, steps, jnp.any(end != start)

    return jax.vmap(one)(images, actions)


def reapply_solve(
    predict: Predict, images: Array | np.ndarray, max_reapplications: int = 20
) -> ReapplyResult:
    """Solves a batch of mazes by re-applying `predict` from where each walk ended, at most
    `max_reapplications` applications in all (1: the plain single application). Examples that
    are solved or make no progress stop; the loop ends early when all have stopped."""
    if max_reapplications < 1:
        raise ConfigError(f"max_reapplications={max_reapplications} is invalid: must be >= 1")
    images = jnp.asarray(images, jnp.float32)
    batch = images.shape[0]
    active = jnp.ones((batch,), bool)
    solved = jnp.zeros((batch,), bool)
    applications = jnp.zeros((batch,), jnp.int32)
    steps = jnp.zeros((batch,), jnp.int32)
    first_actions = solved_single = None
    for _ in range(max_reapplications):
        actions = jnp.asarray(predict(images))
        repainted, now_solved, now_steps, moved = apply_actions(images, actions)
        if first_actions is None:
            first_actions, solved_single = actions, now_solved
        applications = applications + active.astype(jnp.int32)
        steps = steps + jnp.where(active, now_steps, 0)
        solved = solved | (active & now_solved)
        active = active & ~now_solved & moved
        images = jnp.where(active[:, None, None, None], repainted, images)
        if not bool(jnp.any(active)):
            break
    return ReapplyResult(
        solved=solved,
        applications=applications,
        steps=steps,
        solved_single=solved_single,
        first_actions=first_actions,
        final_images=images,
    )


def most_certain_actions(predictions: Array, certainties: Array, route_length: int) -> Array:
    """CTM outputs (B, R*5, T) and (B, 2, T) -> (B, R) actions at each example's most certain
    tick (the highest 1 - normalised entropy, first on ties)."""
    tick = jnp.argmax(certainties[:, 1], axis=-1)
    logits = jnp.take_along_axis(predictions, tick[:, None, None], axis=-1)[..., 0]
    return jnp.argmax(logits.reshape(logits.shape[0], route_length, N_ACTIONS), axis=-1)


def ctm_predictor(
    model: CTM, variables: Mapping[str, Any], route_length: int, expand_range: bool
) -> Predict:
    """Jitted `predict` for `reapply_solve`: [0, 1] images -> the model's input scaling
    ([-1, 1] when `expand_range`, as MazeTask feeds it) -> most-certain-tick actions."""

    @jax.jit
    def predict(images: Array) -> Array:
        x = images * 2.0 - 1.0 if expand_range else images
        out = model.apply(variables, x, train=False)
        return most_certain_actions(out.predictions, out.certainties, route_length)

    return predict


def with_ticks(model: CTM, ticks: int) -> CTM:
    """The same CTM running `ticks` internal ticks (the variables fit unchanged)."""
    if ticks < 1:
        raise ConfigError(f"ticks={ticks} is invalid: must be >= 1")
    return CTM(dataclasses.replace(model.config, iterations=int(ticks)), dtype=model.dtype)


def held_out_mazes(
    side: int, route_length: int, seed: int, num: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`num` generated `side` x `side` mazes of the eval stream of task seed `seed` (never a
    training maze): images float32 (num, side, side, 3) in [0, 1], targets (num, route_length)
    (the route's first actions, WAIT-padded) and the full route lengths (num,)."""
    stream = maze_data.split_seed(seed, "eval")
    examples = [maze_data.maze_example(side, stream, i, route_length) for i in range(num)]
    images = np.stack([maze_data.to_float(e["image"]) for e in examples])
    targets = np.stack([e["actions"] for e in examples]).astype(np.int32)
    lengths = np.asarray([e["route_length"] for e in examples], np.int32)
    return images, targets, lengths
