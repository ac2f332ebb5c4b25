"""The parts of a reference CTM `.pt` training checkpoint: state dict, saved args, iteration.

The reference saves `{'model_state_dict', 'args' (its argparse.Namespace), 'iteration', ...}`;
`ctm_jax.torch_checkpoint` reads the file (with or without torch). This module turns the loaded
dict into the state dict and the CTM constructor kwargs, recognises the task it was trained on,
and checks the args against the weights' shapes, naming every field they contradict. Turning it
into a training workdir is `python -m launch.import_ctm_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from core.errors import DataError

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


def _fail(path: Any, reason: str) -> DataError:
    return DataError(f"{path}: {reason}")


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
