"""Generalisation to larger mazes: the re-application walk with stub predictors, a real tiny CTM
with more ticks on larger mazes, and `launch.eval` end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ctm_maze import get_config
from configs.ctm_parity import get_config as parity_config
from ctm_jax.model import CTM
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.generalise import (
    ctm_predictor,
    held_out_mazes,
    most_certain_actions,
    move_start,
    reapply_solve,
    with_ticks,
)
from tasks.ctm_maze.metrics import maze_metrics
from train_lib import trainer
from train_lib.task import make_task

REPO = Path(__file__).resolve().parents[1]
UP, WAIT = maze_data.UP, maze_data.WAIT
ROUTE = 8  # actions per application of the stubs


def red_positions(image: np.ndarray) -> list[tuple[int, int]]:
    red = (image[..., 0] > 0.5) & (image[..., 1] < 0.5) & (image[..., 2] < 0.5)
    return [tuple(int(v) for v in p) for p in np.argwhere(red)]


def goal_position(image: np.ndarray) -> tuple[int, int]:
    green = (image[..., 1] > 0.5) & (image[..., 0] < 0.5) & (image[..., 2] < 0.5)
    (found,) = np.argwhere(green)
    return int(found[0]), int(found[1])


def true_route_stub(k: int):
    """A 'model' that predicts the true route from the current start, cut to its first k steps
    (the rest WAIT). Records the images it was called with."""
    calls: list[np.ndarray] = []

    def predict(images: jax.Array) -> np.ndarray:
        images = np.asarray(images)
        calls.append(images)
        out = np.full((len(images), ROUTE), WAIT, np.int32)
        for i, image in enumerate(images):
            (start,) = red_positions(image)
            open_ = image.max(axis=-1) > 0.5
            path = maze_data.shortest_path(open_, start, goal_position(image))
            actions = maze_data.path_to_actions(path)[:k]
            out[i, : len(actions)] = actions
        return out

    return predict, calls


def long_mazes(side: int = 19, num: int = 6, min_length: int = 13):
    """Held-out mazes whose routes are longer than `min_length` steps."""
    images, _, lengths = held_out_mazes(side, ROUTE, seed=3, num=40)
    keep = np.flatnonzero(lengths > min_length)[:num]
    assert len(keep) == num
    return images[keep], lengths[keep]


def test_truncated_true_route_solves_after_ceil_len_over_k_applications():
    images, lengths = long_mazes()
    for k in (3, 5):
        predict, _ = true_route_stub(k)
        result = reapply_solve(predict, images, max_reapplications=100)
        assert np.all(result.solved)
        np.testing.assert_array_equal(result.applications, np.ceil(lengths / k).astype(int))
        np.testing.assert_array_equal(result.steps, lengths)
        assert not np.any(result.solved_single)  # every route is longer than k


def test_application_limit_caps_the_walk():
    images, lengths = long_mazes()
    predict, calls = true_route_stub(2)
    result = reapply_solve(predict, images, max_reapplications=3)
    assert len(calls) == 3 and not np.any(result.solved)
    np.testing.assert_array_equal(result.applications, 3)
    np.testing.assert_array_equal(result.steps, 6)
    mixed, _, mixed_lengths = held_out_mazes(11, ROUTE, seed=3, num=12)
    assert 0 < np.sum(mixed_lengths <= ROUTE) < len(mixed)
    single = reapply_solve(true_route_stub(ROUTE)[0], mixed, max_reapplications=1)
    np.testing.assert_array_equal(single.solved, mixed_lengths <= ROUTE)
    np.testing.assert_array_equal(single.solved, single.solved_single)
    np.testing.assert_array_equal(single.steps, np.minimum(mixed_lengths, ROUTE))


def test_repainted_images_move_the_start_and_keep_everything_else():
    images, _ = long_mazes(num=4)
    predict, calls = true_route_stub(4)
    reapply_solve(predict, images, max_reapplications=2)
    first, second = calls
    for before, after in zip(first, second, strict=True):
        (old,) = red_positions(before)
        open_ = before.max(axis=-1) > 0.5
        path = maze_data.shortest_path(open_, old, goal_position(before))
        assert red_positions(after) == [path[4]]  # exactly one red pixel, 4 steps on
        np.testing.assert_array_equal(after[old], [1.0, 1.0, 1.0])  # old start is corridor
        changed = np.argwhere(np.any(after != before, axis=-1))
        assert sorted(map(tuple, changed.tolist())) == sorted([old, path[4]])


def test_move_start_paints_one_red_pixel():
    image = np.asarray(held_out_mazes(11, ROUTE, seed=0, num=1)[0][0])
    (old,) = red_positions(image)
    target = goal_position(image)
    moved = np.asarray(move_start(jnp.asarray(image), jnp.asarray(target)))
    assert red_positions(moved) == [target]
    np.testing.assert_array_equal(moved[old], [1.0, 1.0, 1.0])


def walk_up(image: np.ndarray) -> tuple[tuple[int, int], int, bool]:
    """Reference walk of all-UP actions: (end, steps, solved)."""
    (pos,) = red_positions(image)
    goal = goal_position(image)
    steps = 0
    while steps < ROUTE and pos != goal and pos[0] > 0 and image[pos[0] - 1, pos[1]].max() > 0.5:
        pos = (pos[0] - 1, pos[1])
        steps += 1
    return pos, steps, pos == goal


def test_walking_into_a_wall_stops_and_never_solves():
    images, _ = long_mazes(num=6)
    calls = []

    def always_up(x: jax.Array) -> np.ndarray:
        calls.append(np.asarray(x))
        return np.full((x.shape[0], ROUTE), UP, np.int32)

    result = reapply_solve(always_up, images, max_reapplications=20)
    for i, image in enumerate(images):
        end, steps, solved = walk_up(image)
        assert bool(result.solved[i]) == solved
        assert int(result.steps[i]) == steps
        if solved:
            continue
        # Moved: a second application from the wall it stopped at makes no progress; else one.
        assert int(result.applications[i]) == (2 if steps else 1)
        assert red_positions(np.asarray(result.final_images[i])) == [end]
    assert not np.all(result.solved)
    assert {1, 2} <= set(np.asarray(result.applications).tolist())  # both cases occur
    assert len(calls) == int(np.max(result.applications)) <= 2


# ------------------------------------------------------------------------------------------------
# A real tiny CTM (configs/ctm_maze.py:test: 11x11 mazes, route 32, 3 ticks)


@pytest.fixture(scope="module")
def tiny_ctm():
    task = make_task(get_config("test"))
    model = task.build_model()
    side, route = maze_data.PRESETS[task.size]
    variables = model.init({"params": jax.random.key(0)}, jnp.zeros((2, side, side, 3)))
    return model, variables, route


def test_parameters_do_not_depend_on_ticks(tiny_ctm):
    model, variables, _ = tiny_ctm
    longer = with_ticks(model, 4 * model.config.iterations)
    shapes = jax.eval_shape(longer.init, {"params": jax.random.key(0)}, jnp.zeros((2, 23, 23, 3)))
    same = jax.tree.map(lambda a, b: a.shape == b.shape, shapes, variables)
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert all(jax.tree.leaves(same))


def test_more_ticks_on_a_larger_maze_match_the_plain_metrics(tiny_ctm):
    model, variables, route = tiny_ctm
    ticks = 2 * model.config.iterations
    images, targets, _ = held_out_mazes(19, route, seed=0, num=4)
    longer = CTM(dataclasses.replace(model.config, iterations=ticks))
    out = longer.apply(variables, jnp.asarray(images))
    assert out.predictions.shape[-1] == ticks
    tick = np.argmax(np.asarray(out.certainties)[:, 1], axis=-1)
    logits = np.asarray(out.predictions)[np.arange(len(tick)), :, tick]
    actions = logits.reshape(len(tick), route, 5).argmax(-1)
    direct = maze_metrics(jnp.asarray(images), jnp.asarray(actions), jnp.asarray(targets))

    predict = ctm_predictor(with_ticks(model, ticks), variables, route, expand_range=False)
    result = reapply_solve(predict, images, max_reapplications=3)
    np.testing.assert_array_equal(result.first_actions, actions)
    np.testing.assert_allclose(np.mean(result.solved_single), direct["solve_rate"])
    np.testing.assert_allclose(np.mean(result.first_actions == targets), direct["step_accuracy"])
    one = reapply_solve(predict, images, max_reapplications=1)
    np.testing.assert_allclose(np.mean(one.steps), direct["route_length_reached"])
    np.testing.assert_array_equal(one.applications, 1)
    assert np.all(result.steps >= one.steps) and np.all(result.applications <= 3)


def test_predictor_scales_inputs_like_the_task(tiny_ctm):
    model, variables, route = tiny_ctm
    images, _, _ = held_out_mazes(15, route, seed=1, num=2)
    expanded = model.apply(variables, jnp.asarray(images) * 2 - 1)
    want = most_certain_actions(expanded.predictions, expanded.certainties, route)
    got = ctm_predictor(model, variables, route, expand_range=True)(jnp.asarray(images))
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------
# launch.eval end to end


def run_eval(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.eval", f"--workdir={workdir}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_eval_cli_on_a_trained_maze_run(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    config = get_config("test")  # 4 steps, a checkpoint at step 4, 11x11 mazes, 3 ticks
    config.train.eval_every = 0
    trainer.train_and_evaluate(config, workdir)
    proc = run_eval(
        workdir,
        "--sizes=11,15",
        "--ticks=3,6",
        "--num_mazes=6",
        "--batch_size=4",
        "--max_reapplications=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "solve_rate_single" in lines[1] and "mean_applications" in lines[1]
    assert any(line.startswith("step accuracy at the trained size") for line in lines)
    summary = json.loads(lines[-1])
    assert summary["step"] == 4 and summary["trained_ticks"] == 3
    rows = summary["rows"]
    assert [(r["size"], r["ticks"]) for r in rows] == [(11, 3), (11, 6), (15, 3), (15, 6)]
    for row in rows:
        assert 0.0 <= row["solve_rate_single"] <= row["solve_rate"] <= 1.0
        assert 1.0 <= row["mean_applications"] <= 3.0
        assert 0.0 <= row["step_accuracy"] <= 1.0 and row["mean_steps"] >= 0.0
    table_rows = [line.split() for line in lines[3 : 3 + len(rows)]]
    assert [(int(r[0]), int(r[1])) for r in table_rows] == [(r["size"], r["ticks"]) for r in rows]

    bad = run_eval(workdir, "--sizes=16")
    assert bad.returncode != 0 and "--sizes='16' is invalid" in bad.stderr


def test_eval_cli_refuses_a_non_maze_run(tmp_path: Path) -> None:
    config = parity_config("test")
    config.train.update(total_steps=1, checkpoint_every=1, eval_every=0)
    config.optim.warmup_steps = 0
    trainer.train_and_evaluate(config, tmp_path)
    proc = run_eval(tmp_path)
    assert proc.returncode != 0
    assert "not a maze run" in proc.stderr
