"""Resume in-process: SIGTERM handling (the handler, the forced save at the step boundary, the
handler restored afterwards) and incomplete checkpoints (never used, never a crash).

The subprocess versions (kill -9 five times, SIGTERM, both ending bit-identical to an
uninterrupted run) are in test_resilience.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from typing import Any

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from train_helpers import checkpoint_steps, load_state_arrays

from configs.ctm_parity import get_config
from tasks.ctm_parity.task import ParityTask
from train_lib import checkpointing, metrics, trainer

TOTAL = 12
SIGTERM_AT_BATCH = 5  # 0-based: read while step 5 is being computed, so step 6 is saved


class SigtermAtBatchTask(ParityTask):
    """Parity whose training data sends this process SIGTERM when batch SIGTERM_AT_BATCH is
    read (the loop reads data in the main thread here: data_threads=0, data_prefetch=0)."""

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        ds = super().dataset(
            split, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count
        )
        if split != "train":
            return ds

        def maybe_preempt(index: int, batch: dict[str, Any]) -> dict[str, Any]:
            if index == SIGTERM_AT_BATCH:
                os.kill(os.getpid(), signal.SIGTERM)
            return batch

        return ds.map_with_index(maybe_preempt)


def _config(task_name: str = "tasks.ctm_parity.task:ParityTask"):
    config = get_config("test")
    config.task.name = task_name
    config.train.update(
        total_steps=TOTAL,
        checkpoint_every=4,
        log_every=1,
        eval_every=0,
        data_threads=0,
        data_prefetch=0,
    )
    return config


class _NoCheckpoints:
    def reached_preemption(self, step: int) -> bool:
        raise AssertionError("only used with jax.distributed")


def test_preemption_watch_sets_a_flag_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with checkpointing.PreemptionWatch(_NoCheckpoints()) as watch:
        assert not watch.uses_sync_manager
        assert signal.getsignal(signal.SIGTERM) not in (previous, signal.SIG_DFL)
        assert not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the process goes on
        assert watch.reached(2) and watch.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


def test_preemption_watch_outside_the_main_thread_installs_nothing():
    previous = signal.getsignal(signal.SIGTERM)
    seen = {}

    def run() -> None:
        with checkpointing.PreemptionWatch(_NoCheckpoints()) as watch:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["reached"] = watch.reached(1)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": previous, "reached": False}


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("preempted")
    handler = signal.getsignal(signal.SIGTERM)
    summary = trainer.train_and_evaluate(_config("test_resume:SigtermAtBatchTask"), workdir)
    return workdir, summary, handler, checkpoint_steps(workdir)


def test_sigterm_saves_the_next_step_boundary_and_returns(preempted_run, capsys):
    workdir, summary, handler, steps = preempted_run
    assert summary.preempted and summary.step == SIGTERM_AT_BATCH + 1
    assert not summary.already_finished
    assert steps == [4, 6]  # 6 is off the checkpoint_every=4 interval: forced
    saved = load_state_arrays(workdir, 6)
    assert int(saved["step"]) == 6
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the loop
    assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == list(range(1, 7))


def test_uncommitted_checkpoint_is_ignored_and_the_run_resumes_before_it(preempted_run, caplog):
    """Step 6's directory, complete but never renamed (what a kill between writing and Orbax's
    atomic rename leaves), is not used: the run resumes from step 4 and finishes."""
    workdir, *_ = preempted_run
    ckpt_dir = workdir / trainer.CHECKPOINT_DIR
    uncommitted = ckpt_dir / "6.orbax-checkpoint-tmp-1795987303381473601"
    (ckpt_dir / "6").rename(uncommitted)
    caplog.set_level(logging.INFO)  # the trainer's lines are absl INFO records
    summary = trainer.train_and_evaluate(_config(), workdir)
    out = caplog.text
    assert "restored checkpoint at step 4" in out
    assert summary.resumed_from == 4 and summary.step == TOTAL and not summary.preempted
    assert checkpoint_steps(workdir) == [4, 8, 12]
    assert not uncommitted.exists()  # removed by Orbax's cleanup of temporary directories
    assert [r["step"] for r in metrics.read_metrics(workdir, "train")] == list(range(1, TOTAL + 1))


def test_orbax_commit_semantics_we_rely_on(tmp_path):
    """Locally a checkpoint counts once renamed from its temporary name; on gs:// (no atomic
    rename) once `commit_success.txt`, written last, exists. Checked on Orbax's own predicates,
    with the class Orbax picks for a gs:// path."""
    atomicity = ocp.path.atomicity
    gcs_class = ocp.path.atomicity_defaults.get_default_temporary_path_class(
        epath.Path("gs://bucket/run/checkpoints")
    )
    assert gcs_class is atomicity.CommitFileTemporaryPath
    local_class = ocp.path.atomicity_defaults.get_default_temporary_path_class(epath.Path(tmp_path))
    assert local_class is atomicity.AtomicRenameTemporaryPath

    it = iter(grain.MapDataset.range(4).batch(2).to_iter_dataset())
    with checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2) as ckpt:
        ckpt.save(1, {"w": np.arange(3.0)}, it, {})
    final = tmp_path / "ckpt" / "1"
    finalized = ocp.path.step.is_path_finalized
    assert finalized(final, temporary_path_cls=atomicity.AtomicRenameTemporaryPath)
    assert finalized(final, temporary_path_cls=atomicity.CommitFileTemporaryPath)
    uncommitted = tmp_path / "copy" / "1"
    shutil.copytree(final, uncommitted)
    (uncommitted / "commit_success.txt").unlink()
    assert not finalized(uncommitted, temporary_path_cls=atomicity.CommitFileTemporaryPath)
    renamed = tmp_path / "copy" / "2.orbax-checkpoint-tmp-123"
    shutil.copytree(final, renamed)
    assert not finalized(renamed, temporary_path_cls=atomicity.AtomicRenameTemporaryPath)
