"""Train a model: `python -m launch.train --config=configs/ctm_parity.py:tiny --workdir=runs/x`.

Any config field can be overridden, e.g. `--config.optim.lr=3e-4 --config.train.total_steps=500`.
Re-running the same command resumes from the latest checkpoint in the workdir. A bad config value
or a non-finite metric ends the run with a one-line `error: ...` and a non-zero exit status.
SIGTERM (preemption) and a first Ctrl-C save a checkpoint at the next step boundary and exit with
status 0; a second Ctrl-C (or one before training starts) stops at once, naming the checkpoint a
re-run resumes from (status 130). A second trainer on a live run's workdir refuses (LOCK file).

Multi-host (TPU pod slices, Slurm): run the same command on every host with `--multihost` and a
shared `--workdir` (e.g. gs://bucket/run); `jax.distributed.initialize()` finds the coordinator
itself there, or takes --coordinator_address / --num_processes / --process_id (any cluster,
also several CPU processes on one machine).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli
from train_lib.trainer import resume_point, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a preset: path/to/config.py:preset.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, Slurm)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--multihost: host:port of process 0 (default: auto-detect)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "--multihost: number of processes (default: auto-detect)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "--multihost: this process's index (default: auto-detect)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    if _MULTIHOST.value:
        # Before any other JAX call: afterwards the backend is fixed to the local devices.
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        # Every process logs this one (the trainer's own lines are process 0's).
        logging.info(
            "process %d of %d: %d local of %d devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    elif any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need --multihost")
    # Expected failures (core.errors.Error): one line, no traceback, non-zero exit. Returns
    # normally after a SIGTERM too (checkpoint saved): exit status 0.
    with cli.one_line_errors():
        try:
            train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        except KeyboardInterrupt:
            # Ctrl-C before the trainer watches for it (building the experiment) or a second one.
            if cli.verbose():
                raise
            print(f"error: interrupted; {resume_point(_WORKDIR.value)}", file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    cli.run(main)
