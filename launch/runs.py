"""Reading a finished or running training workdir for the analysis launchers (no flags here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigError
from train_lib import trainer


def load_run(
    workdir: str | Path,
    task_type: type | tuple[type, ...] | None = None,
    *,
    kind: str = "",
    tool: str = "",
) -> tuple[trainer.Experiment, dict[str, Any], int]:
    """(experiment, model variables {'params': ..., <collections>}, step) of the latest
    checkpoint of a training workdir; read-only. ConfigError when its task is not a `task_type`
    (`kind` names what was expected, e.g. 'maze'; `tool` the launcher)."""
    exp, state, step = trainer.restore_run(workdir)
    if task_type is not None and not isinstance(exp.task, task_type):
        types = task_type if isinstance(task_type, tuple) else (task_type,)
        wanted = kind or " or ".join(t.__name__ for t in types)
        raise ConfigError(
            f"--workdir={str(workdir)!r} is invalid: it is a {exp.config.task.name!r} run, not a "
            f"{wanted} run{f' ({tool} reads those only)' if tool else ''}"
        )
    return exp, {"params": state.params, **state.buffers}, step
