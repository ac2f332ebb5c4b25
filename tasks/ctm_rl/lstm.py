"""The LSTM baseline of the RL experiments (the reference's LSTM RL baseline).

Same observation backbone as the RL CTM; then `iterations` steps of one LSTM cell that sees the
same features every step, from the carried (h, c); the agent reads the hidden state h. The cell is
torch.nn.LSTMCell's: gates (i, f, g, o), a bias on both the input and the hidden projection,
every weight and bias U(+-1/sqrt(H)); the learned start states are U(+-sqrt(1/H)). The
reference's widths match the T = 1 CTMs' parameter counts: H 118 on CartPole (175,855 against
the CTM's 175,437 with the actor and critic) and 243 on Acrobot (350,118 against 350,094); on
FourRooms this project uses 528 (see configs/ctm_rl.py: FOURROOMS_LSTM_WIDTH).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from core.errors import ConfigError
from ctm_jax.modules import uniform
from ctm_jax.rl import RL_BACKBONES, rl_backbone

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LSTMRLConfig:
    """Arguments of the reference LSTM RL baseline (same names)."""

    iterations: int  # LSTM steps per environment step (each sees the same features)
    d_model: int  # hidden width H
    d_input: int  # width of the backbone's observation features
    backbone_type: str = "classic-control-backbone"  # observation featuriser

    def validate(self, prefix: str = "model.") -> LSTMRLConfig:
        for name in ("iterations", "d_model", "d_input"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"{prefix}{name}={value!r} is invalid: must be a positive integer"
                )
        if self.backbone_type not in RL_BACKBONES:
            raise ConfigError(
                f"{prefix}backbone_type={self.backbone_type!r} is invalid: allowed: "
                f"{', '.join(RL_BACKBONES)}"
            )
        return self

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], prefix: str = "model.") -> LSTMRLConfig:
        values = {f.name: mapping[f.name] for f in dataclasses.fields(cls) if f.name in mapping}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]} is missing (required LSTM field)")
        return cls(**values).validate(prefix)


class LSTMCell(nn.Module):
    """torch.nn.LSTMCell: (x, (h, c)) -> (h', c')."""

    hidden: int

    @nn.compact
    def __call__(self, x: Array, h: Array, c: Array) -> tuple[Array, Array]:
        init = uniform(1.0 / math.sqrt(self.hidden))
        dense = lambda name: nn.Dense(4 * self.hidden, kernel_init=init, bias_init=init, name=name)
        gates = dense("input")(x) + dense("hidden")(h)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c


class LSTMRL(nn.Module):
    """LSTM core with the RL CTM's interface: `initial_state(batch)`, `__call__(obs, state) ->
    (h (B, H), state)`."""

    config: LSTMRLConfig

    def setup(self) -> None:
        h = self.config.d_model
        bound = math.sqrt(1 / h)
        self.start_hidden_state = self.param("start_hidden_state", uniform(bound), (h,))
        self.start_cell_state = self.param("start_cell_state", uniform(bound), (h,))
        self.backbone = rl_backbone(self.config.backbone_type, self.config.d_input)
        self.lstm_cell = LSTMCell(h)

    def initial_state(self, batch: int) -> dict[str, Array]:
        h = self.config.d_model
        return {
            "h": jnp.broadcast_to(self.start_hidden_state, (batch, h)),
            "c": jnp.broadcast_to(self.start_cell_state, (batch, h)),
        }

    def __call__(self, obs: Array, state: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        features = self.backbone(obs)
        h, c = state["h"], state["c"]
        for _ in range(self.config.iterations):
            h, c = self.lstm_cell(features, h, c)
        return h, {"h": h, "c": c}
