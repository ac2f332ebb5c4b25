"""The JAX CartPole-v1 / Acrobot-v1 against gymnasium's, transition by transition, plus the time
limit, same-step auto-reset, resets and velocity masking."""

from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import ConfigError
from tasks.ctm_rl.envs import ClassicControl

# Ours in float64 (jax x64) must equal gymnasium's float64 formulas; ours in float32 (training)
# must agree to float32 rounding: RK4 on Acrobot's stiff states at the velocity bounds (|dtheta2|
# near 28 rad/s) amplifies it to a few 1e-4.
EXACT = dict(rtol=1e-9, atol=1e-9)
CARTPOLE_F32 = dict(rtol=1e-5, atol=1e-5)
ACROBOT_F32 = dict(rtol=2e-5, atol=5e-4)


def _gym_transitions(env, states, actions):
    """gymnasium's (next state, reward, terminated) from each given state and action."""
    out_states, rewards, terms = [], [], []
    for state, action in zip(states, actions, strict=True):
        env.state = np.asarray(state, np.float64)
        if hasattr(env, "steps_beyond_terminated"):
            env.steps_beyond_terminated = None
        _, reward, terminated, _, _ = env.step(int(action))
        out_states.append(np.asarray(env.state, np.float64))
        rewards.append(reward)
        terms.append(terminated)
    return np.stack(out_states), np.asarray(rewards), np.asarray(terms)


def _ours(name, states, actions, dtype=jnp.float32):
    """Our dynamics on every (state, action); float64 runs under jax x64."""
    env = ClassicControl(name, 500, mask_velocity=False)
    step = jax.jit(jax.vmap(env.dynamics))
    with jax.enable_x64(dtype == jnp.float64):
        nxt, reward, terminated = step(jnp.asarray(states, dtype), jnp.asarray(actions))
        return np.asarray(nxt), np.asarray(reward), np.asarray(terminated)


def _cartpole_trajectory_states(n, seed):
    """States visited by random play in gymnasium's CartPole (reset on termination), float32."""
    env = gym.make("CartPole-v1").unwrapped
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    states, actions = [], []
    while len(states) < n:
        state = np.asarray(env.state, np.float32)
        action = int(rng.integers(2))
        states.append(state)
        actions.append(action)
        env.state = state.astype(np.float64)
        _, _, terminated, _, _ = env.step(action)
        if terminated:
            env.reset(seed=int(rng.integers(1 << 30)))
    return np.stack(states), np.asarray(actions)


def test_cartpole_transitions_match_gymnasium():
    states, actions = _cartpole_trajectory_states(400, seed=0)
    want_state, want_reward, want_term = _gym_transitions(
        gym.make("CartPole-v1").unwrapped, states, actions
    )
    for dtype, tol in ((jnp.float64, EXACT), (jnp.float32, CARTPOLE_F32)):
        got_state, got_reward, got_term = _ours("CartPole-v1", states, actions, dtype)
        np.testing.assert_allclose(got_state, want_state, **tol)
        np.testing.assert_array_equal(got_reward, want_reward)
        np.testing.assert_array_equal(got_term, want_term)
    assert want_term.sum() >= 10  # random play fails often: the termination test has cases


def _angle_gap(a, b):
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


def test_acrobot_transitions_match_gymnasium():
    rng = np.random.default_rng(1)
    # Broad random states (every angle, velocities up to the bounds, so wrapping, bounding and
    # the goal test all occur) and the states of a random-play trajectory.
    broad = np.stack(
        [
            rng.uniform(-np.pi, np.pi, 300),
            rng.uniform(-np.pi, np.pi, 300),
            rng.uniform(-4 * np.pi, 4 * np.pi, 300),
            rng.uniform(-9 * np.pi, 9 * np.pi, 300),
        ],
        axis=1,
    ).astype(np.float32)
    env = gym.make("Acrobot-v1").unwrapped
    env.reset(seed=1)
    walk = []
    for _ in range(200):
        walk.append(np.asarray(env.state, np.float32))
        env.state = walk[-1].astype(np.float64)
        env.step(int(rng.integers(3)))
    states = np.concatenate([broad, np.stack(walk)])
    actions = rng.integers(3, size=len(states))
    want_state, want_reward, want_term = _gym_transitions(env, states, actions)
    for dtype, tol in ((jnp.float64, EXACT), (jnp.float32, ACROBOT_F32)):
        got_state, got_reward, got_term = _ours("Acrobot-v1", states, actions, dtype)
        # Angles compared on the circle (+pi and -pi are the same angle after wrapping).
        assert _angle_gap(got_state[:, :2], want_state[:, :2]).max() < 10 * tol["atol"]
        assert np.all(np.abs(got_state[:, :2]) <= np.pi + 1e-6)
        np.testing.assert_allclose(got_state[:, 2:], want_state[:, 2:], **tol)
        np.testing.assert_array_equal(got_term, want_term)
        np.testing.assert_array_equal(got_reward, want_reward)
    assert want_term.sum() >= 10 and (~want_term).sum() >= 10
    # Bounded velocities were hit (the clip is exercised).
    assert np.isclose(np.abs(want_state[:, 3]), 9 * np.pi).any()


def test_observations_match_gymnasium_and_masking_zeroes_velocities():
    env = gym.make("Acrobot-v1").unwrapped
    env.reset(seed=3)
    env.state = np.array([0.3, -2.0, 1.5, -4.0])
    want = env._get_ob()
    ours = ClassicControl("Acrobot-v1", 500, mask_velocity=False)
    np.testing.assert_allclose(ours.observation(jnp.asarray(env.state, jnp.float32)), want, 1e-6)
    masked = ClassicControl("Acrobot-v1", 500, mask_velocity=True)
    np.testing.assert_allclose(
        masked.observation(jnp.asarray(env.state, jnp.float32)), want * [1, 1, 1, 1, 0, 0], 1e-6
    )
    cart = ClassicControl("CartPole-v1", 200, mask_velocity=True)
    np.testing.assert_array_equal(
        cart.observation(jnp.array([0.1, 0.2, 0.3, 0.4])), np.float32([0.1, 0, 0.3, 0])
    )


def test_reset_draws_gymnasium_ranges():
    for name, bound in (("CartPole-v1", 0.05), ("Acrobot-v1", 0.1)):
        env = ClassicControl(name, 100, mask_velocity=False)
        obs, state = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(0), 256))
        physics = np.asarray(state["physics"])
        assert physics.dtype == np.float32 and physics.shape == (256, 4)
        assert np.abs(physics).max() <= bound and np.abs(physics).max() > 0.9 * bound
        assert np.all(np.asarray(state["time"]) == 0)
        assert obs.shape == (256, env.obs_dim)


CARTPOLE_5 = ClassicControl("CartPole-v1", max_episode_steps=5, mask_velocity=False)
STEP_5 = jax.jit(CARTPOLE_5.step)


def test_time_limit_truncates_and_resets_in_the_same_step():
    obs, state = CARTPOLE_5.reset(jax.random.key(0))
    # Alternate pushes keep the pole up for five steps: the fifth is truncated, not terminated.
    for t in range(5):
        out = STEP_5(jax.random.key(10 + t), state, jnp.int32(t % 2))
        assert bool(out.done) == (t == 4) and not bool(out.terminated)
        state = out.state
    assert int(state["time"]) == 0
    reset_obs, reset_state = CARTPOLE_5.reset(jax.random.key(14))
    np.testing.assert_array_equal(out.obs, reset_obs)
    np.testing.assert_array_equal(state["physics"], reset_state["physics"])


def test_termination_ends_the_episode_and_starts_a_new_one():
    state = {"physics": jnp.array([2.399, 1.0, 0.0, 0.0]), "time": jnp.int32(2)}
    out = STEP_5(jax.random.key(1), state, jnp.int32(1))
    assert bool(out.terminated) and bool(out.done) and float(out.reward) == 1.0
    assert int(out.state["time"]) == 0
    assert np.abs(np.asarray(out.state["physics"])).max() <= 0.05
    # Not terminal: the physics advance and the clock counts.
    state = {"physics": jnp.zeros(4), "time": jnp.int32(2)}
    out = STEP_5(jax.random.key(1), state, jnp.int32(1))
    assert not bool(out.done) and int(out.state["time"]) == 3
    x, x_dot, theta, theta_dot = np.asarray(out.state["physics"])
    assert x == 0 and theta == 0 and x_dot > 0 and theta_dot < 0  # pushed right from rest


def test_bad_environment_fields_fail_early():
    with pytest.raises(ConfigError, match=r"^task\.env='Pong' is invalid"):
        ClassicControl("Pong", 100)
    with pytest.raises(ConfigError, match=r"^task\.max_episode_steps=0 is invalid"):
        ClassicControl("CartPole-v1", 0)
    assert ClassicControl("Acrobot-v1", 1).num_actions == 3
