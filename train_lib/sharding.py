"""Mesh and shardings: the one place that decides where arrays live.

Mesh axes are ('data', 'fsdp', 'tensor'). Every parameter has logical axis names, one per
dimension, from a table of (path regex, names) kept next to its model (`ctm_jax/sharding_rules.py`,
`parscale_jax/sharding_rules.py`; the model class exposes it as `param_axes`). The config's
`mesh.rules` maps logical names to mesh axes, e.g. embed -> fsdp (FSDP: params and optimiser
state split along the model dim), heads / mlp / vocab -> tensor (tensor parallelism),
batch -> data,fsdp. `state_shardings` turns both into a NamedSharding for every leaf of the
train state: params as the rules say, optimiser state mirroring the params it belongs to (Adam's
mu / nu), everything else (counts, step, key, buffers) replicated.

Dimensions the mesh axes do not divide fall back to replication for that dimension (logged), as
does a dimension whose mesh axis an earlier dimension of the same array already uses. Main
activations are constrained with `nn.with_logical_constraint` inside the models; trace them under
`activate(mesh, rules)` so those constraints see the rules (XLA pads uneven activations, so they
need no fallback).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from core.errors import ConfigError
from core.tree_paths import path_str

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every axis that holds a copy of the model's work (the
# default when a config has no `mesh.rules`; otherwise mesh.rules.batch says).
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes) pairs, 'batch' first (it wins a mesh axis that an activation's other
# dims also ask for), then alphabetical.
LogicalRules = tuple[tuple[str, tuple[str, ...]], ...]
# (param path regex, logical name per dim | None for "replicated, any rank") as in sharding_rules.
ParamAxesTable = Sequence[tuple[str, tuple[str | None, ...] | None]]


def _log(message: str) -> None:
    """Start-up notes (replicated dims): absl INFO on process 0, DEBUG on the others."""
    logging.log(logging.INFO if jax.process_index() == 0 else logging.DEBUG, "%s", message)


# ------------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(mesh_config: Mapping[str, Any], n_devices: int) -> tuple[int, ...]:
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


def make_mesh(
    mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), with Auto (GSPMD) axes.

    Auto rather than Explicit because the models only constrain their main activations and leave
    the rest to XLA's propagation (jax.sharding.AxisType.Auto).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


# ------------------------------------------------------------------------------------------------
# Logical axis rules


def parse_rules(rules_config: Mapping[str, Any] | None) -> LogicalRules:
    """`mesh.rules` (logical name -> 'axis', 'axis,axis', '' for replicated, or a tuple) ->
    ((name, mesh axes), ...), 'batch' first. Raises ConfigError naming a bad entry."""
    if not rules_config:
        return ()
    out = []
    for name in sorted(rules_config, key=lambda n: (n != "batch", n)):
        value = rules_config[name]
        if value is None:
            axes: tuple[str, ...] = ()
        elif isinstance(value, str):
            axes = tuple(a.strip() for a in value.split(",") if a.strip())
        else:
            axes = tuple(str(a) for a in value)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(
                f"mesh.rules.{name}={value!r} is invalid: {bad[0]!r} is not a mesh axis; "
                f"allowed: {', '.join(MESH_AXES)} (comma-separated) or '' (replicated)"
            )
        if len(set(axes)) != len(axes):
            raise ConfigError(f"mesh.rules.{name}={value!r} is invalid: repeats a mesh axis")
        out.append((str(name), axes))
    return tuple(out)


def logical_rules(mesh_config: Mapping[str, Any]) -> LogicalRules:
    """The parsed `mesh.rules` of a config's mesh section; () when it has none (older configs:
    everything replicated, batch over data and fsdp)."""
    return parse_rules(mesh_config.get("rules", None))


def flax_rules(rules: LogicalRules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The same rules in flax.linen's format, for `nn.logical_axis_rules`."""
    return tuple((name, None if not a else a[0] if len(a) == 1 else a) for name, a in rules)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: LogicalRules = ()) -> Iterator[None]:
    """`jax.set_mesh(mesh)` plus flax's logical axis rules: trace (lower / first call) sharded
    functions inside this, so the models' `nn.with_logical_constraint`s take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(rules)):
        yield


def batch_axes(rules: LogicalRules = ()) -> tuple[str, ...]:
    return dict(rules).get("batch", BATCH_AXES)


def data_parallel_size(mesh: jax.sharding.Mesh, rules: LogicalRules = ()) -> int:
    return math.prod(mesh.shape[name] for name in batch_axes(rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, rules: LogicalRules = ()) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    axes = batch_axes(rules)
    return NamedSharding(mesh, P(axes if axes else None))


# ------------------------------------------------------------------------------------------------
# Parameters and train state


def model_param_axes(model: Any) -> ParamAxesTable | None:
    """The model's (path regex, logical names) table, or None if it declares none."""
    return getattr(model, "param_axes", None)


def param_logical_axes(params: Any, table: ParamAxesTable) -> dict[str, tuple[str | None, ...]]:
    """'path' -> logical name per dim, for every leaf of `params` (arrays or ShapeDtypeStructs).

    Every path must fully match exactly one regex of `table` and have the rank its entry names;
    otherwise ConfigError naming the path.
    """
    compiled = [(re.compile(pattern), axes) for pattern, axes in table]
    out: dict[str, tuple[str | None, ...]] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path, shape = path_str(key_path), tuple(np.shape(leaf))
        hits = [(p.pattern, axes) for p, axes in compiled if p.fullmatch(path)]
        if not hits:
            raise ConfigError(
                f"param {path} {shape} matches no rule of the model's param_axes table"
            )
        if len(hits) > 1:
            listed = ", ".join(repr(pattern) for pattern, _ in hits)
            raise ConfigError(f"param {path} {shape} matches {len(hits)} rules: {listed}")
        pattern, axes = hits[0]
        if axes is None:
            axes = (None,) * len(shape)
        if len(axes) != len(shape):
            raise ConfigError(
                f"param {path} has shape {shape} but rule {pattern!r} names {len(axes)} dims "
                f"{tuple(axes)}"
            )
        out[path] = tuple(axes)
    return out


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    rules: LogicalRules,
    mesh: jax.sharding.Mesh,
    *,
    where: str = "array",
    notes: list[str] | None = None,
) -> P:
    """PartitionSpec for one array whose dims have logical `names`.

    A name missing from `rules` raises ConfigError. A dim the mesh axes' size does not divide, or
    whose mesh axis an earlier dim already took, is replicated; a line saying so goes to `notes`.
    """
    mapping = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        if name is None:
            spec.append(None)
            continue
        if name not in mapping:
            raise ConfigError(
                f"mesh.rules.{name} is missing: {where} names logical axis {name!r}; "
                f"mapped names: {', '.join(sorted(mapping))}"
            )
        axes = mapping[name]
        if not axes:
            spec.append(None)
            continue
        if used & set(axes):
            if notes is not None:
                notes.append(
                    f"{where}: dim {dim} ({name}) replicated: mesh axis "
                    f"{','.join(sorted(used & set(axes)))} already splits an earlier dim"
                )
            spec.append(None)
            continue
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            if notes is not None:
                notes.append(
                    f"{where}: dim {dim} ({name}, size {size}) replicated: not divisible by "
                    f"{'x'.join(axes)}={n}"
                )
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_shardings(
    mesh: jax.sharding.Mesh,
    params: Any,
    rules: LogicalRules,
    table: ParamAxesTable,
    log: Callable[[str], None] | None = _log,
) -> Any:
    """A NamedSharding for every leaf of `params` (same tree), from the table and the rules."""
    axes = param_logical_axes(params, table)
    notes: list[str] = []

    def one(key_path: Any, leaf: Any) -> NamedSharding:
        path = path_str(key_path)
        spec = logical_to_spec(
            axes[path], np.shape(leaf), rules, mesh, where=f"param {path}", notes=notes
        )
        return NamedSharding(mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, params)
    if log is not None:
        for note in notes:
            log(note)
    return out


def _mirror_params(mesh: jax.sharding.Mesh, tree: Any, params: Any, params_sharding: Any) -> Any:
    """Shardings for optimiser-state leaves: a leaf whose key path ends with a parameter's path
    and has that parameter's shape (Adam mu / nu, accumulated gradients, ...) is sharded like
    it; anything else (counts, per-parameter clip histories of another shape) is replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(params_sharding)
    for (key_path, leaf), sh in zip(flat_params, flat_shardings, strict=True):
        by_path[path_str(key_path)] = (tuple(np.shape(leaf)), sh)
    rep = replicated(mesh)

    def one(key_path: Any, leaf: Any) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        for start in range(len(key_path)):  # the longest matching suffix wins
            hit = by_path.get(path_str(key_path[start:]))
            if hit is not None and hit[0] == shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(
    mesh: jax.sharding.Mesh,
    abstract_state: Any,
    rules: LogicalRules = (),
    param_axes: ParamAxesTable | None = None,
    log: Callable[[str], None] | None = _log,
) -> Any:
    """Sharding for every leaf of the train state (a struct with `params` and `opt_state`).

    With rules and a param-axes table: params as the rules map their logical names, the
    optimiser state mirroring the params (see `_mirror_params`), everything else (step, key,
    buffers, BatchNorm statistics) replicated. Without either: everything replicated.
    """
    rep = replicated(mesh)
    everything = jax.tree.map(lambda _: rep, abstract_state)
    if not rules or param_axes is None:
        if rules and log is not None and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
            log("the model declares no param_axes: parameters and optimiser state replicated")
        return everything
    params = param_shardings(mesh, abstract_state.params, rules, param_axes, log)
    opt_state = _mirror_params(mesh, abstract_state.opt_state, abstract_state.params, params)
    return everything.replace(params=params, opt_state=opt_state)


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of the batch (works for one or many hosts)."""
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }
