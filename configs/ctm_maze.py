"""CTM on 2-D mazes.

    python -m launch.train --config=configs/ctm_maze.py:large --workdir=runs/maze_large
    python -m launch.train --config=configs/ctm_maze.py:cpu --workdir=runs/maze_cpu

Presets follow the reference training scripts:
  large   scripts/train_ctm.sh (= the released checkpoint): 39x39 mazes, route 100, D 2048,
          resnet34-2, 16 heads, U-Net depth 8, first-last 64/32, 75 ticks, inputs in [0, 1]
  medium  the README's medium command: 19x19 mazes, route 50, 8 heads, U-Net depth 4
  small   the README's CPU-trainable run: 15x15 mazes, route 50, D 1024, resnet18-1,
          random-pairing 128/128, 50 ticks
  cpu     `make demo`: a reduced model on 11x11 mazes (route 32) that trains on a 2-core CPU in
          about 12 minutes
  test    seconds-long runs for the test suite
  cpu-p2, cpu-p4
          the P-stream CTM (`MazeStreamsTask`: ParScale's parallel streams around the CTM, with
          a `streams` section) recycled from the `make demo` run: `init_from=runs/maze_demo`,
          whose CTM is frozen (`freeze_backbone`); only the P per-pixel input offsets and the
          aggregator train, for a few thousand steps on the CPU
  test-p2 the P = 2 CTM trained from scratch at test size (tests set init_from/freeze_backbone)
Mazes are generated on the fly from a seeded stream unless `task.data_dir` (a prepared tfds
`generated_mazes` dataset) or `task.image_folder` (the reference's PNG layout) is given.

`get_config` writes out the reference configuration (large); each preset in `PRESETS` lists, in
one place, every value it sets on top of it (no preset builds on another).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from configs import common

# Preset name -> {section: {field: value}}: every value the preset sets on top of the reference
# config (the large run) written out in `get_config`; a section the reference config lacks
# (`streams`) is added whole, a non-dict value sets a top-level field (`init_from`).
PRESETS: dict[str, dict[str, Any]] = {
    "large": {},  # the reference config as written in get_config
    "reference": {},  # the same
    # The README's medium command.
    "medium": {
        "model": dict(heads=8, synapse_depth=4),
        "task": dict(size="medium"),
    },
    # The README's CPU-trainable run.
    "small": {
        "model": dict(
            iterations=50,
            d_model=1024,
            d_input=256,
            heads=4,
            n_synch_out=128,
            n_synch_action=128,
            synapse_depth=8,
            backbone_type="resnet18-1",
            neuron_select_type="random-pairing",
        ),
        "task": dict(size="small"),
        "optim": dict(warmup_steps=5000),
        "train": dict(total_steps=100_001),
    },
    # `make demo`: trains on a 2-core CPU in about 12 minutes.
    "cpu": {
        "model": dict(
            iterations=16,
            d_model=256,
            d_input=64,
            heads=4,
            n_synch_out=64,
            n_synch_action=32,
            synapse_depth=1,
            memory_length=8,
            memory_hidden_dims=8,
            backbone_type="resnet18-1",
            dropout=0.0,
            neuron_select_type="random-pairing",
        ),
        "task": dict(size="tiny"),
        "optim": dict(lr=2e-3, warmup_steps=500),
        "train": dict(
            total_steps=12_000,
            batch_size=32,
            log_every=50,
            eval_every=2000,
            eval_batches=32,  # 1,024 held-out mazes
            checkpoint_every=1000,
        ),
    },
    # Seconds-long runs for the test suite (the real model and data pipeline, just small).
    "test": {
        "model": dict(
            iterations=3,
            d_model=32,
            d_input=16,
            heads=2,
            n_synch_out=8,
            n_synch_action=8,
            synapse_depth=1,
            memory_length=3,
            memory_hidden_dims=2,
            backbone_type="resnet18-1",
            dropout=0.0,
            neuron_select_type="random-pairing",
        ),
        "task": dict(size="tiny"),
        "optim": dict(lr=2e-3, warmup_steps=2),
        "train": dict(
            total_steps=4,
            batch_size=4,
            log_every=2,
            eval_every=4,
            eval_batches=1,
            checkpoint_every=4,
        ),
    },
    # The P = 2 CTM recycled from the `make demo` run (`:cpu`, in runs/maze_demo): its CTM is
    # frozen, the two streams' per-pixel input offsets and the per-tick aggregator train.
    "cpu-p2": {
        "model": dict(  # = the :cpu model (the recycled checkpoint's)
            iterations=16,
            d_model=256,
            d_input=64,
            heads=4,
            n_synch_out=64,
            n_synch_action=32,
            synapse_depth=1,
            memory_length=8,
            memory_hidden_dims=8,
            backbone_type="resnet18-1",
            dropout=0.0,
            neuron_select_type="random-pairing",
        ),
        "task": dict(name="tasks.ctm_maze.task:MazeStreamsTask", size="tiny"),
        "streams": dict(
            n_streams=2,  # P
            transform="additive",  # a learned offset per pixel and colour for each stream
            transform_stddev=0.02,  # the offsets' N(0, std^2) init (ParScale's)
            smoothing=0.1,  # stream weights w (1 - eps) + eps / P
            aggregator_hidden_dim=0,  # 0: the feature width, route * 5
            mode="fold",  # the streams folded into the batch (one CTM call)
        ),
        "init_from": "runs/maze_demo",  # the P = 1 run whose CTM is recycled
        "freeze_backbone": True,  # train only the stream offsets and the aggregator
        "optim": dict(lr=2e-3, warmup_steps=100),
        "train": dict(
            total_steps=2500,  # about 8 minutes on a 2-core CPU
            batch_size=32,
            log_every=50,
            eval_every=500,
            eval_batches=32,  # the same 1,024 held-out mazes as the :cpu run
            checkpoint_every=500,
        ),
    },
    # The same with P = 4.
    "cpu-p4": {
        "model": dict(  # = the :cpu model (the recycled checkpoint's)
            iterations=16,
            d_model=256,
            d_input=64,
            heads=4,
            n_synch_out=64,
            n_synch_action=32,
            synapse_depth=1,
            memory_length=8,
            memory_hidden_dims=8,
            backbone_type="resnet18-1",
            dropout=0.0,
            neuron_select_type="random-pairing",
        ),
        "task": dict(name="tasks.ctm_maze.task:MazeStreamsTask", size="tiny"),
        "streams": dict(
            n_streams=4,
            transform="additive",
            transform_stddev=0.02,
            smoothing=0.1,
            aggregator_hidden_dim=0,
            mode="fold",
        ),
        "init_from": "runs/maze_demo",
        "freeze_backbone": True,
        "optim": dict(lr=2e-3, warmup_steps=100),
        "train": dict(
            total_steps=1250,  # about 8 minutes on a 2-core CPU (twice the P = 2 step)
            batch_size=32,
            log_every=50,
            eval_every=250,
            eval_batches=32,
            checkpoint_every=250,
        ),
    },
    # The P = 2 CTM at test size, trained from scratch (BatchNorm statistics update, hence
    # mode='fold'); tests recycle a :test run with init_from=<workdir>, freeze_backbone=True.
    "test-p2": {
        "model": dict(
            iterations=3,
            d_model=32,
            d_input=16,
            heads=2,
            n_synch_out=8,
            n_synch_action=8,
            synapse_depth=1,
            memory_length=3,
            memory_hidden_dims=2,
            backbone_type="resnet18-1",
            dropout=0.0,
            neuron_select_type="random-pairing",
        ),
        "task": dict(name="tasks.ctm_maze.task:MazeStreamsTask", size="tiny"),
        "streams": dict(
            n_streams=2,
            transform="additive",
            transform_stddev=0.02,
            smoothing=0.1,
            aggregator_hidden_dim=0,
            mode="fold",
        ),
        "init_from": "",  # '' : none
        "freeze_backbone": False,
        "optim": dict(lr=2e-3, warmup_steps=2),
        "train": dict(
            total_steps=4,
            batch_size=4,
            log_every=2,
            eval_every=4,
            eval_batches=1,
            checkpoint_every=4,
        ),
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # CTM constructor arguments (ctm_jax.config.CTMConfig); out_dims = route * 5 and the reshaper
    # follow from task.size.
    config.model = ml_collections.ConfigDict(
        dict(
            iterations=75,  # internal ticks T
            d_model=2048,  # neurons D (width of the recurrent state z)
            d_input=512,  # attention width (keys/values/query)
            heads=16,  # attention heads (divide d_input)
            n_synch_out=64,  # neurons in the output synchronisation
            n_synch_action=32,  # neurons in the action (attention-query) synchronisation
            synapse_depth=8,  # synapse U-Net depth (1: one Linear-GLU-LayerNorm layer)
            memory_length=25,  # M, pre-activation history each neuron-level model sees
            deep_nlms=True,  # 2-layer neuron-level models (else one linear map)
            memory_hidden_dims=32,  # hidden width of the deep neuron-level models
            do_layernorm_nlm=False,  # LayerNorm on the neuron-level models' input history
            backbone_type="resnet34-2",  # ResNet-34 truncated after 2 hyper-blocks
            positional_embedding_type="none",  # nothing added to the feature map
            dropout=0.1,  # attention and synapse dropout
            dropout_nlm=config_dict.placeholder(float),  # None: same as dropout
            neuron_select_type="first-last",  # out: the first n neurons, action: the last n
            n_random_pairing_self=0,  # self pairs (random-pairing only)
            variant="ctm",  # ctm | sort
            # compute dtype: float32 | bfloat16 (params, optimiser state, softmaxes, certainties
            # and the synchronisation stay float32)
            dtype="float32",
        )
    )
    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.ctm_maze.task:MazeTask",  # the task class, module:Class
            size="large",  # tiny 11x11 / small 15x15 / medium 19x19 / large 39x39 / xl 99x99
            seed=0,  # maze streams: train uses 2*seed, eval 2*seed+1
            lookahead=5,  # auto-curriculum look-ahead (cirriculum_lookahead)
            expand_range=False,  # inputs in [-1, 1] if True; the released checkpoint used [0, 1]
            use_most_certain=True,  # loss selects the most-certain tick (and the min-loss tick)
            num_train=config_dict.placeholder(int),  # None: an endless stream of new mazes
            data_dir=config_dict.placeholder(str),  # a prepared tfds `generated_mazes` dataset
            image_folder=config_dict.placeholder(str),  # the reference's PNG layout
        )
    )
    # Fields and defaults in configs/common.py.
    config.optim = common.optim_section(
        warmup_steps=10_000,  # linear warm-up from 0 to lr
        clip="global_norm",  # clip the global gradient norm ...
        max_grad_norm=1.0,  # ... to 1
    )
    config.train = common.train_section(
        total_steps=1_000_001,  # optimiser steps (the reference's training iterations)
        batch_size=64,  # mazes per step (global, over all devices)
    )
    config.mesh = common.mesh_section()  # data parallel over every device

    if arg in (None, ""):
        return config
    if arg not in PRESETS:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ctm_maze.py; use one of {', '.join(PRESETS)}"
        )
    for section, values in PRESETS[arg].items():
        if not isinstance(values, dict):
            config[section] = values  # a top-level field (init_from, freeze_backbone)
        elif section in config:
            config[section].update(values)
        else:
            config[section] = ml_collections.ConfigDict(values)  # a section of its own (streams)
    return config
