"""Checkpoints: Orbax V0 CheckpointManager over (train state, data iterator, config JSON).

Each checkpoint is `<workdir>/checkpoints/<step>/{state,data,meta}`. Orbax writes into a temporary
directory and renames it when complete (on GCS, where renames are not atomic, it writes
`commit_success.txt` last instead), so a run killed mid-save leaves the previous checkpoint as the
latest one; `latest_step` never returns a half-written checkpoint, and the leftovers are removed.
Saves are asynchronous: the device arrays are copied to host and training goes on while the files
are written. Directories are `etils.epath` paths, so a `gs://` workdir works as is.

Preemption: `PreemptionWatch` turns SIGTERM (the notice TPU VMs, Kubernetes and Slurm send before
killing a job) and a first Ctrl-C (SIGINT) into "save at the next step boundary and stop" -- see
its docstring. Integrity: every checkpoint carries `checksums.json` (see checkpoint_integrity);
`select_intact_step` verifies before anything is restored and sets damaged steps aside.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from core.errors import CheckpointMismatchError, ConfigError, DamagedCheckpointError
from core.tree_paths import path_str
from train_lib import checkpoint_integrity

STATE, DATA, META = "state", "data", "meta"
# Orbax's temporary step directories: `<step>.orbax-checkpoint-tmp[-<timestamp>]`.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Damaged checkpoints are moved here (beside checkpoints/), never deleted.
DAMAGED_DIR = "damaged_checkpoints"
# Enough leaves to recognise the problem without flooding the terminal.
_MAX_LISTED = 8


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Handlers per item, so metadata and partial restores work without example args."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add(DATA, grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler)
    registry.add(DATA, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler)
    registry.add(META, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add(META, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'a/b/c' -> (shape, dtype name) for arrays, checkpoint metadata or ShapeDtypeStructs."""
    flat = ocp.tree.to_flat_dict(tree)
    out = {}
    for path, leaf in flat.items():
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            # Typed PRNG keys are stored as their raw uint32 data.
            shape = tuple(leaf.shape) + tuple(jax.random.key_data(jax.random.key(0)).shape)
            name = "uint32"
        else:
            shape, name = tuple(leaf.shape), np.dtype(dtype).name
        out[path_str(path)] = (shape, name)
    return out


def describe_mismatch(saved: Any, expected: Any) -> list[str]:
    """Human-readable differences between a checkpoint's tree metadata and an abstract state."""
    got, want = _flat_shapes(saved), _flat_shapes(expected)
    lines = []
    # Parameters first: optimiser-state leaves mirror them and say nothing new.
    order = lambda path: (not path.startswith("params/"), path.startswith("opt_state/"), path)
    for path in sorted(set(got) | set(want), key=order):
        if path not in got:
            lines.append(f"{path}: missing from the checkpoint (config builds {want[path][0]})")
        elif path not in want:
            lines.append(f"{path}: in the checkpoint {got[path][0]} but not built by the config")
        elif got[path] != want[path]:
            (gs, gd), (ws, wd) = got[path], want[path]
            lines.append(f"{path}: checkpoint {gs} {gd} vs config {ws} {wd}")
    return lines


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with this project's items and policies."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
        checksums: bool = True,
        read_only: bool = False,
    ) -> None:
        """`checksums`: write `checksums.json` into every checkpoint (see checkpoint_integrity).
        `read_only`: never write, prune or clean up anything (evaluation of a live run's workdir:
        its in-progress temporary directory must survive)."""
        self.directory = as_path(directory)
        self._async = async_save
        self._checksums = checksums
        self._saving: list[int] = []  # steps whose post-finalisation callback is still due
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.FixedIntervalPolicy(save_every),
            preservation_policy=cm.LatestN(keep),
            # Always Orbax's async checkpointer: its post-finalisation callback writes the
            # checksums before the commit. A synchronous save waits for it in `save`.
            enable_async_checkpointing=True,
            async_options=ocp.options.AsyncOptions(
                post_finalization_callback=self._write_checksums if checksums else None
            ),
            # Half-written checkpoints of a killed run are not restorable; remove them.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )

    def _write_checksums(self) -> None:
        """Orbax's post-finalisation callback (primary process, background thread): every
        process has written the step, which is not committed yet (locally still in its
        `<step>.orbax-checkpoint-tmp` directory; on gs:// commit_success.txt is still due)."""
        step = self._saving.pop(0)
        names = [str(step), f"{step}{TMP_SUFFIX}"]
        found = [
            p for p in self.directory.iterdir() if p.name == names[0] or p.name.startswith(names[1])
        ]
        # The temporary directory when there is one (local), else the step's own (gs://).
        found.sort(key=lambda p: p.name == names[0])
        if not found:
            raise DamagedCheckpointError(
                f"checkpoint step {step}: no directory to write checksums into in {self.directory}"
            )
        checkpoint_integrity.write_checksums(found[0])

    # -- queries -----------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True (on every process at the same step) once JAX's preemption sync manager has seen
        a preemption notice; always False without `jax.distributed`."""
        return self._manager.reached_preemption(step)

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatchError naming the leaves whose shape/dtype/presence differ
        (DamagedCheckpointError when the saved tree's metadata cannot be read at all)."""
        try:
            metadata = self._manager.item_metadata(step)[STATE]
        except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many kinds; one line
            raise self._damaged(step, f"{STATE}/_METADATA", e) from None
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise self._damaged(step, f"{STATE}/_METADATA", "missing or unreadable")
        problems = describe_mismatch(tree, abstract_state)
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED])
            more = len(problems) - _MAX_LISTED
            suffix = f"; and {more} more" if more > 0 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} does not match the model the config "
                f"builds ({len(problems)} leaves differ): {listed}{suffix}. Use a fresh --workdir "
                f"or the config the checkpoint was written with."
            )

    def _damaged(self, step: int, file: str, why: object) -> DamagedCheckpointError:
        text = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        return DamagedCheckpointError(
            f"checkpoint step {step} is damaged: {self.directory / str(step) / file}: {text}",
            step=step,
            file=file,
        )

    # -- integrity ---------------------------------------------------------------------------
    def verify(self, step: int) -> bool:
        """DamagedCheckpointError unless the step's files match its checksums.json; False for a
        checkpoint without checksums (written before they existed; not verified)."""
        return checkpoint_integrity.verify(self.directory / str(step), step)

    # -- save / restore ----------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator,
        meta: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Starts an (async) save if the policy (or `force`) says so; returns whether it did.
        A synchronous Checkpointer (async_save=False) returns when the step is committed."""
        if not (force or self.should_save(step)):
            return False
        if self._checksums and jax.process_index() == 0:
            self._saving.append(step)
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(data_iterator),
                    # A JSON round trip catches non-serialisable values here, not in a thread.
                    META: ocp.args.JsonSave(json.loads(json.dumps(meta))),
                }
            ),
            force=True,
        )
        if not self._async:
            self._manager.wait_until_finished()
        return saved

    def restore(
        self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores state (with the shardings of `abstract_state`) and the iterator in place.

        A checkpoint whose checksums verified and still fails to read is a bug (raised as is);
        one without checksums that fails to read is reported as damaged, in one line."""
        verified = checkpoint_integrity.has_checksums(self.directory / str(step))
        self.check_compatible(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if verified:
                raise
            raise self._damaged(step, "", e) from None
        return restored[STATE], dict(restored[META])

    def restore_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
        return dict(restored[META])

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        # Orbax removes a killed run's temporary directories in a background future that its
        # close() does not wait for; a run failing early (bad data) would exit under it and
        # print a "cannot schedule new futures after interpreter shutdown" traceback.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_aside(directory: epath.Path, step: int) -> epath.Path:
    """Moves a damaged step to `<workdir>/damaged_checkpoints/<step>[-n]` (kept for inspection,
    out of Orbax's way: the run re-saves that step later); returns where it went."""
    target_dir = directory.parent / DAMAGED_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    target, n = target_dir / str(step), 1
    while target.exists():
        target, n = target_dir / f"{step}-{n}", n + 1
    (directory / str(step)).rename(target)
    return target


def select_intact_step(directory: epath.Path, log: Callable[[str], None]) -> int | None:
    """For the trainer, before it opens the checkpoint manager (which would read the damaged
    metadata itself): the newest committed checkpoint whose files verify, None when there is
    none at all.

    Damaged newer ones are reported in one line each and set aside (never deleted), so training
    resumes from the intact one. If every checkpoint is damaged nothing is moved and
    DamagedCheckpointError lists them: starting afresh is the user's decision. Multi-process:
    process 0 reads and decides; the others take its answer."""
    if jax.process_count() == 1:
        return _select_intact_step(directory, log)
    step, error = -1, None  # -1: no checkpoint; -2: none intact (process 0 raises)
    if jax.process_index() == 0:
        try:
            found = _select_intact_step(directory, log)
            step = -1 if found is None else found
        except DamagedCheckpointError as e:
            step, error = -2, e
    step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    if error is not None:
        raise error
    if step == -2:
        raise DamagedCheckpointError(f"no intact checkpoint in {directory} (process 0 names them)")
    return None if step < 0 else step


def _newest_intact(
    directory: epath.Path, log: Callable[[str], None], unverified: str
) -> tuple[int | None, list[DamagedCheckpointError]]:
    """(the newest committed step whose files verify, or None; the damaged newer ones, newest
    first). A step without checksums counts as intact, with the line `... checksums.json:
    <unverified>`."""
    damaged: list[DamagedCheckpointError] = []
    for step in reversed(committed_steps(directory)):
        try:
            if not checkpoint_integrity.verify(directory / str(step), step):
                log(f"checkpoint step {step} has no checksums.json: {unverified}")
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        return step, damaged
    return None, damaged


def _no_intact(directory: epath.Path, damaged: list[DamagedCheckpointError], advice: str) -> str:
    listed = "; ".join(str(e) for e in damaged)
    return f"no intact checkpoint in {directory}: {listed}{advice}"


def _select_intact_step(directory: epath.Path, log: Callable[[str], None]) -> int | None:
    step, damaged = _newest_intact(directory, log, "restoring it unverified")
    if step is None and damaged:
        advice = ". Nothing was moved; move them away to start this run afresh"
        raise DamagedCheckpointError(_no_intact(directory, damaged, advice))
    for error in damaged:
        where = set_aside(directory, error.step)
        log(f"{error}; moved to {where}; resuming from step {step} instead")
    return step


def committed_steps(directory: epath.Path) -> list[int]:
    """Steps of the committed checkpoints in `directory`, read from the names alone (no manager
    is opened, nothing is cleaned up): Orbax renames a finished local save, and writes
    commit_success.txt last on gs://; `is_checkpoint_finalized` knows both."""
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and p.is_dir() and ocp.step.is_checkpoint_finalized(p)
    )


def newest_intact_readonly(directory: epath.Path, log: Callable[[str], None]) -> int | None:
    """For readers of a workdir (evaluation, export, init_from): the newest committed step whose
    files verify; damaged newer ones are reported in one line each and skipped, nothing is
    moved. None when there is no checkpoint; DamagedCheckpointError when none is intact."""
    step, damaged = _newest_intact(directory, log, "reading it unverified")
    for error in damaged:
        log(f"{error}; skipped")
    if step is None and damaged:
        raise DamagedCheckpointError(_no_intact(directory, damaged, ""))
    return step


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, as Orbax restore expects."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def as_path(path: str | os.PathLike) -> epath.Path:
    """An `etils.epath.Path` for a workdir or checkpoint directory: local paths are made absolute,
    cloud URIs (`gs://bucket/run`) are kept as they are (pathlib would turn `gs://` into `gs:/`)."""
    text = os.fspath(path)
    if "://" in text:
        if text.startswith("gs://") and not _gcs_backend_available():
            raise ConfigError(
                f"workdir {text!r} is invalid here: gs:// paths need gcsfs "
                "(pip install -r requirements-tpu.txt) or tensorflow installed"
            )
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def _gcs_backend_available() -> bool:
    """etils.epath reaches gs:// through gcsfs or tensorflow.io.gfile."""
    return any(importlib.util.find_spec(name) for name in ("gcsfs", "tensorflow"))


class PreemptionWatch:
    """Tells the training loop when to save and stop because the job is being preempted.

    Use it as a context manager around the loop and call `reached(step)` at every step boundary:
    * One process (no `jax.distributed`): on entry a handler for `signals` (the trainer passes
      SIGTERM and SIGINT) is installed that only sets a flag (signal handlers run between
      bytecodes of the main thread, so nothing else is safe there); on exit the previous handler
      is restored. `reached` returns the flag. A second SIGINT (Ctrl-C twice) raises
      KeyboardInterrupt at once, as Ctrl-C normally does.
    * `jax.distributed` initialised (multi-host): JAX's preemption sync manager already catches
      SIGTERM on every host and agrees on one step, the first that every process can still
      reach, through `CheckpointManager.reached_preemption`; `reached` asks it (every process
      must call it at every step). No Python handler is installed: it would replace the sync
      manager's.
    Outside the main thread no handler can be installed; SIGTERM then keeps its usual effect.
    """

    def __init__(self, ckpt: Checkpointer, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self._ckpt = ckpt
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._distributed = False
        self.received: int | None = None  # the signal number, once one arrived (one process)

    def __enter__(self) -> PreemptionWatch:
        self._distributed = jax.distributed.is_initialized()
        if self._distributed and not jax.config.jax_enable_preemption_service:
            logging.warning(
                "jax_enable_preemption_service is off: SIGTERM will not save a checkpoint"
            )
        if not self._distributed and threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # a second Ctrl-C: stop now (nothing saved)
                raise KeyboardInterrupt
            # A handler may not log (absl's lock could be held); one raw write is safe.
            os.write(2, b"\nCtrl-C: saving at the next step boundary (Ctrl-C again: stop now)\n")
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    @property
    def uses_sync_manager(self) -> bool:
        return self._distributed

    def reached(self, step: int) -> bool:
        """Whether to save `step` now and stop (the same answer on every process)."""
        if self._distributed:
            return self._ckpt.reached_preemption(step)
        return self.received is not None
