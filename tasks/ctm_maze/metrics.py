"""Maze metrics: follow predicted actions through the maze image.

Actions: 0 up (row - 1), 1 down (row + 1), 2 left (col - 1), 3 right (col + 1), 4 wait. Images are
(H, W, 3) in [0, 1]: walls black, corridors white, start red, goal green.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MOVES = jnp.array([[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0]], jnp.int32)


def _find(mask: Array) -> Array:
    """(row, col) of the first True pixel of an (H, W) mask."""
    flat = jnp.argmax(mask.reshape(-1))
    return jnp.stack([flat // mask.shape[1], flat % mask.shape[1]]).astype(jnp.int32)


def follow_route(image: Array, actions: Array) -> tuple[Array, Array]:
    """Walks `actions` from the red start. Returns (solved, steps): solved when the goal is reached
    before any move into a wall or off the image; steps = valid moves made until the goal, the
    first invalid move or the end."""
    _, solved, steps = walk_route(image, actions)
    return solved, steps


def walk_route(image: Array, actions: Array) -> tuple[Array, Array, Array]:
    """`follow_route` that also returns where the walk ended: (position (2,) int32 row/col,
    solved, steps). The walk stops before the first invalid move and at the goal."""
    red = (image[..., 0] > 0.5) & (image[..., 1] < 0.5) & (image[..., 2] < 0.5)
    green = (image[..., 1] > 0.5) & (image[..., 0] < 0.5) & (image[..., 2] < 0.5)
    open_ = jnp.max(image, axis=-1) > 0.5
    height, width = open_.shape
    goal = _find(green)

    def step(state, action):
        pos, alive, solved, steps = state
        new = pos + MOVES[action]
        inside = (new[0] >= 0) & (new[0] < height) & (new[1] >= 0) & (new[1] < width)
        clipped = jnp.clip(new, 0, jnp.array([height - 1, width - 1]))
        ok = inside & open_[clipped[0], clipped[1]]
        moving = alive & ~solved
        valid_move = moving & ok & (action != 4)
        alive = alive & (ok | ~moving)
        pos = jnp.where(valid_move, clipped, pos)
        steps = steps + valid_move.astype(jnp.int32)
        solved = solved | (alive & jnp.all(pos == goal))
        return (pos, alive, solved, steps), None

    init = (_find(red), jnp.array(True), jnp.array(False), jnp.array(0, jnp.int32))
    (pos, _, solved, steps), _ = jax.lax.scan(step, init, actions.astype(jnp.int32))
    return pos, solved, steps


def maze_metrics(images: Array, predicted: Array, targets: Array) -> dict[str, Array]:
    """Per-step accuracy, full-route solve rate and mean route length reached for a batch.

    images (B, H, W, 3) in [0, 1], predicted and targets (B, R) actions.
    """
    solved, steps = jax.vmap(follow_route)(images, predicted)
    return {
        "step_accuracy": jnp.mean(predicted == targets),
        "solve_rate": jnp.mean(solved.astype(jnp.float32)),
        "route_length_reached": jnp.mean(steps.astype(jnp.float32)),
    }
