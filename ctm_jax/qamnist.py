"""The Q&A-MNIST CTM (the reference's `ContinuousThoughtMachineQAMNIST`) as a Flax Linen module.

A question is shown one tick at a time. Every tick is one of:

  digit     attend (query from the action synchronisation) over the key/value tokens of one
            digit image (a 2 x [Conv3x3 -> BatchNorm -> ReLU -> MaxPool2] backbone, then the
            CTM's Linear + LayerNorm key/value projection): o = attention output
  index     o = a fixed sinusoidal embedding of the digit's position (a table of 50 rows)
  operator  o = a learned embedding of '+' (token -1) or '-' (token -2), row -token - 1
  answer    o = 0
  pad       nothing happens: the tick keeps the whole state (see below)

and then runs the usual CTM tick on concat(o, z): synapses, pre-activation history, neuron-level
models, output synchronisation, prediction, certainty. The action synchronisation is updated on
every tick, as the reference does, even where no attention reads it.

The reference's T is the question's own length (digit + question + answer ticks), so PyTorch
batches one question shape at a time. Here each example is laid out over a fixed number of
ticks, and the ticks before its question starts are *pad* ticks that leave the carried state
(z, history, synchronisation accumulators) exactly as it was: an example padded by k ticks
gives, on its real ticks, exactly what the unpadded forward gives, and one compiled step serves
every question shape. The answer ticks are always the last ones.

Per-tick inputs come through the scan's xs (mode, digit slot, direct embedding); keys/values
are projected once per forward for every digit slot and gathered per tick.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import synchronisation as sync
from ctm_jax.backbones import BatchNorm, conv, torch_default_conv_init
from ctm_jax.config import CTMConfig
from ctm_jax.model import PARAM_DTYPE, CTMOutput, certainty
from ctm_jax.modules import (
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

Array = jax.Array

# Tick modes (the `modes` input).
PAD, DIGIT, INDEX, OPERATOR, ANSWER = 0, 1, 2, 3, 4
MODE_NAMES = ("pad", "digit", "index", "operator", "answer")
# Operator tokens as the reference encodes them: embedding row -token - 1.
PLUS, MINUS = -1, -2
# Rows of the fixed index table (the reference's max_seq_length): digit positions 0..49.
INDEX_TABLE_SIZE = 50


def sinusoidal_table(rows: int, width: int) -> np.ndarray:
    """The fixed index embedding: row p, column 2k = sin(p w_k), column 2k+1 = cos(p w_k), with
    w_k = 10000^(-2k / width) (the Transformer's positional encoding). (rows, width) float32."""
    position = np.arange(rows, dtype=np.float32)[:, None]
    rate = np.exp(np.arange(0, width, 2, dtype=np.float32) * (-math.log(10000.0) / width))
    table = np.zeros((rows, width), np.float32)
    table[:, 0::2] = np.sin(position * rate)
    table[:, 1::2] = np.cos(position * rate)[:, : width // 2]
    return table


class DigitBackbone(nn.Module):
    """2 x [Conv3x3(d, pad 1, bias) -> BatchNorm -> ReLU -> MaxPool 2x2]: (N, H, W, C) ->
    (N, H/4, W/4, d). Names follow the reference's Sequential indices (`layers.{0,1,4,5}`)."""

    d_input: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for conv_index in (0, 4):
            fan_in = 9 * x.shape[-1]
            init = torch_default_conv_init(fan_in)  # torch LazyConv2d's default init
            x = conv(
                self.d_input,
                3,
                1,
                1,
                use_bias=True,
                kernel_init=init,
                bias_init=init,
                name=f"layers_{conv_index}",
            )(x)
            x = nn.relu(BatchNorm(name=f"layers_{conv_index + 1}")(x, train))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x


class IndexEmbedding(nn.Module):
    """The fixed sinusoidal table of digit positions, a 'buffers' variable `embedding`
    (INDEX_TABLE_SIZE, d): never trained, stored so that a checkpoint carries it."""

    width: int

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        table = self.variable(
            "buffers",
            "embedding",
            lambda: jnp.asarray(sinusoidal_table(INDEX_TABLE_SIZE, self.width)),
        ).value
        return table[jnp.clip(tokens, 0, INDEX_TABLE_SIZE - 1)]


def _keep_where(active: Array, new: Array, old: Array) -> Array:
    """Per example: `new` where active (B,), else `old` (any trailing shape, batch first)."""
    return jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)


class QAMNISTTick(nn.Module):
    """One tick; `nn.scan` runs it over the tick axis of xs = {mode, slot, direct} (each (B, ...)
    per tick). Params as `ctm_jax.model.CTMTick`'s (q_proj, attention, synapses, trace_processor,
    output_projector), the neuron-level models' w1 in the loop layout."""

    config: CTMConfig
    deterministic: bool
    track: bool

    @nn.compact
    def __call__(self, carry: dict[str, Array], ctx: dict[str, Any], xs: dict[str, Array]):
        cfg = self.config
        det = self.deterministic
        old = carry
        carry = dict(carry)
        z = carry["z"]
        mode = xs["mode"]
        batch = jnp.arange(z.shape[0])

        products = sync.pairwise_products(z, ctx["action_pairs"])
        synch_action, carry["alpha_action"], carry["beta_action"] = sync.update_synchronisation(
            carry["alpha_action"], carry["beta_action"], products, ctx["r_action"]
        )
        query = Linear(cfg.d_input, name="q_proj")(synch_action)
        # This tick's digit: every example its own slot (B, heads, L, head_dim).
        keys = ctx["keys"][batch, xs["slot"]]
        values = ctx["values"][batch, xs["slot"]]
        attended, attention = QueryAttention(cfg.d_input, cfg.heads, cfg.dropout, name="attention")(
            query, keys, values, det
        )
        # Question ticks feed their embedding directly; answer (and pad) ticks feed zeros.
        o = jnp.where((mode == DIGIT)[:, None], attended, xs["direct"])
        synapse_input = jnp.concatenate([o, z], axis=-1)

        if cfg.synapse_depth == 1:
            synapses = SynapseLayer(cfg.d_model, cfg.dropout, name="synapses")
        else:
            synapses = SynapseUNet(tuple(cfg.synapse_widths), cfg.dropout, name="synapses")
        pre_activation = synapses(synapse_input, det)
        # History neuron-major (D, B, M), the neuron-level models' layout.
        trace = jnp.concatenate([carry["trace"][:, :, 1:], pre_activation.T[:, :, None]], axis=-1)
        z = NeuronLevelModels(
            d_model=cfg.d_model,
            memory_length=cfg.memory_length,
            hidden_dims=cfg.memory_hidden_dims,
            deep=cfg.deep_nlms,
            do_norm=cfg.do_layernorm_nlm,
            dropout=cfg.nlm_dropout,
            name="trace_processor",
        )(trace, det)

        products = sync.pairwise_products(z, ctx["out_pairs"])
        synch_out, carry["alpha_out"], carry["beta_out"] = sync.update_synchronisation(
            carry["alpha_out"], carry["beta_out"], products, ctx["r_out"]
        )
        prediction = Linear(cfg.out_dims, name="output_projector")(synch_out)
        carry.update(z=z, trace=trace)

        # Pad ticks leave every part of the state as it was (the trace is neuron-major).
        active = mode != PAD
        new = {}
        for name, value in carry.items():
            if name == "trace":
                new[name] = jnp.where(active[None, :, None], value, old[name])
            else:
                new[name] = _keep_where(active, value, old[name])
        ys = {
            "predictions": prediction,
            "certainties": certainty(prediction, cfg.prediction_shape()),
        }
        if self.track:
            ys.update(
                synch_out=synch_out,
                synch_action=synch_action,
                pre_activations=pre_activation,
                post_activations=z,
                attention=attention,
            )
        return new, ys


class QAMNISTCTM(nn.Module):
    """The Q&A-MNIST CTM. `config` holds the CTM fields (backbone_type and positional embedding
    'none'; `iterations` is not used: the question's layout sets the ticks).

    Inputs: `digits` (B, N, H, W, C) images (N digit slots; slots the question never shows may
    hold anything), `modes` (B, T) int tick modes (PAD ... ANSWER), `tokens` (B, T) int: the digit
    slot on digit ticks, the digit position on index ticks, -1 ('+') / -2 ('-') on operator ticks,
    ignored elsewhere. Returns a `CTMOutput` with predictions (B, out_dims, T) and certainties
    (B, 2, T); values on pad ticks mean nothing.

    Variables: 'params'; 'buffers' (the neuron index vectors and the fixed index table
    `index_backbone/embedding`); 'batch_stats' (the digit backbone's BatchNorms: pass
    mutable=['batch_stats'] with train=True). The decay params are clamped inside autograd, as
    the reference's QAMNIST forward does (no straight-through gradient, nothing to project).

    BatchNorm: the reference runs the backbone once per digit (a batch of B images, running
    statistics updated once per digit); here all B x N slots go through it at once, so training
    normalises with the statistics of all of them and updates the running statistics once per
    forward.
    """

    config: CTMConfig

    def _index_buffers(self, role: str, n_synch: int) -> tuple[Array, Array]:
        cfg = self.config
        drawn: dict[str, tuple[Array, Array]] = {}

        def side(i: int) -> Array:
            if "pair" not in drawn:  # one draw for left and right (random-pairing self pairs)
                drawn["pair"] = sync.init_neuron_indices(
                    self.make_rng("params"),
                    cfg.neuron_select_type,
                    cfg.d_model,
                    n_synch,
                    role,
                    cfg.n_random_pairing_self,
                )
            return drawn["pair"][i]

        left = self.variable("buffers", f"{role}_neuron_indices_left", side, 0)
        right = self.variable("buffers", f"{role}_neuron_indices_right", side, 1)
        return sync.pair_indices(cfg.neuron_select_type, left.value, right.value)

    def _direct_inputs(self, modes: Array, tokens: Array) -> Array:
        """(B, T, d): the index / operator embedding on question ticks, zeros elsewhere."""
        index_rows = IndexEmbedding(self.config.d_input, name="index_backbone")(tokens)
        operators = nn.Embed(
            2,
            self.config.d_input,
            embedding_init=nn.initializers.normal(1.0),  # torch's N(0, 1)
            name="operator_backbone",
        )
        operator_rows = operators(jnp.clip(-tokens - 1, 0, 1))
        direct = jnp.where((modes == INDEX)[..., None], index_rows, 0.0)
        return jnp.where((modes == OPERATOR)[..., None], operator_rows, direct)

    @nn.compact
    def __call__(
        self,
        digits: Array,
        modes: Array,
        tokens: Array,
        *,
        train: bool = False,
        track: bool = False,
    ) -> CTMOutput:
        cfg = self.config
        digits = jnp.asarray(digits, jnp.float32)
        modes = jnp.asarray(modes, jnp.int32)
        tokens = jnp.asarray(tokens, jnp.int32)
        b, slots = digits.shape[:2]
        d, m = cfg.d_model, cfg.memory_length

        start_state = self.param(
            "start_activated_state", uniform(math.sqrt(1 / d)), (d,), PARAM_DTYPE
        )
        start_trace = self.param(
            "start_trace", uniform(math.sqrt(1 / (d + m))), (d, m), PARAM_DTYPE
        )
        decay_out = self.param(
            "decay_params_out", nn.initializers.zeros, (cfg.synch_size_out,), PARAM_DTYPE
        )
        decay_action = self.param(
            "decay_params_action", nn.initializers.zeros, (cfg.synch_size_action,), PARAM_DTYPE
        )

        # Every digit slot through the backbone at once (one BatchNorm batch of B x N images).
        features = DigitBackbone(cfg.d_input, name="backbone_digit")(
            digits.reshape(b * slots, *digits.shape[2:]), train
        )
        tokens_kv = features.reshape(b * slots, -1, features.shape[-1])
        kv = layer_norm("kv_norm")(Linear(cfg.d_input, name="kv_proj")(tokens_kv))
        keys, values = KeyValueProjection(cfg.d_input, cfg.heads, name="attention_kv")(kv)
        ctx = {
            "keys": keys.reshape(b, slots, *keys.shape[1:]),
            "values": values.reshape(b, slots, *values.shape[1:]),
            "out_pairs": self._index_buffers("out", cfg.n_synch_out),
            "action_pairs": self._index_buffers("action", cfg.n_synch_action),
            "r_out": sync.decay_factors(decay_out, straight_through=False),
            "r_action": sync.decay_factors(decay_action, straight_through=False),
        }
        xs = {
            "mode": modes.T,
            "slot": jnp.where(modes == DIGIT, jnp.clip(tokens, 0, slots - 1), 0).T,
            "direct": jnp.moveaxis(self._direct_inputs(modes, tokens), 1, 0),
        }

        z0 = jnp.broadcast_to(start_state, (b, d))
        carry = {
            "z": z0,
            "trace": jnp.broadcast_to(start_trace[:, None, :], (d, b, m)),
            # z^0 is the first sample of the output synchronisation's time series. Accumulators
            # are per example: pad ticks hold an example's, not the batch's.
            "alpha_out": sync.pairwise_products(z0, ctx["out_pairs"]),
            "beta_out": jnp.ones((b, cfg.synch_size_out), jnp.float32),
            "alpha_action": jnp.zeros((b, cfg.synch_size_action), jnp.float32),
            "beta_action": jnp.zeros((b, cfg.synch_size_action), jnp.float32),
        }

        tick = (
            nn.remat(
                QAMNISTTick,
                prevent_cse=False,
                policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            )
            if cfg.remat_ticks
            else QAMNISTTick
        )
        ticks = nn.scan(
            tick,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=(nn.broadcast, 0),
            out_axes=0,
        )
        initializing = self.is_initializing()
        # The neuron-level models' weights enter the loop neuron-major, moved once per forward.
        ticks = nn.map_variables(
            ticks,
            "params",
            trans_in_fn=lambda v: nlm_weights(v, to_loop=True),
            trans_out_fn=lambda v: nlm_weights(v, to_loop=False),
            init=initializing,
            mutable=initializing,
        )
        final, per_tick = ticks(cfg, deterministic=not train, track=track, name="ticks")(
            carry, ctx, xs
        )
        tracking = None
        if track:
            tracking = {
                k: v for k, v in per_tick.items() if k not in ("predictions", "certainties")
            }
            tracking["kv"] = kv.reshape(b, slots, *kv.shape[1:])
        return CTMOutput(
            predictions=jnp.moveaxis(per_tick["predictions"], 0, -1),
            certainties=jnp.moveaxis(per_tick["certainties"], 0, -1),
            synch_out=final["alpha_out"] / jnp.sqrt(final["beta_out"]),
            tracking=tracking,
        )
