"""Maze routing in the CTM maze format, with a replay verifier and the teleport-restart helpers.

Problem: an RGB uint8 image (walls black, corridors white, start red, goal green) of a perfect
maze, so the shortest route is the only simple route. Answer: a route of actions 0 up, 1 down,
2 left, 3 right, 4 wait; the first L = route_length steps count (shorter routes act as if padded
with wait). The verifier replays the route on the grid:

  valid   never steps into a wall or off the grid (the walk stops at the goal, as the CTM's
          `walk_route` does, so moves after reaching it do not matter);
  solved  reaches the goal within L steps;
  exact   the first L steps equal the shortest path padded with wait (the CTM training metric).

`correct` is `solved` (default) or `exact`. Feedback locates the first step that leaves the
shortest path (a wall hit always is such a step) and the cell reached before it, without
revealing the rest of the path: a sequential loop moves the start there (`restart_image`),
re-solves, and joins the routes (`splice`).

Levels are a grid size and a bucket of shortest-path lengths: mazes of stream (key, level, i) are
drawn until the path length falls in the bucket. Every bucket ends at or below L, so every
instance is solvable within L steps. Paths are even (cells are two pixels apart).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from core.errors import ConfigError
from inference_scaling.tasks.base import (
    Instance,
    Verdict,
    VerifiableTask,
    final_answer_text,
    frozen,
)
from tasks.ctm_maze import data as maze_data

WAIT = maze_data.WAIT
# Route length per image side, from the CTM maze presets.
ROUTE_LENGTH = {side: length for side, length in maze_data.PRESETS.values()}
# level -> (image side, shortest-path bucket lo..hi inclusive), easiest first within a size.
# Buckets split each size's path lengths (up to its route length) into thirds.
LEVELS: dict[str, tuple[int, int, int]] = {
    "side11-len1-10": (11, 1, 10),
    "side11-len11-20": (11, 11, 20),
    "side11-len21-32": (11, 21, 32),
    "side15-len1-16": (15, 1, 16),
    "side15-len17-32": (15, 17, 32),
    "side15-len33-50": (15, 33, 50),
    "side19-len1-16": (19, 1, 16),
    "side19-len17-32": (19, 17, 32),
    "side19-len33-50": (19, 33, 50),
    "side39-len1-33": (39, 1, 33),
    "side39-len34-66": (39, 34, 66),
    "side39-len67-100": (39, 67, 100),
}
# Rejection sampling bound; the rarest bucket above takes ~1 in 12 draws.
MAX_DRAWS = 10_000
CRITERIA = ("solved", "exact")

Cell = tuple[int, int]


def _mask(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels whose channels each lie on the same side of half-intensity as `colour`'s."""
    image = np.asarray(image)
    half = 0.5 if image.dtype.kind == "f" else 128
    return np.all((image >= half) == (np.asarray(colour) >= 128), axis=-1)


def _single(mask: np.ndarray, what: str) -> Cell:
    found = np.argwhere(mask)
    if len(found) != 1:
        raise ConfigError(f"maze image is invalid: expected one {what} pixel, found {len(found)}")
    return int(found[0][0]), int(found[0][1])


def grid(image: np.ndarray) -> tuple[np.ndarray, Cell, Cell]:
    """(passable mask, start, goal) of a maze image (uint8 or float in [0, 1])."""
    image = np.asarray(image)
    half = 0.5 if image.dtype.kind == "f" else 128
    passable = np.max(image, axis=-1) >= half
    start = _single(_mask(image, maze_data.START), "red start")
    goal = _single(_mask(image, maze_data.GOAL), "green goal")
    return passable, start, goal


def parse_route(answer: Any) -> np.ndarray | None:
    """int32 actions of an answer (array, list or text of integers 0..4), None if unreadable.

    Text may be separated by spaces or commas, bracketed, inside <final_answer> tags, or a run
    of digits with no separators ("3311").
    """
    if isinstance(answer, str):
        text = final_answer_text(answer).strip().strip("[]()").strip()
        tokens = [t for t in re.split(r"[\s,]+", text) if t]
        if len(tokens) == 1 and len(tokens[0]) > 1:
            tokens = list(tokens[0])
        if not all(t.isdigit() for t in tokens):
            return None
        values = np.asarray([int(t) for t in tokens], dtype=np.int64)
    else:
        try:
            values = np.asarray(answer)
        except (TypeError, ValueError):
            return None
        if values.ndim != 1 or values.dtype.kind not in "uif":
            return None
        integral = np.all(np.isfinite(values)) and np.all(values == np.round(values))
        if values.dtype.kind == "f" and not integral:
            return None
        values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > WAIT):
        return None
    return values.astype(np.int32)


def replay(passable: np.ndarray, start: Cell, goal: Cell, route: np.ndarray) -> dict[str, Any]:
    """Walk `route` from `start`. Stops at the goal or before the first wall / off-grid move.

    Returns valid, solved, steps_walked (moves made, waits excluded), wall_hit and reached_at
    (step indices or None), end (the last cell).
    """
    height, width = passable.shape
    pos, steps = start, 0
    for t, action in enumerate(np.asarray(route).tolist()):
        if pos == goal:
            break
        if action == WAIT:
            continue
        dr, dc = maze_data.MOVES[action]
        new = (pos[0] + dr, pos[1] + dc)
        if not (0 <= new[0] < height and 0 <= new[1] < width and passable[new]):
            return {
                "valid": False,
                "solved": False,
                "steps_walked": steps,
                "wall_hit": t,
                "reached_at": None,
                "end": pos,
            }
        pos, steps = new, steps + 1
        if pos == goal:
            return {
                "valid": True,
                "solved": True,
                "steps_walked": steps,
                "wall_hit": None,
                "reached_at": t,
                "end": pos,
            }
    solved = pos == goal  # only when the start is the goal
    return {
        "valid": True,
        "solved": solved,
        "steps_walked": steps,
        "wall_hit": None,
        "reached_at": None,
        "end": pos,
    }


def path_cells(start: Cell, actions: Sequence[int]) -> list[Cell]:
    """Cells visited by moving `actions` from `start` (start included; wait stays put)."""
    cells = [start]
    for action in actions:
        r, c = cells[-1]
        dr, dc = maze_data.MOVES[action] if action != WAIT else (0, 0)
        cells.append((r + dr, c + dc))
    return cells


def splice(
    prefix_actions: Sequence[int] | np.ndarray,
    continuation_actions: Sequence[int] | np.ndarray,
    route_length: int,
) -> np.ndarray:
    """The route that walks `prefix_actions`, then `continuation_actions` (a route planned from
    where the prefix ends), truncated or padded with wait to `route_length` (int32)."""
    joined = np.concatenate(
        [np.asarray(prefix_actions, np.int32).ravel(), np.asarray(continuation_actions, np.int32)]
    )
    return maze_data.pad_actions(joined, int(route_length))


def restart_image(instance: Instance, cell: Sequence[int]) -> np.ndarray:
    """The instance's image with the start moved to `cell`: the old start becomes corridor and
    `cell` red, so a solver re-plans from the last cell its previous route reached correctly.

    The goal is no valid restart cell; when feedback says `prefix_solves`, the route's correct
    prefix alone already reaches it and `splice(prefix, [], L)` is the repaired route.
    """
    image = np.array(instance.problem, dtype=np.uint8)
    passable, start, goal = grid(image)
    if len(cell) != 2:
        raise ConfigError(f"cell={cell!r} is invalid: expected (row, col)")
    target = (int(cell[0]), int(cell[1]))
    inside = 0 <= target[0] < image.shape[0] and 0 <= target[1] < image.shape[1]
    if not inside or not passable[target] or target == goal:
        raise ConfigError(
            f"cell={target} is invalid: expected a corridor cell of the "
            f"{image.shape[0]}x{image.shape[1]} maze other than the goal {goal}"
        )
    image[start] = maze_data.CORRIDOR
    image[target] = maze_data.START
    return image


def _strip_waits(route: np.ndarray) -> np.ndarray:
    moves = np.flatnonzero(route != WAIT)
    return route[: moves[-1] + 1] if moves.size else route[:0]


class MazeTask(VerifiableTask):
    """CTM maze routing; `criterion` picks what `correct` means ('solved' or 'exact')."""

    name = "maze"
    levels = tuple(LEVELS)

    def __init__(self, criterion: str = "solved") -> None:
        if criterion not in CRITERIA:
            raise ConfigError(f"criterion={criterion!r} is invalid: expected one of {CRITERIA}")
        self.criterion = criterion

    def make_instance(self, rng: np.random.Generator, level: str, index: int) -> Instance:
        side, lo, hi = LEVELS[level]
        length = ROUTE_LENGTH[side]
        seed = int(rng.integers(2**63))
        for draw in range(MAX_DRAWS):
            example = maze_data.maze_example(side, seed, draw, length)
            path_length = int(example["route_length"])
            if lo <= path_length <= hi:
                break
        else:  # pragma: no cover - the buckets are common enough
            raise RuntimeError(f"no maze of level {level} in {MAX_DRAWS} draws")
        _, start, goal = grid(example["image"])
        return Instance(
            instance_id=index,
            level=level,
            problem=frozen(example["image"], np.uint8),
            solution=tuple(int(a) for a in example["actions"][:path_length]),
            meta={
                "side": side,
                "route_length": length,
                "path_length": path_length,
                "start": list(start),
                "goal": list(goal),
            },
        )

    def canonicalize(self, answer: Any, instance: Instance | None = None) -> Hashable | None:
        """The route as a tuple without trailing waits. With the instance it is first cut to the
        route length, and after the wall hit (all such routes are equally wrong) and, when
        `correct` means solved, after the step that reaches the goal (later steps never count).
        """
        route = parse_route(answer)
        if route is None:
            return None
        if instance is not None:
            route = route[: int(instance.meta["route_length"])]
            walk = replay(*grid(instance.problem), route)
            if walk["wall_hit"] is not None:
                route = route[: walk["wall_hit"] + 1]
            elif self.criterion == "solved" and walk["reached_at"] is not None:
                route = route[: walk["reached_at"] + 1]
        return tuple(int(a) for a in _strip_waits(route))

    def verify(self, instance: Instance, answer: Any) -> Verdict:
        passable, start, goal = grid(instance.problem)
        route = parse_route(answer)
        if route is None:  # a retry starts over from the start
            feedback = {
                "reason": "not a route of integers 0..4",
                "first_error": 0,
                "last_correct_cell": list(start),
                "prefix_solves": False,
            }
            return Verdict(False, False, False, feedback, {})
        length = int(instance.meta["route_length"])
        route = route[:length]
        walk = replay(passable, start, goal, route)
        target = maze_data.pad_actions(np.asarray(instance.solution, np.int32), length)
        differs = np.flatnonzero(maze_data.pad_actions(route, length) != target)
        exact = differs.size == 0
        first_error = None if exact else int(differs[0])
        last_cell = None if exact else path_cells(start, target.tolist())[first_error]
        details = {
            "valid": walk["valid"],
            "solved": walk["solved"],
            "exact": bool(exact),
            "steps_walked": walk["steps_walked"],
            "reached_at": walk["reached_at"],
            "path_length": int(instance.meta["path_length"]),
        }
        feedback = {
            "first_error": first_error,
            "last_correct_cell": None if last_cell is None else list(last_cell),
            "prefix_solves": last_cell == goal,
            "wall_hit": walk["wall_hit"],
            "end_cell": list(walk["end"]),
        }
        correct = walk["solved"] if self.criterion == "solved" else bool(exact)
        return Verdict(True, walk["valid"], bool(correct), feedback, details)

    def prompt(self, instance: Instance) -> str:
        """The maze as ASCII (# wall, . corridor, S start, G goal) and the answer format."""
        passable, start, goal = grid(instance.problem)
        rows = []
        for r, row in enumerate(passable):
            chars = ["." if open_ else "#" for open_ in row]
            if r == start[0]:
                chars[start[1]] = "S"
            if r == goal[0]:
                chars[goal[1]] = "G"
            rows.append("".join(chars))
        length = instance.meta["route_length"]
        return (
            "\n".join(rows)
            + f"\nRoute from S to G as {length} actions (0 up, 1 down, 2 left, 3 right, 4 wait):"
        )
