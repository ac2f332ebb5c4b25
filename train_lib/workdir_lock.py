"""One writer per workdir: a lock file `<workdir>/LOCK` naming the host and pid of the writer.

Two trainers on one workdir destroy each other's work: the second one's checkpoint manager removes
the first one's in-progress (temporary) checkpoint directory and both save the same steps. So
`train_and_evaluate` takes this lock before it opens the checkpoint manager and a second trainer
refuses at once with one line naming the workdir and the other process.

A lock is stale (and taken over, with a log line) when
* its pid is dead on this host (a run killed with SIGKILL or a crashed machine that came back), or
* its heartbeat is older than `STALE_AFTER_S`: the holder rewrites the lock every
  `HEARTBEAT_S` seconds, so a run whose host vanished (a preempted TPU VM resumed on a new one)
  frees the workdir after a few minutes.

Local disks (and NFS with O_EXCL) create the lock atomically. On gs:// there is no atomic
create through etils.epath: the lock is written, then read back, which catches all but two runs
started within the same second on one bucket path (a documented limitation).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from core.errors import WorkdirInUseError

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _pid_start_time(pid: int) -> str | None:
    """The process start time from /proc (Linux), so a reused pid is not taken for the holder."""
    with contextlib.suppress(OSError, IndexError):
        stat = epath.Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    return None


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (started {started})"


class WorkdirLock:
    """Context manager: holds `<workdir>/LOCK` while the body runs (released on exit)."""

    def __init__(self, workdir: epath.Path) -> None:
        self.workdir = workdir
        self.path = workdir / LOCK_FILE
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _pid_start_time(os.getpid()),
            "started": time.time(),
            "token": self._token,
        }

    # -- staleness ------------------------------------------------------------------------------
    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock `holder` wrote is no longer held, or None while it is."""
        if holder.get("host") == self._record["host"]:
            pid = int(holder.get("pid", -1))
            if not _pid_alive(pid):
                return f"its process {pid} is not running"
            start = holder.get("pid_start")
            if start is not None and _pid_start_time(pid) not in (None, start):
                return f"pid {pid} now belongs to another process"
            return None  # alive on this host: held, whatever the heartbeat says
        age = time.time() - float(holder.get("heartbeat", holder.get("started", 0)))
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age:.0f}s old (> {STALE_AFTER_S:.0f}s)"
        return None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable or half-written: treated as stale below (no pid, no heartbeat)

    def _write(self, exclusive: bool) -> bool:
        record = dict(self._record, heartbeat=time.time())
        text = json.dumps(record) + "\n"
        if "://" in str(self.path):  # an object store replaces an object atomically
            self.path.write_text(text)
            return True
        if exclusive:
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        # A heartbeat replaces the file in one rename: a reader never sees it half-written.
        tmp = f"{self.path}.{self._token}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.fspath(self.path))
        return True

    # -- acquire / release ----------------------------------------------------------------------
    def acquire(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race re-reads the winner's lock
            holder = self._read()
            if holder is not None:
                reason = self._stale_reason(holder)
                if reason is None:
                    raise WorkdirInUseError(
                        f"workdir {self.workdir} is in use by {_describe(holder)} (lock file "
                        f"{self.path}); wait for that run, stop it, or use another --workdir"
                    )
                logging.warning("taking over the stale lock %s: %s", self.path, reason)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            if self._write(exclusive=True) and self._owned():
                self._thread = threading.Thread(target=self._heartbeat, daemon=True)
                self._thread.start()
                return
        raise WorkdirInUseError(f"workdir {self.workdir}: could not take the lock {self.path}")

    def _owned(self) -> bool:
        holder = self._read()
        return bool(holder) and holder.get("token") == self._token

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                if self._owned():
                    self._write(exclusive=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(OSError):
            if self._owned():
                self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
