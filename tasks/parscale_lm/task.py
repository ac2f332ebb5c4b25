"""ParScale language modelling on the shared train loop
(`task.name = 'tasks.parscale_lm.task:ParScaleLMTask'`).

Model: `ParScaleLM` built from the `model` section (a `ParScaleConfig`; `model.parscale_n` = P).
Data: `tasks.parscale_lm.data.lm_dataset`, packed fixed-length sequences of a tokenised corpus; the
trainer's 'eval' split is the corpus' held-out 'validation' documents. Loss: next-token
cross-entropy averaged over `loss_mask`; metrics: perplexity (exp of that masked mean), next-token
accuracy and `tokens` (loss tokens in the batch). The progress line adds tokens/s
(`tokens_per_example` = seq_len).

Attention stays inside each packed document (`segment_ids`, causal, padding masked) and RoPE
positions restart at every document (`positions`), so a packed sequence computes what its
documents would compute alone -- matching the loss mask, which never trains across a boundary.

Starting points (at most one; both only when the workdir has no checkpoint of its own):

* `init_from=WORKDIR` (two-stage training, paper sec. 4.1): the backbone comes from the latest
  checkpoint of a P = 1 run (or a run with the same P, which also gives prefixes and aggregator);
  prefixes and aggregator keep this model's fresh initialisation -- N(0, 0.02^2) prefixes, the
  aggregator's N(0, 0.02^2) kernels and zero biases (parallel.py) -- the paper's random init.
  Optimiser state and schedule are this run's own (fresh AdamW, own warm-up).
* `init_from_hf=DIR` (recycling, paper sec. 4.2): the backbone of a Hugging Face Qwen2 /
  Qwen2.5 (or Qwen2-ParScale) checkpoint; its config.json must describe `model` (the same
  vocab_size, hidden_size, ...). With `freeze_backbone=True` only the prefixes and the
  aggregator train (the backbone gets no optimiser state at all), so one backbone serves every P:
  train one prefix/aggregator set per P, and serve P = 1 from the bare backbone
  (`generate.at_parscale_n`, `python -m launch.generate --parscale_n=1`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from core.errors import ConfigError
from core.tree_paths import path_str
from parscale_jax import config as ps_config
from parscale_jax.model import (
    LMOutput,
    ParScaleLM,
    is_scanned,
    stack_layer_params,
    unstack_layer_params,
)
from tasks.parscale_lm import data
from train_lib.task import Batch, Metrics, Task

# Param-path components of the ParScale-specific parameters (everything else is the backbone).
PARSCALE_PREFIX_NAMES = ("prefix_k", "prefix_v")
AGGREGATOR_NAME = "aggregate_layer"
# Fields of config.json that must agree with `model` when recycling an HF checkpoint.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "kv_head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)
_MAX_LISTED = 6


def is_parscale_param(path: str | tuple[str, ...]) -> bool:
    """True for the P-specific parameters (per-layer prefixes, aggregator), False for the backbone.

    `path` is 'layers_0/self_attn/prefix_k' or its tuple of names.
    """
    parts = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    return parts[0] == AGGREGATOR_NAME or parts[-1] in PARSCALE_PREFIX_NAMES


def model_config(model: Mapping[str, Any]) -> ps_config.ParScaleConfig:
    """ParScaleConfig from the `model` section; ConfigError naming the field otherwise."""
    try:
        return ps_config.ParScaleConfig.from_mapping(dict(model.items()), prefix="model.")
    except TypeError as e:  # an unknown field name
        raise ConfigError(str(e)) from None


def streams_of(params: Mapping[str, Any]) -> int:
    """P of a ParScaleLM params tree (1 when it has no prefixes)."""
    for path, leaf in flatten_dict(dict(params)).items():
        if path[-1] == "prefix_k":
            # (P, kv_heads, tokens, head_dim), with a leading layer axis when stacked
            return int(np.shape(leaf)[-4])
    return 1


def merge_pretrained(
    params: Mapping[str, Any], source: Mapping[str, Any], field: str, where: str
) -> dict[str, Any]:
    """`params` (a fresh init) with the backbone -- and, when the source has the same P > 1, the
    prefixes and aggregator -- taken from `source`.

    Raises ConfigError (one line, naming `field`=`where`) when the source has another P > 1, or
    when its backbone differs from this model's: missing, unexpected or mis-shaped params.
    """
    # The source may come in the other layer layout (scan_layers on in one run, off in the other).
    source = stack_layer_params(source) if is_scanned(params) else unstack_layer_params(source)
    target_p, source_p = streams_of(params), streams_of(source)
    if source_p > 1 and source_p != target_p:
        raise ConfigError(
            f"{field}={where!r} is invalid: its model has parscale_n={source_p} but "
            f"model.parscale_n={target_p}; start from a P=1 model or one with the same P"
        )
    flat, src = flatten_dict(dict(params)), flatten_dict(dict(source))
    copy_parscale = source_p == target_p > 1
    wanted = {p for p in flat if copy_parscale or not is_parscale_param(p)}
    offered = {p for p in src if copy_parscale or not is_parscale_param(p)}
    problems = [
        f"missing {path_str(p)} {tuple(np.shape(flat[p]))}" for p in sorted(wanted - offered)
    ]
    problems += [
        f"unexpected {path_str(p)} {tuple(np.shape(src[p]))}" for p in sorted(offered - wanted)
    ]
    for p in sorted(wanted & offered):
        if tuple(np.shape(flat[p])) != tuple(np.shape(src[p])):
            problems.append(
                f"{path_str(p)} is {tuple(np.shape(src[p]))} there, {tuple(np.shape(flat[p]))} here"
            )
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ConfigError(
            f"{field}={where!r} is invalid: its parameters do not fit the model the config "
            f"builds ({len(problems)} differ: {listed}{more})"
        )
    merged = dict(flat)
    for p in wanted:
        merged[p] = jnp.asarray(src[p], dtype=flat[p].dtype)
    return unflatten_dict(merged)


def forward_flops_per_token(cfg: ps_config.ParScaleConfig, seq_len: int) -> float:
    """Model FLOPs of one token's forward in a sequence of `seq_len` (2 per multiply-add;
    matmuls and einsums only -- biases, norms, RoPE, softmax and the embedding lookup are not
    counted):

        P * (2 N + 4 layers * heads * head_dim * (seq_len + n_prefix))
          + 2 (P H H + H P)   (the aggregator, P > 1 only)
          + 2 H V             (the LM head, tied or not, run once on the aggregated state)

    N = the non-embedding matmul weights of the P streams' shared backbone, per layer
    H (heads + 2 kv_heads) head_dim (q, k, v) + heads head_dim H (o) + 3 H I (SwiGLU), times
    the layers. The attention term is the logits and the weighted values over every key this
    model computes: the whole dense (seq_len + n_prefix)-wide score row, causal mask or not (the
    PaLM convention), the prefix keys being the n_prefix = parscale_n_tokens per stream (P > 1).
    """
    h, v, p = cfg.hidden_size, cfg.vocab_size, cfg.parscale_n
    attn = cfg.num_attention_heads * cfg.kv_head_dim
    kv = cfg.num_key_value_heads * cfg.kv_head_dim
    per_layer = h * (attn + 2 * kv) + attn * h + 3 * h * cfg.intermediate_size
    backbone = 2 * cfg.num_hidden_layers * per_layer
    attention = 4 * cfg.num_hidden_layers * attn * (seq_len + cfg.n_prefix)
    aggregator = 2 * (p * h * h + h * p) if p > 1 else 0
    return float(p * (backbone + attention) + aggregator + 2 * h * v)


def train_flops_per_sequence(cfg: ps_config.ParScaleConfig, seq_len: int) -> float:
    """3 x the forward FLOPs of a `seq_len`-token sequence: 6 N tokens (per stream) + 12 layers
    heads head_dim (seq_len + n_prefix) tokens (per stream) + 3 x (aggregator + LM head)."""
    return 3.0 * seq_len * forward_flops_per_token(cfg, seq_len)


class ParScaleLMTask(Task):
    """Next-token prediction with a ParScale LM. Config: `model` (ParScaleConfig fields),
    `task.{seq_len, tokenizer, corpus, data_dir, seed, ...}` (the `lm_dataset` arguments), and
    the top-level `init_from`, `init_from_hf`, `freeze_backbone`."""

    progress_keys = ("loss", "perplexity", "accuracy")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        self.model_config = model_config(config.model)
        task = config.task
        self.seq_len = int(task.seq_len)
        if not 1 <= self.seq_len <= self.model_config.max_position_embeddings:
            raise ConfigError(
                f"task.seq_len={task.seq_len!r} is invalid: must lie in [1, "
                f"model.max_position_embeddings={self.model_config.max_position_embeddings}]"
            )
        self.tokens_per_example = self.seq_len
        if task.corpus not in data.CORPORA:
            raise ConfigError(
                f"task.corpus={task.corpus!r} is invalid: allowed: {', '.join(data.CORPORA)}"
            )
        if task.tokenizer is None:
            raise ConfigError(
                "task.tokenizer=None is invalid: give 'bytes' or the path of a tokenizer.json"
            )
        try:
            tokenizer = data.make_tokenizer(task.tokenizer, eos_token=task.get("eos_token"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"task.tokenizer={task.tokenizer!r} is invalid: {e}") from None
        if self.model_config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.model_config.vocab_size} is invalid: must be >= the "
                f"{tokenizer.vocab_size} ids of task.tokenizer={task.tokenizer!r} "
                f"(e.g. {data.round_vocab(tokenizer.vocab_size)})"
            )
        self.init_from = config.get("init_from") or None
        self.init_from_hf = config.get("init_from_hf") or None
        self.freeze_backbone = bool(config.get("freeze_backbone", False))
        if self.init_from and self.init_from_hf:
            raise ConfigError(
                f"init_from_hf={self.init_from_hf!r} is invalid: init_from={self.init_from!r} "
                "is set too; give one starting point"
            )
        if self.freeze_backbone:
            if self.model_config.parscale_n == 1:
                raise ConfigError(
                    "freeze_backbone=True is invalid: model.parscale_n=1 has no prefixes or "
                    "aggregator to train; set model.parscale_n > 1"
                )
            if not (self.init_from or self.init_from_hf):
                raise ConfigError(
                    "freeze_backbone=True is invalid: needs init_from or init_from_hf (a frozen "
                    "random backbone)"
                )

    def _check_hf_config(self, directory: Path) -> None:
        """The checkpoint's config.json against `model` (checked when it is used, so that a
        resumed or analysed run does not need the checkpoint any more)."""
        from parscale_jax.convert import read_config

        try:  # the directory, config.json (JSON, every field's type and value) named on failure
            hf = read_config(directory)
        except ValueError as e:  # ConfigError, DataError
            raise ConfigError(f"init_from_hf={str(directory)!r} is invalid: {e}") from None
        for name in ARCHITECTURE_FIELDS:
            ours, theirs = getattr(self.model_config, name), getattr(hf, name)
            if ours != theirs:
                field = "head_dim" if name == "kv_head_dim" else name
                raise ConfigError(
                    f"model.{field}={ours!r} is invalid: the checkpoint init_from_hf="
                    f"{str(directory)!r} has {field}={theirs!r}"
                )
        if hf.parscale_n > 1 and hf.parscale_n != self.model_config.parscale_n:
            raise ConfigError(
                f"model.parscale_n={self.model_config.parscale_n} is invalid: the checkpoint "
                f"init_from_hf={str(directory)!r} has parscale_n={hf.parscale_n}; use that P"
            )

    # -- data ---------------------------------------------------------------------------------
    def _lm_dataset(self, split: str, **kwargs: Any) -> grain.MapDataset:
        task = self.config.task
        options: dict[str, Any] = {}
        for name in ("max_documents", "tfds_name", "eos_token"):
            if task.get(name) is not None and task.get(name) != "":
                options[name] = task[name]
        if task.get("paths"):
            options["paths"] = tuple(str(p) for p in task.paths)
        for name in ("validation_fraction", "include_tests", "text_feature"):
            if name in task:
                options[name] = task[name]
        return data.lm_dataset(
            split,
            seq_len=self.seq_len,
            tokenizer=str(task.tokenizer),
            corpus=str(task.corpus),
            data_dir=task.get("data_dir"),
            seed=int(task.seed),
            **options,
            **kwargs,
        )

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; the LM task has 'train' and 'eval'")
        try:
            ds = self._lm_dataset(
                "train" if split == "train" else "validation",
                batch_size=batch_size,
                shard_index=shard_index,
                shard_count=shard_count,
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"task.corpus={self.config.task.corpus!r} is invalid: {e}") from None
        if split == "eval":
            wanted = int(self.config.train.get("eval_batches", 0))
            if int(self.config.train.get("eval_every", 0)) > 0 and len(ds) < wanted:
                raise ConfigError(
                    f"train.eval_batches={wanted} is invalid: the validation split has only "
                    f"{len(ds)} batches of {batch_size}"
                )
        return ds

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the validation split, or of the training split when the validation split
        has no full batch of this size (a big global batch on a small corpus with evaluation
        off): only its shapes and dtypes are used."""
        ds = self.dataset("eval", batch_size=batch_size)
        if len(ds) == 0:
            ds = self.dataset("train", batch_size=batch_size)
        if len(ds) == 0:
            raise ConfigError(
                f"train.batch_size={batch_size} is invalid: task.corpus="
                f"{self.config.task.corpus!r} has no full batch of {batch_size} sequences"
            )
        return dict(ds[0])

    # -- model --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return ParScaleLM(self.model_config)

    def train_flops_per_example(self) -> float:
        """`train_flops_per_sequence` of one packed `task.seq_len` sequence (padding included:
        the model computes it). With `freeze_backbone` the backbone's weight gradients are not
        computed, so the convention's 3 x overstates a frozen run's work by up to a third."""
        return train_flops_per_sequence(self.model_config, self.seq_len)

    def apply(
        self,
        model: nn.Module,
        variables: Mapping[str, Any],
        batch: Batch,
        *,
        train: bool,
        rng: jax.Array | None = None,
        mutable: Any = False,
    ) -> LMOutput:
        del train, rng, mutable  # no dropout, no mutable collections
        return model.apply(
            variables,
            batch["inputs"],
            attention_mask=batch["segment_ids"] > 0,
            position_ids=batch["positions"],
            segment_ids=batch["segment_ids"],
        )

    def trainable(self) -> Callable[[str], bool] | None:
        if not self.freeze_backbone:
            return None
        return is_parscale_param

    def warm_start(
        self, variables: dict[str, Any], source: Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        if source is not None:
            params = merge_pretrained(
                variables["params"], source["params"], "init_from", str(self.init_from)
            )
        elif self.init_from_hf:
            from parscale_jax.convert import load_checkpoint

            where = str(self.init_from_hf)
            self._check_hf_config(Path(where))
            try:
                _, hf_params = load_checkpoint(where)
            except (OSError, ValueError) as e:
                raise ConfigError(f"init_from_hf={where!r} is invalid: {e}") from None
            params = merge_pretrained(variables["params"], hf_params, "init_from_hf", where)
        else:
            return None
        return {**variables, "params": params}

    # -- objective ----------------------------------------------------------------------------
    def loss_and_metrics(self, outputs: LMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        logits, targets = outputs.logits, batch["targets"]
        mask = batch["loss_mask"].astype(jnp.float32)
        n_tokens = jnp.sum(mask)
        denom = jnp.maximum(n_tokens, 1.0)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        loss = jnp.sum(losses * mask) / denom
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return loss, {
            "perplexity": jnp.exp(loss),
            "accuracy": jnp.sum(correct * mask) / denom,
            "tokens": n_tokens,
        }
