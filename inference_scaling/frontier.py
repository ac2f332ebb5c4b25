"""One accuracy-vs-compute frontier over ticks, streams and samples.

Every way of spending compute becomes points (knobs, accuracy, mean FLOPs per instance) on the same
instances:

  * a compute setting (CTM ticks T, certainty exit, ParScale P) read once: `average` at 1 call;
  * the same setting sampled N times and aggregated: for every k <= N, majority (maj@k),
    best-of-k with the perfect verifier (pass@k) and worst-of-k (worst@k), each costing k
    samples; selected best-of-N (an imperfect verifier) at N;
  * sequential rounds with feedback: solved within r rounds, costing the rounds actually run.

A point is on the Pareto front when no other point is at least as accurate for at most the same
FLOPs and strictly better in one of the two. Best-of-k and worst-of-k assume a perfect verifier
(an upper and a lower bound), and the sequential loop stops when the ground truth says an answer
is right (the paper's hybrid critic); the front is reported with them and without them
("verifier-free": one read, majority vote, or the model's own confidence picking among N).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Points that need the ground truth (to pick, or to stop and locate the error).
ORACLE_AGGREGATORS = ("best_of_k", "worst_of_k", "sequential")


@dataclasses.dataclass(frozen=True)
class Point:
    """One way of spending compute: `knobs` (e.g. {"T": 16, "P": 1, "aggregator": "maj@k",
    "k": 4}), accuracy in [0, 1], and mean FLOPs per instance."""

    knobs: Mapping[str, Any]
    accuracy: float
    flops: float

    @property
    def deployable(self) -> bool:
        return self.knobs.get("aggregator") not in ORACLE_AGGREGATORS


def points_from_summary(
    knobs: Mapping[str, Any],
    summary: Mapping[str, Any],
    flops_per_sample: float,
) -> list[Point]:
    """Points of one compute setting from `aggregators.summarize` output: average at one call,
    maj@k / best-of-k (pass@k) / worst-of-k at k calls, selected best-of-N at N calls."""
    points = [
        Point({**knobs, "aggregator": "average", "k": 1}, summary["acc_avg"], flops_per_sample)
    ]
    curves = (("maj@k", "majority"), ("pass@k", "best_of_k"), ("worst@k", "worst_of_k"))
    for curve, name in curves:
        for k, value in summary[curve].items():
            k = int(k)
            if k == 1:
                continue  # maj@1 = pass@1 = worst@1 = the average
            points.append(Point({**knobs, "aggregator": name, "k": k}, value, k * flops_per_sample))
    if "acc_sel" in summary:
        n = int(summary["samples"])
        points.append(
            Point(
                {**knobs, "aggregator": "selected_best_of_n", "k": n},
                summary["acc_sel"],
                n * flops_per_sample,
            )
        )
    return points


def points_from_sequential(
    knobs: Mapping[str, Any],
    solved_by_round: Mapping[Any, float],
    flops_by_round: Mapping[Any, float],
) -> list[Point]:
    """Sequential points: solved within r rounds at the mean FLOPs actually spent up to r."""
    return [
        Point(
            {**knobs, "aggregator": "sequential", "rounds": int(r)},
            float(acc),
            float(flops_by_round[r]),
        )
        for r, acc in solved_by_round.items()
    ]


def pareto_front(points: Sequence[Point]) -> list[bool]:
    """On-front flags: no other point is as accurate for no more FLOPs and better in one."""
    acc = np.array([p.accuracy for p in points], float)
    cost = np.array([p.flops for p in points], float)
    flags = []
    for i in range(len(points)):
        dominated = (acc >= acc[i]) & (cost <= cost[i]) & ((acc > acc[i]) | (cost < cost[i]))
        flags.append(not bool(dominated.any()))
    return flags


def frontier_records(points: Sequence[Point]) -> list[dict[str, Any]]:
    """frontier.json records: knobs, accuracy, FLOPs, on the front among all points, and on the
    front among deployable points (no perfect-verifier aggregators)."""
    front_all = pareto_front(points)
    deployable = [p for p in points if p.deployable]
    front_deployable = dict(zip(map(id, deployable), pareto_front(deployable), strict=True))
    return [
        {
            "knobs": dict(p.knobs),
            "accuracy": float(p.accuracy),
            "flops_per_instance": float(p.flops),
            "on_front": bool(on),
            "on_deployable_front": bool(front_deployable.get(id(p), False)),
        }
        for p, on in zip(points, front_all, strict=True)
    ]


def compute_matched(
    streams_single: Mapping[int, Point], base_summary: Mapping[str, Any], base_flops: float
) -> list[dict[str, Any]]:
    """The paper-suggested comparison at equal FLOPs: P = k with one sample vs P = 1 with
    maj@k vs P = 1 with best-of-k (a perfect verifier's upper bound). `streams_single` maps
    P -> the average point of the P-stream model; `base_summary` is P = 1's summary."""
    rows = []
    for p, point in sorted(streams_single.items()):
        if p == 1 or str(p) not in base_summary["maj@k"]:
            continue
        rows.append(
            {
                "k": p,
                "P=k, 1 sample": float(point.accuracy),
                "P=k FLOPs": float(point.flops),
                "P=1 maj@k": float(base_summary["maj@k"][str(p)]),
                "P=1 best-of-k": float(base_summary["pass@k"][str(p)]),
                "P=1 k samples FLOPs": float(p * base_flops),
            }
        )
    return rows
