"""The parts of a reference CTM checkpoint: state dict, saved args, iteration.

The reference saves `{'model_state_dict', 'args' (its argparse.Namespace), 'iteration', ...}`;
`ctm_jax.torch_checkpoint` reads the file (with or without torch). Its Hugging Face exports are a
directory with `model.safetensors` (the state dict) and `config.json` (the constructor kwargs),
which `load_reference_checkpoint` turns into the same dict, the task told from the output shape.
This module turns the loaded dict into the state dict and the CTM constructor kwargs, recognises
the task it was trained on (maze, parity, image classification), and checks the args against the
weights' shapes, naming every field they contradict. Turning it into a training workdir is
`python -m launch.import_ctm_checkpoint`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DataError
from ctm_jax.backbones import RESNET_LAYOUTS, parse_resnet
from ctm_jax.torch_checkpoint import load_safetensors, load_torch_checkpoint

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


# The reference image-classification `--dataset` names -> (tfds name, classes).
IMAGE_DATASETS: dict[str, tuple[str, int]] = {
    "imagenet": ("imagenet2012", 1000),
    "cifar10": ("cifar10", 10),
    "cifar100": ("cifar100", 100),
}
# torchvision block keys: backbone.layer<hyper-block>.<block>.<module>...
_RESNET_BLOCK = re.compile(r"^backbone\.layer(\d+)\.(\d+)\.([^.]+)\.")
# A Hugging Face export's files (huggingface_hub's PyTorchModelHubMixin layout).
HF_WEIGHTS, HF_CONFIG = "model.safetensors", "config.json"


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
    """'maze', 'parity' or 'image' from the saved args; other tasks are refused by name."""
    model = args.get("model", args.get("model_type", "ctm"))
    if model != "ctm":
        raise _fail(path, f"args.model={model!r}: only CTM checkpoints can be imported")
    dataset = str(args.get("dataset", ""))
    if "maze_route_length" in args or dataset.startswith("mazes"):
        return "maze"
    if "parity_sequence_length" in args or dataset == "parity":
        return "parity"
    if dataset in IMAGE_DATASETS:
        return "image"
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
        f"task {task!r} is not supported: only maze, parity and image classification "
        f"({', '.join(IMAGE_DATASETS)}) CTM checkpoints can be imported",
    )


def image_dataset(args: Mapping[str, Any], path: Any = "<checkpoint>") -> tuple[str, int, int]:
    """(tfds name, classes, out_dims) of an image-classification checkpoint's saved args.

    The reference sets `args.out_dims` to the dataset's class count before saving; older args
    without it mean that count."""
    name, classes = IMAGE_DATASETS[str(args["dataset"])]
    out_dims = args.get("out_dims", classes)
    if out_dims != classes:
        raise _fail(
            path,
            f"args.out_dims={out_dims!r} does not fit args.dataset={args['dataset']!r} "
            f"({classes} classes)",
        )
    return name, classes, int(out_dims)


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


def resnet_candidates(state_dict: Mapping[str, np.ndarray]) -> tuple[list[str], str] | None:
    """The ResNet backbone names whose weights have the state dict's `backbone.layer*` layout
    (several when truncation hides the difference, e.g. resnet50-2 / resnet101-2), and that
    layout in words; None when the state dict holds no ResNet trunk."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state_dict:
        match = _RESNET_BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            bottleneck |= match.group(3) == "conv3"
    if not blocks:
        return None
    counts = tuple(len(blocks.get(layer, ())) for layer in range(1, max(blocks) + 1))
    kind = "bottleneck" if bottleneck else "basic"
    names = [
        f"resnet{depth}-{len(counts)}"
        for depth, (block, layout) in RESNET_LAYOUTS.items()
        if block == kind and layout[: len(counts)] == counts
    ]
    return names, f"{kind} blocks {counts}"


def _self_pairs(state_dict: Mapping[str, np.ndarray], which: str) -> int | None:
    """How many leading index pairs of a random-pairing synchronisation are self pairs (i, i)."""
    left = state_dict.get(f"{which}_neuron_indices_left")
    right = state_dict.get(f"{which}_neuron_indices_right")
    if left is None or right is None or np.shape(left) != np.shape(right) or np.ndim(left) != 1:
        return None
    differ = np.flatnonzero(np.asarray(left) != np.asarray(right))
    return int(differ[0]) if differ.size else int(np.size(left))


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
    backbone = str(kwargs["backbone_type"])
    resnets = resnet_candidates(state_dict)
    if resnets is not None and backbone not in resnets[0]:
        expected = " or ".join(resnets[0]) if resnets[0] else "no known ResNet"
        checks.append(("backbone_type", backbone, expected, f"backbone.layer* ({resnets[1]})"))
    elif resnets is None and parse_resnet(backbone) is not None:
        checks.append(("backbone_type", backbone, "no ResNet", "backbone.layer* (none)"))
    if select == "random-pairing" and int(kwargs.get("n_random_pairing_self") or 0) > 0:
        # The reference copies the first k left indices into the right ones, so at least k
        # leading pairs are self pairs (more only by chance).
        for which in ("out", "action"):
            pairs = _self_pairs(state_dict, which)
            if pairs is not None and pairs < int(kwargs["n_random_pairing_self"]):
                checks.append(
                    (
                        "n_random_pairing_self",
                        kwargs["n_random_pairing_self"],
                        f"<= {pairs}",
                        f"{which}_neuron_indices_left/right",
                    )
                )
                break
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
    evidence = lambda key: f"{key} {shape(key)}" if shape(key) else key
    bad = [
        f"args.{field}: expected {expected} (from {evidence(key)}), received {received!r}"
        for field, received, expected, key in checks
        if expected is None or received != expected
    ]
    if bad:
        raise _fail(path, "args do not fit the state dict: " + "; ".join(bad))


def args_from_hf_config(config: Mapping[str, Any], path: Any = "<checkpoint>") -> dict[str, Any]:
    """Saved-args stand-in for a Hugging Face export's `config.json` (the constructor kwargs).

    The export names no task, so it is told from the outputs: a (route, 5) reshaper is a maze,
    a parity backbone with (length, 2) is parity, and 1000 / 10 / 100 classes of an image
    backbone are ImageNet / CIFAR-10 / CIFAR-100.
    """
    args = dict(config)
    reshaper = list(args.get("prediction_reshaper") or [-1])
    out_dims = args.get("out_dims")
    backbone = str(args.get("backbone_type", ""))
    if len(reshaper) == 2 and reshaper[1] == 5 and "dataset" not in args:
        args["maze_route_length"] = int(reshaper[0])
    elif backbone == "parity_backbone" and len(reshaper) == 2 and reshaper[1] == 2:
        args["parity_sequence_length"] = int(reshaper[0])
    elif "dataset" not in args:
        by_classes = {classes: name for name, (_, classes) in IMAGE_DATASETS.items()}
        if out_dims not in by_classes or backbone in ("none", "parity_backbone"):
            raise _fail(
                path,
                f"cannot tell the task from {HF_CONFIG} (out_dims={out_dims!r}, "
                f"prediction_reshaper={reshaper}, backbone_type={backbone!r}): expected a maze "
                "(route, 5) reshaper, a parity backbone, or 1000 / 10 / 100 image classes",
            )
        args["dataset"] = by_classes[out_dims]
    return args


def _hf_files(path: Path) -> tuple[Path, Path] | None:
    """(weights, config) of a Hugging Face export given as its directory or its weights file."""
    if path.is_dir():
        return path / HF_WEIGHTS, path / HF_CONFIG
    if path.suffix == ".safetensors":
        return path, path.with_name(HF_CONFIG)
    return None


def load_reference_checkpoint(path: str | Path, backend: str = "auto") -> dict[str, Any]:
    """A reference checkpoint as `{'model_state_dict', 'args', ...}`, from a `.pt` file
    (`ctm_jax.torch_checkpoint.load_torch_checkpoint`, `backend` as there) or a Hugging Face
    export (a directory holding model.safetensors + config.json, or the .safetensors file with
    config.json beside it; no torch needed). Raises DataError."""
    path = Path(path)
    files = _hf_files(path)
    if files is None:
        return load_torch_checkpoint(path, backend)
    weights, config_path = files
    for file in files:
        if not file.is_file():
            raise _fail(
                path,
                f"no {file.name} in {file.parent}: a Hugging Face export needs "
                f"{HF_WEIGHTS} and {HF_CONFIG}",
            )
    try:
        config = json.loads(config_path.read_text())
        assert isinstance(config, dict), f"expected a JSON object, got {type(config).__name__}"
    except (UnicodeDecodeError, json.JSONDecodeError, AssertionError) as e:
        raise _fail(config_path, f"not a model config ({e})") from None
    state_dict = load_safetensors(weights)
    return {"model_state_dict": state_dict, "args": args_from_hf_config(config, config_path)}
