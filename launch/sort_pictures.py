"""Wait ticks vs value gaps of a trained sorting CTM (the CTM paper's sorting analysis).

    python -m launch.sort_pictures --workdir=runs/sort_cpu \
        [--examples=1024] [--out=docs/figures/sort_wait_ticks.png]

Loads `<workdir>/config.json` and the latest checkpoint, runs the model (eval mode) on the first
`--examples` examples of the eval stream, decodes greedily and, for every pair of successive output
positions decoded right, relates the ticks the model waited between the two emissions to the gap
between the two sorted values. Writes one figure (scatter + binned means with the correlations;
one example's emissions over the ticks) and prints the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from core.errors import ConfigError  # noqa: E402
from launch import cli  # noqa: E402
from launch.runs import load_run  # noqa: E402
from tasks.ctm_sort import metrics  # noqa: E402
from tasks.ctm_sort.task import SortTask  # noqa: E402


def run_model(workdir: str | Path, examples: int, batch_size: int = 256) -> dict[str, Any]:
    """Predictions (E, N+1, T), inputs (E, N) and targets (E, N) of the first `examples` eval
    examples, with the checkpoint's step."""
    if examples < 1:
        raise ConfigError(f"--examples={examples} is invalid: must be >= 1")
    exp, variables, step = load_run(workdir, SortTask, kind="sort", tool="launch.sort_pictures")
    batch_size = min(batch_size, examples)
    data = exp.task.dataset("eval", batch_size=batch_size)
    forward = jax.jit(lambda v, x: exp.model.apply(v, x, train=False).predictions)
    found: dict[str, list[np.ndarray]] = {"predictions": [], "inputs": [], "targets": []}
    with jax.set_mesh(exp.mesh):
        for i in range(-(-examples // batch_size)):
            batch = data[i]
            found["predictions"].append(np.asarray(forward(variables, batch["inputs"])))
            found["inputs"].append(batch["inputs"])
            found["targets"].append(batch["targets"])
    out = {k: np.concatenate(v)[:examples] for k, v in found.items()}
    return {**out, "step": step}


def plot_wait_ticks(
    waits: np.ndarray,
    gaps: np.ndarray,
    stats: metrics.WaitStats,
    example: dict[str, np.ndarray],
    path: str | Path,
    title: str,
) -> Path:
    """Left: wait ticks against value gaps (jittered points, binned means +- s.e.m.). Right: one
    example, the value of each emitted element at the tick it was emitted (a sorted output is
    a rising staircase)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, size=waits.shape)
    left.scatter(gaps, waits + jitter, s=4, alpha=0.15, color="tab:blue", label="pairs (jittered)")
    left.errorbar(
        stats.bin_gap,
        stats.bin_wait,
        yerr=stats.bin_sem,
        color="tab:red",
        marker="o",
        capsize=3,
        label="mean per gap decile",
    )
    left.set_xlabel("gap between successive sorted values")
    left.set_ylabel("ticks waited before emitting the next element")
    left.set_title(
        f"{stats.pairs} pairs: Pearson r = {stats.pearson:.2f}, "
        f"Spearman rho = {stats.spearman:.2f}",
        fontsize=10,
    )
    left.legend(loc="upper right", fontsize=8)

    elements, ticks, x = example["elements"], example["ticks"], example["inputs"]
    n = len(x)
    values = x[np.clip(elements, 0, n - 1)]
    right_place = elements[:n] == example["targets"][: len(elements[:n])]
    colours = np.where(right_place, "tab:green", "tab:red")
    right.step(ticks[:n] + 1, values[:n], where="post", color="0.6")
    right.scatter(ticks[:n] + 1, values[:n], c=list(colours), zorder=3, s=18)
    # The N values themselves, at the right edge: a complete sorted output visits each once.
    right.scatter(np.full(n, example["n_ticks"] + 1), np.sort(x), marker="_", color="k", s=80)
    right.set_xlim(0.5, example["n_ticks"] + 1.5)
    right.set_xlabel("tick of emission (right edge: all N values)")
    right.set_ylabel("value of the emitted element")
    right.set_title(
        f"eval example 0: {int(right_place.sum())}/{n} right (green), {len(elements)} emitted",
        fontsize=10,
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def analyse(
    workdir: str | Path, examples: int = 1024, out: str | Path | None = None, bins: int = 10
) -> dict[str, Any]:
    """Runs the model, writes the figure to `out` (default <workdir>/sort_wait_ticks.png) and
    returns the numbers: step, examples, sequence_accuracy, accuracy, mean_wait, stats (WaitStats),
    path, and `data`, what `run_model` returned."""
    found = run_model(workdir, examples)
    predictions, inputs, targets = found["predictions"], found["inputs"], found["targets"]
    n = targets.shape[1]
    emitted = metrics.emissions(predictions)
    padded = np.full(targets.shape, n, np.int64)  # cut or blank-padded to N, as in training
    for b, (elements, _) in enumerate(emitted):
        padded[b, : min(len(elements), n)] = elements[:n]
    correct = padded == targets
    waits, gaps = metrics.wait_ticks_and_gaps(predictions, inputs, targets)
    stats = metrics.wait_stats(waits, gaps, bins)
    elements, ticks = emitted[0]
    path = plot_wait_ticks(
        waits,
        gaps,
        stats,
        {
            "elements": elements,
            "ticks": ticks,
            "inputs": inputs[0],
            "targets": targets[0],
            "n_ticks": predictions.shape[2],
        },
        out if out is not None else Path(workdir) / "sort_wait_ticks.png",
        f"CTM sorting N = {n} over T = {predictions.shape[2]} ticks, step {found['step']}, "
        f"{len(targets)} eval examples ({correct.all(axis=1).mean():.1%} exact)",
    )
    return {
        "step": found["step"],
        "examples": len(targets),
        "sequence_accuracy": float(correct.all(axis=1).mean()),
        "accuracy": float(correct.mean()),
        "mean_wait": float(waits.mean()) if waits.size else float("nan"),
        "stats": stats,
        "path": path,
        "data": found,
    }


def define_flags() -> None:
    """The command line; defined only when run as a program, so importing this module (tests,
    notebooks) registers no flags that could clash with another launcher's."""
    flags.DEFINE_string("workdir", None, "Workdir of a sorting training run.")
    flags.DEFINE_integer("examples", 1024, "Eval examples to analyse.")
    flags.DEFINE_string("out", None, "Figure path (default: <workdir>/sort_wait_ticks.png).")
    flags.DEFINE_integer("bins", 10, "Equal-count gap bins for the means.")
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    args = flags.FLAGS
    if args.bins < 1:
        cli.fail(f"--bins={args.bins} is invalid: must be >= 1")
    with cli.one_line_errors():
        result = analyse(args.workdir, args.examples, args.out, args.bins)
    stats = result["stats"]
    print(f"figure: {result['path']}")
    print(
        f"step {result['step']}, {result['examples']} eval examples: exact "
        f"{result['sequence_accuracy']:.4f}, per position {result['accuracy']:.4f}; "
        f"{stats.pairs} right successive pairs, mean wait {result['mean_wait']:.2f} ticks, "
        f"Pearson r {stats.pearson:.3f}, Spearman rho {stats.spearman:.3f}"
    )
    for gap, wait, count in zip(stats.bin_gap, stats.bin_wait, stats.bin_count, strict=True):
        print(f"  gap {gap:7.4f}: mean wait {wait:5.2f} ticks ({count} pairs)")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
