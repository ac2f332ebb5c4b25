"""The Continuous Thought Machine (Darlow et al., 2025) as a Flax Linen module.

Per forward: featurise the input once into keys/values, then run T internal ticks (`nn.scan`,
parameters broadcast, one dropout key per tick). Each tick, in the reference's order:

  1. action synchronisation S_act from the previous post-activations z^{t-1}
  2. query q = W_q S_act; o = MultiHeadAttention(q, kv, kv)
  3. pre-activations a^t = synapses(concat(o, z^{t-1}))       (attention output first)
  4. history A^t = last M pre-activations (oldest first)
  5. post-activations z^t = NLM_d(A^t_d) for every neuron d   (private weights per neuron)
  6. output synchronisation S_out over z^0..z^t; prediction y^t = W_out S_out
  7. certainty^t = 1 - normalised entropy of y^t

Inputs are channels-last: images / feature maps (B, H, W, C), token sets (B, L, C), parity
sequences (B, L) of +-1, sort vectors (B, N).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ctm_jax import synchronisation as sync
from ctm_jax.backbones import conv, make_backbone, parse_resnet, torch_default_conv_init
from ctm_jax.config import CTMConfig
from ctm_jax.modules import (
    POSITIONAL_EMBEDDINGS,
    KeyValueProjection,
    Linear,
    NeuronLevelModels,
    QueryAttention,
    SynapseLayer,
    SynapseUNet,
    layer_norm,
    nlm_weights,
    uniform,
)
from ctm_jax.sharding_rules import PARAM_AXES

Array = jax.Array

# Parameters are float32 even under jax x64 (initialisers default to float64 there).
PARAM_DTYPE = jnp.float32
DECAY_PARAM_NAMES = ("decay_params_out", "decay_params_action")


@flax.struct.dataclass
class CTMOutput:
    """Per-tick read-outs, tick axis last as in the reference.

    predictions: (B, out_dims, T) logits; certainties: (B, 2, T) with [:, 0] the normalised
    entropy and [:, 1] = 1 - that; synch_out: (B, S_out) after the last tick. `tracking` (only
    with track=True) holds tick-major internals: synch_out (T, B, S_out), synch_action
    (T, B, S_act), pre_activations / post_activations (T, B, D), attention (T, B, heads, 1, L),
    and kv (B, L, d_input).
    """

    predictions: Array
    certainties: Array
    synch_out: Array
    tracking: dict[str, Array] | None = None


def certainty(logits: Array, prediction_shape: tuple[int, ...]) -> Array:
    """[normalised entropy, 1 - normalised entropy] of softmax over the last reshaped axis,
    averaged over the other non-batch axes: (B, out_dims) -> (B, 2)."""
    b = logits.shape[0]
    reshaped = logits.reshape((b, *prediction_shape))
    log_p = jax.nn.log_softmax(reshaped, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    normalised = entropy / jnp.log(jnp.float32(reshaped.shape[-1]))
    normalised = normalised.reshape(b, -1).mean(axis=-1)
    return jnp.stack([normalised, 1.0 - normalised], axis=-1)


class CTMTick(nn.Module):
    """One internal tick; `nn.scan` runs it T times over the carried state. Its parameters are
    the CTM's 'ticks' params with the neuron-level models' weights in the loop layout
    (`nlm_weights(..., to_loop=True)`)."""

    config: CTMConfig
    deterministic: bool
    track: bool

    @nn.compact
    def __call__(self, carry: dict[str, Array], ctx: dict[str, Any]):
        cfg = self.config
        det = self.deterministic
        carry = dict(carry)
        z = carry["z"]
        ys: dict[str, Array] = {}

        if cfg.has_attention:
            # Products of the (compute-dtype) state, accumulated in the accumulators' dtype.
            products = sync.pairwise_products(z, ctx["action_pairs"]).astype(
                carry["alpha_action"].dtype
            )
            synch_action, carry["alpha_action"], carry["beta_action"] = sync.update_synchronisation(
                carry["alpha_action"], carry["beta_action"], products, ctx["r_action"]
            )
            # The query in the compute dtype; the synchronisation that feeds it is float32.
            query = Linear(cfg.d_input, name="q_proj")(synch_action).astype(z.dtype)
            attended, attention = QueryAttention(
                cfg.d_input, cfg.heads, cfg.dropout, name="attention"
            )(query, ctx["keys"], ctx["values"], det)
            synapse_input = jnp.concatenate([attended.astype(z.dtype), z], axis=-1)
            if self.track:
                ys.update(synch_action=synch_action, attention=attention)
        else:
            synapse_input = jnp.concatenate([ctx["inputs"].astype(z.dtype), z], axis=-1)

        if cfg.synapse_depth == 1:
            synapses = SynapseLayer(cfg.d_model, cfg.dropout, name="synapses")
        else:
            synapses = SynapseUNet(tuple(cfg.synapse_widths), cfg.dropout, name="synapses")
        pre_activation = synapses(synapse_input, det)
        # The history is carried neuron-major, (D, B, M), the neuron-level models' layout.
        # (The casts are no-ops except while initialising, when the params are not cast yet.)
        pre_activation = pre_activation.astype(z.dtype)
        trace = jnp.concatenate([carry["trace"][:, :, 1:], pre_activation.T[:, :, None]], axis=-1)

        z = NeuronLevelModels(
            d_model=cfg.d_model,
            memory_length=cfg.memory_length,
            hidden_dims=cfg.memory_hidden_dims,
            deep=cfg.deep_nlms,
            do_norm=cfg.do_layernorm_nlm,
            dropout=cfg.nlm_dropout,
            name="trace_processor",
        )(trace, det).astype(z.dtype)
        # The per-tick state, split over neurons under tensor parallelism (no-op without rules).
        z = nn.with_logical_constraint(z, ("batch", "neurons"))

        products = sync.pairwise_products(z, ctx["out_pairs"]).astype(carry["alpha_out"].dtype)
        synch_out, carry["alpha_out"], carry["beta_out"] = sync.update_synchronisation(
            carry["alpha_out"], carry["beta_out"], products, ctx["r_out"]
        )
        prediction = Linear(cfg.out_dims, name="output_projector")(synch_out)

        carry = {**carry, "z": z, "trace": trace}
        ys.update(
            predictions=prediction,
            certainties=certainty(prediction, cfg.prediction_shape()),
        )
        if self.track:
            ys.update(synch_out=synch_out, pre_activations=pre_activation, post_activations=z)
        return carry, ys


class CTM(nn.Module):
    """Continuous Thought Machine. Variables: 'params' (trainable), 'buffers' (the int32
    neuron index vectors of the synchronisation pairs: drawn once at init, imported verbatim)
    and, for the ResNet / shallow-wide backbones, 'batch_stats' (BatchNorm running statistics:
    pass mutable=['batch_stats'] with train=True to get the updated ones back; train=False
    normalises with them).

    `dtype` is the dtype of the input and of the synchronisation accumulators (float64 needs jax
    x64 and float64 variables; it exists to compare against the reference's float64 runs).
    `config.dtype` is the compute dtype: with 'bfloat16' the backbone, projections, synapses,
    neuron-level models and the state z / pre-activation history run in bfloat16 (the tick
    params are cast once per forward, outside the tick loop), while params, softmaxes,
    certainties, the synchronisation and the predictions stay float32.
    """

    config: CTMConfig
    dtype: Any = jnp.float32
    # Logical axis names of every parameter, for the trainer's sharding (a path-regex table).
    param_axes: ClassVar = PARAM_AXES

    @property
    def compute_dtype(self) -> Any:
        """bfloat16 for config.dtype 'bfloat16'; None (follow the input and params) otherwise."""
        return jnp.bfloat16 if self.config.dtype == "bfloat16" else None

    def featurise(self, x: Array, train: bool = False) -> Array:
        """[initial_rgb ->] backbone -> + positional embedding -> tokens -> Linear -> LayerNorm:
        (B, L, d_input). `train` switches the backbone's BatchNorms to batch statistics."""
        cfg = self.config
        dt = self.compute_dtype
        if parse_resnet(cfg.backbone_type) is not None:
            # The reference's lazily-sized 1x1 conv to RGB (torch default init, with bias).
            x = conv(
                3,
                1,
                use_bias=True,
                kernel_init=torch_default_conv_init(x.shape[-1]),
                bias_init=torch_default_conv_init(x.shape[-1]),
                dtype=dt,
                name="initial_rgb",
            )(x)
        backbone = make_backbone(cfg.backbone_type, cfg.d_input, dt)
        features = x if backbone is None else backbone(x, train)
        if cfg.positional_embedding_type != "none":
            embed = POSITIONAL_EMBEDDINGS[cfg.positional_embedding_type]
            position = embed(features.shape[-1], name="positional_embedding")(features)
            features = (features + position).astype(dt or features.dtype)
        tokens = features.reshape(features.shape[0], -1, features.shape[-1])
        kv = layer_norm("kv_norm", dt)(Linear(cfg.d_input, dtype=dt, name="kv_proj")(tokens))
        return nn.with_logical_constraint(kv, ("batch", "length", "embed"))

    def _index_buffers(self, role: str, n_synch: int) -> tuple[Array, Array]:
        cfg = self.config

        def draw() -> tuple[Array, Array]:
            key = self.make_rng("params")
            return sync.init_neuron_indices(
                key, cfg.neuron_select_type, cfg.d_model, n_synch, role, cfg.n_random_pairing_self
            )

        # One draw shared by left and right, so left[:k] == right[:k] holds for random-pairing.
        drawn: dict[str, tuple[Array, Array]] = {}

        def side(i: int) -> Array:
            if "pair" not in drawn:
                drawn["pair"] = draw()
            return drawn["pair"][i]

        left = self.variable("buffers", f"{role}_neuron_indices_left", side, 0)
        right = self.variable("buffers", f"{role}_neuron_indices_right", side, 1)
        return sync.pair_indices(cfg.neuron_select_type, left.value, right.value)

    def _initial_state(
        self, x: Array, train: bool, track: bool
    ) -> tuple[dict[str, Array], dict[str, Any], dict[str, Array]]:
        """Per-forward setup (called from `__call__`): the tick carry before tick 1, the tick
        context (keys/values or inputs, neuron pairs, decay factors) and tracking extras."""
        cfg = self.config
        cfg.validate_input_shape(x.shape)
        x = jnp.asarray(x, self.dtype)
        batch = x.shape[0]
        d, m = cfg.d_model, cfg.memory_length

        start_state = self.param(
            "start_activated_state", uniform(math.sqrt(1 / d)), (d,), PARAM_DTYPE
        )
        start_trace = self.param(
            "start_trace", uniform(math.sqrt(1 / (d + m))), (d, m), PARAM_DTYPE
        )
        straight_through = cfg.variant == "ctm"
        decay_out = self.param(
            "decay_params_out", nn.initializers.zeros, (cfg.synch_size_out,), PARAM_DTYPE
        )
        ctx: dict[str, Any] = {
            "out_pairs": self._index_buffers("out", cfg.n_synch_out),
            "r_out": sync.decay_factors(decay_out, straight_through),
        }
        tracking: dict[str, Array] = {}
        if cfg.has_attention:
            kv = self.featurise(x, train)
            ctx["keys"], ctx["values"] = KeyValueProjection(
                cfg.d_input, cfg.heads, self.compute_dtype, name="attention_kv"
            )(kv)
            decay_action = self.param(
                "decay_params_action", nn.initializers.zeros, (cfg.synch_size_action,), PARAM_DTYPE
            )
            ctx["action_pairs"] = self._index_buffers("action", cfg.n_synch_action)
            ctx["r_action"] = sync.decay_factors(decay_action, straight_through)
            if track:
                tracking["kv"] = kv
        else:
            ctx["inputs"] = x

        z0 = jnp.broadcast_to(start_state, (batch, d))
        state_dtype = self.compute_dtype or z0.dtype
        carry = {
            "z": z0.astype(state_dtype),
            # neuron-major (D, B, M), see CTMTick
            "trace": jnp.broadcast_to(start_trace[:, None, :], (d, batch, m)).astype(state_dtype),
            # z^0 is the first sample of the output synchronisation's time series.
            "alpha_out": sync.pairwise_products(z0, ctx["out_pairs"]),
            "beta_out": jnp.ones((cfg.synch_size_out,), self.dtype),
        }
        if cfg.has_attention:
            carry["alpha_action"] = jnp.zeros((batch, cfg.synch_size_action), self.dtype)
            carry["beta_action"] = jnp.zeros((cfg.synch_size_action,), self.dtype)
        return carry, ctx, tracking

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        train: bool = False,
        track: bool = False,
        initial_state_only: bool = False,
    ) -> CTMOutput | tuple[dict[str, Array], dict[str, Any]]:
        """All `config.iterations` ticks. With `initial_state_only`, returns `(carry, ctx)` for
        `CTMTick` instead of running any tick (`ctm_jax.adaptive` then runs ticks one at a
        time with the params under 'ticks')."""
        cfg = self.config
        carry, ctx, tracking = self._initial_state(x, train, track)
        if initial_state_only:
            return carry, ctx

        tick = (
            nn.remat(
                CTMTick,
                prevent_cse=False,
                policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            )
            if cfg.remat_ticks
            else CTMTick
        )
        ticks = nn.scan(
            tick,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=nn.broadcast,
            out_axes=0,
            length=cfg.iterations,
        )
        # The neuron-level models' weights enter the loop neuron-major, moved (and cast to the
        # compute dtype) once per forward.
        initializing = self.is_initializing()
        compute = None if initializing else self.compute_dtype
        ticks = nn.map_variables(
            ticks,
            "params",
            trans_in_fn=lambda v: cast_floating(nlm_weights(v, to_loop=True), compute),
            trans_out_fn=lambda v: nlm_weights(v, to_loop=False),
            init=initializing,
            mutable=initializing,
        )
        final, per_tick = ticks(cfg, deterministic=not train, track=track, name="ticks")(carry, ctx)

        if track:
            tracking.update(
                {k: per_tick[k] for k in per_tick if k not in ("predictions", "certainties")}
            )
        return CTMOutput(
            predictions=jnp.moveaxis(per_tick["predictions"], 0, -1),
            certainties=jnp.moveaxis(per_tick["certainties"], 0, -1),
            synch_out=final["alpha_out"] / jnp.sqrt(final["beta_out"]),
            tracking=tracking if track else None,
        )


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of `tree` cast to `dtype`; the tree itself when `dtype` is None."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def project_params(config: CTMConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Project stored params back to their valid range after an optimiser update.

    The main reference class clamps its decay params to [0, 15] in place at every forward, so the
    optimiser always starts from clamped values; the SORT variant clamps inside autograd only.
    """
    if config.variant != "ctm":
        return params
    return {
        name: sync.project_decay_params(value) if name in DECAY_PARAM_NAMES else value
        for name, value in params.items()
    }
