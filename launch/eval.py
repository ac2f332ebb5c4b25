"""Evaluation of a trained (or imported) CTM run; what it measures depends on the run's task.

    python -m launch.eval --workdir runs/maze_cpu [--sizes 15,19,39] [--ticks 16,32]
    python -m launch.eval --workdir runs/imagenet_ref --split validation [--eval_transform resize]

Image classification (`tasks.ctm_image`): per-tick top-1 / top-5 of the read-outs of
`ctm_jax.readouts` (instant, most certain so far, mean probability, certainty-weighted logits),
the calibration error per tick and certainty-threshold exits (0.5 / 0.8 / 0.9), over the tfds
split `--split` (any tfds split string, e.g. `validation[:1000]`; default: the dataset's held-out
split), via `tasks.ctm_image.task.evaluate_per_tick`. Images get the run's evaluation transform
(`task.eval_transform`, overridable: `center_crop` resizes the shorter side to `eval_resize` and
crops `image_size`; `resize` keeps the whole image, as the CTM paper's ImageNet analysis does, so
images of equal size are batched together, one compilation per size). BatchNorm uses the
checkpoint's running statistics unless `--reestimate_bn` re-estimates them on training batches
first, as training evaluations do. Prints one row per tick, the exits, then one JSON line.

Mazes: restores the latest checkpoint of the maze run in `--workdir`, generates `--num_mazes`
held-out mazes (the eval stream of the run's task seed) per image side in `--sizes` and evaluates
them with each tick count in `--ticks` (default: the trained count and twice it). Rows (size,
ticks): solve_rate with re-application from the last reached cell (at most
`--max_reapplications` applications, `tasks.ctm_maze.generalise`), solve_rate_single (one
application: the plain metric), step_accuracy against the route's first route_length actions,
mean applications and mean route steps walked. The last line is one JSON object with all rows.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from core.errors import ConfigError, DataError
from ctm_jax import readouts
from ctm_jax.model import CTM
from launch import cli
from launch.cli import format_table
from launch.runs import load_run
from tasks.ctm_image import data as image_data
from tasks.ctm_image.task import ImageTask, evaluate_per_tick
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.generalise import ctm_predictor, held_out_mazes, reapply_solve, with_ticks
from tasks.ctm_maze.task import MazeTask

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a maze or image training run.")
_SIZES = flags.DEFINE_list(
    "sizes", None, "Maze image sides (odd, >= 5); default: the trained side and up to 3 larger."
)
_TICKS = flags.DEFINE_list(
    "ticks",
    None,
    "Tick counts; default: the trained count and twice it (image runs: one count, default the "
    "trained one).",
)
_NUM_MAZES = flags.DEFINE_integer("num_mazes", 256, "Held-out mazes per size.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Mazes or images per model call (default: the run's train.batch_size)."
)
_MAX_REAPPLICATIONS = flags.DEFINE_integer(
    "max_reapplications", 20, "Most model applications per maze (1: no re-application)."
)
_JSON = flags.DEFINE_bool("json", False, "Print only the JSON summary.")
# Image classification only.
_SPLIT = flags.DEFINE_string(
    "split", None, "Image runs: tfds split, e.g. validation (default: the held-out split)."
)
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Image runs: the split's first N examples (default: all)."
)
_EVAL_TRANSFORM = flags.DEFINE_enum(
    "eval_transform",
    None,
    list(image_data.EVAL_TRANSFORMS),
    "Image runs: evaluation geometry (default: the run's task.eval_transform); resize = uncropped.",
)
_EVAL_RESIZE = flags.DEFINE_integer(
    "eval_resize", None, "Image runs: shorter side after resizing (default: task.eval_resize)."
)
_REESTIMATE_BN = flags.DEFINE_bool(
    "reestimate_bn",
    False,
    "Image runs: re-estimate BatchNorm statistics on task.bn_reestimate_batches training batches "
    "first (default: the checkpoint's statistics).",
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Image runs: compute dtype (default: the run's model.dtype).",
)
flags.mark_flags_as_required(["workdir"])

MAZE_FLAGS = ("sizes", "num_mazes", "max_reapplications")
IMAGE_FLAGS = ("split", "num_examples", "eval_transform", "eval_resize", "reestimate_bn", "dtype")


def default_sizes(trained_side: int) -> list[int]:
    """The trained side and up to three larger preset sides."""
    larger = sorted({side for side, _ in maze_data.PRESETS.values() if side > trained_side})
    return [trained_side, *larger[:3]]


def parse_sizes(values: Sequence[str]) -> list[int]:
    sizes = []
    for value in values:
        try:
            side = int(value)
        except ValueError:
            side = -1
        if side < 5 or side % 2 == 0:
            raise ConfigError(f"--sizes={value!r} is invalid: sides must be odd integers >= 5")
        sizes.append(side)
    return sizes


def parse_ticks(values: Sequence[str]) -> list[int]:
    ticks = []
    for value in values:
        try:
            t = int(value)
        except ValueError:
            t = 0
        if t < 1:
            raise ConfigError(f"--ticks={value!r} is invalid: tick counts must be integers >= 1")
        ticks.append(t)
    return ticks


def evaluate(
    model: CTM,
    variables: Any,
    *,
    route_length: int,
    expand_range: bool,
    seed: int,
    sizes: Sequence[int],
    ticks: Sequence[int],
    num_mazes: int,
    batch_size: int,
    max_reapplications: int,
) -> list[dict[str, Any]]:
    """One row per (size, ticks) over `num_mazes` held-out mazes of each size."""
    rows = []
    for side in sizes:
        try:
            model.config.validate_input_shape((1, side, side, 3))
        except ValueError as e:  # the config's own error type
            raise ConfigError(f"--sizes={side} is invalid for this model: {e}") from None
        images, targets, lengths = held_out_mazes(side, route_length, seed, num_mazes)
        # Pad the last batch with the first mazes (one compiled shape); padding is dropped.
        padded = -(-num_mazes // batch_size) * batch_size
        index = np.arange(padded) % num_mazes
        for t in ticks:
            predict = ctm_predictor(with_ticks(model, t), variables, route_length, expand_range)
            found: dict[str, list[np.ndarray]] = {}
            for lo in range(0, padded, batch_size):
                take = index[lo : lo + batch_size]
                result = reapply_solve(predict, images[take], max_reapplications)
                keep = slice(0, min(batch_size, num_mazes - lo))
                for name, value in (
                    ("solved", result.solved),
                    ("solved_single", result.solved_single),
                    ("applications", result.applications),
                    ("steps", result.steps),
                    ("correct", np.asarray(result.first_actions) == targets[take]),
                ):
                    found.setdefault(name, []).append(np.asarray(value)[keep])
            cat = {k: np.concatenate(v) for k, v in found.items()}
            rows.append(
                {
                    "size": side,
                    "ticks": t,
                    "solve_rate": float(cat["solved"].mean()),
                    "solve_rate_single": float(cat["solved_single"].mean()),
                    "step_accuracy": float(cat["correct"].mean()),
                    "mean_applications": float(cat["applications"].mean()),
                    "mean_steps": float(cat["steps"].mean()),
                    "mean_route_length": float(lengths.mean()),
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------
# Image classification


def image_records(task: ImageTask, split: str | None) -> Any:
    """Random-access records {'image', 'label'} of a split of the run's dataset; None: the
    dataset's held-out split. A split tfds does not know is a one-line ConfigError."""
    spec = task.spec
    if spec.tfds_name is None:  # digits: the fixed train / held-out halves
        return image_data.DigitsSource("train" if split == "train" else spec.eval_split)
    name = split or spec.eval_split
    task_cfg = task.config.task
    data_dir = task_cfg.get("data_dir") or None
    try:
        return image_data.tfds_source(task.dataset_name, name, data_dir, bool(task_cfg.download))
    except (ValueError, KeyError) as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"--split={name!r} is invalid for {spec.tfds_name}: {detail}") from None


def image_batches(
    records: Any,
    transform: image_data.ImageTransform,
    *,
    batch_size: int,
    num_examples: int | None = None,
    threads: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """Every record (or the first `num_examples`) transformed, in batches of equal image size:
    one batch per `batch_size` images of a size, then each size's remainder as a smaller batch.
    With a fixed-size transform this is the split in order; uncropped images (`resize`) are
    grouped by size, so nothing is padded or dropped."""
    total = len(records) if num_examples is None else min(num_examples, len(records))
    ds = grain.MapDataset.source(records)[:total].map(lambda r: transform(r, None))
    stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64))
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    stack = lambda items: {k: np.stack([x[k] for x in items]) for k in ("inputs", "targets")}
    for example in stream:
        group = pending.setdefault(tuple(example["inputs"].shape), [])
        group.append(example)
        if len(group) == batch_size:
            yield stack(group)
            group.clear()
    for group in pending.values():
        if group:
            yield stack(group)


def _logged(batches: Iterable[Mapping[str, Any]], total: int) -> Iterator[Mapping[str, Any]]:
    """Passes the batches through, logging progress about every 30 seconds."""
    start = last = time.monotonic()
    done = 0
    for batch in batches:
        yield batch
        done += len(batch["targets"])
        now = time.monotonic()
        if now - last > 30:
            last = now
            rate = done / (now - start)
            logging.info("%d / %d images (%.1f / s)", done, total, rate)


def evaluate_image_run(
    task: ImageTask,
    model: CTM,
    variables: Mapping[str, Any],
    *,
    split: str | None = None,
    num_examples: int | None = None,
    batch_size: int,
    eval_transform: str | None = None,
    eval_resize: int | None = None,
    ticks: int | None = None,
    dtype: str | None = None,
    reestimate_bn: bool = False,
) -> dict[str, Any]:
    """`evaluate_per_tick` of the run's model over a split; returns its table plus the settings
    used ('split', 'eval_transform', 'eval_resize', 'image_size', 'ticks', 'dtype', 'bn')."""
    if num_examples is not None and num_examples < 1:
        raise ConfigError(f"--num_examples={num_examples} is invalid: must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"--batch_size={batch_size} is invalid: must be >= 1")
    if eval_resize is not None and eval_resize < 1:
        raise ConfigError(f"--eval_resize={eval_resize} is invalid: must be >= 1")
    transform = task.transform("eval")
    transform = dataclasses.replace(
        transform,
        eval_transform=eval_transform or transform.eval_transform,
        eval_resize=eval_resize or transform.eval_resize,
    )
    if transform.eval_transform == "center_crop" and transform.eval_resize < transform.image_size:
        raise ConfigError(
            f"--eval_resize={transform.eval_resize} is invalid: center_crop crops "
            f"task.image_size={transform.image_size} from it, so it must be >= that"
        )
    cfg = model.config
    if ticks is not None:
        if ticks < 1:
            raise ConfigError(f"--ticks={ticks} is invalid: tick counts must be integers >= 1")
        cfg = dataclasses.replace(cfg, iterations=ticks)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if reestimate_bn:  # as training evaluations do, with the run's own model
        variables = task.eval_variables(model, variables, batch_size)
    records = image_records(task, split)
    total = len(records) if num_examples is None else min(num_examples, len(records))
    if total == 0:
        raise DataError(f"split {split or task.spec.eval_split!r} of {task.dataset_name} is empty")
    batches = image_batches(records, transform, batch_size=batch_size, num_examples=total)
    table = evaluate_per_tick(task, CTM(cfg), variables, _logged(batches, total))
    return {
        **table,
        "split": split or task.spec.eval_split,
        "eval_transform": transform.eval_transform,
        "eval_resize": transform.eval_resize,
        "image_size": transform.image_size,
        "ticks": cfg.iterations,
        "dtype": cfg.dtype,
        "bn": "re-estimated" if reestimate_bn else "checkpoint",
    }


def tick_rows(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per tick (1-based): top-1 and top-5 of every read-out, and the ECE."""
    rows = []
    for t in range(len(table["ece"])):
        row: dict[str, Any] = {"tick": t + 1}
        for k in ("top1", "top5"):
            for readout in readouts.READOUTS:
                row[f"{k}_{readout}"] = float(table[k][readout][t])
        row["ece"] = float(table["ece"][t])
        rows.append(row)
    return rows


def exit_rows(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"certainty_threshold": float(thr), **{k: float(v) for k, v in values.items()}}
        for thr, values in sorted(table["exits"].items())
    ]


def _refuse_flags(names: Sequence[str], kind: str) -> None:
    given = [f"--{name}" for name in names if flags.FLAGS[name].present]
    if given:
        raise ConfigError(f"{', '.join(given)} is invalid here: {kind} runs do not use it")


def image_main(workdir: Path, exp: Any, variables: Any, step: int) -> None:
    """`launch.eval` on an image-classification run."""
    _refuse_flags(MAZE_FLAGS, "image classification")
    task, config = exp.task, exp.config
    if _TICKS.value is not None and len(_TICKS.value) != 1:
        raise ConfigError(f"--ticks={','.join(_TICKS.value)} is invalid: image runs take one")
    ticks = parse_ticks(_TICKS.value)[0] if _TICKS.value else None
    table = evaluate_image_run(
        task,
        exp.model,
        variables,
        split=_SPLIT.value,
        num_examples=_NUM_EXAMPLES.value,
        batch_size=_BATCH_SIZE.value or int(config.train.batch_size),
        eval_transform=_EVAL_TRANSFORM.value,
        eval_resize=_EVAL_RESIZE.value,
        ticks=ticks,
        dtype=_DTYPE.value,
        reestimate_bn=_REESTIMATE_BN.value,
    )
    summary = {"workdir": str(workdir), "step": step, "dataset": task.dataset_name, **table}
    summary["exits"] = {str(k): v for k, v in table["exits"].items()}
    if not _JSON.value:
        t = table["ticks"]
        geometry = {
            "center_crop": f"resize {table['eval_resize']}, crop {table['image_size']}",
            "resize": f"resize {table['eval_resize']}, uncropped",
        }.get(table["eval_transform"], f"{table['image_size']}x{table['image_size']}")
        print(
            f"{workdir} at step {step}: {task.dataset_name} {table['split']}, {table['n']} images "
            f"({table['eval_transform']}: {geometry}), {t} ticks, {table['dtype']}, "
            f"BatchNorm statistics: {table['bn']}"
        )
        print(format_table(tick_rows(table)))
        print(format_table(exit_rows(table)))
        last = {r: table["top1"][r][-1] for r in readouts.READOUTS}
        print(
            f"top-1 at tick {t}: "
            + ", ".join(f"{r} {v:.4f}" for r, v in last.items())
            + f"; top-5 most certain {table['top5']['most_certain'][-1]:.4f}"
        )
    print(json.dumps(summary))


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    with cli.one_line_errors():
        workdir = Path(_WORKDIR.value)
        exp, variables, step = load_run(
            workdir,
            (MazeTask, ImageTask),
            kind="maze run or an image classification",  # '... not a {kind} run'
            tool="launch.eval",
        )
        if isinstance(exp.task, ImageTask):
            image_main(workdir, exp, variables, step)
            return
        _refuse_flags(IMAGE_FLAGS, "maze")
        config, task = exp.config, exp.task
        model = task.build_model()
        trained_side, route_length = maze_data.PRESETS[task.size]
        trained_ticks = model.config.iterations
        sizes = parse_sizes(_SIZES.value) if _SIZES.value else default_sizes(trained_side)
        ticks = parse_ticks(_TICKS.value) if _TICKS.value else [trained_ticks, 2 * trained_ticks]
        if _NUM_MAZES.value < 1:
            raise ConfigError(f"--num_mazes={_NUM_MAZES.value} is invalid: must be >= 1")
        if _MAX_REAPPLICATIONS.value < 1:
            raise ConfigError(
                f"--max_reapplications={_MAX_REAPPLICATIONS.value} is invalid: must be >= 1"
            )
        batch_size = min(_BATCH_SIZE.value or int(config.train.batch_size), _NUM_MAZES.value)
        if batch_size < 1:
            raise ConfigError(f"--batch_size={batch_size} is invalid: must be >= 1")
        rows = evaluate(
            model,
            variables,
            route_length=route_length,
            expand_range=bool(config.task.expand_range),
            seed=int(config.task.seed),
            sizes=sizes,
            ticks=ticks,
            num_mazes=_NUM_MAZES.value,
            batch_size=batch_size,
            max_reapplications=_MAX_REAPPLICATIONS.value,
        )
    summary = {
        "workdir": str(workdir),
        "step": step,
        "trained_size": trained_side,
        "trained_ticks": trained_ticks,
        "route_length": route_length,
        "num_mazes": _NUM_MAZES.value,
        "max_reapplications": _MAX_REAPPLICATIONS.value,
        "rows": rows,
    }
    if not _JSON.value:
        trained = [r for r in rows if r["size"] == trained_side and r["ticks"] == trained_ticks]
        print(
            f"{workdir} at step {step}: trained on {trained_side}x{trained_side} mazes, route "
            f"{route_length}, {trained_ticks} ticks; {_NUM_MAZES.value} held-out mazes per size, "
            f"at most {_MAX_REAPPLICATIONS.value} applications"
        )
        print(format_table(rows))
        if trained:
            print(f"step accuracy at the trained size and ticks: {trained[0]['step_accuracy']:.4f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
