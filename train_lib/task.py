"""The Task interface: what the trainer needs from a problem (data, model, loss, metrics).

A task knows nothing about devices, files or the loop; the trainer knows nothing about
equations. The config names the Task subclass to build, `config.task.name = 'package.module:Class'`
(e.g. 'tasks.ctm_maze.task:MazeTask'), so this module names no task of its own.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

from core.errors import ConfigError

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
    """One training problem.

    Construct it from the full config: the constructor validates every section it reads and
    raises `ConfigError` (one line naming the field) before anything is traced or compiled.

    Batches are dicts of arrays whose leading dimension is the batch; the trainer shards that
    dimension over the data-parallel mesh axes. Model variables are `{'params': ..., <other
    collections>}`; the non-param collections (e.g. CTM's neuron-index 'buffers') are carried in
    the train state and never touched by the optimiser. Collections the model itself updates
    while training (BatchNorm's 'batch_stats') are listed in `mutable_collections`; the train
    step keeps their new values.
    """

    # Names shown on the progress line, in order.
    progress_keys: tuple[str, ...] = ("loss",)
    # Variable collections the forward pass updates in training (e.g. ("batch_stats",)).
    mutable_collections: tuple[str, ...] = ()
    # Tokens per example for sequence models (the progress line then shows tokens/s); 0: none.
    tokens_per_example: int = 0

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config

    # -- data ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        """Batched, deterministic, random-access dataset for `split` ('train' or 'eval').

        `batch_size` is per process; element i of shard k must be the same whatever the run
        history, so that a restored grain iterator continues the exact stream.
        """

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch with the right shapes and dtypes, used to initialise the model."""
        return dict(self.dataset("eval", batch_size=batch_size)[0])

    # -- cost ---------------------------------------------------------------------------------
    def train_flops_per_example(self) -> float | None:
        """*Model* FLOPs of one training example, or None (the default: no MFU on the progress
        line).

        The convention of the MFU papers (PaLM appendix B): matmuls, einsums and convolutions
        only, 2 FLOPs per multiply-add, forward + backward = 3 x the forward; no
        rematerialisation, optimiser or elementwise work counted (`train_lib.mfu`).
        """
        return None

    # -- model --------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The Flax module (pure; no files, flags or devices)."""

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        return dict(model.init({"params": rng}, batch["inputs"]))

    def apply(
        self,
        model: nn.Module,
        variables: Mapping[str, Any],
        batch: Batch,
        *,
        train: bool,
        rng: jax.Array | None = None,
        mutable: Sequence[str] | bool = False,
    ) -> Any:
        """The model's outputs; `(outputs, updated collections)` when `mutable` names any."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        return model.apply(variables, batch["inputs"], train=train, rngs=rngs, mutable=mutable)

    def project_params(self, params: Any) -> Any:
        """Applied after every optimiser update (e.g. clamping constrained parameters)."""
        return params

    def trainable(self) -> Callable[[str], bool] | None:
        """Which params the optimiser may change: a predicate on param paths ('a/b/kernel'), or
        None (the default) when all of them train. Frozen params get no optimiser state, no
        update, and `project_params` never changes them."""
        return None

    def warm_start(
        self, variables: dict[str, Any], source: Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        """Starting variables of a run whose workdir has no checkpoint yet, or None to keep the
        fresh initialisation `variables` (host or device arrays, same structure).

        `source` holds the variables ({'params': ..., <collections>}) of the latest checkpoint of
        the workdir named by the top-level `init_from` config field, or None when it is unset.
        The optimiser state and step start fresh either way. The default accepts no source.
        """
        if source is not None:
            raise ConfigError(
                f"init_from is invalid: task {type(self).__name__} cannot start from another run"
            )
        return None

    # -- custom steps -------------------------------------------------------------------------
    def make_train_step(
        self,
        model: nn.Module,
        tx: Any,
        schedule: Callable[[Any], Any],
        microbatches: int = 1,
    ) -> Callable[[Any, Batch], tuple[Any, Metrics]] | None:
        """A task-specific train step `(TrainState, batch) -> (TrainState, scalar metrics)`, or
        None (the default: the trainer's supervised step, `train_lib.trainer.make_train_step`).

        For tasks whose update is not one gradient step on a dataset batch (PPO: a rollout of
        the environments, then epochs of minibatch updates). The step must advance
        `state.step` by one, keep the state's structure (collections in `state.buffers` carry
        anything that must survive a resume, e.g. environment states) and return float scalars.
        """
        return None

    def eval_buffers(
        self,
        model: nn.Module,
        params: Any,
        buffers: Any,
        train_batch: Callable[[int], Batch],
    ) -> Any:
        """The non-param collections an evaluation uses; by default the train state's own.

        Called by the trainer before every evaluation, outside the jitted eval step, with
        `train_batch(i)`: batch i of a fixed slice of the training stream, already placed on the
        devices. Image classification overrides it to re-estimate BatchNorm statistics on
        training batches, as the reference does. The train state itself is not changed.
        """
        return buffers

    # -- objective ----------------------------------------------------------------------------
    @abc.abstractmethod
    def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        """Scalar training loss and scalar metrics (batch means), inside the jitted step."""

    def eval_metrics(self, outputs: Any, batch: Batch) -> Metrics:
        """Scalar batch-mean metrics for evaluation; the trainer averages them over batches."""
        loss, metrics = self.loss_and_metrics(outputs, batch)
        return {"loss": loss, **metrics}


def resolve_task_class(name: str) -> type[Task]:
    """`module:Class` -> the Task subclass."""
    target = str(name)
    if ":" not in target:
        raise ConfigError(
            f"task.name={name!r} is invalid: must be 'package.module:TaskClass', "
            "e.g. 'tasks.ctm_maze.task:MazeTask'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task.name={name!r} is invalid: cannot import {target} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task.name={name!r} is invalid: {target} is not a Task subclass")
    return cls


def make_task(config: ml_collections.ConfigDict) -> Task:
    """Builds (and thereby validates) the task named by `config.task.name`."""
    return resolve_task_class(config.task.name)(config)
