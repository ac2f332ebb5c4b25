"""Cumulative parity (the CTM paper's parity task).

x is uniform in {-1, +1}^L and target[i] = (number of -1 in x[0..i]) mod 2, so the model must
emit L binary answers (out_dims 2L, reshaped (L, 2)). Data is a seeded, random-access stream:
example i of a stream with seed s is drawn from `np.random.default_rng([s, i])`, so any
example can be regenerated without replaying the stream, and a grain iterator position is all a
checkpoint needs. The reference reports accuracy at the most certain tick; the last tick is
reported too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core.errors import ConfigError
from ctm_jax import config as ctm_config
from ctm_jax.flops import ctm_flops
from ctm_jax.losses import parity_loss
from ctm_jax.model import CTM, CTMOutput, project_params
from train_lib.task import Batch, Metrics, Task

# Streams are effectively infinite; grain needs a length, and 2**62 indices never run out.
STREAM_LENGTH = 2**62


# ------------------------------------------------------------------------------------------------
# Data


def parity_targets(x: np.ndarray) -> np.ndarray:
    """Cumulative parity of the -1 entries along the last axis: {-1,+1}^L -> {0,1}^L int32."""
    return (np.cumsum(np.asarray(x) < 0, axis=-1) % 2).astype(np.int32)


def parity_example(seed: int, index: int, seq_len: int) -> dict[str, np.ndarray]:
    """Example `index` of the stream `seed`: inputs (L,) float32 of +-1, targets (L,) int32."""
    rng = np.random.default_rng([seed, index])
    x = (2 * rng.integers(0, 2, size=seq_len, dtype=np.int8) - 1).astype(np.float32)
    return {"inputs": x, "targets": parity_targets(x)}


@dataclasses.dataclass(frozen=True)
class ParitySource:
    """grain random-access source: element i is `parity_example(seed, i, seq_len)`."""

    seq_len: int
    seed: int

    def __len__(self) -> int:
        return STREAM_LENGTH

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return parity_example(self.seed, int(index), self.seq_len)


def parity_dataset(
    seq_len: int, seed: int, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
    """Batches of this process's shard of the stream (examples shard_index, +shard_count, ...).

    Batch j of shard k holds the same examples whatever happened before, which is what makes
    the checkpointed iterator position (and multi-host sharding) exact.
    """
    ds = grain.MapDataset.source(ParitySource(seq_len, seed))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=True)


# ------------------------------------------------------------------------------------------------
# Metrics


def most_certain_tick(certainties: jax.Array) -> jax.Array:
    """(B, 2, T) -> (B,) index of the tick with the highest certainty (first on ties)."""
    return jnp.argmax(certainties[:, 1], axis=-1)


def parity_accuracy(
    predictions: jax.Array, targets: jax.Array, tick: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(per-position accuracy, whole-sequence accuracy) of the answers at `tick` per example.

    predictions (B, 2L, T) raw logits, targets (B, L), tick (B,) int.
    """
    b, length = targets.shape
    answers = jnp.argmax(predictions.reshape(b, length, 2, predictions.shape[-1]), axis=2)
    chosen = jnp.take_along_axis(answers, tick[:, None, None], axis=-1)[..., 0]  # (B, L)
    correct = chosen == targets
    return correct.mean(), correct.all(axis=1).mean()


def parity_metrics(outputs: CTMOutput, targets: jax.Array) -> dict[str, jax.Array]:
    """Accuracies at the most certain and at the last tick, certainty and chosen tick."""
    predictions, certainties = outputs.predictions, outputs.certainties
    ticks = predictions.shape[-1]
    certain = most_certain_tick(certainties)
    last = jnp.full_like(certain, ticks - 1)
    acc, seq_acc = parity_accuracy(predictions, targets, certain)
    acc_last, seq_acc_last = parity_accuracy(predictions, targets, last)
    chosen_certainty = jnp.take_along_axis(certainties[:, 1], certain[:, None], axis=-1)
    return {
        "accuracy": acc,
        "sequence_accuracy": seq_acc,
        "accuracy_last_tick": acc_last,
        "sequence_accuracy_last_tick": seq_acc_last,
        "certainty": chosen_certainty.mean(),
        "most_certain_tick": certain.astype(jnp.float32).mean(),
    }


# ------------------------------------------------------------------------------------------------
# Task


def model_config(model: Mapping[str, Any], seq_len: int) -> ctm_config.CTMConfig:
    """CTMConfig from the `model` section; out_dims and the reshaper follow from seq_len."""
    values = dict(model.items())
    for name, derived in (("out_dims", 2 * seq_len), ("prediction_reshaper", (seq_len, 2))):
        given = values.get(name)
        if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(derived)):
            raise ConfigError(
                f"model.{name}={given!r} is invalid: parity with task.seq_len={seq_len} "
                f"needs {derived!r} (leave it out of the config)"
            )
        values[name] = derived
    cfg = ctm_config.CTMConfig.from_mapping(values)
    cfg.validate_input_shape((1, seq_len))
    return cfg


class ParityTask(Task):
    """CTM on cumulative parity. Config: `task.{seq_len, train_seed, eval_seed,
    use_most_certain}` and the CTM fields in `model` (without out_dims/prediction_reshaper).

    The reference insists on a square length because it plots sequences as sqrt(L) x sqrt(L)
    grids; training does not care, so any length is accepted here (plots must check).
    """

    progress_keys = ("loss", "accuracy", "sequence_accuracy")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        task = config.task
        self.seq_len = int(task.seq_len)
        if self.seq_len < 1:
            raise ConfigError(f"task.seq_len={task.seq_len!r} is invalid: must be >= 1")
        for name in ("train_seed", "eval_seed"):
            if int(task[name]) < 0:
                raise ConfigError(f"task.{name}={task[name]!r} is invalid: must be >= 0")
        if int(task.train_seed) == int(task.eval_seed):
            raise ConfigError(
                f"task.eval_seed={task.eval_seed!r} is invalid: must differ from "
                f"task.train_seed so evaluation is held out"
            )
        self.use_most_certain = bool(task.use_most_certain)
        self.model_config = model_config(config.model, self.seq_len)

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; parity has 'train' and 'eval'")
        seed = int(self.config.task.train_seed if split == "train" else self.config.task.eval_seed)
        return parity_dataset(self.seq_len, seed, batch_size, shard_index, shard_count)

    def build_model(self) -> nn.Module:
        return CTM(self.model_config)

    def project_params(self, params: Any) -> Any:
        return project_params(self.model_config, params)

    def train_flops_per_example(self) -> float:
        """3 x the analytic forward FLOPs of one sequence (`ctm_jax.flops.ctm_flops`: K/V
        projected once, then `iterations` ticks)."""
        cfg = self.model_config
        return 3.0 * ctm_flops(cfg, (self.seq_len,)).total(cfg.iterations)

    def loss_and_metrics(self, outputs: CTMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        targets = batch["targets"]
        loss, _ = parity_loss(
            outputs.predictions, outputs.certainties, targets, self.use_most_certain
        )
        acc, seq_acc = parity_accuracy(
            outputs.predictions, targets, most_certain_tick(outputs.certainties)
        )
        return loss, {"accuracy": acc, "sequence_accuracy": seq_acc}

    def eval_metrics(self, outputs: CTMOutput, batch: Batch) -> Metrics:
        loss, _ = parity_loss(
            outputs.predictions, outputs.certainties, batch["targets"], self.use_most_certain
        )
        return {"loss": loss, **parity_metrics(outputs, batch["targets"])}
