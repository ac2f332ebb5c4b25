"""CTM on 2-D mazes.

    python -m launch.train --config=configs/ctm_maze.py:large --workdir=runs/maze_large
    python -m launch.train --config=configs/ctm_maze.py:cpu --workdir=runs/maze_cpu

Presets follow the reference runs (reference/ctm.md §3):
  large   scripts/train_ctm.sh (= the released checkpoint): 39x39 mazes, route 100, D 2048,
          resnet34-2, 16 heads, U-Net depth 8, first-last 64/32, 75 ticks, inputs in [0, 1]
  medium  the README's medium command: 19x19 mazes, route 50, 8 heads, U-Net depth 4
  small   the README's CPU-trainable run: 15x15 mazes, route 50, D 1024, resnet18-1,
          random-pairing 128/128, 50 ticks
  cpu     `make demo`: a reduced model on 11x11 mazes (route 32) that trains on a 2-core CPU in
          about 12 minutes
  test    seconds-long runs for the test suite
Mazes are generated on the fly from a seeded stream unless `task.data_dir` (a prepared tfds
`generated_mazes` dataset) or `task.image_folder` (the reference's PNG layout) is given.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # CTM constructor arguments; out_dims = route * 5 and the reshaper follow from task.size.
    config.model = ml_collections.ConfigDict(
        dict(
            iterations=75,
            d_model=2048,
            d_input=512,
            heads=16,
            n_synch_out=64,
            n_synch_action=32,
            synapse_depth=8,
            memory_length=25,
            deep_nlms=True,
            memory_hidden_dims=32,
            do_layernorm_nlm=False,
            backbone_type="resnet34-2",
            positional_embedding_type="none",
            dropout=0.1,
            dropout_nlm=config_dict.placeholder(float),
            neuron_select_type="first-last",
            n_random_pairing_self=0,
            variant="ctm",
        )
    )
    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.ctm_maze.task:MazeTask",
            size="large",  # tiny 11x11 / small 15x15 / medium 19x19 / large 39x39 / xl 99x99
            seed=0,  # maze streams: train uses 2*seed, eval 2*seed+1
            lookahead=5,  # auto-curriculum look-ahead (cirriculum_lookahead)
            expand_range=False,  # the released large checkpoint was trained on [0, 1] inputs
            use_most_certain=True,
            num_train=config_dict.placeholder(int),  # None: an endless stream of new mazes
            data_dir=config_dict.placeholder(str),
            image_folder=config_dict.placeholder(str),
        )
    )
    config.optim = common.optim_section(warmup_steps=10_000, clip="global_norm", max_grad_norm=1.0)
    config.train = common.train_section(total_steps=1_000_001, batch_size=64)
    config.mesh = common.mesh_section()

    presets = {
        "large": None,
        "reference": None,
        "medium": _medium,
        "small": _small,
        "cpu": _cpu,
        "test": _test,
    }
    if arg not in (None, "") and arg not in presets:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ctm_maze.py; use one of {', '.join(presets)}"
        )
    if presets.get(arg):
        presets[arg](config)
    return config


def _medium(config: ml_collections.ConfigDict) -> None:
    config.model.update(heads=8, synapse_depth=4)
    config.task.size = "medium"


def _small(config: ml_collections.ConfigDict) -> None:
    config.model.update(
        d_model=1024,
        d_input=256,
        heads=4,
        iterations=50,
        synapse_depth=8,
        n_synch_out=128,
        n_synch_action=128,
        neuron_select_type="random-pairing",
        backbone_type="resnet18-1",
    )
    config.task.size = "small"
    config.optim.warmup_steps = 5000
    config.train.total_steps = 100_001


def _cpu(config: ml_collections.ConfigDict) -> None:
    _small(config)
    config.model.update(
        d_model=256,
        d_input=64,
        heads=4,
        iterations=16,
        memory_length=8,
        memory_hidden_dims=8,
        synapse_depth=1,
        n_synch_out=64,
        n_synch_action=32,
        dropout=0.0,
    )
    config.task.size = "tiny"
    config.optim.update(lr=2e-3, warmup_steps=500)
    config.train.update(
        total_steps=12_000,
        batch_size=32,
        log_every=50,
        eval_every=2000,
        eval_batches=32,  # 1,024 held-out mazes
        checkpoint_every=1000,
    )


def _test(config: ml_collections.ConfigDict) -> None:
    _cpu(config)
    config.model.update(
        d_model=32,
        d_input=16,
        heads=2,
        iterations=3,
        memory_length=3,
        memory_hidden_dims=2,
        n_synch_out=8,
        n_synch_action=8,
    )
    config.optim.warmup_steps = 2
    config.train.update(
        total_steps=4, batch_size=4, log_every=2, eval_every=4, eval_batches=1, checkpoint_every=4
    )
