"""Train a model: `python -m launch.train --config=configs/ctm_parity.py:tiny --workdir=runs/x`.

Any config field can be overridden, e.g. `--config.optim.lr=3e-4 --config.train.total_steps=500`.
Re-running the same command resumes from the latest checkpoint in the workdir. A bad config value
or a non-finite metric ends the run with a one-line `error: ...` and a non-zero exit status.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from train_lib.errors import ConfigError, NonFiniteError
from train_lib.trainer import train_and_evaluate

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every save step by step at INFO; progress lines come from the trainer.
        logging.set_verbosity(logging.WARNING)
    if _MULTIHOST.value:
        jax.distributed.initialize()
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, NonFiniteError) as e:
        # Expected failures: one line, no traceback, non-zero exit.
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
