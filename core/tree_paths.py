"""Pytree paths as strings, and the per-model table of modules built on them.

`path_str` is the one way a pytree key path becomes 'a/b/kernel' (sharding rules, weight-decay
masks, trainable filters and error messages all use it).

`ParamTable` lists a model's modules once: where each sits in the Flax tree (a regex on the
'/'-joined module path), its name in the reference checkpoint, and the logical axis names of
its parameters. The model's sharding rules (`param_axes`, consumed by `train_lib.sharding`) and
its checkpoint converter's key map are both derived from it, so a module is added or renamed in
one place.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

# Logical name per dimension (None: that dim is never sharded), or None for the whole entry:
# "replicated, whatever the rank".
LogicalAxes = tuple[str | None, ...] | None


def path_str(path: Iterable[Any]) -> str:
    """'a/b/kernel' for a pytree key path (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey)
    or a plain tuple of names (`flax.traverse_util.flatten_dict` keys)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


@dataclasses.dataclass(frozen=True)
class Module:
    """One module of a model.

    path:       regex, fully matching the '/'-joined Flax module path ('' for the root, whose
                variables sit at the top of the tree).
    reference:  its reference checkpoint key, as a `str.format` template: `{leaf}` is the
                variable's reference name (the table's `leaf_names` applied to the Flax leaf),
                `{1}`, `{2}`, ... the groups of `path`.
    params:     leaf-name regex -> logical axes of the parameters it holds. Other collections'
                variables under the module (BatchNorm statistics, buffers) share its reference
                name but have no axes: only parameters are sharded.
    part:       row block of a reference tensor packed from several modules (torch
                MultiheadAttention's in_proj holds [W_q; W_k; W_v]); None when not packed.
    """

    path: str
    reference: str
    params: Mapping[str, LogicalAxes]
    part: int | None = None


@dataclasses.dataclass(frozen=True)
class ParamTable:
    """A model's modules, each listed once (see `Module`)."""

    modules: tuple[Module, ...]
    leaf_names: Mapping[str, str]  # Flax leaf name -> reference name ('kernel' -> 'weight')

    @functools.cached_property
    def _compiled(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(m.path) for m in self.modules)

    def param_axes(self) -> tuple[tuple[str, LogicalAxes], ...]:
        """(param path regex, logical axes) pairs: the `param_axes` table `train_lib.sharding`
        reads (every parameter must fully match exactly one)."""
        return tuple(
            (f"{_group(m.path)}/{_group(leaf)}" if m.path else _group(leaf), axes)
            for m in self.modules
            for leaf, axes in m.params.items()
        )

    def reference_key(self, path: tuple[str, ...]) -> tuple[str, int | None]:
        """The reference checkpoint key of a Flax variable path, and its packed part (None if
        unpacked). KeyError naming the path when no module, or more than one, matches."""
        module, leaf = path_str(path[:-1]), path[-1]
        hits = [
            (m, match)
            for m, pattern in zip(self.modules, self._compiled, strict=True)
            if (match := pattern.fullmatch(module)) is not None
        ]
        if len(hits) != 1:
            found = "no module" if not hits else f"{len(hits)} modules"
            raise KeyError(f"{path_str(path)}: {found} of the model's param table match {module!r}")
        m, match = hits[0]
        name = m.reference.format(
            match.group(0), *match.groups(), leaf=self.leaf_names.get(leaf, leaf)
        )
        return name, m.part


def _group(regex: str) -> str:
    """`regex` as one unit of a longer one: 'scale|bias' -> '(?:scale|bias)' (an alternation
    outside any group would otherwise split the whole pattern); anything else unchanged."""
    depth, in_class, i = 0, False, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 1  # skip the escaped character
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            return f"(?:{regex})"
        i += 1
    return regex
