"""Maze pictures: the plotting functions on hand-made arrays and `launch.visualise` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.ctm_maze import get_config
from ctm_jax import viz
from tasks.ctm_maze.metrics import follow_route
from train_lib import trainer

REPO = Path(__file__).resolve().parents[1]

# A 5x5 maze: '#' wall, '.' corridor, 'S' start (red), 'G' goal (green).
MAZE = [
    "#####",
    "#S..#",
    "###.#",
    "#G..#",
    "#####",
]
UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
ROUTE = np.array([RIGHT, RIGHT, DOWN, DOWN, LEFT, LEFT, WAIT, WAIT])  # solves at action 5


def tiny_maze() -> np.ndarray:
    colours = {"#": (0, 0, 0), ".": (1, 1, 1), "S": (1, 0, 0), "G": (0, 1, 0)}
    return np.array([[colours[c] for c in row] for row in MAZE], dtype=np.float32)


def cells_with(image: np.ndarray, colour: tuple[float, float, float]) -> set[tuple[int, int]]:
    mask = np.all(np.isclose(image, colour), axis=-1)
    return {(int(r), int(c)) for r, c in np.argwhere(mask)}


def assert_sane(path: Path, fmt: str) -> None:
    """`path` opens as a `fmt` image of a readable size."""
    with Image.open(path) as im:
        im.load()
        assert im.format == fmt
        assert min(im.size) >= 200 and max(im.size) <= 1200, im.size


@pytest.mark.parametrize(
    "actions",
    [ROUTE, [RIGHT, UP, RIGHT], [RIGHT, WAIT, RIGHT, DOWN, RIGHT], [LEFT], [WAIT, WAIT], [DOWN]],
)
def test_walk_matches_follow_route(actions: list[int]) -> None:
    image = tiny_maze()
    walk = viz.walk_route(image, np.array(actions))
    solved, steps = follow_route(jnp.asarray(image), jnp.asarray(actions))
    assert (walk.solved, walk.steps) == (bool(solved), int(steps))
    assert len(walk.cells) == walk.steps + 1


def test_overlay_marks_exactly_the_visited_cells() -> None:
    image = tiny_maze()
    walk = viz.walk_route(image, ROUTE)
    assert walk.solved and walk.steps == 6 and walk.hit is None and walk.stopped_at == 5
    out = viz.route_overlay(image, walk)
    assert cells_with(out, viz.ROUTE_COLOUR) == {(1, 2), (1, 3), (2, 3), (3, 3), (3, 2)}
    assert cells_with(out, (1, 0, 0)) == {(1, 1)} and cells_with(out, (0, 1, 0)) == {(3, 1)}
    assert not cells_with(out, viz.HIT_COLOUR)
    # Everything not on the route is unchanged.
    changed = np.any(out != image, axis=-1)
    assert {(int(r), int(c)) for r, c in np.argwhere(changed)} == cells_with(out, viz.ROUTE_COLOUR)

    # Into the wall below (2, 2) after one step: that cell is the hit, nothing after it is drawn.
    walk = viz.walk_route(image, np.array([RIGHT, DOWN, RIGHT, RIGHT]))
    assert (walk.solved, walk.steps, walk.hit, walk.stopped_at) == (False, 1, (2, 2), 1)
    out = viz.route_overlay(image, walk)
    assert cells_with(out, viz.ROUTE_COLOUR) == {(1, 2)}
    assert cells_with(out, viz.HIT_COLOUR) == {(2, 2)}


def test_pictures_are_valid_images(tmp_path: Path) -> None:
    image = tiny_maze()
    walk = viz.draw_route(image, ROUTE, tmp_path / "route.png", title="tiny")
    assert walk.solved
    assert_sane(tmp_path / "route.png", "PNG")

    rng = np.random.default_rng(0)
    certainties = rng.random((3, 2, 7))
    for name, c in (("one.png", certainties[0]), ("many.png", certainties)):
        viz.certainty_plot(c, tmp_path / name)
        assert_sane(tmp_path / name, "PNG")

    ticks, heads, hw = 5, 3, (3, 3)
    attention = rng.random((ticks, heads, 1, hw[0] * hw[1]))
    viz.attention_gif(image, attention, hw, tmp_path / "attention.gif", fps=5)
    assert_sane(tmp_path / "attention.gif", "GIF")
    with Image.open(tmp_path / "attention.gif") as gif:
        assert gif.n_frames == ticks and gif.info["duration"] == 200
    with pytest.raises(ValueError, match="attention must be"):
        viz.attention_gif(image, attention[..., :-1], hw, tmp_path / "bad.gif")


def test_upsample_attention_is_row_major_nearest() -> None:
    maps = np.arange(6.0).reshape(2, 3)  # L = 6 tokens as a 2x3 feature map
    big = viz.upsample_attention(maps, (4, 6))
    np.testing.assert_array_equal(big, np.repeat(np.repeat(maps, 2, axis=0), 2, axis=1))
    odd = viz.upsample_attention(maps, (5, 5))  # 5 -> 2 rows: 0, 0, 1, 1, 1 by pixel centre
    np.testing.assert_array_equal(odd[:, 0], [0, 0, 3, 3, 3])
    np.testing.assert_array_equal(odd[0], [0, 0, 1, 2, 2])


def test_visualise_cli_on_a_trained_maze_run(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    config = get_config("test")  # 4 steps, a checkpoint at step 4
    config.train.eval_every = 0  # no eval step to compile: the test is about the pictures
    trainer.train_and_evaluate(config, workdir)
    out = tmp_path / "pictures"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.visualise", f"--workdir={workdir}", "--index=1"]
        + [f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval example 1 at step 4: solved" in proc.stdout and "step accuracy" in proc.stdout
    for name in ("route.png", "certainty.png"):
        assert_sane(out / name, "PNG")
    with Image.open(out / "attention.gif") as gif:
        assert gif.n_frames == config.model.iterations
    assert not (workdir / "route.png").exists()  # --out was honoured
