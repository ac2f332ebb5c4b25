"""Pictures of one eval maze of a trained run: route, attention per tick, certainty (no flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from ctm_jax import viz
from launch.runs import load_run
from tasks.ctm_maze.task import N_ACTIONS, MazeTask


def visualise(
    workdir: str | Path, index: int = 0, out: str | Path | None = None, fps: float = 4.0
) -> dict[str, Any]:
    """Writes route.png, attention.gif and certainty.png for eval example `index`; returns their
    paths and the example's metrics (solved, steps, step_accuracy, most_certain_tick, step)."""
    exp, variables, step = load_run(workdir, MazeTask, kind="maze", tool="launch.visualise")
    task: MazeTask = exp.task
    out = Path(out if out is not None else workdir)
    batch = dict(task.dataset("eval", batch_size=1)[int(index)])
    with jax.set_mesh(exp.mesh):
        outputs = exp.model.apply(variables, batch["inputs"], train=False, track=True)
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
