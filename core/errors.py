"""The errors this library raises on purpose: one class per kind of failure.

Every package imports this leaf module (it imports nothing of ours). Each message is one line that
names the field, file or step at fault, so the launchers print `error: <message>` and exit non-zero
without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class Error(Exception):
    """Base of every expected failure; launchers catch this, never a bare ValueError."""


class ConfigError(Error, ValueError):
    """A configuration value that cannot work: `<field>=<value> is invalid: <what is allowed>`."""


class CheckpointMismatchError(Error, ValueError):
    """A checkpoint or state dict whose names or shapes do not fit the model the config builds."""


class DataError(Error, ValueError):
    """A file whose content cannot be used (bad format, unsafe pickle, truncated): names it."""


class NonFiniteError(Error, RuntimeError):
    """Training produced a non-finite metric; the run stopped without saving that state."""

    def __init__(self, message: str, *, step: int, metrics: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.metrics = metrics


class DamagedCheckpointError(Error, RuntimeError):
    """A checkpoint whose files differ from what was saved (garbled, truncated, missing, invalid
    JSON): names the step and the file. Never raised for a checkpoint of another model."""

    def __init__(self, message: str, *, step: int | None = None, file: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.file = file


class WorkdirInUseError(Error, RuntimeError):
    """Another live process is writing the workdir (its lock file names the host and pid)."""
