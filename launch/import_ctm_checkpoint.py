"""Reference CTM checkpoint -> a training workdir.

    python -m launch.import_ctm_checkpoint --checkpoint FILE.pt --out DIR [--data_dir TFDS_DIR]
    python -m ctm_jax.convert import-torch --checkpoint FILE.pt --out DIR      # the same command

reads a reference maze, parity or image-classification checkpoint (state dict + saved args; with
torch's `torch.load(weights_only=True)` when torch is installed, else a torch-free restricted
reader), or a Hugging Face export (a directory with model.safetensors + config.json), and writes
DIR/config.json (a full training config from configs/ctm_maze.py, ctm_parity.py or ctm_image.py,
the model section and optimiser settings taken from the saved args) and an Orbax checkpoint at
step = the file's `iteration` (0 without one) with a fresh optimiser state. `launch.eval`,
`launch.adaptive`, `launch.visualise` read the workdir, and `launch.train` continues it.

Image classification (the released ImageNet model `ctm_imagenet_D=4096_T=50_M=25.pt`): the
config is configs/ctm_image.py's preset for the saved `args.dataset` (imagenet -> imagenet2012,
cifar10, cifar100), so the dataset must be readable where `--data_dir` says (tfds's default
without it; the task checks this before anything is written). The evaluation geometry is the
preset's `task.eval_transform='center_crop'` (resize 256, centre crop 224: the reference's
validation transform during training); `launch.eval --eval_transform=resize` evaluates the
uncropped images of the paper's analysis instead.
A bad file, args that contradict the weights or an existing --out end with one `error:` line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from configs import ctm_image, ctm_maze, ctm_parity
from core.errors import CheckpointMismatchError, ConfigError, DataError, Error
from ctm_jax.convert import import_state_dict
from ctm_jax.reference_checkpoint import (
    check_args_fit_state_dict,
    ctm_checkpoint_parts,
    image_dataset,
    load_reference_checkpoint,
    reference_model_kwargs,
    reference_task,
)
from launch import cli
from tasks.ctm_maze.data import PRESETS
from train_lib import trainer

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Reference CTM .pt file, or a Hugging Face export (directory with model.safetensors + "
    "config.json).",
)
_OUT = flags.DEFINE_string("out", None, "New workdir (config.json + checkpoints/).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Image checkpoints: the tfds data dir holding the dataset (task.data_dir; default: tfds's).",
)
_BACKEND = flags.DEFINE_enum(
    "backend",
    "auto",
    ["auto", "torch", "numpy"],
    "torch.load(weights_only=True) or the torch-free reader (auto: torch if installed).",
)


def _maze_size(args: Mapping[str, Any], route: int, path: Any) -> str:
    """The maze size preset whose route length is `route` (the saved dataset name first)."""
    named = str(args.get("dataset", "")).removeprefix("mazes-")
    if named in PRESETS and PRESETS[named][1] == route:
        return named
    matches = [size for size, (_, r) in PRESETS.items() if r == route]
    if not matches:
        routes = sorted({r for _, r in PRESETS.values()})
        raise DataError(
            f"{path}: "
            f"args.maze_route_length={route} is not a route length of any maze size {routes}"
        )
    logging.warning(
        "%r mazes have no route length %d here; using task.size=%r (%dx%d)",
        args.get("dataset"),
        route,
        matches[0],
        PRESETS[matches[0]][0],
        PRESETS[matches[0]][0],
    )
    return matches[0]


def _image_config(args: Mapping[str, Any], path: Any) -> tuple[Any, dict[str, tuple[int, int]]]:
    """configs/ctm_image.py's preset for the saved dataset, with the image-specific settings of
    the args (the model section and the shared optimiser fields are set by the caller)."""
    name, _, out_dims = image_dataset(args, path)
    config = ctm_image.get_config(str(args["dataset"]))  # presets imagenet, cifar10, cifar100
    config.task.dataset = name
    # The reference's image scripts clip the global gradient norm (-1: no clipping).
    clip = float(args.get("gradient_clipping", -1))
    config.optim.update(
        clip="none" if clip == -1 else "global_norm",
        max_grad_norm=config.optim.max_grad_norm if clip == -1 else clip,
    )
    # Mixed precision: the reference's fp16 autocast (and its AdamW eps) -> bfloat16 here.
    amp = bool(args.get("use_amp", False))
    config.model.dtype = "bfloat16" if amp else "float32"
    config.optim.eps = 1e-6 if amp else 1e-8
    # The ImageNet run's batch_size is per process under torchrun, and the process count is not
    # saved: keep the preset's global batch (64 x 8 GPUs). The CIFAR runs use one process.
    if name != "imagenet2012":
        config.train.batch_size = int(args.get("batch_size", config.train.batch_size))
    return config, {"out_dims": (out_dims, 1)}


def reference_training_config(
    args: Mapping[str, Any], path: Any = "<checkpoint>", step: int = 0
) -> tuple[Any, dict[str, tuple[int, int]]]:
    """(full training ConfigDict from configs/ctm_maze.py, ctm_parity.py or ctm_image.py, task
    fields for `check_args_fit_state_dict`) from the saved args; `step` is the step the run will
    be at."""
    task = reference_task(args, path)
    kwargs = reference_model_kwargs(args, path)
    if task == "image":
        config, task_fields = _image_config(args, path)
    elif task == "maze":
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
    if task != "image":  # image: see _image_config
        config.train.batch_size = int(args.get("batch_size", config.train.batch_size))
    config.optim.lr = float(args.get("lr", config.optim.lr))
    config.optim.weight_decay = float(args.get("weight_decay", config.optim.weight_decay))
    config.optim.warmup_steps = min(
        int(args.get("warmup_steps", config.optim.warmup_steps)), total - 1
    )
    if not args.get("use_scheduler", True):
        config.optim.schedule = "constant"
    elif args.get("scheduler_type", "cosine") != "cosine":
        logging.warning("scheduler_type=%r has no equivalent; using cosine", args["scheduler_type"])
    return config, task_fields


def import_torch_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path,
    backend: str = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Reference CTM `.pt` (or Hugging Face export) -> `out/config.json` + an Orbax checkpoint
    in `out/checkpoints/`.

    The train state holds the imported params (raw, as saved) and buffers; see
    `train_lib.trainer.write_workdir` for the rest. `overrides`: config fields set after the
    saved args ('section.field' -> value, e.g. {'task.data_dir': ...}). Returns a summary dict.
    Raises DataError (bad file, args contradicting the weights, an unreadable dataset),
    ConfigError (e.g. `out` already holds a run).
    """
    path = Path(checkpoint_path)
    return import_checkpoint_dict(load_reference_checkpoint(path, backend), out, path, overrides)


def import_checkpoint_dict(
    checkpoint: Mapping[str, Any],
    out: str | Path,
    path: Any = "<checkpoint>",
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`import_torch_checkpoint` for an already loaded checkpoint dict (`path` names it)."""
    state_dict, args, iteration = ctm_checkpoint_parts(checkpoint, path)
    step = iteration or 0
    try:
        config, task_fields = reference_training_config(args, path, step)
    except (TypeError, ValueError, KeyError) as e:
        if isinstance(e, Error):
            raise
        raise DataError(
            f"{path}: the saved args cannot be read ({type(e).__name__}: {e})"
        ) from None
    # Before the overrides, so that a contradiction is always the file's, not the caller's.
    check_args_fit_state_dict(reference_model_kwargs(args, path), task_fields, state_dict, path)
    for field, value in (overrides or {}).items():
        section, _, name = field.partition(".")
        if section not in config or name not in config[section]:
            raise ConfigError(f"override {field}={value!r} is invalid: the config has no {field}")
        config[section][name] = value
    try:
        exp = trainer.build_experiment(config)
    except ConfigError as e:
        raise DataError(f"{path}: its saved args make an impossible config: {e}") from None
    # A dataset the task cannot read (e.g. ImageNet not prepared in task.data_dir) surfaces
    # here as the task's own one-line DataError.
    try:
        variables = import_state_dict(exp.task.model_config, state_dict)
    except CheckpointMismatchError as e:
        raise DataError(f"{path}: " + " ".join(str(e).split())) from None
    trainer.write_workdir(exp, out, variables, step, imported_from=str(path))
    return {
        "task": config.task.name,
        "step": step,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(variables["params"]))),
        "workdir": str(out),
    }


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        overrides = {"task.data_dir": _DATA_DIR.value} if _DATA_DIR.value else {}
        summary = import_torch_checkpoint(_CHECKPOINT.value, _OUT.value, _BACKEND.value, overrides)
    print(
        f"imported {_CHECKPOINT.value} ({summary['task']}, {summary['params']:,} parameters) "
        f"-> {summary['workdir']} at step {summary['step']}"
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "out"])
    cli.run(main)
