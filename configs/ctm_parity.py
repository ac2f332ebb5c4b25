"""CTM on cumulative parity.

    python -m launch.train --config=configs/ctm_parity.py --workdir=runs/parity          # reference
    python -m launch.train --config=configs/ctm_parity.py:tiny --workdir=runs/parity_tiny

The default is the reference run (SakanaAI scripts/train_ctm_75_25.sh: D 1024, T 75, M 25,
length 64, 200,001 iterations). Presets:
  tiny  the reference's CPU-sized setting (D 128, T 16, length 16, lr 1e-3): 17,500 steps, about
        15 minutes on a 2-core CPU (measured: 99.9% per position / 99.4% whole sequence after
        15,000 steps in 12.9 minutes).
  test  a few-second model for the test suite.
Every field can be overridden from the command line, e.g. `--config.optim.lr=3e-4`.

`get_config` writes out the reference configuration; each preset in `PRESETS` lists, in one place,
every value it sets on top of it (no preset builds on another).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

# Preset name -> {section: {field: value}}: every value the preset sets on top of the reference
# config written out in `get_config`.
PRESETS: dict[str, dict[str, dict]] = {
    "reference": {},  # the reference config as written in get_config (also the default)
    # The reference code's CPU-sized parity run (PyTorch: 99.3% per position in 15 minutes).
    "tiny": {
        "model": dict(
            iterations=16,
            d_model=128,
            d_input=64,
            heads=4,
            n_synch_out=32,
            n_synch_action=32,
            synapse_depth=1,
            memory_length=8,
            memory_hidden_dims=8,
        ),
        "task": dict(seq_len=16),
        "optim": dict(lr=1e-3, warmup_steps=500),
        "train": dict(
            total_steps=17_500,
            log_every=100,
            eval_every=500,
            eval_batches=16,
            checkpoint_every=1000,
        ),
    },
    # Seconds-long runs for the test suite (still the real CTM, just small).
    "test": {
        "model": dict(
            iterations=4,
            d_model=32,
            d_input=16,
            heads=2,
            n_synch_out=8,
            n_synch_action=8,
            synapse_depth=1,
            memory_length=4,
            memory_hidden_dims=4,
        ),
        "task": dict(seq_len=8),
        "optim": dict(lr=3e-3, warmup_steps=10),
        "train": dict(
            total_steps=200,
            batch_size=16,
            log_every=20,
            eval_every=100,
            eval_batches=2,
            checkpoint_every=50,
            keep_checkpoints=3,
        ),
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # The CTM constructor's arguments (ctm_jax.config.CTMConfig). out_dims = 2 * seq_len and
    # prediction_reshaper = (seq_len, 2) follow from task.seq_len, so they are not listed here.
    config.model = ml_collections.ConfigDict(
        dict(
            iterations=75,  # internal ticks T
            d_model=1024,  # neurons D (width of the recurrent state z)
            d_input=512,  # attention width (keys/values/query)
            heads=8,  # attention heads (divide d_input)
            n_synch_out=32,  # neurons in the output synchronisation
            n_synch_action=32,  # neurons in the action (attention-query) synchronisation
            synapse_depth=1,  # 1: one Linear-GLU-LayerNorm synapse layer; > 1: U-Net depth
            memory_length=25,  # M, pre-activation history each neuron-level model sees
            deep_nlms=True,  # 2-layer neuron-level models (else one linear map)
            memory_hidden_dims=16,  # hidden width of the deep neuron-level models
            do_layernorm_nlm=False,  # LayerNorm on the neuron-level models' input history
            backbone_type="parity_backbone",  # a 2-row embedding of the +-1 inputs
            positional_embedding_type="custom-rotational-1d",  # added to the embedded sequence
            dropout=0.0,  # attention and synapse dropout
            dropout_nlm=config_dict.placeholder(float),  # None: same as dropout
            neuron_select_type="random",  # each pair: two neurons drawn at random
            n_random_pairing_self=0,  # self pairs (random-pairing only)
            variant="ctm",  # ctm | sort
            # compute dtype: float32 | bfloat16 (params, optimiser state, softmaxes, certainties
            # and the synchronisation stay float32)
            dtype="float32",
        )
    )

    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.ctm_parity.task:ParityTask",  # the task class, module:Class
            seq_len=64,  # bits per sequence (parity_sequence_length)
            train_seed=0,  # seed of the training stream
            eval_seed=1,  # a different stream: evaluation is held out
            use_most_certain=True,  # loss selects the most-certain tick (and the min-loss tick)
        )
    )

    # Fields and defaults in configs/common.py.
    config.optim = common.optim_section()  # the reference parity run: quantile clipping
    config.train = common.train_section()  # 200,001 steps of batch 64
    config.mesh = common.mesh_section()  # data parallel over every device

    if arg in (None, ""):
        return config
    if arg not in PRESETS:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ctm_parity.py; use one of {', '.join(PRESETS)}"
        )
    for section, values in PRESETS[arg].items():
        config[section].update(values)
    return config
