"""The CTM's reinforcement-learning variant (the reference's ContinuousThoughtMachineRL).

It differs from the main CTM (`ctm_jax.model`) in five ways:

  * no attention and no action synchronisation: every tick the synapses see
    concat(features, z) with `features` the backbone's embedding of the observation;
  * its state lives across environment steps: the last M pre-activations ('trace') and the last
    M post-activations ('activated_trace'), both (B, D, M), are carried from one observation to
    the next (reset to the learned start traces at episode starts, which the caller does);
  * the output synchronisation is computed after the T ticks, non-recursively, over the window
    of the last M post-activations of the last n_synch_out neurons (the "first-last" selection's
    out side taken from the end), with weights exp(-k * clamp(p, 0, 4)) for the sample k steps
    old, divided by sqrt(sum of the weights); the clamp is inside autograd (zero gradient
    outside [0, 4], full gradient on the closed interval);
  * synapse depth 1 means two Linear-GLU-LayerNorm blocks (depth > 1: the usual U-Net);
  * there is no output projector: the synchronisation feeds the agent's actor and critic.

The neuron-level models' weights are stored neuron-major, (D, in, out) (`SuperLinear`'s loop
layout): this model has no reference checkpoint to import, so nothing needs the (in, out, D)
storage layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from core.errors import ConfigError
from ctm_jax.config import unet_widths
from ctm_jax.modules import Linear, NeuronLevelModels, SynapseUNet, glu, layer_norm, uniform

Array = jax.Array
RLState = dict[str, Array]

RL_BACKBONES = ("classic-control-backbone", "navigation-backbone")
# The navigation backbone's vocabulary: MiniGrid's 11 object types, 6 colours, 3 states, and
# the 7 x 7 cells of the egocentric view; each gets an embedding of this width.
MINIGRID_VOCAB = {"object": 11, "colour": 6, "state": 3}
MINIGRID_VIEW_CELLS = 7 * 7
NAVIGATION_EMBED_WIDTH = 8
RL_NEURON_SELECT_TYPES = ("first-last",)
RL_DECAY_MIN, RL_DECAY_MAX = 0.0, 4.0


@dataclasses.dataclass(frozen=True)
class CTMRLConfig:
    """Arguments of the reference `ContinuousThoughtMachineRL` constructor (same names)."""

    iterations: int  # internal ticks T per environment step
    d_model: int  # neurons D
    d_input: int  # width of the backbone's observation features
    n_synch_out: int  # n: the last n neurons' n(n+1)/2 pairs make the synchronisation
    synapse_depth: int  # 1: two Linear-GLU-LayerNorm blocks; > 1: a U-Net of that depth
    memory_length: int  # M: pre-/post-activation history length (the synchronisation window)
    deep_nlms: bool = True  # 2-layer neuron-level models (M -> H -> 1); else M -> 1
    memory_hidden_dims: int = 4  # H of the deep neuron-level models
    do_layernorm_nlm: bool = False  # LayerNorm each neuron's input history
    backbone_type: str = "classic-control-backbone"  # observation featuriser
    dropout: float = 0.0  # must be 0: rollouts and updates run deterministically
    neuron_select_type: str = "first-last"  # the only selection the reference's RL CTM accepts

    @property
    def synch_size(self) -> int:
        return self.n_synch_out * (self.n_synch_out + 1) // 2

    def validate(self, prefix: str = "model.") -> CTMRLConfig:
        """Raises ConfigError (one line naming the field) for the first impossible value."""

        def fail(name: str, allowed: str) -> None:
            raise ConfigError(f"{prefix}{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name in (
            "iterations",
            "d_model",
            "d_input",
            "n_synch_out",
            "synapse_depth",
            "memory_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if self.deep_nlms and self.memory_hidden_dims < 1:
            fail("memory_hidden_dims", "deep neuron-level models need >= 1")
        if self.backbone_type not in RL_BACKBONES:
            fail("backbone_type", f"allowed: {', '.join(RL_BACKBONES)}")
        if self.neuron_select_type not in RL_NEURON_SELECT_TYPES:
            fail("neuron_select_type", "the RL CTM supports only 'first-last'")
        if self.n_synch_out > self.d_model:
            fail("n_synch_out", f"must be <= d_model={self.d_model}")
        if self.dropout != 0.0:
            fail("dropout", "must be 0 (the RL rollouts and updates run without dropout)")
        return self

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = "model.") -> CTMRLConfig:
        values = dict(mapping.items())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]} is not a field of the RL CTM; allowed: "
                f"{', '.join(sorted(known))}"
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]} is missing (required RL CTM field)")
        return cls(**values).validate(prefix)


def clamp_with_gradient(x: Array, low: float, high: float) -> Array:
    """clip(x, low, high) whose gradient is 1 on the closed interval and 0 outside, as
    torch.clamp's (jnp.clip passes none at the end points, where the decay params start)."""
    inside = (x >= low) & (x <= high)
    return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, low, high)))


def window_synchronisation(activated_trace: Array, decay_params: Array, n_synch: int) -> Array:
    """The RL CTM's output synchronisation: (B, D, M) post-activation window -> (B, S).

    For the pairs i <= j (row-major upper triangle) of the last `n_synch` neurons:
    sum_k w_k z_i z_j / sqrt(sum_k w_k) over the window, with w = exp(-age * clamp(p, 0, 4))
    and age M-1 for the oldest sample down to 0 for the newest.
    """
    window = activated_trace[:, -n_synch:, :]  # (B, n, M)
    rows, cols = np.triu_indices(n_synch)
    products = window[:, rows, :] * window[:, cols, :]  # (B, S, M)
    memory = activated_trace.shape[-1]
    age = jnp.arange(memory - 1, -1, -1, dtype=jnp.float32)
    rates = clamp_with_gradient(decay_params, RL_DECAY_MIN, RL_DECAY_MAX)
    weights = jnp.exp(-age[None, :] * rates[:, None])  # (S, M)
    return jnp.sum(products * weights, axis=-1) / jnp.sqrt(jnp.sum(weights, axis=-1))


class GLUBlocks(nn.Module):
    """`blocks` x (Linear(-> 2 * width) -> GLU -> LayerNorm(width)), torch-default inits."""

    width: int
    blocks: int = 2

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.blocks):
            x = glu(Linear(2 * self.width, name=f"linear_{i}")(x))
            x = layer_norm(f"norm_{i}")(x)
        return x


class ClassicControlBackbone(nn.Module):
    """Flatten -> 2 x (Linear -> GLU -> LayerNorm): an observation vector -> (B, d_input)."""

    d_input: int

    @nn.compact
    def __call__(self, obs: Array) -> Array:
        return GLUBlocks(self.d_input, name="input_projector")(obs.reshape(obs.shape[0], -1))


class NavigationBackbone(nn.Module):
    """MiniGrid's symbolic view (B, 7, 7, 3) ints -> (B, d_input).

    Every cell's object type, colour and state, and the cell's place in the view, are looked up
    in four learned tables of width 8 (torch's N(0, 1) init); the four vectors are concatenated
    per cell, all 49 cells are flattened, and 2 x (Linear -> GLU -> LayerNorm) map them to
    d_input. The reference describes its navigation backbone only as these four embeddings of
    width 8 followed by GLU + LayerNorm blocks; concatenating them is this project's reading."""

    d_input: int

    @nn.compact
    def __call__(self, obs: Array) -> Array:
        batch = obs.shape[0]
        cells = obs.reshape(batch, MINIGRID_VIEW_CELLS, 3).astype(jnp.int32)
        embed = lambda size, name: nn.Embed(
            size, NAVIGATION_EMBED_WIDTH, embedding_init=nn.initializers.normal(1.0), name=name
        )
        parts = [
            embed(size, f"{field}_embedding")(cells[..., channel])
            for channel, (field, size) in enumerate(MINIGRID_VOCAB.items())
        ]
        position = embed(MINIGRID_VIEW_CELLS, "position_embedding")(jnp.arange(MINIGRID_VIEW_CELLS))
        parts.append(jnp.broadcast_to(position, (batch, *position.shape)))
        features = jnp.concatenate(parts, axis=-1).reshape(batch, -1)
        return GLUBlocks(self.d_input, name="input_projector")(features)


def rl_backbone(backbone_type: str, d_input: int) -> nn.Module:
    """The observation featuriser named by `backbone_type` (one of RL_BACKBONES)."""
    if backbone_type == "navigation-backbone":
        return NavigationBackbone(d_input)
    return ClassicControlBackbone(d_input)


class CTMRL(nn.Module):
    """CTM-RL core: `initial_state(batch)` and `__call__(obs, state) -> (synch (B, S), state)`.

    Variables: 'params' only (first-last selection has no index buffers to store).
    """

    config: CTMRLConfig

    def setup(self) -> None:
        cfg = self.config
        d, m = cfg.d_model, cfg.memory_length
        bound = math.sqrt(1 / (d + m))
        self.start_trace = self.param("start_trace", uniform(bound), (d, m), jnp.float32)
        self.start_activated_trace = self.param(
            "start_activated_trace", uniform(bound), (d, m), jnp.float32
        )
        self.decay_params_out = self.param(
            "decay_params_out", nn.initializers.zeros, (cfg.synch_size,), jnp.float32
        )
        self.backbone = rl_backbone(cfg.backbone_type, cfg.d_input)
        if cfg.synapse_depth == 1:
            self.synapses = GLUBlocks(cfg.d_model, blocks=2)
        else:
            self.synapses = SynapseUNet(tuple(unet_widths(d, cfg.synapse_depth)), cfg.dropout)
        self.trace_processor = NeuronLevelModels(
            d_model=d,
            memory_length=m,
            hidden_dims=cfg.memory_hidden_dims,
            deep=cfg.deep_nlms,
            do_norm=cfg.do_layernorm_nlm,
            dropout=0.0,
        )

    def initial_state(self, batch: int) -> RLState:
        """The learned start traces, broadcast to `batch` environments: (B, D, M) each."""
        d, m = self.config.d_model, self.config.memory_length
        return {
            "trace": jnp.broadcast_to(self.start_trace, (batch, d, m)),
            "activated_trace": jnp.broadcast_to(self.start_activated_trace, (batch, d, m)),
        }

    def synapse_step(self, features: Array, z: Array) -> Array:
        if self.config.synapse_depth == 1:
            return self.synapses(jnp.concatenate([features, z], axis=-1))
        return self.synapses(jnp.concatenate([features, z], axis=-1), True)

    def __call__(self, obs: Array, state: RLState) -> tuple[Array, RLState]:
        """T ticks on one observation per environment, from the carried `state`."""
        features = self.backbone(obs)
        trace, activated = state["trace"], state["activated_trace"]
        for _ in range(self.config.iterations):
            pre = self.synapse_step(features, activated[:, :, -1])
            trace = jnp.concatenate([trace[:, :, 1:], pre[:, :, None]], axis=-1)
            # The neuron-level models take the history neuron-major, (D, B, M).
            post = self.trace_processor(trace.transpose(1, 0, 2), True)
            activated = jnp.concatenate([activated[:, :, 1:], post[:, :, None]], axis=-1)
        synch = window_synchronisation(activated, self.decay_params_out, self.config.n_synch_out)
        return synch, {"trace": trace, "activated_trace": activated}
