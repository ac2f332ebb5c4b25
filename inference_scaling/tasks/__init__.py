"""Verifiable tasks by name: each generates instances by level and checks answers exactly.

`make_task('tsp')` builds one; `TASKS` lists them. The protocol is in `base`.
"""

from __future__ import annotations

from typing import Any

from core.errors import ConfigError
from inference_scaling.tasks.arithmetic import ArithmeticTask
from inference_scaling.tasks.base import Instance, Verdict, VerifiableTask
from inference_scaling.tasks.maze import MazeTask
from inference_scaling.tasks.parity import ParityTask
from inference_scaling.tasks.sat import SatTask
from inference_scaling.tasks.tsp import TspTask

TASKS: dict[str, type[VerifiableTask]] = {
    "maze": MazeTask,
    "arithmetic": ArithmeticTask,
    "parity": ParityTask,
    "sat": SatTask,
    "tsp": TspTask,
}

__all__ = ["TASKS", "Instance", "Verdict", "VerifiableTask", "make_task"]


def make_task(name: str, **kwargs: Any) -> VerifiableTask:
    """The task called `name`, built with its options (e.g. maze criterion, arithmetic carries)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is invalid: expected one of {sorted(TASKS)}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"options {sorted(kwargs)} are invalid for task {name!r}: {e}") from e
