"""One accuracy-vs-FLOPs frontier over ticks, streams and samples, on the same task instances.

    python -m launch.frontier --task=maze     # CTM ticks, certainty exit, P-stream CTMs, samples
    python -m launch.frontier --task=arith    # ParScale P = 1, 2, 4 LMs and samples

Runs (or resumes, from the same samples.jsonl) the `frontier-<task>` preset of
configs/inference_scaling.py, turns every compute setting x aggregator x k into a point (accuracy,
mean FLOPs per instance), marks the Pareto front (with and without the perfect-verifier
aggregators and the sequential loop, which need the ground truth), and writes frontier.json,
frontier.png and the compute-matched comparison (P = k with one sample vs P = 1 with maj@k vs
P = 1 with best-of-k) to --frontier_out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from configs import inference_scaling as presets
from core.errors import ConfigError
from inference_scaling import frontier, report
from launch import cli
from launch.scale_inference import scale_inference

TASKS = ("maze", "arith")


def define_flags() -> None:
    """Defined only when run as a program (absl flags are process-global; see scale_inference)."""
    flags.DEFINE_enum("task", None, list(TASKS), "Which frontier: maze or arith.")
    flags.DEFINE_string("frontier_out", "", "Output directory (default: the preset's out).")
    flags.DEFINE_integer("n", 0, "Samples per instance N (default: the preset's).")
    flags.DEFINE_integer("instances_per_level", 0, "Instances per level (default: the preset's).")


def knobs_of(label: str) -> dict[str, Any]:
    """'T=16,P=1,exit=0.9' -> {'T': 16, 'P': 1, 'exit': 0.9}."""
    knobs: dict[str, Any] = {}
    for part in label.split(","):
        name, _, value = part.partition("=")
        try:
            knobs[name] = int(value)
        except ValueError:
            try:
                knobs[name] = float(value)
            except ValueError:
                knobs[name] = value
    return knobs


def frontier_points(summary: Mapping[str, Any]) -> list[frontier.Point]:
    points = []
    for label, s in summary["configs"].items():
        knobs = {"config": label, **knobs_of(label)}
        points += frontier.points_from_summary(knobs, s, s["cost"]["flops_per_sample"])
        if "sequential" in s:
            seq = s["sequential"]
            points += frontier.points_from_sequential(
                {**knobs, "feedback": seq["feedback"]}, seq["seq_solved@r"], seq["flops_by_round"]
            )
    return points


def matched(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """P = k (1 sample) vs P = 1 maj@k / best-of-k at equal FLOPs, for every P = k setting and
    the P = 1 setting with the same other knobs (how the streams were trained, `init`, aside)."""
    configs = summary["configs"]

    def rest(label: str) -> tuple:
        return tuple(sorted((k, v) for k, v in knobs_of(label).items() if k not in ("P", "init")))

    bases = {rest(label): label for label in configs if knobs_of(label).get("P") == 1}
    rows = []
    for label in configs:
        p = knobs_of(label).get("P")
        base_label = bases.get(rest(label))
        if not isinstance(p, int) or p == 1 or base_label is None:
            continue
        base = configs[base_label]
        single = frontier.Point(
            {"config": label}, configs[label]["acc_avg"], configs[label]["cost"]["flops_per_sample"]
        )
        for r in frontier.compute_matched({p: single}, base, base["cost"]["flops_per_sample"]):
            rows.append({"setting": label, "base": base_label, **r})
    return rows


def run_frontier(config: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
    summary = scale_inference(config)
    points = frontier_points(summary)
    records = frontier.frontier_records(points)
    result = {
        "task": summary["task"],
        "instances": summary["instances"],
        "n": summary["n"],
        "points": records,
        "compute_matched": matched(summary),
    }
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / report.FRONTIER_FILE, result)
    report.frontier_plot(records, out / "frontier.png", f"{summary['task']}: accuracy vs FLOPs")
    return result


def describe_front(records: Sequence[Mapping[str, Any]], key: str) -> str:
    front = sorted((r for r in records if r[key]), key=lambda r: r["flops_per_instance"])
    return "\n".join(
        f"  {r['flops_per_instance'] / 1e9:10.3f} GFLOPs  acc {r['accuracy']:.3f}  "
        + ", ".join(f"{k}={v}" for k, v in r["knobs"].items() if k != "config")
        for r in front
    )


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    args = flags.FLAGS
    with cli.one_line_errors():
        if args.task is None:
            raise ConfigError(f"--task is missing: allowed: {', '.join(TASKS)}")
        config = presets.get_config(f"frontier-{args.task}")
        if args.n:
            config.n = args.n
        if args.instances_per_level:
            config.instances_per_level = args.instances_per_level
        out = Path(args.frontier_out or config.out)
        config.out = str(out)
        result = run_frontier(config, out)
    print(f"{result['task']}: {result['instances']} instances, N={result['n']}")
    print("Pareto front (all aggregators):")
    print(describe_front(result["points"], "on_front"))
    print("verifier-free Pareto front (no best-of-k, worst-of-k or sequential):")
    print(describe_front(result["points"], "on_deployable_front"))
    if result["compute_matched"]:
        print("compute-matched (equal FLOPs):")
        print(cli.format_table(result["compute_matched"]))
    print(f"wrote {out / report.FRONTIER_FILE} and {out / 'frontier.png'}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
