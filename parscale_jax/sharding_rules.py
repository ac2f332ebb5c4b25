"""Logical axis names of every ParScale LM parameter: (path regex, names per dim) pairs.

Derived from `parscale_jax.param_table.PARAM_TABLE`, which lists each module once (its Flax path,
its HF tensor name and its parameters' logical axes; the axis names are documented there).
The trainer's sharding matches each parameter path ('layers_0/mlp/gate_proj/kernel', or
'layers/mlp/gate_proj/kernel' with scan_layers) against these
regexes (full match; every leaf must match exactly one) and maps the names to mesh axes with the
config's `mesh.rules`.
"""

from __future__ import annotations

from core.tree_paths import LogicalAxes
from parscale_jax.param_table import PARAM_TABLE, scanned_param_axes

_PER_LAYER_AXES = PARAM_TABLE.param_axes()
# Both layer layouts (scan_layers False: 'layers_0/...', True: 'layers/...' with a leading
# 'layers' axis); their regexes never match the same path.
PARAM_AXES: tuple[tuple[str, LogicalAxes], ...] = _PER_LAYER_AXES + scanned_param_axes(
    _PER_LAYER_AXES
)
