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
  s0..s5 the paper's six scaling-law sizes (reference/parscale.md §3.3; names by checkpoint
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
The big presets need `--config.task.tokenizer=/path/to/Qwen2.5/tokenizer.json` and a corpus
(`--config.task.corpus=files --config.task.paths=...` or a prepared tfds text dataset). Their
optimiser settings (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, peak lr 3e-4, warm-up then
cosine) are common LM defaults, not the paper's (unverified, see parscale.md §6).

Starting points (only when the workdir has no checkpoint of its own):
  --config.init_from=WORKDIR    two-stage training from another run (P = 1 or the same P).
  --config.init_from_hf=DIR     recycle an HF Qwen2/Qwen2.5 checkpoint; `model` must describe
                                it (vocab_size, hidden_size, ... are checked against config.json).
  --config.freeze_backbone=True train only prefixes + aggregator (parameter-efficient). The
                                backbone stays bit-identical, so one backbone serves every P
                                ("dynamic parallel scaling"): one prefix/aggregator set per P,
                                and P = 1 is the bare backbone (`parscale_jax.generate
                                --parscale-n 1`, `generate.at_parscale_n`).
Every field can be overridden, e.g. `--config.optim.lr=1e-3 --config.train.total_steps=500`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

# (hidden_size, intermediate_size) of the scaling-law models, parscale.md §3.3.
SCALING_SIZES = {
    "s0": (896, 4864),  # ParScale-0.7B (0.5B non-embedding)
    "s1": (1024, 5504),  # 0.9B (0.7B)
    "s2": (1280, 6912),  # 1.3B (1.1B)
    "s3": (1536, 8320),  # 1.8B (1.6B)
    "s4": (2048, 11008),  # 3B (2.8B)
    "s5": (2560, 13824),  # 4.7B (4.4B)
}
QWEN_VOCAB = 151_936
# Recycling presets: the public Qwen2.5 base models' architectures (hidden, intermediate, layers,
# heads, KV heads); every field is checked against the checkpoint's config.json when it loads.
QWEN25 = {
    "qwen2.5-0.5b-peft": (896, 4864, 24, 14, 2),
    "qwen2.5-3b-peft": (2048, 11008, 36, 16, 2),  # the paper's recycled backbone (§4.2)
}
PAPER_TOKENS_PER_STEP = 1024 * 2048


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # parscale_jax.config.ParScaleConfig fields.
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=320,  # the byte tokenizer's 258 ids, 64-aligned
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=config_dict.placeholder(int),  # None: hidden_size / num_attention_heads
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            parscale_n=1,
            parscale_n_tokens=48,
            parscale_attn_smooth=0.1,
            dtype="float32",
        )
    )
    # tasks.parscale_lm.data.lm_dataset arguments.
    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.parscale_lm.task:ParScaleLMTask",
            seq_len=128,
            tokenizer="bytes",  # or the path of a tokenizer.json
            eos_token=config_dict.placeholder(str),  # HF tokenizers: else tokenizer_config.json
            corpus="stdlib",  # "stdlib" | "files" | "tfds"
            paths=(),  # corpus="files": paths or globs
            tfds_name="",  # corpus="tfds": a prepared text dataset
            text_feature="text",
            max_documents=config_dict.placeholder(int),  # keep only this many documents
            validation_fraction=0.02,
            include_tests=False,  # stdlib: also the test suites
            data_dir=config_dict.placeholder(str),  # tfds data_dir (None: ~/tensorflow_datasets)
            seed=0,  # shuffling of the training sequences
        )
    )
    config.init_from = config_dict.placeholder(str)
    config.init_from_hf = config_dict.placeholder(str)
    config.freeze_backbone = False

    config.optim = common.optim_section(
        lr=1e-3,
        warmup_steps=100,
        end_lr=1e-5,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        # Norms, biases, prefixes and embeddings are not decayed.
        weight_decay_exclude=("weight$", "bias$", "prefix_[kv]$", "embedding$"),
        clip="global_norm",
        max_grad_norm=1.0,
    )
    config.train = common.train_section(
        total_steps=1000,
        batch_size=16,
        log_every=50,
        eval_every=250,
        eval_batches=8,
        checkpoint_every=250,
    )
    config.mesh = common.mesh_section()

    if arg in (None, "", "tiny"):
        return config
    if arg == "test":
        _test(config)
    elif arg in SCALING_SIZES:
        _paper(config, *SCALING_SIZES[arg])
        config.train.total_steps = round(42e9 / PAPER_TOKENS_PER_STEP)  # 20,027
    elif arg == "1.8b":
        _paper(config, *SCALING_SIZES["s3"])
        config.train.total_steps = round(1e12 / PAPER_TOKENS_PER_STEP)  # 476,837
    elif arg == "1.8b-stage2":
        _paper(config, *SCALING_SIZES["s3"])
        config.model.parscale_n = 8
        config.train.total_steps = round(20e9 / PAPER_TOKENS_PER_STEP)  # 9,537
        config.optim.warmup_steps = 500
    elif arg in QWEN25:
        _recycle(config, QWEN25[arg])
    else:
        names = ", ".join(["tiny", "test", *SCALING_SIZES, "1.8b", "1.8b-stage2", *QWEN25])
        raise ValueError(f"unknown preset {arg!r} for configs/parscale_lm.py; use one of {names}")
    return config


def _paper(config: ml_collections.ConfigDict, hidden: int, intermediate: int) -> None:
    """The released from-scratch architecture (parscale.md §3.1) at one width."""
    config.model.update(
        vocab_size=QWEN_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        dtype="bfloat16",
    )
    config.task.update(seq_len=2048, tokenizer=None)
    config.optim.update(lr=3e-4, warmup_steps=2000, end_lr=3e-5)
    config.train.update(
        batch_size=1024, log_every=100, eval_every=2000, eval_batches=16, checkpoint_every=2000
    )


def _recycle(config: ml_collections.ConfigDict, arch: tuple[int, int, int, int, int]) -> None:
    """PEFT recycling (parscale.md §7b): a frozen Qwen2.5 backbone from --config.init_from_hf,
    P = 2 new prefix sets + aggregator trained on 2048-token sequences."""
    hidden, intermediate, layers, heads, kv_heads = arch
    _paper(config, hidden, intermediate)
    config.model.update(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
        parscale_n=2,
    )
    config.freeze_backbone = True
    config.optim.update(warmup_steps=200)
    config.train.total_steps = 10_000


def _test(config: ml_collections.ConfigDict) -> None:
    """Seconds-long runs for the test suite (the real model and data pipeline, just small)."""
    config.model.update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        parscale_n_tokens=8,
    )
    config.task.update(seq_len=32, max_documents=20)
    config.optim.update(lr=3e-3, warmup_steps=5)
    config.train.update(
        total_steps=30,
        batch_size=8,
        log_every=5,
        eval_every=0,
        eval_batches=2,
        checkpoint_every=10,
    )
