"""Checkpoints: Orbax V0 CheckpointManager over (train state, data iterator, config JSON).

Each checkpoint is `<workdir>/checkpoints/<step>/{state,data,meta}`. Orbax writes into a temporary
directory and renames it when complete (on GCS, where renames are not atomic, it writes
`commit_success.txt` last instead), so a run killed mid-save leaves the previous checkpoint as the
latest one; `latest_step` never returns a half-written checkpoint, and the leftovers are removed.
Saves are asynchronous: the device arrays are copied to host and training goes on while the files
are written. Directories are `etils.epath` paths, so a `gs://` workdir works as is.

Preemption: `PreemptionWatch` turns SIGTERM (the notice TPU VMs, Kubernetes and Slurm send before
killing a job) into "save at the next step boundary and stop" -- see its docstring.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm

from core.errors import CheckpointMismatchError, ConfigError
from core.tree_paths import path_str

STATE, DATA, META = "state", "data", "meta"
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
    ) -> None:
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.FixedIntervalPolicy(save_every),
            preservation_policy=cm.LatestN(keep),
            enable_async_checkpointing=async_save,
            # Half-written checkpoints of a killed run are not restorable; remove them.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry()
        )

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
        """Raises CheckpointMismatchError naming the leaves whose shape/dtype/presence differ."""
        metadata = self._manager.item_metadata(step)[STATE]
        tree = getattr(metadata, "tree", metadata)
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
        """Starts an (async) save if the policy (or `force`) says so; returns whether it did."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(data_iterator),
                    # A JSON round trip catches non-serialisable values here, not in a thread.
                    META: ocp.args.JsonSave(json.loads(json.dumps(meta))),
                }
            ),
            force=force,
        )

    def restore(
        self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores state (with the shardings of `abstract_state`) and the iterator in place."""
        self.check_compatible(step, abstract_state)
        items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
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
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    * One process (no `jax.distributed`): on entry a SIGTERM handler is installed that only sets
      a flag (signal handlers run between bytecodes of the main thread, so nothing else is safe
      there); on exit the previous handler is restored. `reached` returns the flag.
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
