"""Adaptive compute of a trained CTM: accuracy and ticks used per certainty threshold.

`python -m launch.adaptive --workdir runs/parity_tiny_15min --thresholds 0.5,0.8,0.9,0.95`
restores the latest checkpoint of the run in `--workdir` (its config.json says what to build),
evaluates `--batches` batches of the eval split with `ctm_jax.adaptive.adaptive_forward` at each
threshold and prints, per threshold, the task's accuracy at each example's exit tick, the mean
ticks used per example and the mean ticks the (masked) batch ran; the all-ticks forward at the
most certain and at the last tick is the baseline. `--json` prints the rows as JSON instead.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from core.errors import ConfigError
from ctm_jax.adaptive import adaptive_forward
from ctm_jax.model import CTM
from launch import cli
from launch.cli import format_table
from launch.runs import load_run
from tasks.ctm_maze.metrics import maze_metrics
from tasks.ctm_maze.task import MazeTask
from tasks.ctm_parity.task import ParityTask, most_certain_tick, parity_accuracy
from train_lib.task import Batch, Task

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by launch.train.")
_THRESHOLDS = flags.DEFINE_list(
    "thresholds", ["0.5", "0.8", "0.9", "0.95"], "Certainty thresholds, comma-separated."
)
_BATCHES = flags.DEFINE_integer("batches", 8, "Eval batches to average over.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Examples per batch (default: the run's train.batch_size)."
)
_MAX_TICKS = flags.DEFINE_integer(
    "max_ticks", None, "Tick limit (default: the trained model.iterations; may be larger)."
)
_JSON = flags.DEFINE_bool("json", False, "Print the rows as JSON instead of a table.")
flags.mark_flags_as_required(["workdir"])

# Answers (B, out_dims) logits at one tick per example, batch -> scalar metrics.
AnswerMetrics = Callable[[jax.Array, Batch], dict[str, jax.Array]]


def answer_metrics(task: Task) -> AnswerMetrics:
    """The task's accuracies of per-example answers (one tick's logits per example)."""
    if isinstance(task, ParityTask):

        def parity(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
            targets = batch["targets"]
            first = jnp.zeros((targets.shape[0],), jnp.int32)
            acc, seq_acc = parity_accuracy(logits[..., None], targets, first)
            return {"accuracy": acc, "sequence_accuracy": seq_acc}

        return parity
    if isinstance(task, MazeTask):

        def maze(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
            targets = batch["targets"]
            actions = jnp.argmax(logits.reshape(*targets.shape, -1), axis=-1)
            found = maze_metrics(task._images01(batch["inputs"]), actions, targets)
            return {k: found[k] for k in ("step_accuracy", "solve_rate")}

        return maze
    raise ConfigError(f"task {type(task).__name__} has no adaptive metrics (parity, maze only)")


def evaluate(
    model: CTM,
    variables: Any,
    batches: Sequence[Batch],
    metrics: AnswerMetrics,
    thresholds: Sequence[float],
    max_ticks: int,
) -> list[dict[str, Any]]:
    """One row per threshold plus the all-ticks baselines, each averaged over `batches`."""

    @jax.jit
    def baseline(batch: Batch) -> dict[str, dict[str, jax.Array]]:
        out = model.apply(variables, batch["inputs"])
        rows = {}
        ticks = out.predictions.shape[-1]
        for name, tick in (
            ("most certain", most_certain_tick(out.certainties)),
            ("last", jnp.full((out.predictions.shape[0],), ticks - 1)),
        ):
            logits = jnp.take_along_axis(out.predictions, tick[:, None, None], axis=-1)[..., 0]
            rows[name] = {**metrics(logits, batch), "mean_ticks": jnp.float32(ticks)}
        return rows

    @functools.partial(jax.jit, static_argnames="limit")
    def adaptive(batch: Batch, threshold: jax.Array, limit: int) -> dict[str, jax.Array]:
        out = adaptive_forward(model, variables, batch["inputs"], threshold, limit)
        return {
            **metrics(out.predictions, batch),
            "mean_ticks": out.exit_tick.mean(),
            "batch_ticks": out.ticks_run.astype(jnp.float32),
        }

    def mean(values: list[Mapping[str, jax.Array]]) -> dict[str, float]:
        return {k: float(sum(float(v[k]) for v in values) / len(values)) for k in values[0]}

    rows = []
    for threshold in thresholds:
        found = [adaptive(b, jnp.float32(threshold), max_ticks) for b in batches]
        rows.append({"threshold": threshold, **mean(found)})
    base = [baseline(b) for b in batches]
    for name in base[0]:
        rows.append({"threshold": f"all ticks ({name})", **mean([b[name] for b in base])})
    return rows


def parse_thresholds(values: Sequence[str]) -> list[float]:
    """Certainty thresholds from the flag; ConfigError naming a value that is not in (0, 1]."""
    thresholds = []
    for value in values:
        try:
            threshold = float(value)
        except ValueError:
            threshold = -1.0
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"--thresholds={value!r} is invalid: thresholds must lie in (0, 1]")
        thresholds.append(threshold)
    return thresholds


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        thresholds = parse_thresholds(_THRESHOLDS.value)
        workdir = Path(_WORKDIR.value)
        exp, variables, step = load_run(workdir)
        config, task = exp.config, exp.task
        model = task.build_model()
        if not isinstance(model, CTM):
            raise ConfigError(f"--workdir={str(workdir)!r} is invalid: its model is not a CTM")
        max_ticks = _MAX_TICKS.value or model.config.iterations
        batch_size = _BATCH_SIZE.value or int(config.train.batch_size)
        dataset = task.dataset("eval", batch_size=batch_size)
        batches = [dict(dataset[i]) for i in range(_BATCHES.value)]
        rows = evaluate(model, variables, batches, answer_metrics(task), thresholds, max_ticks)
    summary = {
        "workdir": str(workdir),
        "step": step,
        "trained_ticks": model.config.iterations,
        "max_ticks": max_ticks,
        "examples": batch_size * len(batches),
        "rows": rows,
    }
    if _JSON.value:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{workdir} at step {step}: {summary['examples']} eval examples, max_ticks {max_ticks} "
        f"(trained {model.config.iterations}); mean_ticks per example, batch_ticks per batch"
    )
    print(format_table(rows))


if __name__ == "__main__":
    cli.run(main)
