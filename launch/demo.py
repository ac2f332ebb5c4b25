"""The README's first command (`make demo`): train a maze CTM on this machine, then show it.

    python -m launch.demo --workdir=runs/maze_demo [--config.train.total_steps=...]

1. trains `configs/ctm_maze.py:cpu` (generated 11x11 mazes; re-running resumes) with the shared
   trainer, which evaluates on held-out generated mazes (the eval stream never overlaps the
   training stream) and logs to `<workdir>/metrics.jsonl` and TensorBoard;
2. draws eval maze `--index` with `launch.visualise`: route.png, attention.gif, certainty.png;
3. prints the final held-out evaluation read back from metrics.jsonl, so the printed figures are
   the logged ones, and the wall-clock time of the whole command.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import flags

from core.errors import ConfigError
from launch import cli
from launch.maze_pictures import visualise
from tasks.ctm_maze.data import PRESETS
from train_lib.metrics import read_metrics
from train_lib.trainer import train_and_evaluate

# Its default is loaded by cli.run (not at import), so a bad `--config.` override is one line too.
_CONFIG = cli.define_config_file("config", "configs/ctm_maze.py:cpu", "Maze config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/maze_demo", "Run directory.")
_INDEX = flags.DEFINE_integer("index", 0, "Eval maze to draw.")


def final_eval(workdir: str | Path) -> dict[str, Any]:
    """The last eval record of the run's metrics.jsonl."""
    records = read_metrics(workdir, split="eval")
    if not records:
        raise ConfigError(f"{workdir} has no eval record in metrics.jsonl")
    return records[-1]


def summary(config: Any, record: Mapping[str, Any], drawn: Mapping[str, Any]) -> str:
    """The lines `make demo` prints."""
    side, _ = PRESETS[config.task.size]
    held_out = int(config.train.eval_batches) * int(config.train.batch_size)
    lines = [
        f"held-out eval at step {record['step']} ({held_out} generated {side}x{side} mazes, "
        f"metrics.jsonl): step accuracy {record['step_accuracy']:.4f}, "
        f"solve rate {record['solve_rate']:.4f}, "
        f"route length reached {record['route_length_reached']:.2f}",
        f"eval maze {_INDEX.value}: solved {'yes' if drawn['solved'] else 'no'}, "
        f"{drawn['steps']} steps walked, step accuracy {drawn['step_accuracy']:.3f}, "
        f"most certain tick {drawn['most_certain_tick']}",
    ]
    lines += [f"{name}: {path}" for name, path in drawn["paths"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    start = time.monotonic()
    with cli.one_line_errors():
        train_and_evaluate(config, workdir)
        drawn = visualise(workdir, _INDEX.value)
        record = final_eval(workdir)
    print(summary(config, record, drawn))
    print(f"checkpoints: {workdir / 'checkpoints'}, TensorBoard: {workdir / 'tensorboard'}")
    print(f"demo wall-clock time: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    cli.run(main)
