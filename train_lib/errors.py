"""Errors the training stack raises on purpose; the launcher turns them into one-line exits."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work. The message is one line naming the field."""


class CheckpointMismatchError(ConfigError):
    """The checkpoint in the workdir was written for a model with different shapes."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite metric; the run stopped without saving that state."""

    def __init__(self, message: str, *, step: int, metrics: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.metrics = metrics
