"""Kill -9 mid-training, re-run the same command: the result is bit-identical to a run that was
never interrupted. Also checks that a command-line override reaches the optimiser."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import numpy as np
import optax
import pytest
from train_helpers import (
    REPO,
    checkpoint_steps,
    launcher_command,
    launcher_env,
    load_state_arrays,
    run_launcher,
)

from train_lib import metrics

TOTAL = 400
LR = 0.004
OVERRIDES = (
    f"--config.train.total_steps={TOTAL}",
    "--config.train.checkpoint_every=50",
    "--config.train.log_every=50",
    "--config.train.eval_every=200",
    f"--config.optim.lr={LR}",
    "--config.model.dropout=0.1",  # so the per-step dropout keys matter on resume
)


def _records_without_time(workdir):
    return [{k: v for k, v in r.items() if k != "time"} for r in metrics.read_metrics(workdir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = root / "jax_cache"  # same command, same program: later runs skip compilation

    reference = run_launcher(root / "reference", *OVERRIDES, cache_dir=cache)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = root / "killed"
    log_path = root / "killed.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            launcher_command(killed_dir, *OVERRIDES),
            cwd=REPO,
            env=launcher_env(cache),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while not checkpoint_steps(killed_dir):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = checkpoint_steps(killed_dir)

    resumed = run_launcher(killed_dir, *OVERRIDES, cache_dir=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = run_launcher(killed_dir, *OVERRIDES, cache_dir=cache)
    return dict(
        root=root,
        reference=reference,
        resumed=resumed,
        again=again,
        at_kill=at_kill,
        killed_dir=killed_dir,
    )


def test_killed_run_resumes_from_its_last_checkpoint(runs):
    assert runs["at_kill"] and max(runs["at_kill"]) < TOTAL
    found = re.search(r"restored checkpoint at step (\d+)", runs["resumed"].stdout)
    assert found, runs["resumed"].stdout[-2000:]
    restored = int(found.group(1))
    assert 0 < restored < TOTAL and restored >= max(runs["at_kill"])


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs):
    reference = load_state_arrays(runs["root"] / "reference", TOTAL)
    resumed = load_state_arrays(runs["killed_dir"], TOTAL)
    assert set(reference) == set(resumed)
    assert any(k.startswith("params/") for k in reference)
    assert any(k.startswith("opt_state/") for k in reference)  # incl. the clipper's history
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    # The metrics files tell the same story too: records after the restored step were
    # dropped and re-logged, so the resumed run's file equals the uninterrupted run's.
    assert _records_without_time(runs["killed_dir"]) == _records_without_time(
        runs["root"] / "reference"
    )


def test_rerunning_a_finished_run_only_reports(runs):
    again = runs["again"]
    assert again.returncode == 0
    assert f"already finished at step {TOTAL}" in again.stdout
    assert "compiling" not in again.stdout


def test_command_line_override_reaches_the_optimiser(runs):
    workdir = runs["root"] / "reference"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["optim"]["lr"] == LR and saved["train"]["total_steps"] == TOTAL
    # The preset's lr is 3e-3; the logged lr must follow a schedule that peaks at LR.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, LR, saved["optim"]["warmup_steps"], TOTAL, saved["optim"]["end_lr"]
    )
    for record in metrics.read_metrics(workdir, "train"):
        want = np.mean([float(schedule(s)) for s in range(record["step"] - 50, record["step"])])
        np.testing.assert_allclose(record["lr"], want, rtol=1e-5)
