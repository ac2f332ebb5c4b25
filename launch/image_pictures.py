"""Figures and the per-tick table of a trained `ctm_image` run.

    python -m launch.image_pictures --workdir=runs/image_cpu --out=docs/figures

Writes, under --out (default: the workdir):
  image_attention.png    eval images (rows) with the head-averaged attention over the image at
                         evenly spaced ticks (columns), titled with the prediction and certainty
  image_readouts.png     top-1 / top-5 accuracy per tick of the read-outs
  image_calibration.png  reliability diagram at every tick (colour = tick) and ECE per tick
  image_per_tick.json    `tasks.ctm_image.task.evaluate_per_tick` on the eval batches
BatchNorm statistics are re-estimated on training batches first, as every training evaluation
does. A bad workdir ends with one `error: ...` line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from core.errors import Error  # noqa: E402
from ctm_jax import readouts, viz  # noqa: E402
from launch.runs import load_run  # noqa: E402
from tasks.ctm_image import data  # noqa: E402
from tasks.ctm_image.task import ImageTask, evaluate_per_tick  # noqa: E402

READOUT_LABELS = {
    "instant": "instantaneous",
    "most_certain": "most certain so far",
    "mean_prob": "mean probability",
    "certainty_weighted": "certainty-weighted logits",
}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def _overlay(ax: plt.Axes, image: np.ndarray, weights: np.ndarray) -> None:
    """The image with an attention map on top (scaled to its own range), opaque where high."""
    lo, hi = float(weights.min()), float(weights.max())
    norm = (weights - lo) / (hi - lo) if hi > lo else np.zeros_like(weights)
    ax.imshow(image, interpolation="nearest")
    ax.imshow(
        norm, cmap="inferno", vmin=0, vmax=1, alpha=0.15 + 0.7 * norm, interpolation="nearest"
    )
    ax.set_axis_off()


def display_image(inputs: np.ndarray, dataset: str) -> np.ndarray:
    """A normalised model input (H, W, C) back in [0, 1] for display ((H, W, 3))."""
    spec = data.spec(dataset)
    image = np.clip(inputs * np.asarray(spec.std) + np.asarray(spec.mean), 0.0, 1.0)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def attention_grid(
    images: np.ndarray,
    attention: np.ndarray,
    feature_hw: tuple[int, int],
    certainties: np.ndarray,
    predictions: np.ndarray,
    targets: np.ndarray,
    path: str | Path,
    ticks_shown: int = 8,
) -> Path:
    """Rows: images (B, H, W, 3) in [0, 1]; columns: the image, then the head-averaged
    attention (T, B, heads, 1, L) at `ticks_shown` evenly spaced ticks, each map scaled to its
    own range, titled with the tick's predicted class and certainty."""
    ticks = attention.shape[0]
    shown = np.unique(np.linspace(0, ticks - 1, min(ticks_shown, ticks)).round().astype(int))
    maps = attention.mean(axis=(2, 3)).reshape(ticks, len(images), *feature_hw)  # (T, B, h, w)
    fig, axes = plt.subplots(
        len(images), len(shown) + 1, figsize=(1.3 * (len(shown) + 1), 1.7 * len(images)), dpi=110
    )
    axes = np.atleast_2d(axes)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image, interpolation="nearest")
        axes[row, 0].set_title(f"label {int(targets[row])}", fontsize=7)
        axes[row, 0].set_axis_off()
        for col, tick in enumerate(shown, start=1):
            weights = viz.upsample_attention(maps[tick, row], image.shape[:2])
            ax = axes[row, col]
            _overlay(ax, image, weights)
            guess = int(np.argmax(predictions[row, :, tick]))
            colour = "green" if guess == int(targets[row]) else "red"
            ax.set_title(
                f"t{tick + 1}: {guess} ({certainties[row, 1, tick]:.2f})", fontsize=7, color=colour
            )
    fig.suptitle("attention over the image per tick: tick, prediction (certainty)", fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.96))
    return _save(fig, path)


def readouts_plot(table: dict[str, Any], path: str | Path) -> Path:
    """Top-1 (solid) and top-5 (dashed) accuracy per tick for every read-out."""
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for i, name in enumerate(readouts.READOUTS):
        colour = f"C{i}"
        top1, top5 = np.asarray(table["top1"][name]), np.asarray(table["top5"][name])
        ticks = np.arange(1, len(top1) + 1)
        ax.plot(ticks, 100 * top1, color=colour, label=f"{READOUT_LABELS[name]} (top-1)")
        ax.plot(ticks, 100 * top5, color=colour, linestyle="--", alpha=0.6)
    ax.set_xlabel("internal tick")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"held-out accuracy per tick ({table['n']} images; dashed: top-5)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def calibration_plot(table: dict[str, Any], path: str | Path) -> Path:
    """Left: reliability diagram of a tick's prediction with its own probability (bin mean
    confidence vs accuracy, non-empty bins) at up to 6 ticks, coloured by tick, the last one
    highlighted. Right:
    expected calibration error per tick, also with the reference analysis' confidence (the
    predicted class's probability averaged over the ticks so far)."""
    confidence = np.asarray(table["reliability"]["confidence"])
    accuracy = np.asarray(table["reliability"]["accuracy"])
    count = np.asarray(table["reliability"]["count"])
    ticks = confidence.shape[0]
    cmap = plt.get_cmap("viridis")
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=110)
    # A few evenly spaced ticks (all of them crowd the diagram), always the last.
    for t in np.unique(np.linspace(0, ticks - 1, min(ticks, 6)).round().astype(int)):
        used = count[t] > 0
        last = t == ticks - 1
        left.plot(
            confidence[t, used],
            accuracy[t, used],
            marker=".",
            color="#d62728" if last else cmap(t / max(ticks - 1, 1)),
            alpha=1.0 if last else 0.6,
            linewidth=1.6 if last else 0.8,
            label="last tick" if last else f"tick {t + 1}",
        )
    left.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    left.set_xlim(-0.01, 1.01)
    left.set_ylim(-0.01, 1.01)
    left.set_xlabel("predicted probability (bin mean)")
    left.set_ylabel("fraction correct")
    left.legend(fontsize=7, loc="upper left")
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(1, ticks)), ax=left)
    bar.set_label("internal tick")
    right.plot(np.arange(1, ticks + 1), table["ece"], marker=".", label="probability at the tick")
    right.plot(
        np.arange(1, ticks + 1),
        table["ece_mean_prob"],
        marker=".",
        linestyle="--",
        label="mean probability over ticks so far",
    )
    right.legend(fontsize=7)
    right.set_xlabel("internal tick")
    right.set_ylabel("expected calibration error")
    right.set_ylim(bottom=0)
    fig.suptitle("calibration per tick", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def pictures(
    workdir: str | Path,
    out: str | Path | None = None,
    *,
    examples: int = 4,
    ticks_shown: int = 8,
    batch_size: int | None = None,
    eval_batches: int | None = None,
) -> dict[str, Any]:
    """Writes the figures and the per-tick table of a workdir's latest checkpoint (see the
    module docstring) under `out` (default: the workdir); returns `write_pictures`'s result."""
    exp, variables, step = load_run(
        workdir, ImageTask, kind="image classification", tool="launch.image_pictures"
    )
    return write_pictures(
        exp,
        variables,
        step,
        out if out is not None else workdir,
        examples=examples,
        ticks_shown=ticks_shown,
        batch_size=batch_size,
        eval_batches=eval_batches,
    )


def write_pictures(
    exp: Any,
    variables: dict[str, Any],
    step: int,
    out: str | Path,
    *,
    examples: int = 4,
    ticks_shown: int = 8,
    batch_size: int | None = None,
    eval_batches: int | None = None,
) -> dict[str, Any]:
    """The figures and table of a restored run (`launch.runs.load_run`'s experiment and
    variables); returns {'paths': {...}, 'table': ..., 'step': step}."""
    task: ImageTask = exp.task
    out = Path(out)
    batch = int(batch_size or exp.local_batch)
    variables = task.eval_variables(exp.model, variables, batch)
    eval_ds = task.dataset("eval", batch_size=batch)
    n = len(eval_ds) if eval_batches is None else min(int(eval_batches), len(eval_ds))
    table = evaluate_per_tick(task, exp.model, variables, (eval_ds[i] for i in range(n)))

    first = dict(task.dataset("eval", batch_size=examples)[0])
    outputs = jax.jit(lambda v, x: exp.model.apply(v, x, train=False, track=True))(
        variables, first["inputs"]
    )
    images = np.stack([display_image(x, task.dataset_name) for x in np.asarray(first["inputs"])])
    feature_hw = task.model_config.feature_map_size(images.shape[1], images.shape[2])
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "attention": attention_grid(
            images,
            np.asarray(outputs.tracking["attention"]),
            feature_hw,
            np.asarray(outputs.certainties),
            np.asarray(outputs.predictions),
            np.asarray(first["targets"]),
            out / "image_attention.png",
            ticks_shown,
        ),
        "readouts": readouts_plot(table, out / "image_readouts.png"),
        "calibration": calibration_plot(table, out / "image_calibration.png"),
        "table": out / "image_per_tick.json",
    }
    paths["table"].write_text(json.dumps({"step": step, **table}, indent=1) + "\n")
    return {"paths": paths, "table": table, "step": step}


def summary_lines(table: dict[str, Any]) -> list[str]:
    """A short text table: accuracy of each read-out at a few ticks, ECE, exits."""
    ticks = len(table["ece"])
    shown = sorted({0, ticks // 4, ticks // 2, (3 * ticks) // 4, ticks - 1})
    lines = [f"{'read-out':<20}" + "".join(f"  t{t + 1:>3} top1/top5" for t in shown)]
    for name in readouts.READOUTS:
        cells = "".join(
            f"  {100 * table['top1'][name][t]:5.1f}/{100 * table['top5'][name][t]:5.1f}"
            for t in shown
        )
        lines.append(f"{name:<20}{cells}")
    lines.append(f"{'ECE':<20}" + "".join(f"  {table['ece'][t]:11.4f}" for t in shown))
    lines.append(
        f"{'ECE (mean prob.)':<20}" + "".join(f"  {table['ece_mean_prob'][t]:11.4f}" for t in shown)
    )
    for thr, e in table["exits"].items():
        lines.append(
            f"exit at certainty >= {thr}: mean ticks {e['tick_mean']:.2f}, top-1 "
            f"{100 * e['top1']:.1f}%, top-5 {100 * e['top5']:.1f}%, "
            f"reached {100 * e['reached']:.1f}%"
        )
    return lines


_WORKDIR = flags.DEFINE_string("workdir", None, "A ctm_image training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: the workdir).")
_EXAMPLES = flags.DEFINE_integer("examples", 4, "Eval images in the attention figure.")
_TICKS = flags.DEFINE_integer("ticks_shown", 8, "Ticks (columns) in the attention figure.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Eval batches (default: all).")


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        result = pictures(
            _WORKDIR.value,
            _OUT.value,
            examples=_EXAMPLES.value,
            ticks_shown=_TICKS.value,
            eval_batches=_EVAL_BATCHES.value,
        )
    except Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"step {result['step']}, {result['table']['n']} held-out images")
    print("\n".join(summary_lines(result["table"])))
    for name, path in result["paths"].items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
