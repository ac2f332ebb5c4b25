"""Config sections every experiment shares (optimiser, train loop, mesh), with the reference's
defaults; experiment files override what differs."""

from __future__ import annotations

import ml_collections


def optim_section(**overrides) -> ml_collections.ConfigDict:
    """AdamW + linear warm-up + cosine to eta_min, and the gradient clipping choice."""
    values = dict(
        lr=1e-4,
        schedule="cosine",  # or "constant" (after the warm-up)
        warmup_steps=500,
        warmup_init_lr=0.0,  # reference: 1e-20, i.e. zero
        end_lr=1e-7,  # eta_min of the reference's cosine
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        weight_decay_exclude=(),  # regexes on 'a/b/kernel' param paths exempt from decay
        clip="quantile",  # "quantile" | "global_norm" | "none"
        max_grad_norm=1.0,  # used by clip="global_norm"
        clip_quantile=0.9,  # autoclip QuantileClip, as the reference parity run
        clip_history=1000,
        clip_scope="per_parameter",  # autoclip's default; or "global"
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def train_section(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        total_steps=200_001,
        batch_size=64,
        seed=0,  # model init and dropout
        log_every=100,
        eval_every=1000,
        eval_batches=16,
        checkpoint_every=1000,
        keep_checkpoints=3,
        async_checkpointing=True,
        data_threads=1,  # grain read threads
        data_prefetch=8,
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
        heads="tensor",
        kv_heads="tensor",
        mlp="tensor",  # LM intermediate size, CTM synapse outputs
        vocab="tensor",
        neurons="tensor",  # CTM d_model: state, NLM weights
        # replicated
        length="",
        head_dim="",
        norm="",
        streams="",
        prefix="",
        memory="",
        nlm_hidden="",
        synch="",
        classes="",
        features="",
        conv_in="",
        conv_out="",
    )
    values = dict(data=-1, fsdp=1, tensor=1, rules=rules)
    values.update(overrides)
    return ml_collections.ConfigDict(values)
