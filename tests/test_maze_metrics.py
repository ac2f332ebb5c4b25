"""Following predicted routes through a hand-drawn maze."""

import jax.numpy as jnp
import numpy as np

from tasks.ctm_maze.metrics import follow_route, maze_metrics

# 5x5 pixels: S at (1,1), corridor right to (1,3), down to (3,3) = G.
LAYOUT = ["#####", "#S..#", "###.#", "###G#", "#####"]


def image():
    colours = {"#": (0, 0, 0), ".": (1, 1, 1), "S": (1, 0, 0), "G": (0, 1, 0)}
    return jnp.asarray([[colours[c] for c in row] for row in LAYOUT], jnp.float32)


def test_correct_route_solves_and_counts_steps():
    solved, steps = follow_route(image(), jnp.array([3, 3, 1, 1, 4, 4]))
    assert bool(solved) and int(steps) == 4


def test_wall_hit_fails_and_stops_counting():
    solved, steps = follow_route(image(), jnp.array([3, 1, 3, 1, 1, 4]))
    assert not bool(solved) and int(steps) == 1


def test_waiting_and_moves_after_the_goal_do_not_matter():
    solved, _ = follow_route(image(), jnp.array([4, 3, 3, 1, 1, 0, 0]))
    assert bool(solved)
    solved, steps = follow_route(image(), jnp.array([3, 3, 1, 4, 4, 4]))
    assert not bool(solved) and int(steps) == 3


def test_batch_metrics():
    images = jnp.stack([image(), image()])
    predicted = jnp.array([[3, 3, 1, 1], [3, 1, 3, 1]])
    targets = jnp.array([[3, 3, 1, 1], [3, 3, 1, 1]])
    m = maze_metrics(images, predicted, targets)
    np.testing.assert_allclose(m["step_accuracy"], 6 / 8)
    np.testing.assert_allclose(m["solve_rate"], 0.5)
    np.testing.assert_allclose(m["route_length_reached"], (4 + 1) / 2)
