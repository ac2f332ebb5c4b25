"""Config sections every experiment shares (optimiser, train loop, mesh), with the reference's
defaults; experiment files override what differs."""

from __future__ import annotations

import ml_collections


def optim_section(**overrides) -> ml_collections.ConfigDict:
    """AdamW + linear warm-up + cosine to eta_min, and the gradient clipping choice."""
    values = dict(
        lr=1e-4,  # peak learning rate, reached at the end of the warm-up
        schedule="cosine",  # or "constant" (after the warm-up)
        warmup_steps=500,  # linear warm-up from warmup_init_lr to lr over these steps
        warmup_init_lr=0.0,  # reference: 1e-20, i.e. zero
        end_lr=1e-7,  # eta_min of the reference's cosine
        b1=0.9,  # AdamW first-moment decay
        b2=0.999,  # AdamW second-moment decay
        eps=1e-8,  # AdamW denominator epsilon
        weight_decay=0.0,  # AdamW decoupled weight decay (times the learning rate)
        weight_decay_exclude=(),  # regexes on 'a/b/kernel' param paths exempt from decay
        clip="quantile",  # "quantile" | "global_norm" | "none"
        max_grad_norm=1.0,  # used by clip="global_norm"
        clip_quantile=0.9,  # clip="quantile": autoclip QuantileClip, as the reference parity run
        clip_history=1000,  # clip="quantile": how many past gradient norms the quantile uses
        clip_scope="per_parameter",  # autoclip's default; or "global"
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def train_section(**overrides) -> ml_collections.ConfigDict:
    """The training loop: length, batch, logging, evaluation, checkpoints, data, diagnostics."""
    values = dict(
        total_steps=200_001,  # optimiser updates of the whole run (a resumed run continues)
        batch_size=64,  # global batch, split over the processes and the data-parallel devices
        microbatches=1,  # gradient accumulation: the batch in this many sequential pieces
        seed=0,  # model init and dropout
        log_every=100,  # steps per progress line and per train record (interval means)
        eval_every=1000,  # steps between evaluations (and at the last step); 0: never
        eval_batches=16,  # held-out batches per evaluation (the same ones every time)
        checkpoint_every=1000,  # steps between checkpoints (the last step is always saved)
        keep_checkpoints=3,  # the latest checkpoints kept on disk; older ones are deleted
        async_checkpointing=True,  # Orbax writes checkpoints in the background
        checkpoint_checksums=True,  # SHA-256 of every checkpoint file, checked before a restore
        data_threads=1,  # grain read threads
        data_prefetch=8,  # grain prefetch buffer size, in batches
        profile_steps="",  # 'START,STOP': XLA trace of those steps into <workdir>/tensorboard
        transfer_guard="allow",  # jax.transfer_guard in the step loop: log / disallow (+_explicit)
        # MFU on the progress line: '' : the chip table (none on CPU); 'measure': this machine's
        # f32 matmul peak, measured at start; or a number in FLOP/s per device
        mfu_peak="",
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def mesh_section(**overrides) -> ml_collections.ConfigDict:
    """Mesh axis sizes (-1 takes the remaining devices) and the logical-axis rules.

    `rules` maps every logical axis name the models' param tables and activation constraints use
    to mesh axes: 'fsdp', 'tensor', 'data,fsdp' (both, in order) or '' (replicated). With the
    defaults, `--config.mesh.fsdp=4` gives FSDP (params and optimiser state split along the model
    dim over 4 devices) and `--config.mesh.tensor=2` tensor parallelism (heads, MLP, vocab, CTM
    neurons). A dim the mesh axes do not divide is replicated (logged at start-up).
    """
    rules = dict(
        batch="data,fsdp",  # activations' batch dim (and the input batch)
        embed="fsdp",  # model width: LM hidden size, CTM d_input
        hidden="fsdp",  # CTM synapse input / U-Net widths
        heads="tensor",  # attention heads
        kv_heads="tensor",  # key/value heads (grouped-query attention)
        mlp="tensor",  # LM intermediate size, CTM synapse outputs
        vocab="tensor",  # LM vocabulary (embedding table, output head)
        neurons="tensor",  # CTM d_model: state, NLM weights
        # replicated
        length="",  # sequence length
        head_dim="",  # per-head width
        norm="",  # normalisation scales and biases
        streams="",  # ParScale parallel streams
        prefix="",  # ParScale prefix tokens
        layers="",  # the stacked decoder layers of model.scan_layers (the LM)
        memory="",  # CTM memory length (pre-activation history)
        nlm_hidden="",  # CTM neuron-level model hidden width
        synch="",  # CTM synchronisation representation
        classes="",  # output classes
        features="",  # backbone output features (the CTM key/value projection input)
        conv_in="",  # convolution input channels
        conv_out="",  # convolution output channels
    )
    values = dict(
        data=-1,  # data-parallel axis: each device holds a copy of the model
        fsdp=1,  # FSDP axis: params and optimiser state split, batch split too
        tensor=1,  # tensor-parallel axis: heads, MLP, vocab and CTM neurons split
        rules=rules,  # logical axis name -> mesh axes, as above
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)
