"""A training run survives what happens to long jobs, and ends exactly where it would have.

* kill -9 at five random steps (seeded), re-running the same command after each: the final
  train state (params, optimiser state incl. the clipper's history, dropout key) and the
  metrics file are bit-identical to an uninterrupted run's. Checkpoints every 4 steps, so kills
  land between checkpoints (the lost steps are redone from the restored data position) and
  sometimes during an asynchronous save (the half-written checkpoint is ignored).
* SIGTERM (preemption notice): the run saves the step it is at, says so, exits 0; the re-run
  resumes from that step and ends bit-identical too.
* A NaN in a batch stops the run naming the step and metric; the last good checkpoint stays the
  latest and restores.
* A command-line override reaches the optimiser; re-running a finished run only reports.

All runs are `python -m launch.train` subprocesses of the parity `test` preset sharing one
persistent compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from train_helpers import (
    REPO,
    NanParityTask,
    checkpoint_steps,
    launcher_command,
    launcher_env,
    load_state_arrays,
    run_launcher,
)

from configs.ctm_parity import get_config
from core.errors import NonFiniteError
from train_lib import metrics, trainer

TOTAL = 40
LR = 0.004
KILLS = 5
OVERRIDES = (
    f"--config.train.total_steps={TOTAL}",
    "--config.train.checkpoint_every=4",
    "--config.train.log_every=1",  # a progress line per step: where the run is
    "--config.train.eval_every=20",
    f"--config.optim.lr={LR}",
    "--config.model.dropout=0.1",  # so the per-step dropout keys matter on resume
)
STEP_LINE = re.compile(rf"step\s+(\d+)/{TOTAL} ")
RESTORED = re.compile(r"restored checkpoint at step (\d+)")
PREEMPTED = re.compile(r"preempted at step (\d+): saved checkpoint, exiting")


def _records_without_time(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in metrics.read_metrics(workdir)]


def _start(workdir: Path, log_path: Path, cache: Path) -> subprocess.Popen:
    with log_path.open("w") as log:
        return subprocess.Popen(
            launcher_command(workdir, *OVERRIDES),
            cwd=REPO,
            env=launcher_env(cache),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_for_step(proc: subprocess.Popen, log_path: Path, step: int, timeout: float = 240) -> int:
    """Waits until the run's progress output reaches `step`; returns the step it shows."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [int(s) for s in STEP_LINE.findall(log_path.read_text())]
        if seen and max(seen) >= step:
            return max(seen)
        assert proc.poll() is None, (
            f"exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.01)


def _assert_same_final_state(workdir: Path, reference: Path) -> None:
    want = load_state_arrays(reference, TOTAL)
    got = load_state_arrays(workdir, TOTAL)
    assert set(got) == set(want)
    assert any(k.startswith("opt_state/") for k in want)  # incl. the clipper's history
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert _records_without_time(workdir) == _records_without_time(reference)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resilience")


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """The uninterrupted run (it also fills the compilation cache for the others)."""
    result = run_launcher(root / "reference", *OVERRIDES, cache_dir=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "reference"


@pytest.fixture(scope="module")
def killed(root, reference) -> dict:
    workdir, cache = root / "killed", root / "cache"
    targets = sorted(random.Random(0).sample(range(2, TOTAL - 4), KILLS))
    attempts = []
    for i, target in enumerate(targets):
        log_path = root / f"killed_{i}.log"
        proc = _start(workdir, log_path, cache)
        try:
            seen = _wait_for_step(proc, log_path, target)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        output = log_path.read_text()
        restored = RESTORED.search(output)
        attempts.append(
            dict(
                target=target,
                seen=seen,
                returncode=proc.returncode,
                restored=int(restored.group(1)) if restored else None,
                at_kill=checkpoint_steps(workdir),
            )
        )
    final = run_launcher(workdir, *OVERRIDES, cache_dir=cache)
    return dict(workdir=workdir, attempts=attempts, final=final)


def test_killed_five_times_ends_bit_identical(killed, reference):
    attempts, final = killed["attempts"], killed["final"]
    assert [a["returncode"] for a in attempts] == [-signal.SIGKILL] * KILLS
    assert final.returncode == 0, final.stderr[-3000:]
    # Each re-run restored the last checkpoint that was complete when the previous one died
    # (none before the first run; a kill before the first checkpoint leaves none either).
    assert attempts[0]["restored"] is None
    # The trainer's lines are absl INFO records: on stderr.
    restored = [a["restored"] for a in attempts[1:]] + [int(RESTORED.search(final.stderr).group(1))]
    assert restored == [max(a["at_kill"], default=None) for a in attempts]
    # Some kills landed between checkpoints: steps after the last one were lost and redone.
    assert any(a["seen"] > max(a["at_kill"], default=0) for a in attempts), attempts
    assert not list((killed["workdir"] / "checkpoints").glob("*tmp*"))
    _assert_same_final_state(killed["workdir"], reference)


@pytest.fixture(scope="module")
def preempted(root, reference) -> dict:
    workdir, cache, log_path = root / "preempted", root / "cache", root / "preempted.log"
    proc = _start(workdir, log_path, cache)
    try:
        _wait_for_step(proc, log_path, 13)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    at_exit = checkpoint_steps(workdir)
    # What the workdir holds before the re-run (which goes on and prunes old checkpoints).
    found = PREEMPTED.search(output)
    saved = load_state_arrays(workdir, int(found.group(1))) if found else None
    logged = [r["step"] for r in metrics.read_metrics(workdir, "train")]
    resumed = run_launcher(workdir, *OVERRIDES, cache_dir=cache)
    return dict(
        workdir=workdir,
        returncode=proc.returncode,
        output=output,
        at_exit=at_exit,
        saved=saved,
        logged=logged,
        resumed=resumed,
    )


def test_sigterm_saves_the_current_step_and_exits_zero(preempted):
    assert preempted["returncode"] == 0, preempted["output"][-3000:]
    found = PREEMPTED.search(preempted["output"])
    assert found, preempted["output"][-3000:]
    step = int(found.group(1))
    assert 13 <= step < TOTAL
    assert "finished at step" not in preempted["output"]
    assert "Traceback" not in preempted["output"]
    # The step it stopped at was saved (whether or not it is a multiple of checkpoint_every),
    # completely, and is the latest checkpoint.
    assert max(preempted["at_exit"]) == step
    assert int(preempted["saved"]["step"]) == step
    assert preempted["logged"] == list(range(1, step + 1))


def test_rerun_after_sigterm_resumes_there_and_ends_bit_identical(preempted, reference):
    resumed = preempted["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(PREEMPTED.search(preempted["output"]).group(1))
    assert int(RESTORED.search(resumed.stderr).group(1)) == step  # absl logs to stderr
    _assert_same_final_state(preempted["workdir"], reference)


def test_rerunning_a_finished_run_only_reports(root, reference):
    again = run_launcher(reference, *OVERRIDES, cache_dir=root / "cache")
    assert again.returncode == 0
    assert f"already finished at step {TOTAL}" in again.stderr  # absl logs to stderr
    assert "compiling" not in again.stdout + again.stderr


def test_command_line_override_reaches_the_optimiser(reference):
    saved = json.loads((reference / trainer.CONFIG_FILE).read_text())
    assert saved["optim"]["lr"] == LR and saved["train"]["total_steps"] == TOTAL
    # The preset's lr is 3e-3; the logged lr (one step per record) follows a schedule peaking
    # at LR.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, LR, saved["optim"]["warmup_steps"], TOTAL, saved["optim"]["end_lr"]
    )
    records = metrics.read_metrics(reference, "train")
    assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
    for record in records:
        np.testing.assert_allclose(record["lr"], float(schedule(record["step"] - 1)), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# NaN in a batch


class NanAtStep18Task(NanParityTask):
    """Parity whose 18th training batch (0-based 17) makes the loss NaN."""

    NAN_AT_BATCH = 17


def test_nan_batch_stops_the_run_and_the_last_good_checkpoint_restores(tmp_path):
    """Checkpoints every step, saved asynchronously: the save of step 17 may still be in flight
    when step 18's NaN is seen; it lands, step 18 is never saved."""
    config = get_config("test")
    config.task.name = "test_resilience:NanAtStep18Task"
    config.train.update(
        total_steps=TOTAL, checkpoint_every=1, log_every=1, eval_every=0, async_checkpointing=True
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.train_and_evaluate(config, tmp_path)
    error = info.value
    assert error.step == 18 and error.metrics[0] == "loss"
    assert str(error).startswith("non-finite train metric at step 18: loss=nan")
    assert f"latest checkpoint: step 17 in {tmp_path / 'checkpoints'}" in str(error)
    assert checkpoint_steps(tmp_path) == [15, 16, 17]
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    assert [r["step"] for r in metrics.read_metrics(tmp_path, "train")] == list(range(1, 18))
    # The last good checkpoint restores, and holds finite values.
    _, state, step = trainer.restore_run(tmp_path)
    assert step == 17 and int(state.step) == 17
    leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
    assert all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")
