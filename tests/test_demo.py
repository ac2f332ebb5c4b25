"""`make demo` end to end on the seconds-long maze preset: files written, printed = logged."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from configs.ctm_maze import get_config
from train_lib.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_cpu_preset_is_the_demo_config() -> None:
    config = get_config("cpu")
    assert config.task.size == "tiny"  # 11x11 mazes: what the demo's summary line says
    assert config.train.eval_batches * config.train.batch_size >= 1024


def test_demo_writes_everything_and_prints_the_logged_eval(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.demo", "--config=configs/ctm_maze.py:test"]
        + [f"--workdir={workdir}", "--config.train.total_steps=6"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("route.png", "attention.gif", "certainty.png", "metrics.jsonl", "config.json"):
        assert (workdir / name).stat().st_size > 0, name
    assert any((workdir / "checkpoints").iterdir())
    assert any((workdir / "tensorboard").iterdir())

    final = read_metrics(workdir, split="eval")[-1]
    assert final["step"] == 6
    line = next(x for x in proc.stdout.splitlines() if x.startswith("held-out eval"))
    printed = dict(re.findall(r"(step accuracy|solve rate) ([0-9.]+)", line))
    assert float(printed["step accuracy"]) == round(final["step_accuracy"], 4)
    assert float(printed["solve rate"]) == round(final["solve_rate"], 4)
    assert "at step 6 " in line and "11x11" in line  # :test shrinks the :cpu model, same maze size
    assert "demo wall-clock time" in proc.stdout
