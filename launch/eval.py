"""Generalisation of a trained maze CTM: larger mazes (by re-application) and more ticks.

    python -m launch.eval --workdir runs/maze_cpu [--sizes 15,19,39] [--ticks 16,32]

Restores the latest checkpoint of the maze run in `--workdir`, generates `--num_mazes` held-out
mazes (the eval stream of the run's task seed) per image side in `--sizes` and evaluates them
with each tick count in `--ticks` (default: the trained count and twice it). Rows (size, ticks):
solve_rate with re-application from the last reached cell (at most `--max_reapplications`
applications, `tasks.ctm_maze.generalise`), solve_rate_single (one application: the plain
metric), step_accuracy against the route's first route_length actions, mean applications and
mean route steps walked. The last line is one JSON object with all rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from core.errors import ConfigError
from ctm_jax.model import CTM
from launch import cli
from launch.cli import format_table
from launch.runs import load_run
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.generalise import ctm_predictor, held_out_mazes, reapply_solve, with_ticks
from tasks.ctm_maze.task import MazeTask

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a maze training run.")
_SIZES = flags.DEFINE_list(
    "sizes", None, "Maze image sides (odd, >= 5); default: the trained side and up to 3 larger."
)
_TICKS = flags.DEFINE_list("ticks", None, "Tick counts; default: the trained count and twice it.")
_NUM_MAZES = flags.DEFINE_integer("num_mazes", 256, "Held-out mazes per size.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Mazes per model call (default: the run's train.batch_size)."
)
_MAX_REAPPLICATIONS = flags.DEFINE_integer(
    "max_reapplications", 20, "Most model applications per maze (1: no re-application)."
)
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON summary.")
flags.mark_flags_as_required(["workdir"])


def default_sizes(trained_side: int) -> list[int]:
    """The trained side and up to three larger preset sides."""
    larger = sorted({side for side, _ in maze_data.PRESETS.values() if side > trained_side})
    return [trained_side, *larger[:3]]


def parse_sizes(values: Sequence[str]) -> list[int]:
    sizes = []
    for value in values:
        try:
            side = int(value)
        except ValueError:
            side = -1
        if side < 5 or side % 2 == 0:
            raise ConfigError(f"--sizes={value!r} is invalid: sides must be odd integers >= 5")
        sizes.append(side)
    return sizes


def parse_ticks(values: Sequence[str]) -> list[int]:
    ticks = []
    for value in values:
        try:
            t = int(value)
        except ValueError:
            t = 0
        if t < 1:
            raise ConfigError(f"--ticks={value!r} is invalid: tick counts must be integers >= 1")
        ticks.append(t)
    return ticks


def evaluate(
    model: CTM,
    variables: Any,
    *,
    route_length: int,
    expand_range: bool,
    seed: int,
    sizes: Sequence[int],
    ticks: Sequence[int],
    num_mazes: int,
    batch_size: int,
    max_reapplications: int,
) -> list[dict[str, Any]]:
    """One row per (size, ticks) over `num_mazes` held-out mazes of each size."""
    rows = []
    for side in sizes:
        try:
            model.config.validate_input_shape((1, side, side, 3))
        except ValueError as e:  # the config's own error type
            raise ConfigError(f"--sizes={side} is invalid for this model: {e}") from None
        images, targets, lengths = held_out_mazes(side, route_length, seed, num_mazes)
        # Pad the last batch with the first mazes (one compiled shape); padding is dropped.
        padded = -(-num_mazes // batch_size) * batch_size
        index = np.arange(padded) % num_mazes
        for t in ticks:
            predict = ctm_predictor(with_ticks(model, t), variables, route_length, expand_range)
            found: dict[str, list[np.ndarray]] = {}
            for lo in range(0, padded, batch_size):
                take = index[lo : lo + batch_size]
                result = reapply_solve(predict, images[take], max_reapplications)
                keep = slice(0, min(batch_size, num_mazes - lo))
                for name, value in (
                    ("solved", result.solved),
                    ("solved_single", result.solved_single),
                    ("applications", result.applications),
                    ("steps", result.steps),
                    ("correct", np.asarray(result.first_actions) == targets[take]),
                ):
                    found.setdefault(name, []).append(np.asarray(value)[keep])
            cat = {k: np.concatenate(v) for k, v in found.items()}
            rows.append(
                {
                    "size": side,
                    "ticks": t,
                    "solve_rate": float(cat["solved"].mean()),
                    "solve_rate_single": float(cat["solved_single"].mean()),
                    "step_accuracy": float(cat["correct"].mean()),
                    "mean_applications": float(cat["applications"].mean()),
                    "mean_steps": float(cat["steps"].mean()),
                    "mean_route_length": float(lengths.mean()),
                }
            )
    return rows


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        workdir = Path(_WORKDIR.value)
        exp, variables, step = load_run(workdir, MazeTask, kind="maze", tool="launch.eval")
        config, task = exp.config, exp.task
        model = task.build_model()
        trained_side, route_length = maze_data.PRESETS[task.size]
        trained_ticks = model.config.iterations
        sizes = parse_sizes(_SIZES.value) if _SIZES.value else default_sizes(trained_side)
        ticks = parse_ticks(_TICKS.value) if _TICKS.value else [trained_ticks, 2 * trained_ticks]
        if _NUM_MAZES.value < 1:
            raise ConfigError(f"--num_mazes={_NUM_MAZES.value} is invalid: must be >= 1")
        if _MAX_REAPPLICATIONS.value < 1:
            raise ConfigError(
                f"--max_reapplications={_MAX_REAPPLICATIONS.value} is invalid: must be >= 1"
            )
        batch_size = min(_BATCH_SIZE.value or int(config.train.batch_size), _NUM_MAZES.value)
        if batch_size < 1:
            raise ConfigError(f"--batch_size={batch_size} is invalid: must be >= 1")
        rows = evaluate(
            model,
            variables,
            route_length=route_length,
            expand_range=bool(config.task.expand_range),
            seed=int(config.task.seed),
            sizes=sizes,
            ticks=ticks,
            num_mazes=_NUM_MAZES.value,
            batch_size=batch_size,
            max_reapplications=_MAX_REAPPLICATIONS.value,
        )
    summary = {
        "workdir": str(workdir),
        "step": step,
        "trained_size": trained_side,
        "trained_ticks": trained_ticks,
        "route_length": route_length,
        "num_mazes": _NUM_MAZES.value,
        "max_reapplications": _MAX_REAPPLICATIONS.value,
        "rows": rows,
    }
    if not _JSON.value:
        trained = [r for r in rows if r["size"] == trained_side and r["ticks"] == trained_ticks]
        print(
            f"{workdir} at step {step}: trained on {trained_side}x{trained_side} mazes, route "
            f"{route_length}, {trained_ticks} ticks; {_NUM_MAZES.value} held-out mazes per size, "
            f"at most {_MAX_REAPPLICATIONS.value} applications"
        )
        print(format_table(rows))
        if trained:
            print(f"step accuracy at the trained size and ticks: {trained[0]['step_accuracy']:.4f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
