"""What every absl launcher does first (kept apart from launch/common.py, which imports models)."""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags, logging


def start(argv: Sequence[str]) -> None:
    """Refuses positional arguments and, unless --verbosity was given, logs warnings only:
    Orbax logs every save step by step at INFO, and the trainer prints its own progress lines."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
