"""The JAX FourRooms against MiniGrid's own `MiniGrid-FourRooms-v0`: MiniGrid's episodes
replayed step by step (same layout, same actions) must give the same 7 x 7 x 3 views, rewards
and episode ends; plus the reset distribution and the auto-reset."""

from __future__ import annotations

import gymnasium as gym
import jax
import jax.numpy as jnp
import minigrid  # noqa: F401  (registers the MiniGrid environments with gymnasium)
import numpy as np
import pytest
from minigrid.core.world_object import Goal

from core.errors import ConfigError
from tasks.ctm_rl.minigrid import FOURROOMS, GRID_SIZE, ROOM_SIZE, FourRooms, observe, wall_mask

MAX_STEPS = 60  # short episodes, so the replay also crosses time limits


def _state_of(env) -> dict[str, np.ndarray]:
    """Our state for MiniGrid's current layout, agent and step count."""
    grid = env.grid
    gap = lambda cells: next(i for i, (x, y) in cells if grid.get(x, y) is None)
    doors = [
        gap([(y, (ROOM_SIZE, y)) for y in range(1, ROOM_SIZE)]),
        gap([(x, (x, ROOM_SIZE)) for x in range(1, ROOM_SIZE)]),
        gap([(x, (x, ROOM_SIZE)) for x in range(ROOM_SIZE + 1, GRID_SIZE - 1)]),
        gap([(y, (ROOM_SIZE, y)) for y in range(ROOM_SIZE + 1, GRID_SIZE - 1)]),
    ]
    goal = next(
        (x, y)
        for x in range(GRID_SIZE)
        for y in range(GRID_SIZE)
        if grid.get(x, y) is not None and grid.get(x, y).type == "goal"
    )
    return {
        "doors": np.asarray(doors, np.int32),
        "agent": np.asarray(env.agent_pos, np.int32),
        "direction": np.asarray(env.agent_dir, np.int32),
        "goal": np.asarray(goal, np.int32),
        "time": np.asarray(env.step_count, np.int32),
    }


def _goal_ahead(env) -> None:
    """Move MiniGrid's goal to the free cell in front of the agent (if there is one), so random
    play also reaches goals."""
    front = tuple(int(v) for v in env.front_pos)
    if env.grid.get(*front) is not None:
        return
    old = _state_of(env)["goal"]
    env.grid.set(int(old[0]), int(old[1]), None)
    env.put_obj(Goal(), *front)


def test_episodes_replay_minigrid_exactly():
    ours = FourRooms(MAX_STEPS)
    step = jax.jit(ours.dynamics)
    view = jax.jit(observe)
    env = gym.make(FOURROOMS, max_steps=MAX_STEPS).unwrapped
    rng = np.random.default_rng(0)
    # turn left, turn right, forward (most often), and the four no-op actions
    probs = np.array([0.2, 0.2, 0.45, 0.04, 0.04, 0.04, 0.03])
    counts = {"steps": 0, "goals": 0, "truncations": 0, "walls_bumped": 0, "unseen_cells": 0}
    for episode in range(24):
        obs, _ = env.reset(seed=episode)
        if episode % 2:
            _goal_ahead(env)
            obs = env.gen_obs()
        state = _state_of(env)
        np.testing.assert_array_equal(np.asarray(view(state)), obs["image"])
        for _ in range(MAX_STEPS):
            action = int(rng.choice(7, p=probs))
            before = tuple(env.agent_pos)
            obs, reward, terminated, truncated, _ = env.step(action)
            state, our_reward, our_terminated = step(state, jnp.asarray(action))
            image = np.asarray(view(state))
            np.testing.assert_array_equal(image, obs["image"])
            np.testing.assert_array_equal(np.asarray(state["agent"]), np.asarray(env.agent_pos))
            assert int(state["direction"]) == env.agent_dir
            np.testing.assert_allclose(float(our_reward), reward, rtol=1e-6)
            assert bool(our_terminated) == terminated
            assert (int(state["time"]) >= MAX_STEPS) == truncated
            counts["steps"] += 1
            counts["walls_bumped"] += action == 2 and tuple(env.agent_pos) == before
            counts["unseen_cells"] += int((image[..., 0] == 0).sum())
            if terminated or truncated:
                counts["goals"] += terminated
                counts["truncations"] += truncated
                break
    # The replay covered what matters: goals, time limits, walls and occluded cells.
    assert counts["goals"] >= 5 and counts["truncations"] >= 5, counts
    assert counts["walls_bumped"] >= 10 and counts["unseen_cells"] >= 100, counts


def test_reset_draws_minigrid_layouts():
    env = FourRooms(300)
    obs, state = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(0), 4096))
    doors = np.asarray(state["doors"])
    for k, (low, high) in enumerate([(1, 8), (1, 8), (10, 17), (10, 17)]):
        assert doors[:, k].min() == low and doors[:, k].max() == high  # the whole segment
    walls = np.asarray(jax.vmap(wall_mask)(state["doors"]))
    rows = np.arange(len(doors))
    agent, goal = np.asarray(state["agent"]), np.asarray(state["goal"])
    assert not walls[rows, agent[:, 0], agent[:, 1]].any()
    assert not walls[rows, goal[:, 0], goal[:, 1]].any()
    assert not np.all(agent == goal, axis=1).any()
    assert set(np.asarray(state["direction"]).tolist()) == {0, 1, 2, 3}
    # Uniform over free cells: each room holds about a quarter of the agents.
    room = (agent[:, 0] > ROOM_SIZE) * 2 + (agent[:, 1] > ROOM_SIZE)
    np.testing.assert_allclose(np.bincount(room, minlength=4) / len(room), 0.25, atol=0.03)
    np.testing.assert_array_equal(np.asarray(obs), np.asarray(jax.vmap(observe)(state)))
    assert obs.shape == (4096, 7, 7, 3) and obs.dtype == jnp.int32
    # The agent's own cell is always visible and empty.
    np.testing.assert_array_equal(np.asarray(obs)[:, 3, 6], [[1, 0, 0]] * 4096)


def test_goal_and_time_limit_reset_in_the_same_step():
    env = FourRooms(5)
    _, state = env.reset(jax.random.key(1))
    # Put the goal right in front of the agent: forward reaches it on step 1.
    ahead = state["agent"] + jnp.array([[1, 0], [0, 1], [-1, 0], [0, -1]])[state["direction"]]
    walls = wall_mask(state["doors"])
    if bool(walls[ahead[0], ahead[1]]):
        state = {**state, "direction": (state["direction"] + 2) % 4}
        ahead = 2 * state["agent"] - ahead
    state = {**state, "goal": ahead.astype(jnp.int32)}
    out = env.step(jax.random.key(2), state, jnp.asarray(2))
    assert bool(out.done) and bool(out.terminated)
    np.testing.assert_allclose(float(out.reward), 1 - 0.9 * 1 / 5, rtol=1e-6)
    assert int(out.state["time"]) == 0  # already the next episode
    np.testing.assert_array_equal(np.asarray(out.obs), np.asarray(observe(out.state)))
    # Turning in place five times runs out of time: truncated, not terminated, no reward.
    state = out.state
    for t in range(5):
        out = env.step(jax.random.key(3 + t), state, jnp.asarray(0))
        state = out.state
    assert bool(out.done) and not bool(out.terminated) and float(out.reward) == 0.0


def test_bad_fourrooms_fields_fail_early():
    with pytest.raises(ConfigError, match="task.max_episode_steps=0"):
        FourRooms(0)
