"""Checkpoints: Orbax V0 CheckpointManager over (train state, data iterator, config JSON).

Each checkpoint is `<workdir>/checkpoints/<step>/{state,data,meta}`. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest one. Saves are asynchronous: the device arrays are copied to host and training goes on
while the files are written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from train_lib.errors import CheckpointMismatchError

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
        out["/".join(str(p) for p in path)] = (shape, name)
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
        directory: str | Path,
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
    ) -> None:
        self.directory = Path(directory).absolute()
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
