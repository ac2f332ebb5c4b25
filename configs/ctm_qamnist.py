"""CTM on Q&A-MNIST (look at 1-4 digits, then answer "+/- which digits" mod 10).

    python -m launch.train --config=configs/ctm_qamnist.py --workdir=runs/qamnist        # R = 10
    python -m launch.train --config=configs/ctm_qamnist.py:reference_r1 --workdir=runs/qa_r1
    python -m launch.train --config=configs/ctm_qamnist.py:cpu --workdir=runs/qamnist_cpu

The default is the reference's R = 10 run (scripts/train_ctm_10.sh of the CTM repository: D 1024,
d_input 64, 4 heads, M 30, H 16, synapse depth 1, 32/32 'random' synchronisation neurons, batch
64, lr 1e-4, warm-up 500, 300,001 iterations, no gradient clipping); it reads MNIST through
`tfds.data_source('mnist')` (prepare it once with `tfds build mnist --file_format=array_record
--data_dir=<dir>` and pass `--config.task.data_dir=<dir>`). Presets:
  reference_r1  the reference's R = 1 run (train_ctm_1.sh: M 3, one tick per digit / token /
                answer).
  cpu           scikit-learn's 8x8 digits (shipped with the package) at their own size and a
                small CTM: learns on a 2-core CPU in minutes (see the README for the numbers).
  test          a few-second model for the test suite.

Neuron selection: the reference QAMNIST class defaults to 'first-last', but its training script
passes 'random' (the script's own default), so the presets use 'random' as the runs did.

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
    "reference": {},  # the R = 10 reference run as written in get_config (also the default)
    # train_ctm_1.sh: one tick per digit image, per question token and for the answer.
    "reference_r1": {
        "model": dict(memory_length=3),
        "task": dict(repeats=1, answer_steps=1),
    },
    # scikit-learn's digits: no download. They are 8x8 images: upsampling them to 32x32 adds no
    # information and costs 16x the backbone compute, so they stay 8x8 (2x2 = 4 key/value
    # tokens per digit). A small CTM, R = 1 and up to 3 digits / 3 operations keep a step near
    # a tenth of a second; evaluation asks up to 5 operations.
    "cpu": {
        "model": dict(
            d_model=256,
            d_input=32,
            heads=2,
            n_synch_out=32,
            n_synch_action=32,
            memory_length=5,
            memory_hidden_dims=8,
        ),
        "task": dict(
            source="digits",
            image_size=8,
            max_digits=3,
            max_ops=3,
            repeats=1,
            answer_steps=2,
            eval_max_ops=5,
        ),
        "optim": dict(lr=1e-3, warmup_steps=200),
        "train": dict(
            total_steps=6000,
            log_every=100,
            eval_every=1000,
            eval_batches=16,
            checkpoint_every=1000,
        ),
    },
    # Seconds-long runs for the test suite (still the real model, just small).
    "test": {
        "model": dict(
            d_model=32,
            d_input=16,
            heads=2,
            n_synch_out=8,
            n_synch_action=8,
            memory_length=3,
            memory_hidden_dims=4,
        ),
        "task": dict(
            source="digits",
            image_size=8,
            max_digits=2,
            max_ops=2,
            repeats=1,
            answer_steps=1,
            eval_max_ops=3,
        ),
        "optim": dict(lr=1e-2, warmup_steps=5),
        "train": dict(
            total_steps=120,
            batch_size=16,
            log_every=20,
            eval_every=0,  # the test suite evaluates the restored model itself
            eval_batches=2,
            checkpoint_every=120,
            keep_checkpoints=1,
        ),
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # The CTM constructor's arguments (ctm_jax.config.CTMConfig). The task sets out_dims (10),
    # backbone_type / positional_embedding_type ('none': the digit backbone and the question
    # embeddings belong to the Q&A-MNIST model), variant ('ctm') and iterations (the question
    # layout decides the ticks), so they are not listed here.
    config.model = ml_collections.ConfigDict(
        dict(
            d_model=1024,  # neurons D (width of the recurrent state z)
            d_input=64,  # digit backbone channels = attention width = question embedding width
            heads=4,  # attention heads (divide d_input)
            n_synch_out=32,  # neurons in the output synchronisation
            n_synch_action=32,  # neurons in the action (attention-query) synchronisation
            synapse_depth=1,  # 1: one Linear-GLU-LayerNorm synapse layer; > 1: U-Net depth
            memory_length=30,  # M, pre-activation history each neuron-level model sees
            deep_nlms=True,  # 2-layer neuron-level models (else one linear map)
            memory_hidden_dims=16,  # hidden width of the deep neuron-level models
            do_layernorm_nlm=False,  # LayerNorm on the neuron-level models' input history
            dropout=0.0,  # attention and synapse dropout
            dropout_nlm=config_dict.placeholder(float),  # None: same as dropout
            neuron_select_type="random",  # each pair: two neurons drawn at random
            n_random_pairing_self=0,  # self pairs (random-pairing only)
            remat_ticks=True,  # recompute ticks in the backward pass (same numbers, less memory)
            dtype="float32",  # compute dtype; this model runs in float32 only
        )
    )

    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.ctm_qamnist.task:QAMNISTTask",  # the task class, module:Class
            source="mnist",  # digit images: 'mnist' (tfds) or 'digits' (scikit-learn, offline)
            data_dir=config_dict.placeholder(str),  # tfds data_dir holding 'mnist' (None: default)
            image_size=32,  # images resized to this square size (MNIST 28 -> 32 as the reference)
            # Digits shown and operations asked, inclusive ranges. The reference's q_num_images=3
            # with delta 2 is drawn by np.random.randint(1, 5): the upper bound is exclusive, so
            # 1..4 digits (never 5); the same for q_num_operations=3, delta 2: 1..4 operations.
            min_digits=1,  # fewest digit images per question
            max_digits=4,  # most digit images per question (<= 50: the index table's rows)
            min_ops=1,  # fewest operations per question
            max_ops=4,  # most operations per question
            repeats=10,  # R (q_num_repeats_per_input): ticks per digit image and per token
            answer_steps=10,  # ticks of zero input at the end (q_num_answer_steps = R)
            # Evaluation beyond the training range: half of the eval questions have
            # max_ops + 1 .. eval_max_ops operations, reported as beyond_* metrics; equal to
            # max_ops: no such questions.
            eval_max_ops=8,
            train_seed=0,  # seed of the training question stream (MNIST train images)
            eval_seed=1,  # a different stream over the test images: evaluation is held out
            use_most_certain=True,  # loss and accuracy at the most certain answer tick
        )
    )

    # Fields and defaults in configs/common.py. The reference's Q&A-MNIST loop has no gradient
    # clipping and no weight decay.
    config.optim = common.optim_section(lr=1e-4, warmup_steps=500, clip="none")
    config.train = common.train_section(total_steps=300_001, batch_size=64)
    config.mesh = common.mesh_section()  # data parallel over every device

    if arg in (None, ""):
        return config
    if arg not in PRESETS:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ctm_qamnist.py; use one of {', '.join(PRESETS)}"
        )
    for section, values in PRESETS[arg].items():
        config[section].update(values)
    return config
