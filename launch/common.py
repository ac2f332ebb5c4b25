"""Helpers shared by the analysis launchers (no absl flags here, so any launcher may import it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ctm_jax import viz
from ctm_jax.tasks.maze import N_ACTIONS, MazeTask
from train_lib import trainer
from train_lib.errors import ConfigError
from train_lib.task import Task


def restore_variables(workdir: Path) -> tuple[ml_collections.ConfigDict, Task, Any, int]:
    """The run's config, task, model variables ({'params', ...buffers}) and checkpoint step."""
    exp, state, step = trainer.restore_run(workdir)
    return exp.config, exp.task, {"params": state.params, **state.buffers}, step


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned text table of the rows (missing values blank)."""
    tick_columns = ("mean_ticks", "batch_ticks")
    found = list(dict.fromkeys(k for row in rows for k in row))
    columns = [c for c in found if c not in tick_columns] + [c for c in tick_columns if c in found]
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def load_run(workdir: str | Path) -> tuple[Any, Any, int]:
    """(experiment, restored train state, step) of the latest checkpoint of a maze workdir."""
    exp, state, step = trainer.restore_run(workdir)
    if not isinstance(exp.task, MazeTask):
        raise ConfigError(f"{workdir} is a {exp.config.task.name!r} run, not a maze run")
    return exp, state, step


def visualise(
    workdir: str | Path, index: int = 0, out: str | Path | None = None, fps: float = 4.0
) -> dict[str, Any]:
    """Writes route.png, attention.gif and certainty.png for eval example `index`; returns their
    paths and the example's metrics (solved, steps, step_accuracy, most_certain_tick, step)."""
    exp, state, step = load_run(workdir)
    task: MazeTask = exp.task
    out = Path(out if out is not None else workdir)
    batch = dict(task.dataset("eval", batch_size=1)[int(index)])
    with jax.set_mesh(exp.mesh):
        outputs = exp.model.apply(
            {"params": state.params, **state.buffers}, batch["inputs"], train=False, track=True
        )
    predictions = np.asarray(outputs.predictions)[0]  # (out_dims, T)
    certainties = np.asarray(outputs.certainties)[0]  # (2, T)
    attention = np.asarray(outputs.tracking["attention"])[:, 0]  # (T, heads, 1, L)
    targets = np.asarray(batch["targets"])[0]
    tick = int(certainties[1].argmax())
    actions = predictions.reshape(len(targets), N_ACTIONS, -1)[:, :, tick].argmax(axis=-1)
    image = np.asarray(batch["inputs"])[0]
    if task.config.task.expand_range:
        image = (image + 1.0) / 2.0
    cfg = task.model_config
    feature_hw = cfg.feature_map_size(image.shape[0], image.shape[1])

    paths = {
        "route": out / "route.png",
        "attention": out / "attention.gif",
        "certainty": out / "certainty.png",
    }
    walk = viz.draw_route(
        image,
        actions,
        paths["route"],
        title=f"eval maze {index}, step {step}, tick {tick + 1}/{certainties.shape[-1]}",
    )
    viz.attention_gif(image, attention, feature_hw, paths["attention"], fps=fps)
    viz.certainty_plot(certainties, paths["certainty"], title=f"eval maze {index}, step {step}")
    return {
        "paths": paths,
        "solved": walk.solved,
        "steps": walk.steps,
        "step_accuracy": float(np.mean(actions == targets)),
        "most_certain_tick": tick + 1,
        "step": step,
    }
