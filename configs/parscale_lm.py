"""ParScale language models (Qwen2 architecture with P parallel streams) on the shared trainer.

    python -m launch.train --config=configs/parscale_lm.py:tiny --workdir=runs/lm_tiny
    python -m launch.train --config=configs/parscale_lm.py:tiny --workdir=runs/lm_tiny_p4 \\
        --config.model.parscale_n=4

P is `--config.model.parscale_n` (1 = plain Qwen2). Presets:
  tiny   CPU-sized: H 128, 4 layers (0.8M params), byte tokenizer, 128-token sequences of the
         Python standard library (prepared once under ~/tensorflow_datasets, or
         --config.task.data_dir); 1000 steps of 16 x 128 tokens, about 1 step/s on a busy 2-core
         CPU at P = 1 (P multiplies the backbone's work).
  test   a seconds-long model for the test suite.
  s0..s5 the paper's six scaling-law sizes (its released checkpoints; names by checkpoint
         size 0.7B/0.9B/1.3B/1.8B/3B/4.7B, non-embedding 0.5B/0.7B/1.1B/1.6B/2.8B/4.4B): 36
         layers, 16 heads, 2 KV heads, 48 prefix tokens, eps 0.1, tied embeddings, rope 1e4,
         vocab 151,936; 42B tokens = 20,027 steps of 1024 x 2048 tokens.
  1.8b   the production model, stage 1: the s3 architecture, P = 1, 1T tokens (476,837 steps).
  qwen2.5-0.5b-peft, qwen2.5-3b-peft  recycling: the Qwen2.5 base model's architecture, P = 2,
         frozen backbone (needs --config.init_from_hf=<HF checkpoint dir>; its config.json must
         agree with `model`, checked field by field); 10,000 steps of 1024 x 2048 tokens.
  1.8b-stage2  stage 2: 20B tokens (9,537 steps), P = 8 by default, with
         --config.init_from=<stage-1 workdir>: the backbone comes from stage 1, new prefixes and
         aggregator are initialised randomly, the optimiser and schedule start fresh.
  arith, arith-p2, arith-p4  the arithmetic LM (tasks/arith_lm: "a+b=c" byte text, loss on the
         answer): one small model (ARITH_MODEL) from scratch at P = 1, 2, 4, minutes on a CPU.
  arith-p2-recycle, arith-p4-recycle  P = 2 / 4 prefixes + aggregator on the frozen backbone of
         the `arith` run (init_from=runs/arith_p1 by default); `python -m launch.export_lm
         --workdir=runs/arith_p1 --out=DIR --streams_from=<recycled workdirs>` serves all P.
  arith-test  a seconds-long arithmetic run for the test suite.
The big presets need `--config.task.tokenizer=/path/to/Qwen2.5/tokenizer.json` and a corpus
(`--config.task.corpus=files --config.task.paths=...` or a prepared tfds text dataset). Their
optimiser settings (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, peak lr 3e-4, warm-up then
cosine) are common LM defaults: the paper does not state its own.

Starting points (only when the workdir has no checkpoint of its own):
  --config.init_from=WORKDIR    two-stage training from another run (P = 1 or the same P).
  --config.init_from_hf=DIR     recycle an HF Qwen2/Qwen2.5 checkpoint; `model` must describe
                                it (vocab_size, hidden_size, ... are checked against config.json).
  --config.freeze_backbone=True train only prefixes + aggregator (parameter-efficient). The
                                backbone stays bit-identical, so one backbone serves every P
                                ("dynamic parallel scaling"): one prefix/aggregator set per P,
                                and P = 1 is the bare backbone (`python -m launch.generate
                                --parscale_n=1`, `generate.at_parscale_n`).
Every field can be overridden, e.g. `--config.optim.lr=1e-3 --config.train.total_steps=500`.
"""

from __future__ import annotations

import copy

import ml_collections
from ml_collections import config_dict

from configs import common

# The arithmetic LM (tasks/arith_lm): one model for every `arith*` preset, so that P = 1, 2, 4
# and the recycled prefix sets share one architecture (and, recycled, one backbone).
ARITH_STEPS = 800  # optimiser steps of the from-scratch arithmetic runs (32 x 64 tokens each)
ARITH_RECYCLE_STEPS = 600  # steps of the recycled (frozen-backbone) runs
ARITH_MODEL = dict(
    vocab_size=320,  # the byte tokenizer's 258 ids, 64-aligned
    hidden_size=64,  # model width H
    intermediate_size=256,  # SwiGLU MLP width
    num_hidden_layers=3,  # decoder layers (about 0.2M parameters with the embedding)
    num_attention_heads=4,  # query heads (head_dim 16)
    num_key_value_heads=2,  # key/value heads (grouped-query attention)
    max_position_embeddings=128,  # >= task.seq_len
    tie_word_embeddings=True,  # the LM head reuses the input embedding matrix
    parscale_n_tokens=16,  # prefix tokens per stream (P > 1); short sequences, small prefix
    parscale_attn_smooth=0.1,  # eps of the stream weights, as the released checkpoints
)


def arith_task(**overrides) -> ml_collections.ConfigDict:
    """The `task` section of the arithmetic LM (replaces the corpus LM's section)."""
    values = dict(
        name="tasks.arith_lm.task:ArithLMTask",  # the task class, module:Class
        tokenizer="bytes",  # byte-level text (the only choice)
        levels=("add:1", "add:2", "add:3", "add:4"),  # ArithmeticTask levels in the mix
        # Draw probabilities (normalised; () = uniform). Few 4-digit examples: with add:4 at
        # weight 3 of 9 this model still had not learned to carry after 1400 steps.
        level_weights=(2.0, 3.0, 3.0, 1.0),
        seq_len=64,  # tokens per packed training sequence (add:4 examples have <= 16)
        seed=0,  # the data generator's seed (eval sequences use their own stream)
        eval_sequences=1024,  # held-out sequences in the eval split
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


# Preset name -> {section: {field: value}, top-level field: value}: every value the preset sets on
# top of the base config (the tiny run) written out in `get_config`. The paper-sized presets'
# `task.tokenizer=None` must be replaced by a tokenizer.json path on the command line.
PRESETS: dict[str, dict] = {
    "tiny": {},  # the base config as written in get_config
    # Seconds-long runs for the test suite (the real model and data pipeline, just small).
    "test": {
        "model": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            parscale_n_tokens=8,
        ),
        "task": dict(seq_len=32, max_documents=20),
        "optim": dict(lr=3e-3, warmup_steps=5),
        "train": dict(
            total_steps=30,
            batch_size=8,
            log_every=5,
            eval_every=0,
            eval_batches=2,
            checkpoint_every=10,
        ),
    },
    # Scaling-law size s0, ParScale-0.7B (0.5B non-embedding): the released architecture
    # of the released checkpoints at one width, trained on 42B tokens.
    "s0": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=20_027,  # 42B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # Scaling-law size s1, ParScale-0.9B (0.7B non-embedding): the released architecture
    # of the released checkpoints at one width, trained on 42B tokens.
    "s1": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=1024,
            intermediate_size=5504,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=20_027,  # 42B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # Scaling-law size s2, ParScale-1.3B (1.1B non-embedding): the released architecture
    # of the released checkpoints at one width, trained on 42B tokens.
    "s2": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=1280,
            intermediate_size=6912,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=20_027,  # 42B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # Scaling-law size s3, ParScale-1.8B (1.6B non-embedding): the released architecture
    # of the released checkpoints at one width, trained on 42B tokens.
    "s3": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=1536,
            intermediate_size=8320,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=20_027,  # 42B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # Scaling-law size s4, ParScale-3B (2.8B non-embedding): the released architecture
    # of the released checkpoints at one width, trained on 42B tokens.
    "s4": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=20_027,  # 42B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # Scaling-law size s5, ParScale-4.7B (4.4B non-embedding): the released architecture
    # of the released checkpoints at one width, trained on 42B tokens.
    "s5": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=2560,
            intermediate_size=13824,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=20_027,  # 42B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # The production model, stage 1: the s3 architecture, P = 1, 1T tokens.
    "1.8b": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=1536,
            intermediate_size=8320,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=2000, end_lr=3e-5),
        "train": dict(
            total_steps=476_837,  # 1T tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # The production model, stage 2 (with --config.init_from=<stage-1 workdir>): the s3
    # architecture at P = 8, 20B tokens, a fresh optimiser and schedule.
    "1.8b-stage2": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=1536,
            intermediate_size=8320,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            parscale_n=8,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=500, end_lr=3e-5),
        "train": dict(
            total_steps=9537,  # 20B tokens / (1024 x 2048 tokens a step)
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
    },
    # PEFT recycling (the paper's fine-tuning of a frozen model) of Qwen2.5-0.5B
    # (--config.init_from_hf=DIR): frozen backbone, P = 2 new prefix sets + aggregator on
    # 2048-token sequences.
    "qwen2.5-0.5b-peft": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
            parscale_n=2,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=200, end_lr=3e-5),
        "train": dict(
            total_steps=10_000,  # about 21B tokens
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
        "freeze_backbone": True,
    },
    # The same for Qwen2.5-3B, the paper's recycled backbone.
    "qwen2.5-3b-peft": {
        "model": dict(
            vocab_size=151_936,  # Qwen2.5's tokenizer
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
            parscale_n=2,
            dtype="bfloat16",
        ),
        "task": dict(seq_len=2048, tokenizer=None),  # None: set a tokenizer.json path
        "optim": dict(lr=3e-4, warmup_steps=200, end_lr=3e-5),
        "train": dict(
            total_steps=10_000,  # about 21B tokens
            batch_size=1024,  # sequences of 2048 tokens
            log_every=100,
            eval_every=2000,
            eval_batches=16,
            checkpoint_every=2000,
        ),
        "freeze_backbone": True,
    },
    # Arithmetic LM (tasks/arith_lm, ArithLMTask): "a+b=c" byte text, add:1..add:4, loss on
    # the answers. Sized so that each from-scratch run takes <= 10 min on a busy 2-core CPU and
    # leaves 3-/4-digit addition well short of perfect (room for sampling and verification).
    # A seconds-long run for the tests.
    "arith-test": {
        "model": dict(
            ARITH_MODEL,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            parscale_n_tokens=4,
        ),
        "task": arith_task(levels=("add:1", "add:2"), level_weights=(), seq_len=32),
        "optim": dict(lr=3e-3, warmup_steps=5),
        "train": dict(
            total_steps=30,
            batch_size=8,
            log_every=5,
            eval_every=0,
            eval_batches=2,
            checkpoint_every=30,
        ),
    },
    # P = 1 from scratch (the backbone the recycled presets start from).
    "arith": {
        "model": dict(ARITH_MODEL, parscale_n=1),
        "task": arith_task(),
        # lr 1e-2: at 3e-3 this small model stalls for > 1500 steps before it learns to carry.
        "optim": dict(lr=1e-2, warmup_steps=50, end_lr=1e-4),
        "train": dict(
            total_steps=ARITH_STEPS,
            batch_size=32,  # sequences of 64 tokens, about 4.4 examples each
            log_every=50,
            eval_every=200,
            eval_batches=8,
            checkpoint_every=200,
        ),
    },
    # The same model and data with P = 2 streams, from scratch.
    "arith-p2": {
        "model": dict(ARITH_MODEL, parscale_n=2),
        "task": arith_task(),
        # lr 1e-2: at 3e-3 this small model stalls for > 1500 steps before it learns to carry.
        "optim": dict(lr=1e-2, warmup_steps=50, end_lr=1e-4),
        "train": dict(
            total_steps=ARITH_STEPS,
            batch_size=32,  # sequences of 64 tokens, about 4.4 examples each
            log_every=50,
            eval_every=200,
            eval_batches=8,
            checkpoint_every=200,
        ),
    },
    # The same model and data with P = 4 streams, from scratch.
    "arith-p4": {
        "model": dict(ARITH_MODEL, parscale_n=4),
        "task": arith_task(),
        # lr 1e-2: at 3e-3 this small model stalls for > 1500 steps before it learns to carry.
        "optim": dict(lr=1e-2, warmup_steps=50, end_lr=1e-4),
        "train": dict(
            total_steps=ARITH_STEPS,
            batch_size=32,  # sequences of 64 tokens, about 4.4 examples each
            log_every=50,
            eval_every=200,
            eval_batches=8,
            checkpoint_every=200,
        ),
    },
    # Recycling the P = 1 run (init_from, by default runs/arith_p1): its backbone frozen, only
    # the P = 2 prefixes and aggregator train, for fewer steps.
    "arith-p2-recycle": {
        "model": dict(ARITH_MODEL, parscale_n=2),
        "task": arith_task(),
        # lr 3e-2: the new prefixes first disturb the frozen backbone's attention (the loss starts
        # far above the P = 1 run's); at 1e-2 300 steps did not recover it, 3e-2 x 600 does.
        "optim": dict(lr=3e-2, warmup_steps=30, end_lr=1e-4),
        "train": dict(
            total_steps=ARITH_RECYCLE_STEPS,
            batch_size=32,
            log_every=50,
            eval_every=100,
            eval_batches=8,
            checkpoint_every=100,
        ),
        "init_from": "runs/arith_p1",  # the `arith` run's workdir (override to recycle another)
        "freeze_backbone": True,
    },
    # The same with P = 4.
    "arith-p4-recycle": {
        "model": dict(ARITH_MODEL, parscale_n=4),
        "task": arith_task(),
        # lr 3e-2: the new prefixes first disturb the frozen backbone's attention (the loss starts
        # far above the P = 1 run's); at 1e-2 300 steps did not recover it, 3e-2 x 600 does.
        "optim": dict(lr=3e-2, warmup_steps=30, end_lr=1e-4),
        "train": dict(
            total_steps=ARITH_RECYCLE_STEPS,
            batch_size=32,
            log_every=50,
            eval_every=100,
            eval_batches=8,
            checkpoint_every=100,
        ),
        "init_from": "runs/arith_p1",  # the `arith` run's workdir
        "freeze_backbone": True,
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # parscale_jax.config.ParScaleConfig fields (HF Qwen2Config names).
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=320,  # the byte tokenizer's 258 ids, 64-aligned
            hidden_size=128,  # model width H
            intermediate_size=384,  # SwiGLU MLP width
            num_hidden_layers=4,  # decoder layers
            num_attention_heads=4,  # query heads
            num_key_value_heads=2,  # key/value heads (grouped-query attention)
            head_dim=config_dict.placeholder(int),  # None: hidden_size / num_attention_heads
            rope_theta=10000.0,  # RoPE base frequency
            rms_norm_eps=1e-6,  # RMSNorm epsilon
            max_position_embeddings=2048,  # longest sequence the model accepts (>= task.seq_len)
            tie_word_embeddings=True,  # the LM head reuses the input embedding matrix
            parscale_n=1,  # P, parallel streams (1: plain Qwen2)
            parscale_n_tokens=48,  # learned prefix tokens per stream (used when P > 1)
            parscale_attn_smooth=0.1,  # eps of the stream weights: w (1 - eps) + eps / P
            dtype="float32",  # activations' dtype: float32 | bfloat16
            # einsum: this port's grouped einsums; xla | cudnn | auto: jax.nn.dot_product_attention
            attention="einsum",
            scan_layers=False,  # True: layers as one nn.scan (stacked params)
            # none | full | dots_saveable | dots_with_no_batch_dims_saveable | nothing_saveable
            remat_policy="none",
        )
    )
    # tasks.parscale_lm.data.lm_dataset arguments.
    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.parscale_lm.task:ParScaleLMTask",  # the task class, module:Class
            seq_len=128,  # tokens per training sequence
            tokenizer="bytes",  # or the path of a tokenizer.json
            eos_token=config_dict.placeholder(str),  # HF tokenizers: else tokenizer_config.json
            corpus="stdlib",  # "stdlib" | "files" | "tfds"
            paths=(),  # corpus="files": paths or globs
            tfds_name="",  # corpus="tfds": a prepared text dataset
            text_feature="text",  # corpus="tfds": the feature holding the text
            max_documents=config_dict.placeholder(int),  # keep only this many documents
            validation_fraction=0.02,  # share of documents held out for evaluation
            include_tests=False,  # stdlib: also the test suites
            data_dir=config_dict.placeholder(str),  # tfds data_dir (None: ~/tensorflow_datasets)
            seed=0,  # shuffling of the training sequences
        )
    )
    config.init_from = config_dict.placeholder(str)  # workdir of a run to start from
    config.init_from_hf = config_dict.placeholder(str)  # HF Qwen2/Qwen2.5 checkpoint dir
    config.freeze_backbone = False  # True: train only prefixes + aggregator

    # Fields and defaults in configs/common.py.
    config.optim = common.optim_section(
        lr=1e-3,  # peak learning rate
        warmup_steps=100,  # linear warm-up from 0 to lr
        end_lr=1e-5,  # end of the cosine decay
        b1=0.9,  # Adam beta1
        b2=0.95,  # Adam beta2
        weight_decay=0.1,  # AdamW's decoupled weight decay
        # Norms, biases, prefixes and embeddings are not decayed.
        weight_decay_exclude=("weight$", "bias$", "prefix_[kv]$", "embedding$"),
        clip="global_norm",  # clip the global gradient norm ...
        max_grad_norm=1.0,  # ... to 1
    )
    config.train = common.train_section(
        total_steps=1000,  # optimiser steps
        batch_size=16,  # sequences per step (global, over all devices)
        log_every=50,  # steps between log lines
        eval_every=250,  # steps between evaluations (0: none)
        eval_batches=8,  # validation batches per evaluation
        checkpoint_every=250,  # steps between checkpoints
    )
    config.mesh = common.mesh_section()  # data parallel over every device

    if arg in (None, ""):
        return config
    if arg not in PRESETS:
        names = ", ".join(PRESETS)
        raise ValueError(f"unknown preset {arg!r} for configs/parscale_lm.py; use one of {names}")
    for key, value in PRESETS[arg].items():
        if isinstance(value, dict):
            config[key].update(value)
        else:  # a whole section (a ConfigDict: the arithmetic task's) or a top-level value
            config[key] = copy.deepcopy(value)
    if config.task.get("tokenizer", "") is None:
        # A plain None field cannot be overridden from the command line; a str placeholder can
        # (--config.task.tokenizer=PATH), and stays None (an error at start) until it is.
        config.task.tokenizer = config_dict.placeholder(str)
    return config
