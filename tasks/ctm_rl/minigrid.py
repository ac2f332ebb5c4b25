"""JAX-native MiniGrid FourRooms (`MiniGrid-FourRooms-v0` behind MiniGrid's `ImgObsWrapper`),
one environment per call, with the interface of `tasks.ctm_rl.envs.ClassicControl`.

The world is MiniGrid's 19 x 19 grid: an outer wall, a vertical wall at x = 9 and a horizontal
one at y = 9 that cut it into four 8 x 8 rooms, and one gap (a "door" without a door object) in
each of the four wall segments, drawn uniformly inside its segment at every reset. The agent
(random free cell, random direction) must walk onto the goal (random free cell, not the agent's).

Observation: MiniGrid's 7 x 7 x 3 symbolic egocentric view, indexed [x, y, channel] with the
agent at (3, 6) facing up the view: channel 0 the object type (0 unseen, 1 empty, 2 wall, 8 goal),
channel 1 its colour (wall grey 5, goal green 1, empty 0), channel 2 its state (always 0 here).
Cells beyond the grid read as walls; cells hidden behind walls (MiniGrid's `process_vis`
line-of-sight sweep, see `visibility`) read as unseen (0, 0, 0).

Actions: MiniGrid's 7 (0 turn left, 1 turn right, 2 forward, 3 pick up, 4 drop, 5 toggle,
6 done). In FourRooms only the first three change anything; the others spend a step, as in
MiniGrid. Reward: 1 - 0.9 * steps / max_steps on the step that reaches the goal (steps counted
with that step), else 0. The episode terminates on the goal and is truncated after
`max_episode_steps` steps (MiniGrid's default is 100; the reference trains with 300).

State: {'doors': (4,) int32 free coordinate of each gap, 'agent': (2,) int32 (x, y),
'direction': () int32 (0 right, 1 down, 2 left, 3 up), 'goal': (2,) int32, 'time': () int32}.
tests/test_rl_envs.py replays MiniGrid's own episodes through it: same observations, rewards
and episode ends at every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from core.errors import ConfigError
from tasks.ctm_rl.envs import EnvState, EnvStep

Array = jax.Array

FOURROOMS = "MiniGrid-FourRooms-v0"
GRID_SIZE = 19
ROOM_SIZE = GRID_SIZE // 2  # 9: the inner walls stand at x = 9 and y = 9
VIEW_SIZE = 7
NUM_ACTIONS = 7
TURN_LEFT, TURN_RIGHT, FORWARD = 0, 1, 2

# MiniGrid's symbolic encoding (OBJECT_TO_IDX, COLOR_TO_IDX) of what FourRooms contains.
UNSEEN, EMPTY, WALL, GOAL = 0, 1, 2, 8
GREY, GREEN = 5, 1
NUM_OBJECT_TYPES, NUM_COLOURS, NUM_STATES = 11, 6, 3

# Unit step per direction (MiniGrid's DIR_TO_VEC): right, down, left, up.
DIRECTION_VECTORS = jnp.array([[1, 0], [0, 1], [-1, 0], [0, -1]], jnp.int32)


def wall_mask(doors: Array) -> Array:
    """(19, 19) bool, indexed [x, y]: the outer and inner walls less the four gaps.

    doors = (y of the gap in the upper vertical segment, x of the gap in the left horizontal
    segment, x of the gap in the right horizontal segment, y of the gap in the lower vertical
    segment)."""
    xs = jnp.arange(GRID_SIZE)[:, None]
    ys = jnp.arange(GRID_SIZE)[None, :]
    edge = GRID_SIZE - 1
    walls = (xs == 0) | (ys == 0) | (xs == edge) | (ys == edge)
    walls = walls | (xs == ROOM_SIZE) | (ys == ROOM_SIZE)
    gaps = (
        ((xs == ROOM_SIZE) & (ys == doors[0]))
        | ((ys == ROOM_SIZE) & (xs == doors[1]))
        | ((ys == ROOM_SIZE) & (xs == doors[2]))
        | ((xs == ROOM_SIZE) & (ys == doors[3]))
    )
    return walls & ~gaps


def view_coordinates(agent: Array, direction: Array) -> tuple[Array, Array]:
    """World (x, y) of each cell of the 7 x 7 view, (7, 7) each, indexed [view x, view y].

    The agent sits at view (3, 6) looking towards view y = 0: view cell (vx, vy) lies
    6 - vy cells ahead of it and vx - 3 cells to its right."""
    forward = DIRECTION_VECTORS[direction]
    right = jnp.stack([-forward[1], forward[0]])
    vx = jnp.arange(VIEW_SIZE)[:, None]
    vy = jnp.arange(VIEW_SIZE)[None, :]
    ahead = VIEW_SIZE - 1 - vy
    aside = vx - VIEW_SIZE // 2
    x = agent[0] + forward[0] * ahead + right[0] * aside
    y = agent[1] + forward[1] * ahead + right[1] * aside
    return x, y


def visibility(opaque: Array) -> Array:
    """MiniGrid's `process_vis` on a view, (7, 7) bool indexed [x, y] -> visible cells.

    Row by row from the agent's row (y = 6) to the far one (y = 0): a visible cell that is not
    opaque lights its neighbour in the sweep direction and the two cells diagonally and straight
    ahead of it in the next row, first sweeping left to right, then right to left. The sweeps are
    sequential (a lit cell can light the next one in the same sweep), so they are unrolled."""
    size = VIEW_SIZE
    lit = [[jnp.zeros((), bool) for _ in range(size)] for _ in range(size)]  # lit[x][y]
    lit[size // 2][size - 1] = jnp.ones((), bool)
    for y in reversed(range(size)):
        for x in range(size - 1):
            spreads = lit[x][y] & ~opaque[x, y]
            lit[x + 1][y] = lit[x + 1][y] | spreads
            if y > 0:
                lit[x + 1][y - 1] = lit[x + 1][y - 1] | spreads
                lit[x][y - 1] = lit[x][y - 1] | spreads
        for x in reversed(range(1, size)):
            spreads = lit[x][y] & ~opaque[x, y]
            lit[x - 1][y] = lit[x - 1][y] | spreads
            if y > 0:
                lit[x - 1][y - 1] = lit[x - 1][y - 1] | spreads
                lit[x][y - 1] = lit[x][y - 1] | spreads
    return jnp.stack([jnp.stack(column) for column in lit])


def observe(state: EnvState) -> Array:
    """The 7 x 7 x 3 int32 symbolic view of `state` (MiniGrid's `gen_obs()['image']`)."""
    x, y = view_coordinates(state["agent"], state["direction"])
    inside = (x >= 0) & (x < GRID_SIZE) & (y >= 0) & (y < GRID_SIZE)
    walls = wall_mask(state["doors"])
    wall = ~inside | walls[jnp.clip(x, 0, GRID_SIZE - 1), jnp.clip(y, 0, GRID_SIZE - 1)]
    # MiniGrid draws the agent's own cell as empty, even when it stands on the goal.
    agent_cell = (jnp.arange(VIEW_SIZE)[:, None] == VIEW_SIZE // 2) & (
        jnp.arange(VIEW_SIZE)[None, :] == VIEW_SIZE - 1
    )
    goal = inside & (x == state["goal"][0]) & (y == state["goal"][1]) & ~agent_cell
    objects = jnp.where(wall, WALL, jnp.where(goal, GOAL, EMPTY))
    colours = jnp.where(wall, GREY, jnp.where(goal, GREEN, 0))
    visible = visibility(wall)
    image = jnp.stack([objects, colours, jnp.zeros_like(objects)], axis=-1)
    return jnp.where(visible[..., None], image, UNSEEN).astype(jnp.int32)


def _random_free_cell(key: Array, free: Array) -> Array:
    """A uniformly drawn True cell of `free` (19, 19) -> (x, y) int32."""
    logits = jnp.where(free.reshape(-1), 0.0, -jnp.inf)
    flat = jax.random.categorical(key, logits)
    return jnp.stack([flat // GRID_SIZE, flat % GRID_SIZE]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class FourRooms:
    """MiniGrid FourRooms with a time limit and same-step auto-reset; hashable and static."""

    max_episode_steps: int = 300
    name: str = FOURROOMS

    def __post_init__(self) -> None:
        if int(self.max_episode_steps) < 1:
            raise ConfigError(
                f"task.max_episode_steps={self.max_episode_steps!r} is invalid: must be >= 1"
            )

    obs_shape = (VIEW_SIZE, VIEW_SIZE, 3)
    obs_dtype = jnp.int32
    num_actions = NUM_ACTIONS

    def reset(self, key: Array) -> tuple[Array, EnvState]:
        """New gaps, then the agent (and its direction), then the goal, as MiniGrid draws them."""
        door_key, agent_key, dir_key, goal_key = jax.random.split(key, 4)
        low = jnp.array([1, 1, ROOM_SIZE + 1, ROOM_SIZE + 1])
        doors = jax.random.randint(door_key, (4,), low, low + ROOM_SIZE - 1).astype(jnp.int32)
        free = ~wall_mask(doors)
        agent = _random_free_cell(agent_key, free)
        direction = jax.random.randint(dir_key, (), 0, 4).astype(jnp.int32)
        not_agent = free.at[agent[0], agent[1]].set(False)
        goal = _random_free_cell(goal_key, not_agent)
        state = {
            "doors": doors,
            "agent": agent,
            "direction": direction,
            "goal": goal,
            "time": jnp.zeros((), jnp.int32),
        }
        return observe(state), state

    def dynamics(self, state: EnvState, action: Array) -> tuple[EnvState, Array, Array]:
        """(next state, reward, terminated) without time limit or reset; `time` counts the
        step (the reward needs it)."""
        time = state["time"] + 1
        direction = state["direction"]
        ahead = state["agent"] + DIRECTION_VECTORS[direction]
        blocked = wall_mask(state["doors"])[ahead[0], ahead[1]]
        forward = action == FORWARD
        agent = jnp.where(forward & ~blocked, ahead, state["agent"])
        direction = jnp.where(action == TURN_LEFT, (direction + 3) % 4, direction)
        direction = jnp.where(action == TURN_RIGHT, (direction + 1) % 4, direction)
        reached = forward & jnp.all(ahead == state["goal"])
        reward = jnp.where(reached, 1.0 - 0.9 * time / self.max_episode_steps, 0.0)
        nxt = {**state, "agent": agent, "direction": direction.astype(jnp.int32), "time": time}
        return nxt, reward.astype(jnp.float32), reached

    def step(self, key: Array, state: EnvState, action: Array) -> EnvStep:
        """One transition; a finished episode (goal reached or out of time) is reset with `key`."""
        stepped, reward, terminated = self.dynamics(state, action)
        done = terminated | (stepped["time"] >= self.max_episode_steps)
        reset_obs, reset_state = self.reset(key)
        new_state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, stepped)
        obs = jnp.where(done, reset_obs, observe(stepped))
        return EnvStep(obs, new_state, reward, done, terminated)
