"""Arithmetic LM training on the shared train loop (`tasks.arith_lm.task:ArithLMTask`).

The LM task (`tasks.parscale_lm.task.ParScaleLMTask`) with generated arithmetic text in place of a
corpus: the same ParScaleLM, loss (next-token cross-entropy over `loss_mask`), metrics and
starting points (`init_from`, `init_from_hf`, `freeze_backbone`: two-stage training and
recycling with only the prefixes and the aggregator training) -- inherited, not copied. Only
`dataset` differs (`tasks.arith_lm.data`: packed "a+b=c" + EOS examples, loss on the answer and
its EOS only), and the metrics add `exact_match`.

`exact_match`: the share of the batch's examples whose every answer token (and the EOS) is the
argmax of the model given the true prefix. That is exactly greedy decoding's exact-match accuracy
on those prompts: greedy decoding emits the argmax at every step, so it reproduces the answer iff
each of its tokens is the argmax given the answer's own earlier tokens.

Config: `model` (ParScaleConfig fields), `task.{levels, level_weights, seq_len, seed,
eval_sequences, tokenizer='bytes'}`, and the top-level `init_from`, `init_from_hf`,
`freeze_backbone`.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections

from core.errors import ConfigError
from parscale_jax.model import LMOutput
from tasks.arith_lm import data
from tasks.parscale_lm.task import ParScaleLMTask
from train_lib.task import Batch, Metrics


def answer_exact_match(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(examples whose answer tokens are all argmax-correct, examples with answer tokens) of a
    packed batch; an example is a segment (segment_ids > 0) with loss tokens."""
    b, s = targets.shape
    mask = loss_mask > 0
    wrong = mask & (jnp.argmax(logits, axis=-1) != targets)
    rows = jnp.arange(b)[:, None]
    per_wrong = jnp.zeros((b, s + 1), jnp.int32).at[rows, segment_ids].add(wrong.astype(jnp.int32))
    per_loss = jnp.zeros((b, s + 1), jnp.int32).at[rows, segment_ids].add(mask.astype(jnp.int32))
    examples = per_loss[:, 1:] > 0
    right = examples & (per_wrong[:, 1:] == 0)
    return jnp.sum(right).astype(jnp.float32), jnp.sum(examples).astype(jnp.float32)


class ArithLMTask(ParScaleLMTask):
    """Next-token prediction on generated arithmetic; see the module docstring."""

    progress_keys = ("loss", "accuracy", "exact_match")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        task = config.task
        if str(task.get("tokenizer", "bytes")) != "bytes":
            raise ConfigError(
                f"task.tokenizer={task.tokenizer!r} is invalid: the arithmetic data is byte "
                "text; use 'bytes'"
            )
        # The LM task validates the model, seq_len, the byte tokenizer against the vocabulary
        # and the starting points; it reads task.corpus, which this task replaces by generated
        # data, so it sees a copy of the config that names its built-in corpus.
        view = config.copy_and_resolve_references()
        with view.unlocked():
            view.task.corpus = "stdlib"
            view.task.tokenizer = "bytes"
        super().__init__(view)
        self.config = config
        self.spec = data.ArithSpec(
            levels=tuple(str(level) for level in task.levels),
            seq_len=self.seq_len,
            level_weights=tuple(float(w) for w in (task.get("level_weights") or ())),
            seed=int(task.seed),
        )
        self.eval_sequences = int(task.eval_sequences)
        if self.eval_sequences < 1:
            raise ConfigError(f"task.eval_sequences={task.eval_sequences!r} is invalid: need >= 1")

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; the arithmetic task has 'train', 'eval'")
        if split == "eval":
            wanted = int(self.config.train.get("eval_batches", 0))
            have = self.eval_sequences // (batch_size * shard_count)
            if int(self.config.train.get("eval_every", 0)) > 0 and have < wanted:
                raise ConfigError(
                    f"train.eval_batches={wanted} is invalid: task.eval_sequences="
                    f"{self.eval_sequences} make only {have} batches of {batch_size}"
                )
        return data.arith_dataset(
            split,
            self.spec,
            batch_size=batch_size,
            num_sequences=self.eval_sequences if split == "eval" else None,
            shard_index=shard_index,
            shard_count=shard_count,
        )

    def loss_and_metrics(self, outputs: LMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        loss, metrics = super().loss_and_metrics(outputs, batch)
        right, examples = answer_exact_match(
            outputs.logits, batch["targets"], batch["loss_mask"], batch["segment_ids"]
        )
        metrics["exact_match"] = right / jnp.maximum(examples, 1.0)
        metrics["examples"] = examples
        return loss, metrics
