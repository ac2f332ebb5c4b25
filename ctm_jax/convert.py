"""Reference PyTorch CTM state dicts <-> Flax variables, and the oracle checker.

    python -m ctm_jax.convert check-oracle FILE.npz [FILE.npz ...]
    python -m ctm_jax.convert import-torch --checkpoint FILE.pt --out DIR

reads files in the layout of shared/oracles/ctm/README.md, builds the model from the file's
constructor kwargs, imports its state dict, runs the forward (and the loss and its gradients when
the file has them), prints the largest absolute and relative error of every compared array, and
exits non-zero when any array is outside rtol 1e-4 / atol 1e-5.

Layouts: torch Linear weights are (out, in), Flax kernels (in, out); torch's MultiheadAttention
packs [W_q; W_k; W_v] in one `in_proj_weight`; images are NCHW in torch, NHWC here; conv
kernels are OIHW in torch, HWIO in Flax. check-oracle runs the model in eval mode, so image
backbones normalise with the imported BatchNorm running statistics.

import-torch turns a reference maze or parity training checkpoint (state dict + saved args; read
by ctm_jax.torch_checkpoint, with or without torch) into a workdir that
train_lib.trainer.restore_run reads: DIR/config.json, a full training config from
configs/ctm_maze.py or configs/ctm_parity.py with the model section taken from the args, and an
Orbax checkpoint at step = the file's `iteration` (0 without one) with a fresh optimiser state.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ctm_jax import losses
from ctm_jax.config import IMAGE_BACKBONES, CTMConfig
from ctm_jax.config import ConfigError as CTMConfigError
from ctm_jax.model import CTM, project_params
from ctm_jax.torch_checkpoint import TorchCheckpointError, load_torch_checkpoint
from train_lib.errors import ConfigError

RTOL, ATOL = 1e-4, 1e-5

# Flax module path (dot-joined, scan scope removed) -> reference module path, applied in order.
_MODULE_RULES: list[tuple[str, str]] = [
    (r"^trace_processor\.nlm_0\.", "trace_processor.0.0."),
    (r"^trace_processor\.nlm_1\.", "trace_processor.0.2."),
    (r"^synapses\.linear\.dense\.", "synapses.1."),
    (r"^synapses\.norm\.", "synapses.3."),
    (r"^synapses\.first_projection\.dense\.", "synapses.first_projection.0."),
    (r"^synapses\.first_norm\.", "synapses.first_projection.1."),
    (r"^synapses\.down_(\d+)\.dense\.", r"synapses.down_projections.\1.1."),
    (r"^synapses\.down_norm_(\d+)\.", r"synapses.down_projections.\1.2."),
    (r"^synapses\.up_(\d+)\.dense\.", r"synapses.up_projections.\1.1."),
    (r"^synapses\.up_norm_(\d+)\.", r"synapses.up_projections.\1.2."),
    (r"^synapses\.skip_norm_(\d+)\.", r"synapses.skip_lns.\1."),
    (r"^kv_proj\.dense\.", "kv_proj.0."),
    (r"^kv_norm\.", "kv_proj.1."),
    (r"^q_proj\.dense\.", "q_proj."),
    (r"^output_projector\.dense\.", "output_projector.0."),
    (r"^attention\.out\.", "attention.out_proj."),
    (r"^positional_embedding\.embedder_(\d+)\.", r"positional_embedding.embedders.\1."),
    (r"\.mlp_0\.dense\.", ".mlp.0."),
    (r"\.mlp_1\.dense\.", ".mlp.2."),
    (r"\.mlp_norm\.", ".mlp.3."),
    # Image backbones: torchvision ResNet names and the reference's ShallowWide Sequential.
    (r"^backbone\.layer(\d+)_(\d+)\.", r"backbone.layer\1.\2."),
    (r"\.downsample_(\d+)\.", r".downsample.\1."),
    (r"^backbone\.layers_(\d+)\.", r"backbone.layers.\1."),
]
# Variable collections that hold reference state-dict entries ('batch_stats': BatchNorm running
# statistics under torch's leaf names, including the `num_batches_tracked` counter).
_COLLECTIONS = ("params", "batch_stats", "buffers")
# Leaf renames; Dense kernels are also transposed.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# The three parts of torch's packed attention in-projection, in row order.
_IN_PROJ_PARTS = {
    ("attention", "query"): 0,
    ("attention_kv", "key"): 1,
    ("attention_kv", "value"): 2,
}


class StateDictMismatchError(ValueError):
    """A reference state dict whose keys or shapes do not fit the configured model."""


def torch_key(path: tuple[str, ...], config: CTMConfig) -> tuple[str, int | None]:
    """The reference state-dict key of a Flax leaf, and its in_proj part (None if unpacked)."""
    names = [p for p in path if p != "ticks"]
    module, leaf = tuple(names[:-1]), names[-1]
    if module in _IN_PROJ_PARTS:
        suffix = "weight" if leaf == "kernel" else "bias"
        return f"attention.in_proj_{suffix}", _IN_PROJ_PARTS[module]
    dotted = ".".join(module) + "." if module else ""
    for pattern, replacement in _MODULE_RULES:
        dotted = re.sub(pattern, replacement, dotted)
    if config.positional_embedding_type == "custom-rotational":
        dotted = dotted.replace(
            "positional_embedding.projection.dense.", "positional_embedding.projection.0."
        )
    dotted = dotted.replace(
        "positional_embedding.projection.dense.", "positional_embedding.projection."
    )
    leaf = _LEAF_NAMES.get(leaf, leaf) if module else leaf
    return dotted + leaf, None


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
        raise StateDictMismatchError(
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


# ------------------------------------------------------------------------------------------------
# Oracle checking


def oracle_loss(config: CTMConfig, output: Any, targets: jax.Array) -> tuple[jax.Array, Any]:
    """The loss the reference used for this kind of model, picked from config and target shape."""
    if config.variant == "sort":
        return losses.sort_loss(output.predictions, targets), None
    if targets.ndim == 1:
        return losses.image_classification_loss(output.predictions, output.certainties, targets)
    if config.prediction_shape()[-1] == 2:
        return losses.parity_loss(output.predictions, output.certainties, targets)
    raise ValueError(
        f"no reference loss known for targets of shape {targets.shape} with "
        f"prediction_reshaper={list(config.prediction_reshaper)}"
    )


def compare(name: str, got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    """np.allclose-style check with the oracle tolerances and a one-line report."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False, f"  FAIL {name}: shape {got.shape} != expected {want.shape}"
    err = np.abs(got - want)
    rel = err / np.maximum(np.abs(want), 1e-30)
    ok = bool(np.all(err <= ATOL + RTOL * np.abs(want)))
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    return (
        ok,
        f"  {'ok  ' if ok else 'FAIL'} {name:55s} max|err| {max_abs:.2e}  max rel {max_rel:.2e}",
    )


def check_oracle(path: str) -> bool:
    """Runs one oracle file; prints one line per compared array; True when all match."""
    data = np.load(path, allow_pickle=False)
    meta = json.loads(str(data["config_json"]))
    config = CTMConfig.from_reference_kwargs(meta["config"], meta["model_class"])
    state_dict = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
    x = reference_input_to_jax(data["input"], config)
    variables = import_state_dict(config, state_dict, x)
    model = CTM(config)
    print(
        f"{path}: {meta['model_class']} '{meta.get('name', '')}' "
        f"(variant {config.variant}, {config.neuron_select_type}, T={config.iterations})"
    )

    out = model.apply(variables, jnp.asarray(x), track=True)
    checks = [
        ("out/predictions", out.predictions),
        ("out/certainties", out.certainties),
        ("out/final_synch_out", out.synch_out),
    ]
    checks += [(f"out/{k}", v) for k, v in out.tracking.items()]
    projected = project_params(config, variables["params"])
    checks += [(f"post_forward/{k}", projected[k]) for k in projected if k.startswith("decay")]

    if "loss/targets" in data.files:
        targets = jnp.asarray(data["loss/targets"])

        def loss_fn(params):
            output = model.apply({**variables, "params": params}, jnp.asarray(x))
            return oracle_loss(config, output, targets)

        (loss, where), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        checks.append(("loss/value", loss))
        if where is not None and "loss/where_most_certain" in data.files:
            checks.append(("loss/where_most_certain", where))
        for key, value in export_state_dict(config, grads).items():
            checks.append((f"grad/{key}", value))
        missing_grads = {k for k in data.files if k.startswith("grad/")} - {c[0] for c in checks}
        if missing_grads:
            print(f"  FAIL gradients not produced for: {sorted(missing_grads)}")
            return False

    all_ok = True
    for name, value in checks:
        if name not in data.files:
            continue
        ok, line = compare(name, np.asarray(value), data[name])
        print(line)
        all_ok &= ok
    print(f"  => {'PASS' if all_ok else 'FAIL'}")
    return all_ok


# ------------------------------------------------------------------------------------------------
# import-torch: a reference `.pt` checkpoint -> a workdir that train_lib.trainer.restore_run reads

# Keys every reference CTM state dict has (prefix '*' = at least one key under it).
_CTM_MARKERS = ("start_activated_state", "start_trace", "synapses.*", "trace_processor.*")
# Reference argparse name -> CTM constructor name, where they differ.
_ARG_RENAMES = {"deep_memory": "deep_nlms", "do_normalisation": "do_layernorm_nlm"}
_MODEL_ARGS = (
    "iterations",
    "d_model",
    "d_input",
    "heads",
    "n_synch_out",
    "n_synch_action",
    "synapse_depth",
    "memory_length",
    "deep_nlms",
    "memory_hidden_dims",
    "do_layernorm_nlm",
    "backbone_type",
    "positional_embedding_type",
    "dropout",
    "dropout_nlm",
    "neuron_select_type",
    "n_random_pairing_self",
)


def _fail(path: Any, reason: str) -> TorchCheckpointError:
    return TorchCheckpointError(f"{path}: {reason}")


def ctm_checkpoint_parts(
    checkpoint: Mapping[str, Any], path: Any = "<checkpoint>"
) -> tuple[dict[str, np.ndarray], dict[str, Any], int | None]:
    """(state dict, args with legacy names patched, iteration or None) of a loaded `.pt` dict.

    The state dict is `model_state_dict` (training checkpoints), `state_dict` (the maze analysis
    layout) or the top-level tensors (a bare state dict); 'module.' / '_orig_mod.' prefixes of
    DataParallel / torch.compile are removed.
    """
    for name in ("model_state_dict", "state_dict"):
        if isinstance(checkpoint.get(name), Mapping):
            raw = checkpoint[name]
            break
    else:
        raw = {k: v for k, v in checkpoint.items() if isinstance(v, np.ndarray)}
    state_dict = {}
    for key, value in raw.items():
        key = str(key).removeprefix("module.").replace("_orig_mod.", "")
        if not isinstance(value, np.ndarray):
            raise _fail(path, f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    missing = [
        m
        for m in _CTM_MARKERS
        if not (
            any(k.startswith(m[:-1]) for k in state_dict) if m.endswith("*") else m in state_dict
        )
    ]
    if missing:
        found = sorted(state_dict)[:6]
        raise _fail(
            path,
            f"not a CTM checkpoint: no state dict with CTM keys (missing {', '.join(missing)}; "
            f"found {found if found else 'no tensors'}{' ...' if len(state_dict) > 6 else ''})",
        )
    args = checkpoint.get("args")
    if not isinstance(args, Mapping):
        raise _fail(
            path,
            "no saved 'args' (the reference's argparse.Namespace) next to the state dict: "
            "the model configuration cannot be known",
        )
    args = dict(args)
    # Legacy names, patched as the reference's analysis scripts do.
    if "backbone_type" not in args and "resnet_type" in args:
        scales = args.get("resnet_feature_scales") or [4]
        args["backbone_type"] = f"{args['resnet_type']}-{list(scales)[-1]}"
    args.setdefault("neuron_select_type", "first-last")
    args.setdefault("n_random_pairing_self", 0)
    iteration = checkpoint.get("iteration")
    iteration = int(iteration) if isinstance(iteration, (int, np.integer)) else None
    return state_dict, args, iteration


def reference_task(args: Mapping[str, Any], path: Any = "<checkpoint>") -> str:
    """'maze' or 'parity' from the saved args; other tasks are refused by name."""
    model = args.get("model", args.get("model_type", "ctm"))
    if model != "ctm":
        raise _fail(path, f"args.model={model!r}: only CTM checkpoints can be imported")
    dataset = str(args.get("dataset", ""))
    if "maze_route_length" in args or dataset.startswith("mazes"):
        return "maze"
    if "parity_sequence_length" in args or dataset == "parity":
        return "parity"
    if any(str(k).startswith("q_num") for k in args):
        task = "qamnist"
    elif "env_id" in args:
        task = "rl"
    elif dataset:
        task = dataset
    else:
        task = "unknown"
    raise _fail(
        path,
        f"task {task!r} is not supported: only maze and parity CTM checkpoints can be imported",
    )


def reference_model_kwargs(args: Mapping[str, Any], path: Any = "<checkpoint>") -> dict[str, Any]:
    """CTM constructor kwargs (without out_dims / prediction_reshaper) from the saved args."""
    values = {_ARG_RENAMES.get(k, k): v for k, v in args.items()}
    values.setdefault("dropout_nlm", None)  # older parsers had none: NLMs used `dropout`
    missing = [name for name in _MODEL_ARGS if name not in values]
    if missing:
        raise _fail(path, f"args lack the model field(s) {', '.join(missing)}")
    return {name: values[name] for name in _MODEL_ARGS}


def _dense_or_paired(select: str, size: int) -> int | None:
    """n_synch from a synchronisation vector length (n for pairing, n(n+1)/2 otherwise)."""
    if select == "random-pairing":
        return size
    n = int((np.sqrt(8 * size + 1) - 1) / 2)
    return n if n * (n + 1) // 2 == size else None


def check_args_fit_state_dict(
    kwargs: Mapping[str, Any],
    task_fields: Mapping[str, tuple[int, int]],
    state_dict: Mapping[str, np.ndarray],
    path: Any = "<checkpoint>",
) -> None:
    """One error naming every args field whose value the state dict's shapes contradict.

    `task_fields`: task arg name -> (value, outputs per position), e.g. maze_route_length -> (100,
    5): the output projector must have value * outputs rows.
    """
    shape = lambda key: tuple(np.shape(state_dict[key])) if key in state_dict else None
    select = str(kwargs["neuron_select_type"])
    checks: list[tuple[str, Any, Any, str]] = []  # field, received, expected, evidence key
    if (s := shape("start_activated_state")) and len(s) == 1:
        checks.append(("d_model", kwargs["d_model"], s[0], "start_activated_state"))
    if (s := shape("start_trace")) and len(s) == 2:
        checks.append(("memory_length", kwargs["memory_length"], s[1], "start_trace"))
    for field, key in (
        ("n_synch_out", "decay_params_out"),
        ("n_synch_action", "decay_params_action"),
    ):
        if (s := shape(key)) and len(s) == 1:
            checks.append((field, kwargs[field], _dense_or_paired(select, s[0]), key))
    if (s := shape("kv_proj.0.weight")) and len(s) == 2:
        checks.append(("d_input", kwargs["d_input"], s[0], "kv_proj.0.weight"))
    if "synapses.1.weight" in state_dict:
        checks.append(("synapse_depth", kwargs["synapse_depth"], 1, "synapses.1.weight"))
    elif downs := {
        k.split(".")[2] for k in state_dict if k.startswith("synapses.down_projections.")
    }:
        checks.append(
            ("synapse_depth", kwargs["synapse_depth"], len(downs) + 1, "synapses.down_projections")
        )
    if kwargs["deep_nlms"] and (s := shape("trace_processor.0.0.w1")) and len(s) == 3:
        checks.append(
            (
                "memory_hidden_dims",
                kwargs["memory_hidden_dims"],
                s[1] // 2,
                "trace_processor.0.0.w1",
            )
        )
    if (s := shape("output_projector.0.weight")) and len(s) == 2:
        for field, (value, per) in task_fields.items():
            checks.append(
                (
                    field,
                    value,
                    s[0] // per if s[0] % per == 0 else None,
                    "output_projector.0.weight",
                )
            )
    bad = [
        f"args.{field}: expected {expected} (from {key} {shape(key) or ''}), received {received!r}"
        for field, received, expected, key in checks
        if expected is None or received != expected
    ]
    if bad:
        raise _fail(path, "args do not fit the state dict: " + "; ".join(bad))


def _maze_size(args: Mapping[str, Any], route: int, path: Any) -> str:
    from ctm_jax.tasks.maze_data import PRESETS  # noqa: PLC0415

    named = str(args.get("dataset", "")).removeprefix("mazes-")
    if named in PRESETS and PRESETS[named][1] == route:
        return named
    matches = [size for size, (_, r) in PRESETS.items() if r == route]
    if not matches:
        routes = sorted({r for _, r in PRESETS.values()})
        raise _fail(
            path, f"args.maze_route_length={route} is not a route length of any maze size {routes}"
        )
    print(
        f"note: {args.get('dataset')!r} mazes have no route length {route} here; "
        f"using task.size={matches[0]!r} ({PRESETS[matches[0]][0]}x{PRESETS[matches[0]][0]})"
    )
    return matches[0]


def reference_training_config(
    args: Mapping[str, Any], path: Any = "<checkpoint>", step: int = 0
) -> tuple[Any, dict[str, tuple[int, int]]]:
    """(full training ConfigDict from configs/ctm_maze.py or ctm_parity.py, task fields for
    `check_args_fit_state_dict`) from the saved args; `step` is the step the run will be at."""
    task = reference_task(args, path)
    kwargs = reference_model_kwargs(args, path)
    if task == "maze":
        from configs import ctm_maze  # noqa: PLC0415

        config = ctm_maze.get_config()
        route = args.get("maze_route_length")
        route = int(route) if route is not None else int(args.get("out_dims", 0)) // 5
        task_fields = {"maze_route_length": (route, 5)}
        config.task.size = _maze_size(args, route, path)
        # Checkpoints from before the flag existed were trained on [0, 1] inputs.
        config.task.expand_range = bool(args.get("expand_range", False))
        config.task.lookahead = int(args.get("cirriculum_lookahead", config.task.lookahead))
        clip = float(args.get("gradient_clipping", -1))
        config.optim.update(
            clip="none" if clip == -1 else "global_norm",
            max_grad_norm=config.optim.max_grad_norm if clip == -1 else clip,
        )
    else:
        from configs import ctm_parity  # noqa: PLC0415

        config = ctm_parity.get_config()
        length = int(args["parity_sequence_length"])
        task_fields = {"parity_sequence_length": (length, 2)}
        config.task.seq_len = length
        clip = float(args.get("gradient_clipping", -1))
        config.optim.update(
            clip="none" if clip == -1 else "quantile",
            clip_quantile=config.optim.clip_quantile if clip == -1 else clip,
        )
    for name, value in kwargs.items():
        config.model[name] = value
    total = max(int(args.get("training_iterations", config.train.total_steps)), step + 1)
    config.train.total_steps = total
    config.train.batch_size = int(args.get("batch_size", config.train.batch_size))
    config.optim.lr = float(args.get("lr", config.optim.lr))
    config.optim.weight_decay = float(args.get("weight_decay", config.optim.weight_decay))
    config.optim.warmup_steps = min(
        int(args.get("warmup_steps", config.optim.warmup_steps)), total - 1
    )
    if not args.get("use_scheduler", True):
        config.optim.schedule = "constant"
    elif args.get("scheduler_type", "cosine") != "cosine":
        print(f"note: scheduler_type={args['scheduler_type']!r} has no equivalent; using cosine")
    return config, task_fields


def import_torch_checkpoint(
    checkpoint_path: str | Path, out: str | Path, backend: str = "auto"
) -> dict[str, Any]:
    """Reference CTM `.pt` -> `out/config.json` + an Orbax checkpoint in `out/checkpoints/`.

    The train state holds the imported params (raw, as saved) and buffers, a fresh optimiser
    state, the base dropout key of train.seed, and step = the checkpoint's `iteration` (0 when it
    has none), so schedules and plots carry the reference's training progress. The data iterator
    is saved at its start. Returns a summary dict. Raises TorchCheckpointError, ConfigError or
    StateDictMismatchError with a one-line reason.
    """
    path = Path(checkpoint_path)
    return import_checkpoint_dict(load_torch_checkpoint(path, backend), out, path)


def import_checkpoint_dict(
    checkpoint: Mapping[str, Any], out: str | Path, path: Any = "<checkpoint>"
) -> dict[str, Any]:
    """`import_torch_checkpoint` for an already loaded checkpoint dict (`path` names it)."""
    from train_lib import checkpointing, trainer  # noqa: PLC0415

    out = Path(out)
    state_dict, args, iteration = ctm_checkpoint_parts(checkpoint, path)
    step = iteration or 0
    config, task_fields = reference_training_config(args, path, step)
    check_args_fit_state_dict(reference_model_kwargs(args, path), task_fields, state_dict, path)
    if (out / trainer.CONFIG_FILE).exists() or (out / trainer.CHECKPOINT_DIR).exists():
        raise _fail(out, "already holds a workdir (config.json or checkpoints/); pick a new --out")
    exp = trainer.build_experiment(config)
    try:
        variables = import_state_dict(exp.task.model_config, state_dict)
    except StateDictMismatchError as e:
        raise _fail(path, " ".join(str(e).split())) from None
    params = variables.pop("params")
    _, dropout_rng = jax.random.split(jax.random.key(int(config.train.seed)))
    state = trainer.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        buffers=variables,
        opt_state=exp.tx.init(params),
        rng=dropout_rng,
    )
    with jax.set_mesh(exp.mesh):
        state = jax.device_put(state, exp.state_shardings)
    out.mkdir(parents=True, exist_ok=True)
    train_iter = iter(exp.dataset("train").to_iter_dataset(trainer._read_options(config.train)))
    meta = {
        "config": exp.config_json,
        "step": step,
        "eval": {},
        "finished": step >= exp.total_steps,
        "imported_from": str(path),
    }
    with checkpointing.Checkpointer(
        out / trainer.CHECKPOINT_DIR, save_every=1, keep=1_000_000, async_save=False
    ) as ckpt:
        ckpt.save(step, state, train_iter, meta, force=True)
    (out / trainer.CONFIG_FILE).write_text(json.dumps(exp.config_json, indent=2) + "\n")
    return {
        "task": config.task.name,
        "step": step,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "workdir": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ctm_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-oracle", help="compare against reference oracle .npz files")
    check.add_argument("files", nargs="+")
    imp = sub.add_parser(
        "import-torch", help="reference CTM .pt checkpoint -> workdir for launch/* tools"
    )
    imp.add_argument("--checkpoint", required=True, help="reference .pt file")
    imp.add_argument("--out", required=True, help="new workdir (config.json + checkpoints/)")
    imp.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "numpy"),
        help="torch.load(weights_only=True) or the torch-free reader (auto: torch if installed)",
    )
    args = parser.parse_args(argv)
    if args.command == "import-torch":
        try:
            summary = import_torch_checkpoint(args.checkpoint, args.out, args.backend)
        except (TorchCheckpointError, ConfigError, CTMConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(
            f"imported {args.checkpoint} ({summary['task']}, {summary['params']:,} parameters) "
            f"-> {summary['workdir']} at step {summary['step']}"
        )
        return 0
    if args.command == "check-oracle":
        results = [check_oracle(f) for f in args.files]
        print(f"{sum(results)}/{len(results)} oracle files match (rtol {RTOL:g}, atol {ATOL:g})")
        return 0 if all(results) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
