"""Sorting N reals with the CTM's SORT variant, trained with CTC (the CTM paper's sorting task).

Each example is x ~ N(0, 1)^N and the target is argsort(x). The SORT variant has no attention:
every tick its synapses see concat(x, z), and each tick's read-out is a distribution over N + 1
classes (the N indices, then the blank). CTC sums over every way of spreading the N target indices
over the T ticks with blanks and repeats, so the model chooses *when* to emit each element; the
wait-ticks analysis (`tasks.ctm_sort.metrics.wait_stats`) looks at those choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections

from core.errors import ConfigError
from ctm_jax import config as ctm_config
from ctm_jax.flops import ctm_flops
from ctm_jax.losses import sort_loss
from ctm_jax.model import CTM, CTMOutput, project_params
from tasks.ctm_sort.data import sort_dataset
from tasks.ctm_sort.metrics import sort_metrics
from train_lib.task import Batch, Metrics, Task


def model_config(model: Mapping[str, Any], n_values: int) -> ctm_config.CTMConfig:
    """CTMConfig from the `model` section. d_input = N (the raw values enter every tick) and
    out_dims = N + 1 (the indices, then the blank) follow from task.n_values: None takes them,
    any other value must equal them. The ticks must leave room for N emissions."""
    values = dict(model.items())
    derived = {
        "d_input": (n_values, "the sort variant reads the N values directly"),
        "out_dims": (n_values + 1, "CTC needs the N indices and the blank"),
    }
    for name, (want, why) in derived.items():
        given = values.get(name)
        if given is not None and given != want:
            raise ConfigError(
                f"model.{name}={given!r} is invalid: task.n_values={n_values} needs {want} "
                f"({why}); leave it None"
            )
        values[name] = want
    if values.get("variant") != "sort":
        raise ConfigError(
            f"model.variant={values.get('variant')!r} is invalid: the sorting task needs 'sort' "
            "(the raw values enter every tick; there is nothing to attend to)"
        )
    cfg = ctm_config.CTMConfig.from_mapping(values)
    # Distinct indices need no separating blanks, so T >= N ticks is exactly what CTC needs.
    if cfg.iterations < n_values:
        raise ConfigError(
            f"model.iterations={cfg.iterations} is invalid: CTC emits at most one element per "
            f"tick, so sorting task.n_values={n_values} needs >= {n_values} ticks"
        )
    cfg.validate_input_shape((1, n_values))
    return cfg


class SortTask(Task):
    """CTM on sorting. Config: `task.{n_values, train_seed, eval_seed}` and the CTM fields in
    `model` (d_input and out_dims None: they follow from n_values)."""

    progress_keys = ("loss", "accuracy", "sequence_accuracy")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        task = config.task
        self.n_values = int(task.n_values)
        if self.n_values < 2:
            raise ConfigError(f"task.n_values={task.n_values!r} is invalid: must be >= 2")
        for name in ("train_seed", "eval_seed"):
            if int(task[name]) < 0:
                raise ConfigError(f"task.{name}={task[name]!r} is invalid: must be >= 0")
        if int(task.train_seed) == int(task.eval_seed):
            raise ConfigError(
                f"task.eval_seed={task.eval_seed!r} is invalid: must differ from "
                "task.train_seed so evaluation is held out"
            )
        self.model_config = model_config(config.model, self.n_values)

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; sorting has 'train' and 'eval'")
        seed = int(self.config.task.train_seed if split == "train" else self.config.task.eval_seed)
        return sort_dataset(self.n_values, seed, batch_size, shard_index, shard_count)

    def build_model(self) -> nn.Module:
        return CTM(self.model_config)

    def project_params(self, params: Any) -> Any:
        return project_params(self.model_config, params)  # a no-op for the sort variant

    def train_flops_per_example(self) -> float:
        """3 x the analytic forward FLOPs (`ctm_jax.flops.ctm_flops`: T ticks, no attention)."""
        cfg = self.model_config
        return 3.0 * ctm_flops(cfg, (self.n_values,)).total(cfg.iterations)

    def loss_and_metrics(self, outputs: CTMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        loss = sort_loss(outputs.predictions, batch["targets"])
        found = sort_metrics(outputs.predictions, batch["inputs"], batch["targets"])
        return loss, {k: found[k] for k in ("accuracy", "sequence_accuracy")}

    def eval_metrics(self, outputs: CTMOutput, batch: Batch) -> Metrics:
        loss = sort_loss(outputs.predictions, batch["targets"])
        return {
            "loss": loss,
            **sort_metrics(outputs.predictions, batch["inputs"], batch["targets"]),
        }
