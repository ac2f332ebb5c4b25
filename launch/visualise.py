"""Pictures of a trained maze CTM on one eval maze.

    python -m launch.visualise --workdir=runs/maze_cpu [--index=0] [--out=DIR]

Loads `<workdir>/config.json` and the latest checkpoint in `<workdir>/checkpoints`, runs the model
(eval mode, track=True) on example `--index` of the eval split and writes into `--out` (default:
the workdir) route.png (the route at the most certain tick), attention.gif (attention per tick)
and certainty.png (certainty per tick).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from launch import cli
from launch.maze_pictures import visualise

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a maze training run.")
_INDEX = flags.DEFINE_integer("index", 0, "Example of the eval split to draw.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
_FPS = flags.DEFINE_float("fps", 4.0, "Frames (ticks) per second of attention.gif.")
flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        result = visualise(_WORKDIR.value, _INDEX.value, _OUT.value, _FPS.value)
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    print(
        f"eval example {_INDEX.value} at step {result['step']}: solved "
        f"{'yes' if result['solved'] else 'no'}, steps {result['steps']}, step accuracy "
        f"{result['step_accuracy']:.3f}, most certain tick {result['most_certain_tick']}"
    )


if __name__ == "__main__":
    cli.run(main)
