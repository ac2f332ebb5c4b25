"""Verifier-driven inference-time scaling of a trained model on generated, checkable instances.

    python -m launch.scale_inference --config=configs/inference_scaling.py:maze
    python -m launch.scale_inference --config=configs/inference_scaling.py:test --config.out=DIR

For every compute setting of the model (CTM ticks T and certainty exit; ParScale streams P) it
draws N samples per instance (parallel scaling), aggregates them (average, majority vote,
best-of-N and worst-of-N with the perfect verifier, best-of-N selected by the model's own
confidence), and runs R sequential rounds with the configured feedback level. Output in
--config.out: samples.jsonl (one row per sample and round, appended per batch; a rerun with the
same seed keeps the rows already there and draws only the missing ones), summary.json and the
figures (bounds.png, calls.png, levels.png, cost_std.png).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from core.errors import ConfigError
from inference_scaling import aggregators, engine, ledger, report
from inference_scaling.sequential import check_feedback, run_sequential_batched
from inference_scaling.tasks import make_task
from inference_scaling.tasks.base import Instance, VerifiableTask
from launch import cli, inference_models


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as a program: absl flags are
    process-global, and other launchers that tests import in the same process define --config."""
    config_flags.DEFINE_config_file(
        "config", None, "configs/inference_scaling.py:PRESET", lock_config=True
    )
    flags.mark_flags_as_required(["config"])


def parse_list(value: str, field: str, cast: type = int) -> list[Any]:
    """'1,2,4' -> [1, 2, 4]; ConfigError naming `field` otherwise."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ConfigError(
            f"{field}={value!r} is invalid: expected comma-separated {cast.__name__}s"
        ) from None


def make_instances(task: VerifiableTask, config: ml_collections.ConfigDict) -> list[Instance]:
    """instances_per_level instances of every level, with ids unique across levels."""
    levels = parse_list(config.levels, "levels", str) or list(task.levels)
    unknown = [lv for lv in levels if lv not in task.levels]
    if unknown:
        shown = ", ".join(task.levels[:8]) + (" ..." if len(task.levels) > 8 else "")
        raise ConfigError(f"levels={unknown[0]!r} is invalid: task {task.name!r} has {shown}")
    if int(config.instances_per_level) < 1:
        raise ConfigError(
            f"instances_per_level={config.instances_per_level} is invalid: must be >= 1"
        )
    per = int(config.instances_per_level)
    root = jax.random.fold_in(engine.root_key(config.seed), 0x1257)
    out = []
    for li, level in enumerate(levels):
        for inst in task.generate(root, level, per):
            out.append(dataclasses.replace(inst, instance_id=li * per + inst.instance_id))
    return out


def level_summaries(
    table: engine.SampleTable, ks: Sequence[int] | None, seed: int
) -> dict[str, dict[str, Any]]:
    """summarize() per level, plus the level's cost statistics."""
    out = {}
    levels = [inst.level for inst in table.instances]
    for level in dict.fromkeys(levels):
        rows = np.array([lv == level for lv in levels])
        ids = [inst.instance_id for inst, keep in zip(table.instances, rows, strict=True) if keep]
        summary = aggregators.summarize(
            table.correct[rows], table.answers[rows], table.scores[rows], ks, seed, instance_ids=ids
        )
        summary["cost"] = cost_stats(table.cost[rows], table.flops[rows], table.correct[rows])
        out[level] = summary
    return out


def cost_stats(cost: np.ndarray, flops: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Mean cost per sample, the paper's cost nondeterminism (also split into always-correct /
    always-wrong / mixed instances), and each aggregator's total."""
    mean, std = ledger.per_instance_cost(cost)
    by_outcome = {
        name: float(std[mask].mean()) if mask.any() else None
        for name, mask in ledger.split_by_outcome(correct).items()
    }
    totals = {
        name: float(ledger.aggregator_cost(flops, name).mean())
        for name in ledger.PARALLEL_AGGREGATORS
    }
    return {
        "mean": float(cost.mean()),
        "std_within": float(std.mean()),
        "std_by_outcome": by_outcome,
        "instance_mean": [float(x) for x in mean],
        "flops_per_sample": float(flops.mean()),
        "flops_total_per_instance": totals,
    }


def run_setting(
    task: VerifiableTask,
    sampler: engine.Sampler,
    instances: list[Instance],
    config: ml_collections.ConfigDict,
    writer: report.SampleWriter,
    existing: Mapping[tuple, Mapping[str, Any]],
) -> dict[str, Any]:
    """Parallel samples + aggregators, then the sequential loop, for one compute setting."""
    root = engine.root_key(config.seed)
    n = int(config.n)
    ks = parse_list(config.ks, "ks") or None
    done = {
        (key[2], key[3]): row
        for key, row in existing.items()
        if key[0] == "parallel" and key[1] == sampler.label
    }
    t0 = time.perf_counter()
    table = engine.run_parallel(
        task,
        sampler,
        instances,
        n,
        root,
        batch_size=int(config.batch_size),
        done=done,
        on_batch=lambda rows: writer.append({**r, "mode": "parallel"} for r in rows),
    )
    ids = [inst.instance_id for inst in instances]
    summary = aggregators.summarize(
        table.correct, table.answers, table.scores, ks, int(config.seed), instance_ids=ids
    )
    summary["cost"] = cost_stats(table.cost, table.flops, table.correct)
    summary["levels"] = level_summaries(table, ks, int(config.seed))
    summary["diversity"] = sampler.diversity
    summary["seconds"] = time.perf_counter() - t0
    rounds = int(config.sequential.rounds)
    if rounds > 0:
        summary["sequential"] = run_sequential_setting(
            task, sampler, instances, config, writer, existing
        )
    return {"summary": summary, "table": table}


def run_sequential_setting(
    task: VerifiableTask,
    sampler: engine.Sampler,
    instances: list[Instance],
    config: ml_collections.ConfigDict,
    writer: report.SampleWriter,
    existing: Mapping[tuple, Mapping[str, Any]],
) -> dict[str, Any]:
    """R rounds with feedback; keys from the sequential root, so the run is reproducible and
    rows already in samples.jsonl are not written twice."""
    root = jax.random.fold_in(engine.root_key(config.seed), engine.SEQUENTIAL_STREAM)
    feedback = str(config.sequential.feedback)
    spent: dict[int, list[float]] = {}
    by_id = {inst.instance_id: inst for inst in instances}

    def attempt_batch(batch: list[Instance], r: int, contexts: list[dict[str, Any]]) -> list[Any]:
        answers = []
        for start in range(0, len(batch), int(config.batch_size)):
            part = batch[start : start + int(config.batch_size)]
            keys = engine.sample_keys(root, [(inst.instance_id, r) for inst in part])
            size = min(int(config.batch_size), len(instances))
            part_contexts = contexts[start : start + len(part)]
            samples = engine.sample_padded(sampler, part, keys, part_contexts, size)
            rows = []
            for inst, sample in zip(part, samples, strict=True):
                verdict = task.verify(inst, sample.answer)
                canonical = task.canonicalize(sample.answer, inst)
                record = engine.row(task, sampler, inst, 0, r, sample, verdict, canonical)
                record["mode"] = "sequential"
                record["feedback"] = feedback
                spent.setdefault(inst.instance_id, []).append(sample.cost.flops)
                if report.row_key(record) not in existing:
                    rows.append(record)
                answers.append(sample.answer)
            writer.append(rows)
        return answers

    result = run_sequential_batched(
        attempt_batch,
        task.verify,
        instances,
        int(config.sequential.rounds),
        feedback,
        canonicalize=lambda a: task.canonicalize(a),
    )
    summary = result.summary()
    # Mean FLOPs actually spent by round r (solved instances stop spending).
    flops_by_round = {}
    for r in range(1, result.rounds + 1):
        flops_by_round[str(r)] = float(np.mean([sum(spent.get(i, [])[:r]) for i in by_id]))
    summary["flops_by_round"] = flops_by_round
    return summary


def write_figures(
    out: Path,
    summaries: Mapping[str, Mapping[str, Any]],
    tables: Mapping[str, Any],
    unit: str,
    title: str,
) -> list[Path]:
    paths = [report.bounds_bars(summaries, out / "bounds.png", f"{title}: bounds at N")]
    sequential = {
        name: s["sequential"]["solved_by_calls"]
        for name, s in summaries.items()
        if "sequential" in s
    }
    paths.append(
        report.curves_vs_calls(
            summaries, sequential, out / "calls.png", f"{title}: accuracy vs calls"
        )
    )
    paths.append(
        report.per_level(
            {n: s["levels"] for n, s in summaries.items()},
            out / "levels.png",
            f"{title}: per level",
            unit,
        )
    )
    std = {name: ledger.per_instance_cost(t.cost)[1] for name, t in tables.items()}
    outcome = {name: ledger.split_by_outcome(t.correct) for name, t in tables.items()}
    paths.append(report.cost_std_histograms(std, outcome, out / "cost_std.png", unit))
    return paths


def scale_inference(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs every compute setting the config names; returns (and writes) the summary."""
    if int(config.n) < 1:
        raise ConfigError(f"n={config.n} is invalid: the number of samples N must be >= 1")
    for k in parse_list(config.ks, "ks"):
        if not 1 <= k <= int(config.n):
            raise ConfigError(f"ks={config.ks!r} is invalid: k={k} must lie in 1..n={config.n}")
    check_feedback(str(config.sequential.feedback))
    if int(config.sequential.rounds) < 0:
        raise ConfigError(f"sequential.rounds={config.sequential.rounds} is invalid: must be >= 0")
    task = make_task(str(config.task), **dict(config.task_options))
    instances = make_instances(task, config)
    samplers = inference_models.build(config, task)
    out = Path(config.out)
    writer = report.SampleWriter(out)
    existing = writer.existing()
    summaries, tables = {}, {}
    for sampler in samplers:
        logging.info(
            "%s: %d instances x N=%d (%s)",
            sampler.label,
            len(instances),
            config.n,
            sampler.diversity,
        )
        result = run_setting(task, sampler, instances, config, writer, existing)
        summaries[sampler.label] = result["summary"]
        tables[sampler.label] = result["table"]
    unit = "ticks" if str(config.model.kind).startswith("ctm") else "tokens"
    summary = {
        "task": task.name,
        "levels": sorted(
            {inst.level for inst in instances}, key=[i.level for i in instances].index
        ),
        "instances": len(instances),
        "n": int(config.n),
        "seed": int(config.seed),
        "unit": unit,
        "configs": summaries,
    }
    labels = list(summaries)
    if len(labels) > 1:
        weak, strong = labels[0], labels[-1]
        summary["gap_c2r"] = {
            "weak": weak,
            "strong": strong,
            "value": aggregators.conventional_to_reasoning_gap(
                summaries[weak]["acc_bon"], summaries[strong]["acc_avg"]
            ),
        }
    report.write_json(out / report.SUMMARY_FILE, summary)
    figures = write_figures(out, summaries, tables, unit, task.name)
    summary["figures"] = [str(p) for p in figures]
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    rows = []
    for name, s in summary["configs"].items():
        row = {
            "config": name,
            "worst": s["acc_won"],
            "avg": s["acc_avg"],
            "majority": s["acc_mv"],
            "best": s["acc_bon"],
            "selected": s.get("acc_sel"),
            summary["unit"]: s["cost"]["mean"],
            "GFLOPs/sample": s["cost"]["flops_per_sample"] / 1e9,
        }
        if "sequential" in s:
            last = s["sequential"]["seq_solved@r"]
            row[f"seq@{max(map(int, last))}"] = last[str(max(map(int, last)))]
        rows.append(row)
    return cli.format_table(rows)


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    config = flags.FLAGS.config
    with cli.one_line_errors():
        summary = scale_inference(config)
    print(f"{summary['task']}: {summary['instances']} instances, N={summary['n']}")
    print(format_summary(summary))
    print(f"wrote {Path(config.out) / report.SUMMARY_FILE}, samples.jsonl and figures")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
