"""CTM image classification (task `ctm_image`).

    python -m launch.train --config=configs/ctm_image.py:imagenet --workdir=runs/imagenet
    python -m launch.train --config=configs/ctm_image.py:cifar10 --workdir=runs/cifar10
    python -m launch.train --config=configs/ctm_image.py:cpu --workdir=runs/image_cpu

Presets (reference runs: the CTM authors' scripts/train_imagenet.sh and scripts/train_cifar10.sh):
  imagenet  ImageNet-1K, = the released checkpoint's run: D 4096, T 50, M 25, resnet152-4,
            synapse U-Net depth 8, random-pairing 8196 / 2048 (32 self pairs), dropout 0.2,
            batch 64 per GPU on 8 GPUs, fp16 autocast (here bfloat16). Needs the ImageNet archives
            in <task.data_dir>/downloads/manual/ and task.download=True once to prepare them.
  cifar10   the CIFAR-10 "versus humans" run: D 256, T 50, M 15, resnet18-1, U-Net depth 5,
            random-pairing 256 / 512, batch 512, AutoAugment (task.download=True fetches CIFAR).
  cifar100  the cifar10 run's settings on CIFAR-100 (the reference publishes no CIFAR-100 script;
            its training code uses the same CIFAR-10 AutoAugment policy for both).
  cpu       scikit-learn's 8x8 digits (ships with the package, no download): a small CTM that
            trains on a 2-core CPU in a few minutes.
  test      seconds-long runs for the test suite.
`reference` is `imagenet` (also the default). Every field can be overridden from the command line,
e.g. `--config.task.data_dir=/data/tfds --config.task.download=True`.

`get_config` writes out the reference configuration (imagenet); each preset in `PRESETS` lists,
in one place, every value it sets on top of it (no preset builds on another).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from configs import common

# The CIFAR-10 "versus humans" model (scripts/train_cifar10.sh), shared by cifar10 and cifar100.
_CIFAR_MODEL = dict(
    iterations=50,
    d_model=256,
    d_input=64,
    heads=16,
    n_synch_out=256,
    n_synch_action=512,
    synapse_depth=5,
    memory_length=15,
    memory_hidden_dims=64,
    backbone_type="resnet18-1",
    dropout=0.0,
    dropout_nlm=0.0,
    n_random_pairing_self=0,
    dtype="float32",
)
_CIFAR_OPTIM = dict(
    lr=1e-4, warmup_steps=1000, eps=1e-8, weight_decay=1e-4, clip="none", max_grad_norm=1.0
)
_CIFAR_TRAIN = dict(
    total_steps=600_001,
    batch_size=512,
    eval_every=2000,  # track_every
    eval_batches=19,  # the 10,000 test images hold 19 full batches of 512 (9,728 images)
    checkpoint_every=1000,
    seed=1,
)

# Preset name -> {section: {field: value}}: every value the preset sets on top of the reference
# config (ImageNet) written out in `get_config`.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {},  # the reference config as written in get_config
    "reference": {},  # the same
    "cifar10": {
        "model": _CIFAR_MODEL,
        "task": dict(
            dataset="cifar10",
            image_size=32,
            augment="autoaugment",
            eval_transform="none",
            bn_reestimate_batches=50,  # n_test_batches
        ),
        "optim": _CIFAR_OPTIM,
        "train": _CIFAR_TRAIN,
    },
    "cifar100": {
        "model": _CIFAR_MODEL,
        "task": dict(
            dataset="cifar100",
            image_size=32,
            augment="autoaugment",
            eval_transform="none",
            bn_reestimate_batches=50,
        ),
        "optim": _CIFAR_OPTIM,
        "train": _CIFAR_TRAIN,
    },
    # scikit-learn's digits (8x8 greyscale), upsampled to 16x16: resnet18-1 (the CIFAR run's
    # backbone) keeps full resolution in its stem and halves once, so the CTM attends over 8x8
    # positions (4x4 at the native size leaves little to look around).
    "cpu": {
        "model": dict(
            iterations=16,
            d_model=256,
            d_input=64,
            heads=4,
            n_synch_out=128,
            n_synch_action=64,
            synapse_depth=1,
            memory_length=8,
            memory_hidden_dims=16,
            backbone_type="resnet18-1",
            dropout=0.0,
            dropout_nlm=0.0,
            n_random_pairing_self=0,
            dtype="float32",
        ),
        "task": dict(
            dataset="digits",
            image_size=16,
            augment="shift",
            eval_transform="none",
            bn_reestimate="cumulative",
            bn_reestimate_batches=10,
        ),
        "optim": dict(lr=1e-3, warmup_steps=100, eps=1e-8, clip="global_norm", max_grad_norm=1.0),
        "train": dict(
            total_steps=1000,
            batch_size=64,
            log_every=50,
            eval_every=250,
            eval_batches=6,  # all 384 held-out digits
            checkpoint_every=250,
            seed=0,
        ),
    },
    # Seconds-long runs for the test suite (the real model, data pipeline and BN re-estimation).
    "test": {
        "model": dict(
            iterations=3,
            d_model=64,
            d_input=16,
            heads=2,
            n_synch_out=32,
            n_synch_action=8,
            synapse_depth=1,
            memory_length=3,
            memory_hidden_dims=2,
            backbone_type="resnet18-1",
            dropout=0.0,
            dropout_nlm=0.0,
            n_random_pairing_self=0,
            dtype="float32",
        ),
        "task": dict(
            dataset="digits",
            image_size=8,
            augment="shift",
            eval_transform="none",
            bn_reestimate="cumulative",
            bn_reestimate_batches=2,
        ),
        "optim": dict(lr=1e-2, warmup_steps=2, eps=1e-8, clip="none", max_grad_norm=1.0),
        "train": dict(
            total_steps=4,
            batch_size=8,
            log_every=2,
            eval_every=4,
            eval_batches=2,
            checkpoint_every=4,
            seed=0,
        ),
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # CTM constructor arguments (ctm_jax.config.CTMConfig); out_dims (the class count) and the
    # prediction reshaper follow from task.dataset.
    config.model = ml_collections.ConfigDict(
        dict(
            iterations=50,  # internal ticks T
            d_model=4096,  # neurons D (width of the recurrent state z)
            d_input=1024,  # attention width (keys/values/query)
            heads=16,  # attention heads (divide d_input)
            n_synch_out=8196,  # output synchronisation pairs (random-pairing: n; sic, not 8192)
            n_synch_action=2048,  # action (attention-query) synchronisation pairs
            synapse_depth=8,  # synapse U-Net depth (1: one Linear-GLU-LayerNorm layer)
            memory_length=25,  # M, pre-activation history each neuron-level model sees
            deep_nlms=True,  # 2-layer neuron-level models (else one linear map)
            memory_hidden_dims=64,  # hidden width of the deep neuron-level models
            do_layernorm_nlm=False,  # LayerNorm on the neuron-level models' input history
            backbone_type="resnet152-4",  # ResNet-152, all 4 hyper-blocks (stride-1 stem)
            positional_embedding_type="none",  # nothing added to the feature map
            dropout=0.2,  # attention and synapse dropout
            dropout_nlm=0.0,  # the neuron-level models' dropout (None: same as dropout)
            neuron_select_type="random-pairing",  # pairs (left[i], right[i]) drawn at random
            n_random_pairing_self=32,  # the first 32 pairs pair a neuron with itself
            variant="ctm",  # ctm | sort
            # compute dtype: float32 | bfloat16 (the reference trains with fp16 autocast; params,
            # optimiser state, softmaxes, certainties and the synchronisation stay float32)
            dtype="bfloat16",
        )
    )
    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.ctm_image.task:ImageTask",  # the task class, module:Class
            dataset="imagenet2012",  # imagenet2012 | cifar10 | cifar100 | digits
            data_dir=config_dict.placeholder(str),  # tfds data dir (None: tfds's default)
            download=False,  # let tfds download / prepare the dataset (ImageNet: from manual/)
            image_size=224,  # side of the square images the model sees
            # train augmentation: random_resized_crop (+ flip) | autoaugment | shift | none
            augment="random_resized_crop",
            # eval geometry: center_crop (resize shorter side to eval_resize, crop image_size),
            # resize (shorter side to eval_resize only; batch size 1) | none
            eval_transform="center_crop",
            eval_resize=256,  # shorter side before the centre crop
            num_train=config_dict.placeholder(int),  # None: every training image
            seed=0,  # shuffling and augmentation of the training stream
            use_most_certain=True,  # loss selects the most-certain tick (and the min-loss tick)
            # BatchNorm statistics before each evaluation: 'reference' (reset, then momentum 0.1
            # over the batches, as torch) | 'cumulative' (equal weight per batch)
            bn_reestimate="reference",
            bn_reestimate_batches=200,  # training batches for that (n_test_batches); 0: none
        )
    )
    # Fields and defaults in configs/common.py.
    config.optim = common.optim_section(
        lr=5e-4,  # peak learning rate
        warmup_steps=10_000,  # linear warm-up from 0 to lr
        eps=1e-6,  # the reference's AdamW epsilon under mixed precision
        weight_decay=0.0,  # no decoupled weight decay
        clip="global_norm",  # clip the global gradient norm ...
        max_grad_norm=20.0,  # ... to 20
    )
    config.train = common.train_section(
        total_steps=500_001,  # optimiser steps (the reference's training iterations)
        batch_size=512,  # global: 64 per device x 8 devices, as the reference's 8-GPU run
        eval_every=5000,  # track_every
        eval_batches=97,  # the 50,000 validation images hold 97 full batches of 512
        seed=1,  # model init and dropout (the reference script's seed)
    )
    config.mesh = common.mesh_section()  # data parallel over every device

    if arg in (None, ""):
        return config
    if arg not in PRESETS:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ctm_image.py; use one of {', '.join(PRESETS)}"
        )
    for section, values in PRESETS[arg].items():
        config[section].update(values)
    return config
