"""The inference-scaling runner and frontier: files, resume, one-line errors (tiny random CTM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from configs import inference_scaling as presets
from core.errors import ConfigError
from inference_scaling import engine, frontier
from inference_scaling.ledger import SampleCost
from inference_scaling.tasks import make_task
from launch import scale_inference
from launch.frontier import knobs_of, run_frontier

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = {
    "instance_id",
    "data_point_id",
    "repeat_id",
    "data_repeat_id",
    "round",
    "level",
    "config",
    "answer",
    "parsed",
    "valid",
    "correct",
    "ticks",
    "flops",
    "diversity",
}


@pytest.fixture(scope="module")
def test_run(tmp_path_factory) -> Path:
    """`python -m launch.scale_inference` on the :test preset, once for this module."""
    out = tmp_path_factory.mktemp("scale_inference")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.scale_inference",
            "--config=configs/inference_scaling.py:test",
            f"--config.out={out}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and "best" in result.stdout
    return out


def test_the_test_preset_writes_rows_summary_and_figures(test_run: Path) -> None:
    rows = [json.loads(line) for line in (test_run / "samples.jsonl").read_text().splitlines()]
    config = presets.get_config("test")
    instances = 2 * config.instances_per_level
    parallel = [r for r in rows if r["mode"] == "parallel"]
    assert len(parallel) == 2 * instances * config.n  # two compute settings
    assert all(set(r) >= ROW_FIELDS for r in rows)
    assert not any(key.startswith("_") for r in rows for key in r)
    assert {r["round"] for r in rows if r["mode"] == "sequential"} <= {1, 2, 3}
    summary = json.loads((test_run / "summary.json").read_text())
    assert set(summary["configs"]) == {"T=2,P=1", "T=2,P=1,exit=0.5"}
    for s in summary["configs"].values():
        assert s["acc_won"] <= s["acc_avg"] <= s["acc_bon"]
        assert set(s["pass@k"]) == {"1", "2", "4"} and set(s["maj@k"]) == {"1", "2", "4"}
        assert s["pass@k"]["4"] == pytest.approx(s["acc_bon"])
        assert s["worst@k"]["4"] == pytest.approx(s["acc_won"])
        assert set(s["levels"]) == {"side11-len1-10", "side11-len11-20"}
        assert s["cost"]["flops_per_sample"] > 0
        assert set(s["sequential"]["seq_solved@r"]) == {"1", "2", "3"}
    for name in ("bounds.png", "calls.png", "levels.png", "cost_std.png"):
        assert (test_run / name).stat().st_size > 1000, name


def test_a_rerun_resumes_and_the_frontier_reads_the_same_rows(test_run: Path) -> None:
    before = (test_run / "samples.jsonl").read_text().splitlines()
    config = presets.get_config("test")
    config.out = str(test_run)
    result = run_frontier(config, test_run)
    after = (test_run / "samples.jsonl").read_text().splitlines()
    assert after == before  # nothing redrawn, nothing duplicated
    records = json.loads((test_run / "frontier.json").read_text())["points"]
    assert len(records) == len(result["points"]) > 10
    assert any(r["on_front"] for r in records) and any(r["on_deployable_front"] for r in records)
    assert (test_run / "frontier.png").stat().st_size > 1000


class _CountingSampler(engine.Sampler):
    """Answer = a function of the key only; counts the samples it drew."""

    label, diversity = "stub", "key"

    def __init__(self) -> None:
        self.drawn = 0

    def sample(self, instances, keys, contexts=None):
        self.drawn += len(instances)
        bits = np.asarray(jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(keys)).astype(int)
        return [
            engine.Sample(inst.solution if b else "0", float(b), SampleCost(2.0, "tokens", 1, 10.0))
            for inst, b in zip(instances, bits, strict=True)
        ]


def test_interrupted_run_resumes_with_identical_rows() -> None:
    task = make_task("arithmetic")
    instances = task.generate(0, "add:2", 5)
    root = engine.root_key(0)
    full = engine.run_parallel(task, _CountingSampler(), instances, 4, root, batch_size=3)

    written: list[dict] = []

    def crash_after_first(rows):
        written.extend(rows)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run_parallel(
            task, _CountingSampler(), instances, 4, root, batch_size=3, on_batch=crash_after_first
        )
    done = {(r["instance_id"], r["repeat_id"]): r for r in written}
    sampler = _CountingSampler()
    resumed = engine.run_parallel(task, sampler, instances, 4, root, batch_size=3, done=done)
    # 17 missing samples in batches of 3 (the last padded to the batch shape): 6 calls.
    assert len(written) == 3 and sampler.drawn == 3 * 6
    assert resumed.rows == full.rows
    np.testing.assert_array_equal(resumed.correct, full.correct)


def test_sample_keys_depend_on_instance_and_repeat_only() -> None:
    root = engine.root_key(3)
    keys = engine.sample_keys(root, [(5, 1), (2, 0), (5, 1)])
    data = np.asarray(jax.random.key_data(keys))
    assert np.array_equal(data[0], data[2]) and not np.array_equal(data[0], data[1])
    single = jax.random.key_data(engine.sample_key(root, 2, 0))
    assert np.array_equal(data[1], np.asarray(single))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("task", "chess", "task='chess' is invalid"),
        ("n", 0, "n=0 is invalid"),
        ("sequential.feedback", "F9", "feedback"),
        ("ks", "1,16", "k=16 must lie in 1..n=8"),
        ("levels", "side99-len1-2", "levels='side99-len1-2' is invalid"),
        ("model.kind", "gpt", "model.kind='gpt' is invalid"),
        ("model.workdir", "/nonexistent/run", "model.workdir='/nonexistent/run' is invalid"),
        ("task", "arithmetic", "model.kind='ctm_maze' is invalid for task='arithmetic'"),
    ],
)
def test_bad_settings_fail_in_one_line(field: str, value, message: str, tmp_path: Path) -> None:
    config = presets.get_config("maze")
    config.out = str(tmp_path)
    config.instances_per_level = 1
    if field == "task":
        config.levels = ""
        config.task_options = ml_collections.ConfigDict()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        scale_inference.scale_inference(config)
    assert "\n" not in str(e.value)


def test_pareto_front_and_knobs() -> None:
    points = [
        frontier.Point({"aggregator": "average"}, 0.5, 1.0),
        frontier.Point({"aggregator": "majority"}, 0.6, 2.0),
        frontier.Point({"aggregator": "majority"}, 0.55, 3.0),  # dominated by the one before
        frontier.Point({"aggregator": "best_of_k"}, 0.9, 2.0),  # dominates it too
    ]
    assert frontier.pareto_front(points) == [True, False, False, True]
    records = frontier.frontier_records(points)
    assert [r["on_deployable_front"] for r in records] == [True, True, False, False]
    assert knobs_of("T=16,P=2,exit=0.9") == {"T": 16, "P": 2, "exit": 0.9}
