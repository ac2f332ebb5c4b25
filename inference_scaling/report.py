"""The report writer: the only part of inference_scaling that touches files.

samples.jsonl  one row per (config, instance, repeat, round), appended and flushed per batch:
               an interrupted run leaves complete rows only, and a rerun with the same seed
               reads them back and draws only what is missing
summary.json   per config and level: every aggregator at n, the pass@k / worst@k / maj@k
               curves, the gaps, cost statistics (written to a temporary file, then renamed)
*.png          bounds bars, pass@k and maj@k against calls (parallel vs sequential), accuracy
               and cost per level, per-instance cost-std histograms by outcome, the frontier
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.errors import DataError  # noqa: E402

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
FRONTIER_FILE = "frontier.json"


def row_key(row: Mapping[str, Any]) -> tuple[str, str, int, int, int]:
    """What identifies a sample across reruns: (mode, config, instance, repeat, round)."""
    return (
        str(row.get("mode", "parallel")),
        str(row["config"]),
        int(row["instance_id"]),
        int(row["repeat_id"]),
        int(row["round"]),
    )


class SampleWriter:
    """Appends rows to samples.jsonl, one flushed line each; reads back complete rows."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.path = Path(out) / SAMPLES_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def existing(self) -> dict[tuple[str, str, int, int, int], dict[str, Any]]:
        """Rows of an earlier run; a torn last line (killed mid-write) is dropped and cut off."""
        if not self.path.exists():
            return {}
        rows, good_bytes = {}, 0
        with self.path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    break  # the write of this line never finished
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{self.path}:{number}: not a JSON row ({e})") from None
                rows[row_key(row)] = row
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good_bytes)
        return rows

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        with self.path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write-then-rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Figures


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bounds_bars(summaries: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """Worst-of-N / average / majority / best-of-N per config, with the std of the average."""
    names = list(summaries)
    bars = (
        ("acc_won", "worst-of-N"),
        ("acc_avg", "average"),
        ("acc_mv", "majority"),
        ("acc_bon", "best-of-N"),
    )
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names) + 2), 3.8))
    x = np.arange(len(names))
    for i, (key, label) in enumerate(bars):
        values = [summaries[n][key] for n in names]
        errors = [summaries[n]["acc_avg_std"] if key == "acc_avg" else 0.0 for n in names]
        ax.bar(x + (i - 1.5) * width, values, width, yerr=errors, label=label, capsize=2)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    return _save(fig, path)


def curves_vs_calls(
    summaries: Mapping[str, Mapping[str, Any]],
    sequential: Mapping[str, Mapping[str, float]],
    path: Path,
    title: str,
) -> Path:
    """pass@k (best-of-k) and maj@k against the number of calls on a log2 axis, with sequential
    solved-within-budget against calls, critic calls included (dashed)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, summary in summaries.items():
        ks = sorted(int(k) for k in summary["pass@k"])
        (line,) = ax.plot(
            ks, [summary["pass@k"][str(k)] for k in ks], "o-", label=f"{name} best-of-k"
        )
        ax.plot(
            ks,
            [summary["maj@k"][str(k)] for k in ks],
            "s:",
            color=line.get_color(),
            label=f"{name} maj@k",
        )
        if name in sequential:
            calls = sorted(int(c) for c in sequential[name])
            ax.plot(
                calls,
                [sequential[name][str(c)] for c in calls],
                "^--",
                color=line.get_color(),
                label=f"{name} sequential",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of calls")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def per_level(
    by_level: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path, title: str, unit: str
) -> Path:
    """Accuracy (average, best-of-N) and mean cost per level, one line per config."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, levels in by_level.items():
        labels = list(levels)
        x = np.arange(len(labels))
        (line,) = left.plot(x, [levels[lv]["acc_avg"] for lv in labels], "o-", label=f"{name} avg")
        left.plot(
            x,
            [levels[lv]["acc_bon"] for lv in labels],
            "s:",
            color=line.get_color(),
            label=f"{name} best-of-N",
        )
        right.plot(
            x,
            [levels[lv]["cost"]["mean"] for lv in labels],
            "o-",
            color=line.get_color(),
            label=name,
        )
        left.set_xticks(x, labels, rotation=20, fontsize=7)
        right.set_xticks(x, labels, rotation=20, fontsize=7)
    left.set_ylim(0, 1)
    left.set_ylabel("accuracy")
    right.set_ylabel(f"mean {unit} per sample")
    left.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def cost_std_histograms(
    cost_std: Mapping[str, np.ndarray],
    outcome: Mapping[str, Mapping[str, np.ndarray]],
    path: Path,
    unit: str,
) -> Path:
    """Histograms of per-instance cost std across repeats, split by outcome, one panel a config."""
    names = list(cost_std)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        std = np.asarray(cost_std[name])
        for label, mask in outcome[name].items():
            if mask.any():
                ax.hist(std[mask], bins=12, alpha=0.6, label=f"{label} ({int(mask.sum())})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"std of {unit} across repeats")
        ax.legend(fontsize=7)
    return _save(fig, path)


def frontier_plot(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Accuracy against mean FLOPs per instance (log axis), the Pareto front marked."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(str(record["knobs"].get("aggregator")), []).append(record)
    markers = dict(
        average="o",
        majority="s",
        best_of_k="^",
        worst_of_k="v",
        selected_best_of_n="D",
        sequential="P",
    )
    for name, group in groups.items():
        ax.scatter(
            [r["flops_per_instance"] for r in group],
            [r["accuracy"] for r in group],
            marker=markers.get(name, "x"),
            alpha=0.55,
            label=name,
        )
    for key, style, label in (
        ("on_front", "k-", "Pareto front (all)"),
        ("on_deployable_front", "r--", "verifier-free front"),
    ):
        front = sorted((r for r in records if r[key]), key=lambda r: r["flops_per_instance"])
        if front:
            ax.plot(
                [r["flops_per_instance"] for r in front],
                [r["accuracy"] for r in front],
                style,
                label=label,
            )
    ax.set_xscale("log")
    ax.set_xlabel("mean FLOPs per instance")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
