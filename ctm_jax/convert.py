"""Reference PyTorch CTM state dicts <-> Flax variables: the weight mapping, nothing else.

Layouts: torch Linear weights are (out, in), Flax kernels (in, out); torch's MultiheadAttention
packs [W_q; W_k; W_v] in one `in_proj_weight`; images are NCHW in torch, NHWC here; conv
kernels are OIHW in torch, HWIO in Flax. Every key and shape is checked on import.

Checking a port against reference outputs is `ctm_jax.oracle`; turning a reference `.pt` training
checkpoint (or a Hugging Face safetensors export) into a training workdir is
`python -m launch.import_ctm_checkpoint`, also reachable as

    python -m ctm_jax.convert import-torch --checkpoint FILE.pt --out DIR [--backend numpy]

(the same command under the converter's name; see `_main`).
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from core.errors import CheckpointMismatchError
from ctm_jax.config import IMAGE_BACKBONES, CTMConfig
from ctm_jax.model import CTM
from ctm_jax.param_table import PARAM_TABLE

# Variable collections that hold reference state-dict entries ('batch_stats': BatchNorm running
# statistics under torch's leaf names, including the `num_batches_tracked` counter).
_COLLECTIONS = ("params", "batch_stats", "buffers")
# The one config-dependent reference name (not a path mapping, so not in PARAM_TABLE): the
# reference's custom-rotational embedding wraps its projection Linear in a Sequential.
_SEQUENTIAL_PROJECTION = ("positional_embedding.projection.", "positional_embedding.projection.0.")


def torch_key(path: tuple[str, ...], config: CTMConfig) -> tuple[str, int | None]:
    """The reference state-dict key of a Flax variable path, and its in_proj part (None if
    unpacked), from `ctm_jax.param_table.PARAM_TABLE`."""
    key, part = PARAM_TABLE.reference_key(path)
    if config.positional_embedding_type == "custom-rotational":
        flat, sequential = _SEQUENTIAL_PROJECTION
        if key.startswith(flat):
            key = sequential + key[len(flat) :]
    return key, part


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Dense kernel (in, out) -> (out, in); conv kernel HWIO -> OIHW (grouped convs too: both
    frameworks store in_channels/groups and order output channels group by group)."""
    if path[-1] != "kernel":
        return value
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T


def _from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Inverse of `_to_torch_layout`."""
    if path[-1] != "kernel":
        return value
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T


def _to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return _to_torch_layout(path, np.empty(shape, np.bool_)).shape


def expected_state_dict_shapes(
    config: CTMConfig, variables_shapes: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Reference key -> shape for a model whose (abstract) variables are given."""
    shapes: dict[str, tuple[int, ...]] = {}
    for collection in _COLLECTIONS:
        for path, leaf in flatten_dict(variables_shapes.get(collection, {})).items():
            key, part = torch_key(path, config)
            shape = _to_torch_shape(path, tuple(leaf.shape))
            if part is not None:
                shape = (3 * shape[0], *shape[1:])
            shapes[key] = shape
    return shapes


def export_state_dict(config: CTMConfig, tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables ({'params': ..., 'batch_stats': ..., 'buffers': ...}) or a bare
    params/grads tree -> reference keys and layouts."""
    collections = tree if "params" in tree else {"params": tree}
    state: dict[str, np.ndarray] = {}
    packed: dict[str, list[np.ndarray | None]] = {}
    for collection in _COLLECTIONS:
        for path, leaf in flatten_dict(collections.get(collection, {})).items():
            key, part = torch_key(path, config)
            value = _to_torch_layout(path, np.asarray(leaf))
            if path[-1] == "num_batches_tracked":
                value = value.astype(np.int64)  # torch keeps the counter as int64
            if part is None:
                state[key] = value
            else:
                packed.setdefault(key, [None, None, None])[part] = value
    for key, parts in packed.items():
        state[key] = np.concatenate(parts, axis=0)
    return state


def example_input(config: CTMConfig, state_dict: Mapping[str, np.ndarray]) -> np.ndarray:
    """A one-example input whose shape materialises every lazily-sized reference layer."""
    if config.variant == "sort":
        return np.zeros((1, config.d_input), np.float32)
    if config.backbone_type == "parity_backbone":
        return np.ones((1, 4), np.float32)
    first_conv = {"shallow-wide": "backbone.layers.0.weight"}.get(
        config.backbone_type, "initial_rgb.weight"
    )
    if config.backbone_type in IMAGE_BACKBONES:
        weight = state_dict.get(first_conv)
        channels = int(np.shape(weight)[1]) if weight is not None else 3
        # Big enough that the final feature map is at least 2x2 (the Fourier embeddings divide
        # by H-1 and W-1): every backbone reduction maps n -> (n - 1) // 2 + 1.
        size = 2
        while config.feature_map_size(size, size)[0] < 2:
            size *= 2
        return np.zeros((1, size, size, channels), np.float32)
    weight = state_dict.get("kv_proj.0.weight")
    channels = int(np.shape(weight)[1]) if weight is not None else config.d_input
    return np.zeros((1, 4, 4, channels), np.float32)


def import_state_dict(
    config: CTMConfig,
    state_dict: Mapping[str, np.ndarray],
    sample_input: np.ndarray | None = None,
) -> dict[str, Any]:
    """Reference state dict (name -> array) -> Flax variables, checking every key and shape.

    BatchNorm running statistics go to 'batch_stats' (`num_batches_tracked` too, as an int32
    counter that train-mode forwards increment, so an export writes it back).
    Index buffers are copied (never redrawn) and stored as int32. Decay params are imported raw:
    the forward clamps them exactly as the reference's first forward would.
    """
    model = CTM(config)
    if sample_input is None:
        sample_input = example_input(config, state_dict)
    abstract = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0)}, x), jnp.asarray(sample_input)
    )
    expected = expected_state_dict_shapes(config, abstract)
    problems = []
    for key in sorted(set(expected) - set(state_dict)):
        problems.append(f"missing key {key!r} (expected shape {expected[key]})")
    for key in sorted(set(state_dict) - set(expected)):
        problems.append(f"unexpected key {key!r} (shape {tuple(np.shape(state_dict[key]))})")
    for key in sorted(set(expected) & set(state_dict)):
        got = tuple(np.shape(state_dict[key]))
        if got != expected[key]:
            problems.append(f"mis-shaped key {key!r}: expected {expected[key]}, got {got}")
    if problems:
        raise CheckpointMismatchError(
            f"reference state dict does not fit the configured CTM ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )

    variables: dict[str, Any] = {}
    for collection in _COLLECTIONS:
        if collection not in abstract:
            continue
        flat = {}
        for path, leaf in flatten_dict(abstract.get(collection, {})).items():
            key, part = torch_key(path, config)
            value = np.asarray(state_dict[key])
            if part is not None:
                rows = value.shape[0] // 3
                value = value[part * rows : (part + 1) * rows]
            value = _from_torch_layout(path, value)
            flat[path] = jnp.asarray(value, dtype=leaf.dtype)
        variables[collection] = unflatten_dict(flat)
    return variables


def import_reference(
    reference_kwargs: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    model_class: str = "ContinuousThoughtMachine",
    sample_input: np.ndarray | None = None,
) -> tuple[CTM, dict[str, Any]]:
    """(reference constructor kwargs, reference state dict) -> (model, variables)."""
    config = CTMConfig.from_reference_kwargs(reference_kwargs, model_class)
    return CTM(config), import_state_dict(config, state_dict, sample_input)


def reference_input_to_jax(x: np.ndarray, config: CTMConfig) -> np.ndarray:
    """Reference channels-first feature maps (B, C, H, W) / (B, C, L) -> channels-last."""
    channels_first = config.backbone_type == "none" or config.backbone_type in IMAGE_BACKBONES
    if channels_first and config.variant == "ctm" and x.ndim >= 3:
        return np.moveaxis(x, 1, -1)
    return x


_USAGE = """usage: python -m ctm_jax.convert import-torch --checkpoint FILE --out DIR [--backend B]

  import-torch  a reference CTM checkpoint (.pt, or a Hugging Face export: a directory with
                model.safetensors + config.json) -> a training workdir; the flags are those of
                `python -m launch.import_ctm_checkpoint` (--helpfull lists them)"""


def _main(argv: Sequence[str]) -> None:
    """`import-torch` runs `launch.import_ctm_checkpoint` as the program, with the remaining
    arguments. Writing a workdir needs a task config and the trainer, which sit above the model
    packages (docs/architecture.md), so the library code of this module never imports them:
    only this entry point forwards to the launcher, by module name, at run time."""
    if len(argv) < 2 or argv[1] != "import-torch":
        print(_USAGE, file=sys.stderr)
        got = f"unknown command {argv[1]!r}" if len(argv) > 1 else "no command"
        print(f"error: {got}; allowed: import-torch", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"{argv[0]} import-torch", *argv[2:]]
    runpy.run_module("launch.import_ctm_checkpoint", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main(sys.argv)
