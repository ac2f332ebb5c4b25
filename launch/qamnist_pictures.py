"""The per-tick answer of a trained Q&A-MNIST CTM on a few eval questions.

    python -m launch.qamnist_pictures --workdir=runs/qamnist_cpu \
        [--examples=4] [--first=0] [--out=docs/figures/qamnist_answers.png] \
        [--accuracy_examples=2048]

Loads `<workdir>/config.json` and the latest checkpoint and runs the model (eval mode) on eval
questions `--first`, `--first`+1, ... (odd ones ask beyond the training range of operations when
the run's task.eval_max_ops > task.max_ops). One row per question: the digit images it shows, then
the softmax over the 10 answers at every tick of the question (pad ticks left out), with the
ticks' phases (digit / index / operator / answer) underneath, the right answer outlined and the
answer read at the most certain answer tick. Prints each question and what the model answered,
and with --accuracy_examples the accuracy per number of operations over that many eval questions.
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
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from core.errors import ConfigError  # noqa: E402
from ctm_jax.qamnist import ANSWER, DIGIT, INDEX, MODE_NAMES, OPERATOR, PAD  # noqa: E402
from launch import cli  # noqa: E402
from launch.runs import load_run  # noqa: E402
from tasks.ctm_qamnist import data  # noqa: E402
from tasks.ctm_qamnist.task import QAMNISTTask  # noqa: E402

# Phase colours for the strip under each heat map: pad (unused), digit, index, operator, answer.
PHASE_COLOURS = ["#ffffff", "#4c72b0", "#55a868", "#c44e52", "#8172b2"]


def question_from_layout(modes: np.ndarray, tokens: np.ndarray, repeats: int) -> data.Question:
    """The question a tick layout asks (its tokens, one per run of `repeats` ticks)."""
    asked = [int(t) for m, t in zip(modes, tokens, strict=True) if m in (INDEX, OPERATOR)]
    asked = asked[::repeats]
    return data.Question(asked[0], tuple(asked[1::2]), tuple(asked[2::2]))


def run_model(workdir: str | Path, first: int, examples: int) -> dict[str, Any]:
    """Eval questions first .. first + examples - 1 and the model's outputs on them."""
    if examples < 1:
        raise ConfigError(f"--examples={examples} is invalid: must be >= 1")
    if first < 0:
        raise ConfigError(f"--first={first} is invalid: must be >= 0")
    exp, variables, step = load_run(
        workdir, QAMNISTTask, kind="Q&A-MNIST", tool="launch.qamnist_pictures"
    )
    task: QAMNISTTask = exp.task
    stream = task.dataset("eval", batch_size=1)
    rows = [stream[first + i] for i in range(examples)]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    with jax.set_mesh(exp.mesh):
        outputs = task.apply(exp.model, variables, batch, train=False)
    return {
        "batch": batch,
        "probabilities": np.asarray(jax.nn.softmax(outputs.predictions, axis=1)),
        "certainties": np.asarray(outputs.certainties),
        "spec": task.spec,
        "step": step,
    }


def describe(found: dict[str, Any]) -> list[dict[str, Any]]:
    """Per question: readable text, target, the answer at the most certain answer tick (and
    which tick, counted over the question's own ticks), beyond-range flag."""
    batch, spec = found["batch"], found["spec"]
    out = []
    for b in range(len(batch["targets"])):
        modes = batch["modes"][b]
        question = question_from_layout(modes, batch["tokens"][b], spec.repeats)
        answer_certainty = found["certainties"][b, 1, -spec.answer_steps :]
        tick = modes.shape[0] - spec.answer_steps + int(answer_certainty.argmax())
        pads = int((modes == PAD).sum())
        out.append(
            {
                "text": question.readable(batch["labels"][b]),
                "target": int(batch["targets"][b]),
                "answer": int(found["probabilities"][b, :, tick].argmax()),
                "tick": tick - pads,
                "beyond": bool(batch["beyond"][b]),
                "n_digits": int(batch["n_digits"][b]),
            }
        )
    return out


def accuracy_by_ops(workdir: str | Path, examples: int, batch_size: int = 64) -> dict[int, tuple]:
    """{number of operations: (questions, accuracy at the most certain answer tick)} over the
    first `examples` eval questions (rounded up to whole batches); operation counts above the
    run's task.max_ops are the beyond-range questions."""
    if examples < 1:
        raise ConfigError(f"--accuracy_examples={examples} is invalid: must be >= 1")
    exp, variables, _ = load_run(
        workdir, QAMNISTTask, kind="Q&A-MNIST", tool="launch.qamnist_pictures"
    )
    task: QAMNISTTask = exp.task
    stream = task.dataset("eval", batch_size=batch_size)

    def right(batch: dict[str, np.ndarray]) -> jax.Array:
        outputs = task.apply(exp.model, variables, batch, train=False)
        return task.answer_values(outputs, batch)["accuracy"]

    right = jax.jit(right)
    ops, correct = [], []
    with jax.set_mesh(exp.mesh):
        for i in range(-(-examples // batch_size)):
            batch = stream[i]
            ops.append(batch["n_ops"])
            correct.append(np.asarray(right(batch)))
    ops_all, correct_all = np.concatenate(ops), np.concatenate(correct)
    return {
        int(k): (int((ops_all == k).sum()), float(correct_all[ops_all == k].mean()))
        for k in np.unique(ops_all)
    }


def plot_answers(found: dict[str, Any], path: str | Path, title: str) -> Path:
    """One row per question: its digit images, then the per-tick answer probabilities."""
    batch = found["batch"]
    rows = describe(found)
    slots = batch["digits"].shape[1]
    n = len(rows)
    fig = plt.figure(figsize=(12, 2.3 * n + 0.8))
    grid = fig.add_gridspec(n, slots + 1, width_ratios=[1] * slots + [3 * slots], hspace=0.7)
    phases = ListedColormap(PHASE_COLOURS)
    for r, row in enumerate(rows):
        for s in range(slots):
            ax = fig.add_subplot(grid[r, s])
            ax.axis("off")
            if s < row["n_digits"]:
                ax.imshow(batch["digits"][r, s, ..., 0], cmap="gray")
                ax.set_title(f"#{s}: {int(batch['labels'][r, s])}", fontsize=8)
        real = batch["modes"][r] != PAD
        probs = found["probabilities"][r][:, real]  # (10, ticks of this question)
        modes = batch["modes"][r][real]
        ax = fig.add_subplot(grid[r, slots])
        ticks = probs.shape[1]
        ax.imshow(
            probs,
            aspect="auto",
            cmap="magma",
            vmin=0,
            vmax=1,
            origin="lower",
            extent=(0.5, ticks + 0.5, -0.5, 9.5),
        )
        ax.imshow(
            modes[None, :],
            aspect="auto",
            cmap=phases,
            vmin=0,
            vmax=len(PHASE_COLOURS) - 1,
            extent=(0.5, ticks + 0.5, -1.6, -0.6),
            interpolation="nearest",
        )
        ax.add_patch(
            plt.Rectangle(
                (0.5, row["target"] - 0.5), ticks, 1.0, fill=False, edgecolor="cyan", lw=1.2
            )
        )
        ax.plot([row["tick"] + 1], [row["answer"]], marker="x", color="lime", ms=9, mew=2)
        ax.set_ylim(-1.6, 9.5)
        ax.set_yticks(range(10))
        ax.tick_params(labelsize=7)
        verdict = "right" if row["answer"] == row["target"] else "wrong"
        beyond = " [beyond the training range]" if row["beyond"] else ""
        ax.set_title(
            f"{row['text']}{beyond}: answered {row['answer']} ({verdict})", fontsize=9, loc="left"
        )
        if r == n - 1:
            ax.set_xlabel("tick of the question", fontsize=8)
    handles = [
        Patch(color=PHASE_COLOURS[m], label=f"{MODE_NAMES[m]} ticks")
        for m in (DIGIT, INDEX, OPERATOR, ANSWER)
    ]
    handles += [
        Patch(fill=False, edgecolor="cyan", label="right answer"),
        Line2D([], [], marker="x", color="lime", ls="", mew=2, label="most certain answer tick"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def define_flags() -> None:
    """The command line; defined only when run as a program (importing registers no flags)."""
    flags.DEFINE_string("workdir", None, "Workdir of a Q&A-MNIST training run.")
    flags.DEFINE_integer("examples", 4, "Eval questions to draw.")
    flags.DEFINE_integer("first", 0, "Index of the first eval question.")
    flags.DEFINE_string("out", None, "Figure path (default: <workdir>/qamnist_answers.png).")
    flags.DEFINE_integer(
        "accuracy_examples", 0, "Also print accuracy per number of operations over this many."
    )
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    args = flags.FLAGS
    with cli.one_line_errors():
        found = run_model(args.workdir, args.first, args.examples)
        out = args.out or Path(args.workdir) / "qamnist_answers.png"
        spec = found["spec"]
        title = (
            f"Q&A-MNIST CTM, step {found['step']}: answer probabilities per tick "
            f"(R = {spec.repeats}, {spec.answer_steps} answer ticks)"
        )
        path = plot_answers(found, out, title)
    print(f"figure: {path}")
    for row in describe(found):
        beyond = " (beyond)" if row["beyond"] else ""
        print(
            f"  {row['text']}{beyond}: answered {row['answer']} at tick {row['tick'] + 1}, "
            f"{'right' if row['answer'] == row['target'] else 'wrong'}"
        )
    if args.accuracy_examples:
        with cli.one_line_errors():
            table = accuracy_by_ops(args.workdir, args.accuracy_examples)
        trained = found["spec"].max_ops
        print("operations | questions | accuracy (most certain answer tick)")
        for ops, (count, accuracy) in table.items():
            beyond = " (beyond training)" if ops > trained else ""
            print(f"{ops:10d} | {count:9d} | {accuracy:.3f}{beyond}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
