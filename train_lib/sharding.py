"""Mesh and shardings: the one place that decides where arrays live.

Mesh axes are ('data', 'fsdp', 'tensor'). Today the train state is replicated and the batch is
split along the data-parallel axes; FSDP / tensor-parallel rules for parameters belong in
`state_shardings` (and nowhere else) when they arrive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from train_lib.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every axis that holds a copy of the model's work.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolves the config's axis sizes (one may be -1: 'the remaining devices')."""
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    unknown = [name for name, size in zip(MESH_AXES, sizes, strict=True) if size == -1]
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} is invalid: must be a positive size or -1")
    if len(unknown) > 1:
        raise ConfigError(f"mesh.{unknown[1]}=-1 is invalid: at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if n_devices % known:
            raise ConfigError(
                f"mesh.{unknown[0]}=-1 is invalid: the other axes ({known}) do not divide "
                f"the {n_devices} devices"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        given = ", ".join(f"mesh.{name}={mesh_config[name]}" for name in MESH_AXES)
        raise ConfigError(
            f"{given} is invalid: needs {math.prod(sizes)} devices, {n_devices} available"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int]) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices, with Auto (GSPMD) axes.

    Auto rather than Explicit because the models are written without sharding annotations on
    activations (see reference/jax_stack.md §2.1).
    """
    shape = mesh_shape(mesh_config, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[name] for name in BATCH_AXES)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: Any) -> Any:
    """Sharding for every leaf of the train state.

    Everything is replicated for now. This is where parameter partitioning rules (FSDP over
    'fsdp', tensor parallelism over 'tensor') will map leaves to partition specs.
    """
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch (works for one or many hosts)."""
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }
