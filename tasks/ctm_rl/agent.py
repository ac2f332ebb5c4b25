"""The PPO agent: a recurrent core (RL CTM or LSTM) read by an actor and a critic MLP.

One call processes one observation per environment: the carried core state is first reset to
the learned start state where `reset` is set (the observation starts an episode), as the
reference does, then the core runs its ticks and the actor/critic read its output. Actor and
critic are Linear(in, 64)-ReLU-Linear(64, 64)-ReLU-Linear(64, out) with orthogonal weights
(gain 1, the reference's choice for every layer, the last ones included) and zero biases.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

HEAD_WIDTH = 64


class MLPHead(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear with orthogonal (gain 1) kernels and zero biases."""

    out: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda width, name: nn.Dense(
            width,
            kernel_init=nn.initializers.orthogonal(1.0),
            bias_init=nn.initializers.zeros,
            name=name,
        )
        x = nn.relu(dense(HEAD_WIDTH, "dense_0")(x))
        x = nn.relu(dense(HEAD_WIDTH, "dense_1")(x))
        return dense(self.out, "dense_2")(x)


def reset_where(reset: Array, fresh: Any, state: Any) -> Any:
    """`fresh` where reset[b] is set, `state` elsewhere, for every (B, ...) leaf."""
    pick = lambda f, s: jnp.where(reset.reshape(-1, *([1] * (s.ndim - 1))) > 0, f, s)
    return jax.tree.map(pick, fresh, state)


class Agent(nn.Module):
    """`__call__(obs (B, obs_dim), state, reset (B,)) -> (logits (B, A), value (B,), state)`.

    `core` is `ctm_jax.rl.CTMRL` or `tasks.ctm_rl.lstm.LSTMRL` (both have `initial_state(batch)`
    and `__call__(obs, state) -> (features, state)`). With `carry_state=False` (the reference's
    `--no-continuous_state_trace`) every step starts from the start state.
    """

    core: nn.Module
    num_actions: int
    carry_state: bool = True

    def setup(self) -> None:
        self.actor = MLPHead(self.num_actions)
        self.critic = MLPHead(1)

    def initial_state(self, batch: int) -> Any:
        return self.core.initial_state(batch)

    def __call__(
        self, obs: Array, state: Any = None, reset: Array | None = None
    ) -> tuple[Array, Array, Any]:
        fresh = self.core.initial_state(obs.shape[0])
        if state is None or not self.carry_state:
            state = fresh
        elif reset is not None:
            state = reset_where(reset, fresh, state)
        features, state = self.core(obs, state)
        return self.actor(features), self.critic(features)[:, 0], state
