"""Q&A-MNIST (the CTM paper's question-answering task): look at digits, then answer a question
about them, e.g. "digit 2, plus digit 0, minus digit 1" -> the result mod 10.

The model (`ctm_jax.qamnist.QAMNISTCTM`) sees each digit image for R ticks, then the question's
index / operator tokens for R ticks each, then `answer_steps` ticks of nothing; the loss is the
reference's (min-loss tick + most-certain tick) over the answer ticks only, and accuracy is read
at the most certain answer tick. Evaluation can also ask questions with more operations than
training ever did (`task.eval_max_ops`), reported as separate `beyond_*` metrics.

Question format, draw order and the reference's exclusive upper bound: `tasks.ctm_qamnist.data`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections

from core.errors import ConfigError
from ctm_jax import config as ctm_config
from ctm_jax.losses import per_tick_cross_entropy
from ctm_jax.model import CTMOutput
from ctm_jax.qamnist import INDEX_TABLE_SIZE, QAMNISTCTM
from tasks.ctm_qamnist import data
from train_lib.task import Batch, Metrics, Task

# Model fields the task sets itself: name -> (value, why).
DERIVED_MODEL_FIELDS = {
    "out_dims": (data.MODULUS, "the answer is a digit: 10 classes"),
    "backbone_type": ("none", "the digit backbone is part of the Q&A-MNIST model"),
    "positional_embedding_type": ("none", "question tokens carry their own embeddings"),
    "variant": ("ctm", "the Q&A-MNIST model attends on digit ticks"),
}


def question_spec(task: Mapping[str, Any]) -> data.QuestionSpec:
    """The `task` section's question fields, validated (one-line ConfigError per field)."""

    def fail(field: str, allowed: str) -> None:
        raise ConfigError(f"task.{field}={task[field]!r} is invalid: {allowed}")

    for name in ("min_digits", "min_ops", "repeats", "answer_steps"):
        if int(task[name]) < 1:
            fail(name, "must be >= 1")
    if int(task.max_digits) < int(task.min_digits):
        fail("max_digits", f"must be >= task.min_digits={task.min_digits}")
    if int(task.max_digits) > INDEX_TABLE_SIZE:
        fail("max_digits", f"index tokens name digit positions 0..{INDEX_TABLE_SIZE - 1}: <= 50")
    if int(task.max_ops) < int(task.min_ops):
        fail("max_ops", f"must be >= task.min_ops={task.min_ops}")
    if int(task.eval_max_ops) < int(task.max_ops):
        fail("eval_max_ops", f"must be >= task.max_ops={task.max_ops} (equal: no beyond eval)")
    return data.QuestionSpec(
        min_digits=int(task.min_digits),
        max_digits=int(task.max_digits),
        min_ops=int(task.min_ops),
        max_ops=int(task.max_ops),
        repeats=int(task.repeats),
        answer_steps=int(task.answer_steps),
    )


def model_config(model: Mapping[str, Any], ticks: int) -> ctm_config.CTMConfig:
    """CTMConfig from the `model` section. out_dims, backbone, positional embedding and variant
    are fixed by the task and `iterations` by the question layout (`ticks`): leave them out."""
    values = dict(model.items())
    for name, (want, why) in {**DERIVED_MODEL_FIELDS, "iterations": (ticks, "")}.items():
        given = values.get(name)
        if given is not None and given != want:
            reason = why or f"the question layout sets the ticks ({ticks} for training)"
            raise ConfigError(
                f"model.{name}={given!r} is invalid: Q&A-MNIST needs {want!r} ({reason}); "
                "leave it out of the config"
            )
        values[name] = want
    cfg = ctm_config.CTMConfig.from_mapping(values)
    if cfg.dtype != "float32":
        raise ConfigError(
            f"model.dtype={cfg.dtype!r} is invalid: the Q&A-MNIST model runs in 'float32' only"
        )
    return cfg


# ------------------------------------------------------------------------------------------------
# Loss and metrics


def answer_ticks(outputs: CTMOutput, answer_steps: int) -> tuple[jax.Array, jax.Array]:
    """Predictions (B, 10, A) and certainties (B, 2, A) of the last `answer_steps` ticks (the
    answer ticks of every example: the layout pads at the front)."""
    return outputs.predictions[..., -answer_steps:], outputs.certainties[..., -answer_steps:]


def per_example(
    predictions: jax.Array, certainties: jax.Array, targets: jax.Array, use_most_certain: bool
) -> dict[str, jax.Array]:
    """Per-example (B,) values over the answer ticks: the reference's loss (mean of the min-loss
    and the most-certain tick's cross-entropy), correctness at the most certain and the last tick,
    the certainty there and which answer tick it is."""
    losses = per_tick_cross_entropy(predictions, targets)  # (B, A)
    rows = jnp.arange(losses.shape[0])
    t_min = jnp.argmin(losses, axis=1)
    if use_most_certain:
        t_sel = jnp.argmax(certainties[:, 1], axis=-1)
    else:
        t_sel = jnp.full_like(t_min, losses.shape[1] - 1)
    answers = jnp.argmax(predictions, axis=1)  # (B, A)
    return {
        "loss": (losses[rows, t_min] + losses[rows, t_sel]) / 2,
        "accuracy": (answers[rows, t_sel] == targets).astype(jnp.float32),
        "accuracy_last_tick": (answers[:, -1] == targets).astype(jnp.float32),
        "certainty": certainties[rows, 1, t_sel],
        "most_certain_tick": t_sel.astype(jnp.float32),
    }


def masked_means(values: Mapping[str, jax.Array], mask: jax.Array, prefix: str = "") -> Metrics:
    """Means over the examples where `mask` is 1 (0 when there are none)."""
    count = jnp.maximum(mask.sum(), 1.0)
    return {f"{prefix}{k}": (v * mask).sum() / count for k, v in values.items()}


class QAMNISTTask(Task):
    """Config: `task.{source, data_dir, image_size, min_digits, max_digits, min_ops, max_ops,
    repeats, answer_steps, eval_max_ops, train_seed, eval_seed, use_most_certain}` and the CTM
    fields in `model` (without iterations, out_dims, backbone_type, positional_embedding_type,
    variant)."""

    progress_keys = ("loss", "accuracy")
    mutable_collections = ("batch_stats",)

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        task = config.task
        if task.source not in data.SOURCES:
            raise ConfigError(
                f"task.source={task.source!r} is invalid: allowed: {', '.join(data.SOURCES)}"
            )
        size = int(task.image_size)
        if size < 4 or size % 4:
            raise ConfigError(
                f"task.image_size={task.image_size!r} is invalid: two 2x2 max-pools need a "
                "multiple of 4 (the reference: 32, i.e. 8x8 tokens)"
            )
        self.spec = question_spec(task)
        for name in ("train_seed", "eval_seed"):
            if int(task[name]) < 0:
                raise ConfigError(f"task.{name}={task[name]!r} is invalid: must be >= 0")
        if int(task.train_seed) == int(task.eval_seed):
            raise ConfigError(
                f"task.eval_seed={task.eval_seed!r} is invalid: must differ from "
                "task.train_seed so evaluation is held out"
            )
        self.eval_max_ops = int(task.eval_max_ops)
        self.beyond = self.eval_max_ops > self.spec.max_ops
        batch = int(config.train.batch_size)
        if self.beyond and batch % 2:
            raise ConfigError(
                f"train.batch_size={batch} is invalid: with task.eval_max_ops > task.max_ops "
                "half of every eval batch asks beyond the training range, so it must be even"
            )
        self.use_most_certain = bool(task.use_most_certain)
        self.model_config = model_config(config.model, self.spec.ticks())

    # -- data ---------------------------------------------------------------------------------
    def images(self, split: str) -> data.DigitImages:
        task = self.config.task
        return data.digit_images(
            str(task.source), split, int(task.image_size), task.get("data_dir") or None
        )

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; Q&A-MNIST has 'train' and 'eval'")
        task = self.config.task
        seed = int(task.train_seed if split == "train" else task.eval_seed)
        return data.qamnist_dataset(
            self.images(split),
            self.spec,
            seed,
            batch_size,
            eval_max_ops=self.eval_max_ops if split == "eval" else None,
            shard_index=shard_index,
            shard_count=shard_count,
        )

    # -- model --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return QAMNISTCTM(self.model_config)

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        return dict(model.init({"params": rng}, batch["digits"], batch["modes"], batch["tokens"]))

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
        rngs = {"dropout": rng} if train and rng is not None else {}
        return model.apply(
            variables,
            batch["digits"],
            batch["modes"],
            batch["tokens"],
            train=train,
            rngs=rngs,
            mutable=mutable,
        )

    # -- objective ----------------------------------------------------------------------------
    def answer_values(self, outputs: CTMOutput, batch: Batch) -> dict[str, jax.Array]:
        """`per_example` values (B,) over the answer ticks of `batch`."""
        predictions, certainties = answer_ticks(outputs, self.spec.answer_steps)
        return per_example(predictions, certainties, batch["targets"], self.use_most_certain)

    def loss_and_metrics(self, outputs: CTMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        values = self.answer_values(outputs, batch)
        return values["loss"].mean(), {"accuracy": values["accuracy"].mean()}

    def eval_metrics(self, outputs: CTMOutput, batch: Batch) -> Metrics:
        """Means over the in-range questions; with eval_max_ops > max_ops also `beyond_*` over
        the questions with more operations than training had."""
        values = self.answer_values(outputs, batch)
        beyond = batch["beyond"].astype(jnp.float32)
        metrics = masked_means(values, 1.0 - beyond)
        if self.beyond:
            picked = {k: values[k] for k in ("loss", "accuracy", "accuracy_last_tick")}
            metrics.update(masked_means(picked, beyond, prefix="beyond_"))
        return metrics
