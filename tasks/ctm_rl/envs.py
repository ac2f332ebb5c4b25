"""JAX-native CartPole-v1 and Acrobot-v1 (gymnasium's dynamics), one environment per call.

Every function is pure and works on one environment; vmap them over a batch of environments.
`ClassicControl.reset(key) -> (obs, state)` and `ClassicControl.step(key, state, action) ->
EnvStep(obs, state, reward, done, terminated)`, where the step resets a finished episode at once
(the returned obs is then the first obs of the next episode) and `done` = terminated or
truncated by the time limit. The state is a dict of arrays, `{'physics': (4,) float32, 'time': ()
int32}`, so it can live in a checkpoint.

The dynamics follow gymnasium 1.x step by step (tests/test_rl_envs.py checks them against it),
in the dtype of the state: float32 in training (the resets draw float32), float64 under jax x64
(how the tests check the formulas against gymnasium's float64 to 1e-9). The reference's
`--mask_velocity` zeroes the velocity entries of the observation (CartPole: cart and pole
velocity; Acrobot: both angular velocities), which makes the task partially observable: the
policy must remember.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from core.errors import ConfigError

Array = jax.Array
EnvState = dict[str, Array]

ENV_NAMES = ("CartPole-v1", "Acrobot-v1")

# gymnasium's CartPoleEnv constants.
CARTPOLE_GRAVITY = 9.8
CARTPOLE_MASS_CART = 1.0
CARTPOLE_MASS_POLE = 0.1
CARTPOLE_HALF_LENGTH = 0.5  # gymnasium's `length` is half the pole's length
CARTPOLE_FORCE = 10.0
CARTPOLE_TAU = 0.02  # seconds per step (explicit Euler)
CARTPOLE_THETA_LIMIT = 12 * 2 * math.pi / 360
CARTPOLE_X_LIMIT = 2.4
CARTPOLE_RESET_BOUND = 0.05

# gymnasium's AcrobotEnv constants ("book" dynamics, no torque noise).
ACROBOT_DT = 0.2
ACROBOT_LINK_LENGTH_1 = 1.0
ACROBOT_LINK_MASS_1 = 1.0
ACROBOT_LINK_MASS_2 = 1.0
ACROBOT_LINK_COM_1 = 0.5
ACROBOT_LINK_COM_2 = 0.5
ACROBOT_LINK_MOI = 1.0
ACROBOT_MAX_VEL_1 = 4 * math.pi
ACROBOT_MAX_VEL_2 = 9 * math.pi
ACROBOT_TORQUES = (-1.0, 0.0, 1.0)
ACROBOT_RESET_BOUND = 0.1


class EnvStep(NamedTuple):
    """What `ClassicControl.step` returns for one environment."""

    obs: Array  # (obs_dim,) float32; the next episode's first obs when `done`
    state: EnvState  # the state after the step (already reset when `done`)
    reward: Array  # () float32, the reward of this transition
    done: Array  # () bool: terminated or truncated (the episode ended with this step)
    terminated: Array  # () bool: ended by the task itself, not by the time limit


# ------------------------------------------------------------------------------------------------
# CartPole-v1


def cartpole_dynamics(physics: Array, action: Array) -> tuple[Array, Array, Array]:
    """One explicit-Euler step of gymnasium's CartPole: (x, x_dot, theta, theta_dot), action in
    {0: push left, 1: push right} -> (next physics, reward, terminated). The reward is 1 on every
    step, the terminating one included (gymnasium's default reward)."""
    x, x_dot, theta, theta_dot = physics[0], physics[1], physics[2], physics[3]
    total_mass = CARTPOLE_MASS_CART + CARTPOLE_MASS_POLE
    polemass_length = CARTPOLE_MASS_POLE * CARTPOLE_HALF_LENGTH
    force = jnp.where(action == 1, CARTPOLE_FORCE, -CARTPOLE_FORCE)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    temp = (force + polemass_length * theta_dot**2 * sin) / total_mass
    theta_acc = (CARTPOLE_GRAVITY * sin - cos * temp) / (
        CARTPOLE_HALF_LENGTH * (4.0 / 3.0 - CARTPOLE_MASS_POLE * cos**2 / total_mass)
    )
    x_acc = temp - polemass_length * theta_acc * cos / total_mass
    nxt = jnp.stack(
        [
            x + CARTPOLE_TAU * x_dot,
            x_dot + CARTPOLE_TAU * x_acc,
            theta + CARTPOLE_TAU * theta_dot,
            theta_dot + CARTPOLE_TAU * theta_acc,
        ]
    )
    terminated = (jnp.abs(nxt[0]) > CARTPOLE_X_LIMIT) | (jnp.abs(nxt[2]) > CARTPOLE_THETA_LIMIT)
    return nxt, jnp.ones((), physics.dtype), terminated


# ------------------------------------------------------------------------------------------------
# Acrobot-v1


def _acrobot_derivatives(s: Array, torque: Array) -> Array:
    """d/dt (theta1, theta2, dtheta1, dtheta2) under `torque` (gymnasium's "book" equations)."""
    m1, m2 = ACROBOT_LINK_MASS_1, ACROBOT_LINK_MASS_2
    l1, lc1, lc2 = ACROBOT_LINK_LENGTH_1, ACROBOT_LINK_COM_1, ACROBOT_LINK_COM_2
    i1 = i2 = ACROBOT_LINK_MOI
    g = 9.8
    theta1, theta2, dtheta1, dtheta2 = s[0], s[1], s[2], s[3]
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * jnp.cos(theta2)) + i1 + i2
    d2 = m2 * (lc2**2 + l1 * lc2 * jnp.cos(theta2)) + i2
    phi2 = m2 * lc2 * g * jnp.cos(theta1 + theta2 - math.pi / 2.0)
    phi1 = (
        -m2 * l1 * lc2 * dtheta2**2 * jnp.sin(theta2)
        - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * jnp.sin(theta2)
        + (m1 * lc1 + m2 * l1) * g * jnp.cos(theta1 - math.pi / 2)
        + phi2
    )
    ddtheta2 = (torque + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * jnp.sin(theta2) - phi2) / (
        m2 * lc2**2 + i2 - d2**2 / d1
    )
    ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
    return jnp.stack([dtheta1, dtheta2, ddtheta1, ddtheta2])


def wrap_angle(x: Array, low: float, high: float) -> Array:
    """gymnasium's `wrap`: shift by whole periods until low <= x <= high (a value already in the
    closed interval, the end points included, is left as it is)."""
    period = high - low
    x = jnp.where(x > high, x - period * jnp.ceil((x - high) / period), x)
    return jnp.where(x < low, x + period * jnp.ceil((low - x) / period), x)


def acrobot_dynamics(physics: Array, action: Array) -> tuple[Array, Array, Array]:
    """One step of gymnasium's Acrobot: a single RK4 step of dt 0.2 s, angles wrapped to
    [-pi, pi], velocities bounded; action in {0, 1, 2} = torque -1, 0, +1 -> (next physics,
    reward, terminated). The reward is -1 per step and 0 on the step that reaches the goal."""
    torque = jnp.asarray(ACROBOT_TORQUES, physics.dtype)[action]
    dt = ACROBOT_DT
    k1 = _acrobot_derivatives(physics, torque)
    k2 = _acrobot_derivatives(physics + dt / 2 * k1, torque)
    k3 = _acrobot_derivatives(physics + dt / 2 * k2, torque)
    k4 = _acrobot_derivatives(physics + dt * k3, torque)
    s = physics + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    nxt = jnp.stack(
        [
            wrap_angle(s[0], -math.pi, math.pi),
            wrap_angle(s[1], -math.pi, math.pi),
            jnp.clip(s[2], -ACROBOT_MAX_VEL_1, ACROBOT_MAX_VEL_1),
            jnp.clip(s[3], -ACROBOT_MAX_VEL_2, ACROBOT_MAX_VEL_2),
        ]
    )
    terminated = -jnp.cos(nxt[0]) - jnp.cos(nxt[1] + nxt[0]) > 1.0
    reward = jnp.where(terminated, 0.0, -1.0).astype(physics.dtype)
    return nxt, reward, terminated


def acrobot_observation(physics: Array) -> Array:
    """(cos theta1, sin theta1, cos theta2, sin theta2, dtheta1, dtheta2)."""
    t1, t2 = physics[0], physics[1]
    return jnp.stack(
        [jnp.cos(t1), jnp.sin(t1), jnp.cos(t2), jnp.sin(t2), physics[2], physics[3]]
    ).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# The environment


@dataclasses.dataclass(frozen=True)
class ClassicControl:
    """CartPole-v1 or Acrobot-v1 with a time limit, optional velocity masking and same-step
    auto-reset. Hashable and static: pass it to jitted functions as a closure."""

    name: str  # 'CartPole-v1' | 'Acrobot-v1'
    max_episode_steps: int  # time limit (the episode is truncated after this many steps)
    mask_velocity: bool = True  # zero the velocity entries of every observation

    def __post_init__(self) -> None:
        if self.name not in ENV_NAMES:
            raise ConfigError(f"task.env={self.name!r} is invalid: allowed: {', '.join(ENV_NAMES)}")
        if int(self.max_episode_steps) < 1:
            raise ConfigError(
                f"task.max_episode_steps={self.max_episode_steps!r} is invalid: must be >= 1"
            )

    @property
    def obs_dim(self) -> int:
        return 4 if self.name == "CartPole-v1" else 6

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return (self.obs_dim,)

    obs_dtype = jnp.float32

    @property
    def num_actions(self) -> int:
        return 2 if self.name == "CartPole-v1" else 3

    @property
    def velocity_indices(self) -> tuple[int, ...]:
        """Observation entries that `mask_velocity` zeroes (the reference's MaskVelocityWrapper)."""
        return (1, 3) if self.name == "CartPole-v1" else (4, 5)

    def observation(self, physics: Array) -> Array:
        obs = physics if self.name == "CartPole-v1" else acrobot_observation(physics)
        obs = obs.astype(jnp.float32)
        if self.mask_velocity:
            keep = [i not in self.velocity_indices for i in range(self.obs_dim)]
            obs = obs * jnp.asarray(keep, jnp.float32)
        return obs

    def dynamics(self, physics: Array, action: Array) -> tuple[Array, Array, Array]:
        """(next physics, reward, terminated), no time limit and no reset."""
        if self.name == "CartPole-v1":
            return cartpole_dynamics(physics, action)
        return acrobot_dynamics(physics, action)

    def reset(self, key: Array) -> tuple[Array, EnvState]:
        """A fresh episode: every physics entry uniform in +-0.05 (CartPole) / +-0.1 (Acrobot)."""
        bound = CARTPOLE_RESET_BOUND if self.name == "CartPole-v1" else ACROBOT_RESET_BOUND
        physics = jax.random.uniform(key, (4,), jnp.float32, -bound, bound)
        state = {"physics": physics, "time": jnp.zeros((), jnp.int32)}
        return self.observation(physics), state

    def step(self, key: Array, state: EnvState, action: Array) -> EnvStep:
        """One transition; a finished episode (terminated or out of time) is reset with `key`."""
        physics, reward, terminated = self.dynamics(state["physics"], action)
        time = state["time"] + 1
        done = terminated | (time >= self.max_episode_steps)
        reset_obs, reset_state = self.reset(key)
        stepped = {"physics": physics, "time": time}
        new_state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, stepped)
        obs = jnp.where(done, reset_obs, self.observation(physics))
        return EnvStep(obs, new_state, reward, done, terminated)
