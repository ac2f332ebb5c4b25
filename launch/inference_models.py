"""The models a scale_inference config names, as `Sampler`s (one per compute setting).

ctm_maze         a trained maze workdir (`model.workdir`) at every T of `model.ticks` with
                 fixed ticks, and at every certainty-exit threshold of
                 `model.exit_thresholds`; `model.stream_workdirs` adds P-stream CTMs
                 ('2:runs/maze_p2,4:runs/maze_p4') at the trained T
ctm_maze_random  the same from a randomly initialised `configs/ctm_maze.py:test` model (tests)
lm               an exported LM directory (`model.workdir`, launch.export_lm) at every P of
                 `model.streams` (one backbone with per-P stream sets)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from configs import ctm_maze as ctm_maze_config
from core.errors import ConfigError
from inference_scaling.engine import Sampler
from inference_scaling.samplers.ctm_maze import CTMMazeSampler
from inference_scaling.samplers.lm import LMSampler
from inference_scaling.tasks.base import VerifiableTask
from tasks.ctm_maze import data as maze_data
from train_lib import trainer

KINDS = ("ctm_maze", "ctm_maze_random", "lm")


def _ints(value: str, field: str) -> list[int]:
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{field}={value!r} is invalid: expected comma-separated integers"
        ) from None


def _floats(value: str, field: str) -> list[float]:
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{field}={value!r} is invalid: expected comma-separated numbers"
        ) from None


def _stream_workdirs(value: str) -> list[tuple[int, str]]:
    """'2:runs/maze_p2,4:runs/maze_p4' -> [(2, 'runs/maze_p2'), (4, 'runs/maze_p4')]."""
    out = []
    for part in (p.strip() for p in str(value).split(",") if p.strip()):
        p, sep, workdir = part.partition(":")
        if not sep or not p.isdigit() or not workdir:
            raise ConfigError(
                f"model.stream_workdirs={value!r} is invalid: expected 'P:workdir,...'"
            )
        out.append((int(p), workdir))
    return out


def _random_maze_model() -> tuple[Any, dict[str, Any], int, bool]:
    """(model, variables, route length, expand_range) of a fresh `ctm_maze.py:test` CTM."""
    config = ctm_maze_config.get_config("test")
    exp = trainer.build_experiment(config)
    state = exp.init(jax.random.key(int(config.train.seed)))
    _, route = maze_data.PRESETS[exp.task.size]
    variables = {"params": state.params, **state.buffers}
    return exp.model, variables, route, bool(config.task.expand_range)


def _maze_settings(model: ml_collections.ConfigDict, trained_ticks: int) -> list[dict[str, Any]]:
    ticks = _ints(model.ticks, "model.ticks") or [trained_ticks]
    settings = [dict(ticks=t) for t in ticks]
    for threshold in _floats(model.exit_thresholds, "model.exit_thresholds"):
        settings.append(dict(ticks=max(ticks), exit_threshold=threshold))
    return settings


def _diversity(model: ml_collections.ConfigDict, exit_threshold: Any = None) -> str:
    parts = []
    for part in str(model.diversity).split("+"):
        part = part.strip()
        if part == "temperature":
            part = f"temperature={float(model.temperature):g}"
        if part and part != "none":
            parts.append(part)
    if exit_threshold is None and model.tick:
        parts.append(f"tick={model.tick}")
    return "+".join(parts) or "none"


def _check_workdir(workdir: str, field: str = "model.workdir") -> None:
    if not workdir:
        raise ConfigError(f"{field} is missing: name a trained run's directory")
    if not Path(workdir).is_dir():
        raise ConfigError(f"{field}={workdir!r} is invalid: no such directory (train it first)")


def build(config: ml_collections.ConfigDict, task: VerifiableTask) -> list[Sampler]:
    """Every compute setting's sampler, in the order they are reported."""
    model = config.model
    kind = str(model.kind)
    if kind not in KINDS:
        raise ConfigError(f"model.kind={kind!r} is invalid: allowed: {', '.join(KINDS)}")
    if kind.startswith("ctm_maze") and task.name != "maze":
        raise ConfigError(
            f"model.kind={kind!r} is invalid for task={task.name!r}: a maze CTM answers mazes only"
        )
    if kind == "lm" and task.name != "arithmetic":
        raise ConfigError(
            f"model.kind='lm' is invalid for task={task.name!r}: the LMs are trained on arithmetic"
        )
    samplers: list[Sampler] = []
    if kind == "ctm_maze_random":
        net, variables, route, expand = _random_maze_model()
        for setting in _maze_settings(model, net.config.iterations):
            div = _diversity(model, setting.get("exit_threshold"))
            samplers.append(CTMMazeSampler(net, variables, route, expand, diversity=div, **setting))
        return samplers
    if kind == "ctm_maze":
        _check_workdir(model.workdir)
        base = CTMMazeSampler.from_workdir(model.workdir, diversity=_diversity(model))
        for setting in _maze_settings(model, base.ticks):
            div = _diversity(model, setting.get("exit_threshold"))
            samplers.append(CTMMazeSampler.from_workdir(model.workdir, diversity=div, **setting))
        for _, workdir in _stream_workdirs(model.stream_workdirs):
            _check_workdir(workdir, "model.stream_workdirs")
            samplers.append(CTMMazeSampler.from_workdir(workdir, diversity=_diversity(model)))
        return samplers
    _check_workdir(model.workdir)
    options = dict(
        temperature=float(model.temperature),
        top_k=int(model.top_k),
        top_p=float(model.top_p),
        max_new_tokens=int(model.max_new_tokens),
        prompt_fn=task.prompt,
    )
    for p in _ints(model.streams, "model.streams") or [1]:
        sampler = LMSampler.from_dir(model.workdir, parscale_n=p, **options)
        if p > 1:  # one backbone, per-P stream sets trained on it with the backbone frozen
            sampler.label = f"P={p},init=recycled"
        samplers.append(sampler)
    for p, directory in _stream_workdirs(model.stream_workdirs):
        _check_workdir(directory, "model.stream_workdirs")
        sampler = LMSampler.from_dir(directory, parscale_n=p, **options)
        sampler.label = f"P={p},init=scratch"
        samplers.append(sampler)
    return samplers
