"""Metric writers (JSON lines + TensorBoard), interval averaging and the progress line.

`metrics.jsonl` holds one JSON object per logged step and split:
`{"step": 500, "split": "train", "time": 1764441600.0, "loss": 0.41, ...}` -- the scalar names
sit next to the three reserved keys, so `pandas.read_json(path, lines=True)` gives a table.
TensorBoard event files (tensorboardX, no TensorFlow) live in `<workdir>/tensorboard`, tagged
`<split>/<name>`. Paths are `etils.epath` paths, so a `gs://` workdir works: object stores cannot
append, so there metrics.jsonl is rewritten whole at most every `upload_secs` and on close.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter

from core.errors import DataError
from train_lib.mfu import mfu

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "split", "time")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a cloud URI (gs://, s3://, ...) rather than a local file."""
    return "://" in os.fspath(path)


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (or of `<workdir>/metrics.jsonl`), optionally one split."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    records = [record for _, record in _records(path)]
    return [r for r in records if split is None or r["split"] == split]


def _records(path: epath.Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a metrics file. A last line that does not parse is a
    write cut short by a kill: dropped. Any other bad line is a DataError naming the line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            assert isinstance(record, dict) and "step" in record
        except (json.JSONDecodeError, AssertionError):
            if number == len(lines):
                logging.warning("%s: dropping a cut-short last line (%d chars)", path, len(line))
                break
            raise DataError(
                f"{path}: line {number} is not a metrics record: {line[:80]!r}"
            ) from None
        out.append((line, record))
    return out


def _truncate_after(path: epath.Path, step: int) -> None:
    """Drops records logged after `step`: a resumed run re-logs those steps itself."""
    if not path.exists():
        return
    kept = [line for line, record in _records(path) if record["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricWriter:
    """clu-style `write_scalars(step, {name: value})` to metrics.jsonl and TensorBoard.

    With `resume_step`, records after that step (written by a run that was killed before its
    next checkpoint) are removed, so the files describe the run that is actually resumed.
    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        enabled: bool = True,
        upload_secs: float = 30.0,
    ) -> None:
        self.workdir = epath.Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._file = None
        self._closed = False
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        if resume_step is not None:
            _truncate_after(self.path, resume_step)
        self._lines: list[str] | None = None  # remote: the whole file, rewritten on upload
        if is_remote(self.path):
            self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []
            self._upload_secs = upload_secs
            self._uploaded_at = time.monotonic()
        else:
            # Line-buffered: readable while running. Closed by close().
            self._file = open(os.fspath(self.path), "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(
                logdir=str(self.workdir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30
            )

    def write_scalars(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        values = {name: _to_float(value) for name, value in scalars.items()}
        clash = set(values) & set(RESERVED_KEYS)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved in {METRICS_FILE}")
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        # allow_nan: a non-finite value is recorded as NaN/Infinity, which is what happened.
        line = json.dumps(record) + "\n"
        if self._lines is not None:
            self._lines.append(line)
            if time.monotonic() - self._uploaded_at >= self._upload_secs:
                self._upload()
        else:
            self._file.write(line)
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{split}/{name}", value, int(step))

    def _upload(self) -> None:
        self.path.write_text("".join(self._lines))
        self._uploaded_at = time.monotonic()

    def flush(self) -> None:
        if not self.enabled or self._closed:
            return
        if self._lines is not None:
            self._upload()
        else:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._lines is not None:
            self._upload()
        else:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


class MeanAccumulator:
    """Running means of scalar metrics over a logging interval (host side, float64)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def pop(self) -> dict[str, float]:
        """The means since the last pop; resets."""
        means = {name: total / max(self._count, 1) for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Step rate, example rate (and token rate, for sequence models), both also per device, MFU
    and ETA between calls; `line()` formats the progress line.

    MFU (`train_lib.mfu`) is shown when both `flops_per_example` (the task's model FLOPs of one
    training example) and `peak_per_device` (FLOP/s) are given. `batch_size` is the global
    batch, `n_devices` the devices the step runs on; `clock` is for tests."""

    def __init__(
        self,
        total_steps: int,
        batch_size: int,
        start_step: int,
        tokens_per_example: int = 0,
        *,
        n_devices: int = 1,
        flops_per_example: float | None = None,
        peak_per_device: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.tokens_per_example = tokens_per_example
        self.n_devices = max(int(n_devices), 1)
        self.flops_per_example = flops_per_example
        self.peak_per_device = peak_per_device
        self._clock = clock
        self._last_step = start_step
        self._last_time = clock()

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (e.g. an evaluation) out of the current interval's rate."""
        self._last_time += seconds

    def line(self, step: int, scalars: Mapping[str, float], keys: tuple[str, ...]) -> str:
        now = self._clock()
        elapsed = max(now - self._last_time, 1e-9)
        rate = (step - self._last_step) / elapsed
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) / rate if rate > 0 else math.inf
        width = len(str(self.total_steps))
        examples = rate * self.batch_size
        parts = [
            f"step {step:>{width}}/{self.total_steps} ({100.0 * step / self.total_steps:5.1f}%)",
            f"{rate:6.2f} steps/s",
            f"{examples:8.1f} ex/s",
            f"{examples / self.n_devices:8.1f} ex/s/dev",
        ]
        if self.tokens_per_example:
            tokens = examples * self.tokens_per_example
            parts.append(f"{tokens:8.0f} tok/s")
            parts.append(f"{tokens / self.n_devices:8.0f} tok/s/dev")
        if self.flops_per_example and self.peak_per_device:
            utilisation = mfu(
                self.flops_per_example * self.batch_size, rate, self.n_devices, self.peak_per_device
            )
            parts.append(f"MFU {100.0 * utilisation:.1f}%")
        parts.append(f"ETA {format_duration(eta)}")
        parts += [f"{k} {scalars[k]:.4g}" for k in keys if k in scalars]
        return " | ".join(parts)
