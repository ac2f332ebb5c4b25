"""Multi-host data and paths, simulated in one process.

Each process reads only its shard: `task.dataset(split, batch_size=global / processes,
shard_index=k, shard_count=processes)`. The global batch a multi-host step trains on is the
concatenation of the processes' batches (`jax.make_array_from_process_local_data` over a
data-sharded mesh). With the repo's sharding (process k takes stream elements k, k + P, ...),
that concatenation holds exactly the rows of the single-process batch of the same step, in a
fixed interleaved order: process k's row j is single-process row j * P + k. So no example is
read twice or skipped, every step trains on the same examples whatever the process count, and
only the row order inside a batch (hence float summation order) differs.

Also: a gs:// workdir reaches Orbax and the metric files as a cloud path, not a mangled local one;
and two real processes (`launch.train --multihost` over localhost, one CPU device each) train,
stop together on a SIGTERM sent to one of them, and resume.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from train_helpers import REPO, checkpoint_steps, launcher_command, launcher_env

from configs import ctm_maze, ctm_parity
from core.errors import ConfigError
from train_lib import checkpointing, metrics, trainer
from train_lib.task import make_task

PROCESSES = 4
GLOBAL_BATCH = 8
STEPS = 3


def _configs() -> list[tuple[str, ml_collections.ConfigDict]]:
    out = [("ctm_parity", ctm_parity.get_config("test")), ("ctm_maze", ctm_maze.get_config("test"))]
    if importlib.util.find_spec("tasks.parscale_lm.task") is not None:
        from configs import parscale_lm

        out.append(("parscale_lm", parscale_lm.get_config("test")))
    return out


CONFIGS = _configs()


@pytest.mark.parametrize(("name", "config"), CONFIGS, ids=[name for name, _ in CONFIGS])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_process_shards_partition_the_global_batch(name, config, split):
    task = make_task(config)
    local = GLOBAL_BATCH // PROCESSES
    single = task.dataset(split, batch_size=GLOBAL_BATCH)
    shards = [
        task.dataset(split, batch_size=local, shard_index=k, shard_count=PROCESSES)
        for k in range(PROCESSES)
    ]
    # Row j*P + k of the global batch comes from process k, row j: a bijection between the
    # processes' rows and the single-process batch's rows.
    order = np.array([j * PROCESSES + k for k in range(PROCESSES) for j in range(local)])
    assert sorted(order) == list(range(GLOBAL_BATCH))
    for step in range(STEPS):
        want = dict(single[step])
        parts = [dict(shard[step]) for shard in shards]
        assert all(set(p) == set(want) for p in parts)
        for key, value in want.items():
            assert all(p[key].shape[0] == local for p in parts), key
            concatenated = np.concatenate([p[key] for p in parts])  # the multi-host global batch
            np.testing.assert_array_equal(concatenated, value[order], err_msg=f"{key} @ {step}")
            # ... and the single-process order is recovered exactly by inverting it.
            np.testing.assert_array_equal(concatenated[np.argsort(order)], value)


def test_experiment_reads_this_process_shard(monkeypatch):
    """The trainer asks the task for shard jax.process_index() of jax.process_count(), with the
    per-process batch (global / processes)."""
    config = ctm_parity.get_config("test")  # batch 16
    monkeypatch.setattr(jax, "process_count", lambda: PROCESSES)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    exp = trainer.build_experiment(config)
    assert exp.local_batch == 16 // PROCESSES
    calls = []
    original = type(exp.task).dataset

    def spy(self, split, **kwargs):
        calls.append((split, kwargs))
        return original(self, split, **kwargs)

    monkeypatch.setattr(type(exp.task), "dataset", spy)
    exp.dataset("train")
    assert calls == [
        ("train", dict(batch_size=4, shard_index=2, shard_count=PROCESSES)),
    ]


def test_batch_not_divisible_by_the_process_count_is_a_config_error(monkeypatch):
    config = ctm_parity.get_config("test")
    config.train.batch_size = 18
    monkeypatch.setattr(jax, "process_count", lambda: PROCESSES)
    with pytest.raises(ConfigError, match=r"^train\.batch_size=18 is invalid: .*process count 4"):
        trainer.validate_config(config)


# ------------------------------------------------------------------------------------------------
# Paths: gs:// must reach Orbax and the metric files as a cloud path


def test_gs_workdir_is_carried_through_unmangled(monkeypatch):
    monkeypatch.setattr(checkpointing, "_gcs_backend_available", lambda: True)
    workdir = checkpointing.as_path("gs://bucket/runs/parity")
    assert str(workdir) == "gs://bucket/runs/parity"
    assert str(workdir / trainer.CHECKPOINT_DIR) == "gs://bucket/runs/parity/checkpoints"

    seen = {}

    class FakeManager:  # what Orbax's CheckpointManager would be given (no network here)
        def __init__(self, directory, **kwargs):
            seen["directory"] = directory

    monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", FakeManager)
    ckpt = checkpointing.Checkpointer(
        workdir / trainer.CHECKPOINT_DIR, save_every=1, keep=1, async_save=False
    )
    assert str(seen["directory"]) == "gs://bucket/runs/parity/checkpoints"
    assert str(ckpt.directory) == "gs://bucket/runs/parity/checkpoints"


def test_gs_workdir_without_a_gcs_backend_fails_clearly(monkeypatch):
    monkeypatch.setattr(checkpointing, "_gcs_backend_available", lambda: False)
    with pytest.raises(ConfigError, match="gs://bucket/run.*gcsfs"):
        checkpointing.as_path("gs://bucket/run")


def test_local_paths_are_made_absolute_epaths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = checkpointing.as_path("runs/x")
    assert str(path) == str(tmp_path / "runs" / "x")
    path.mkdir(parents=True)
    assert (tmp_path / "runs" / "x").is_dir()


def test_metric_writer_on_an_object_store_rewrites_instead_of_appending(tmp_path, monkeypatch):
    """Object stores cannot append: the remote branch keeps the lines and rewrites the file
    (here on a local directory standing in for gs://, by declaring it remote)."""
    monkeypatch.setattr(metrics, "is_remote", lambda path: True)
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, upload_secs=1e9)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_scalars(2, {"loss": 0.5})
    assert not (tmp_path / metrics.METRICS_FILE).exists()  # not uploaded yet
    writer.flush()
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]
    writer.write_scalars(3, {"loss": 0.25})
    writer.close()
    # A resumed run truncates and keeps rewriting the same file.
    writer = metrics.MetricWriter(tmp_path, resume_step=2, tensorboard=False, upload_secs=0)
    writer.write_scalars(3, {"loss": 0.3})
    assert [r["loss"] for r in metrics.read_metrics(tmp_path)] == [1.0, 0.5, 0.3]
    writer.close()


def test_metric_writer_of_other_processes_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "w", enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------
# Two real processes on this machine (jax.distributed over localhost, one CPU device each)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_processes(workdir: Path, root: Path, name: str, cache: Path) -> list:
    port = _free_port()
    procs = []
    for index in range(2):
        command = launcher_command(
            workdir,
            *TWO_PROCESS_OVERRIDES,
            "--multihost",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={index}",
            # The trainer logs its lines at INFO on process 0 only, at DEBUG on the others:
            # -v 1 shows process 1's too, so both processes' views can be checked.
            *(["--verbosity=1"] if index else []),
        )
        with (root / f"{name}_{index}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=launcher_env(cache),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _wait_all(procs: list, timeout: float = 300) -> list[int]:
    try:
        return [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# Enough steps after the SIGTERM (sent at step 8) for the preemption notice to reach both
# processes: at ~30 steps/s a 30-step run sometimes finished before it did.
TWO_PROCESS_TOTAL = 400
TWO_PROCESS_OVERRIDES = (
    f"--config.train.total_steps={TWO_PROCESS_TOTAL}",
    "--config.train.checkpoint_every=1000",  # only the preemption and the final step save
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
)


def test_two_processes_split_the_data_stop_together_on_sigterm_and_resume(tmp_path):
    """SIGTERM reaches only process 1 (as a preemption notice may reach one host first): JAX's
    preemption sync manager makes both processes save the same step and exit 0; re-running both
    resumes there. Only process 0 writes metrics."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    procs = _start_processes(workdir, tmp_path, "first", cache)
    log0 = tmp_path / "first_0.log"
    try:
        deadline = time.monotonic() + 300
        while not re.search(rf"step\s+8/{TWO_PROCESS_TOTAL} ", log0.read_text()):
            assert all(p.poll() is None for p in procs), log0.read_text()[-3000:]
            assert time.monotonic() < deadline, "step 8 not reached"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        codes = _wait_all(procs)
    outputs = [(tmp_path / f"first_{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    for index, output in enumerate(outputs):
        assert f"process {index} of 2: 1 local of 2 devices" in output
    found = [re.search(r"preempted at step (\d+): saved", o) for o in outputs]
    assert all(found), "\n---\n".join(o[-3000:] for o in outputs)  # which log lacks it
    steps = [int(m.group(1)) for m in found]
    assert steps[0] == steps[1] and 8 <= steps[0] < TWO_PROCESS_TOTAL, steps
    stopped = steps[0]
    assert checkpoint_steps(workdir) == [stopped]
    train = metrics.read_metrics(workdir, "train")
    assert [r["step"] for r in train] == list(range(1, stopped + 1))  # process 0 only

    procs = _start_processes(workdir, tmp_path, "second", cache)
    codes = _wait_all(procs)
    outputs = [(tmp_path / f"second_{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    for output in outputs:
        assert f"restored checkpoint at step {stopped}" in output
        assert f"finished at step {TWO_PROCESS_TOTAL}" in output
    assert checkpoint_steps(workdir) == [stopped, TWO_PROCESS_TOTAL]
    train = metrics.read_metrics(workdir, "train")
    assert [r["step"] for r in train] == list(range(1, TWO_PROCESS_TOTAL + 1))
    assert all(np.isfinite(r["loss"]) for r in train)
