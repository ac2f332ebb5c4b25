"""Pictures of a trained maze CTM on one eval maze.

    python -m launch.visualise --workdir=runs/maze_cpu [--index=0] [--out=DIR]

Loads `<workdir>/config.json` and the latest checkpoint in `<workdir>/checkpoints`, runs the model
(eval mode, track=True) on example `--index` of the eval split and writes into `--out` (default:
the workdir) route.png (the route at the most certain tick), attention.gif (attention per tick)
and certainty.png (certainty per tick).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from ctm_jax import viz
from ctm_jax.tasks.maze import N_ACTIONS, MazeTask
from train_lib.errors import CheckpointMismatchError, ConfigError
from train_lib.trainer import restore_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a maze training run.")
_INDEX = flags.DEFINE_integer("index", 0, "Example of the eval split to draw.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
_FPS = flags.DEFINE_float("fps", 4.0, "Frames (ticks) per second of attention.gif.")
flags.mark_flags_as_required(["workdir"])


def load_run(workdir: str | Path) -> tuple[Any, Any, int]:
    """(experiment, restored train state, step) of the latest checkpoint of a maze workdir."""
    exp, state, step = restore_run(workdir)
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


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        result = visualise(_WORKDIR.value, _INDEX.value, _OUT.value, _FPS.value)
    except (ConfigError, CheckpointMismatchError) as e:
        raise SystemExit(f"error: {e}") from None
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print(
        f"eval example {_INDEX.value} at step {result['step']}: solved "
        f"{'yes' if result['solved'] else 'no'}, steps {result['steps']}, step accuracy "
        f"{result['step_accuracy']:.3f}, most certain tick {result['most_certain_tick']}"
    )


if __name__ == "__main__":
    app.run(main)
