"""PPO for recurrent agents, CleanRL-style as the reference runs it, written as pure JAX.

One PPO iteration (`PPO.iteration`, one trainer step, jitted whole):

  1. rollout: `num_steps` steps of `num_envs` environments (`lax.scan`); the agent's recurrent
     state is carried from step to step and reset at episode starts; rewards go through the
     reference's NormalizeReward (per environment, gymnasium's running variance of the
     discounted return);
  2. GAE(gamma, lambda) with the value of the next observation as bootstrap; an episode end
     (terminated *or* truncated) cuts the bootstrap, as in the reference;
  3. `update_epochs` x `num_minibatches` Adam updates: each minibatch is a group of whole
     environments (their `num_steps` sequences), replayed from the recurrent state the rollout
     started from, so the gradient flows back through time; clipped surrogate, 0.5 MSE value
     loss (optionally clipped), entropy bonus; advantages normalised per minibatch.

The mutable part of the run (environment states, last observations and episode-start flags, the
carried recurrent state, the reward normaliser, episode statistics) is one dict, the 'rollout'
buffers of the train state, so a checkpoint resumes it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tasks.ctm_rl.envs import ClassicControl
from tasks.ctm_rl.minigrid import FourRooms

Array = jax.Array
Buffers = dict[str, Any]

# gymnasium's NormalizeReward / RunningMeanStd constants.
REWARD_NORM_EPS = 1e-8
RUNNING_COUNT_INIT = 1e-4
# CleanRL's advantage normalisation: (a - mean) / (std + 1e-8), torch's unbiased std.
ADV_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The PPO fields of the `task` config section (see configs/ctm_rl.py)."""

    num_envs: int
    num_steps: int
    update_epochs: int
    num_minibatches: int
    gamma: float
    gae_lambda: float
    clip_coef: float
    clip_vloss: bool
    ent_coef: float
    vf_coef: float
    norm_adv: bool
    normalize_reward: bool
    shuffle_minibatches: bool


# ------------------------------------------------------------------------------------------------
# Pure pieces


def gae(
    rewards: Array,
    values: Array,
    starts: Array,
    last_value: Array,
    last_start: Array,
    gamma: float,
    lam: float,
) -> tuple[Array, Array]:
    """Generalised advantage estimates and returns (advantages + values), (S, E) each.

    `starts[t]` is 1 where observation t began an episode (the previous step ended one), so the
    bootstrap from step t to t + 1 is cut by starts[t + 1]; `last_value` / `last_start` belong to
    the observation after the last step.
    """
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    next_nonterminal = 1.0 - jnp.concatenate([starts[1:], last_start[None]], axis=0)
    deltas = rewards + gamma * next_values * next_nonterminal - values

    def back(carry: Array, x: tuple[Array, Array]) -> tuple[Array, Array]:
        delta, nonterminal = x
        advantage = delta + gamma * lam * nonterminal * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(
        back, jnp.zeros_like(last_value), (deltas, next_nonterminal), reverse=True
    )
    return advantages, advantages + values


def reward_normaliser_init(num_envs: int) -> dict[str, Array]:
    """gymnasium NormalizeReward's state, one per environment."""
    return {
        "mean": jnp.zeros((num_envs,), jnp.float32),
        "var": jnp.ones((num_envs,), jnp.float32),
        "count": jnp.full((num_envs,), RUNNING_COUNT_INIT, jnp.float32),
        "discounted": jnp.zeros((num_envs,), jnp.float32),
    }


def normalise_reward(
    stats: dict[str, Array], reward: Array, terminated: Array, gamma: float
) -> tuple[dict[str, Array], Array]:
    """gymnasium's NormalizeReward step: update the running variance of the discounted return
    (reset by termination only: the reference's time limit wraps outside the normaliser) with
    this step's value, then scale the reward by 1 / sqrt(var + 1e-8)."""
    discounted = stats["discounted"] * gamma * (1.0 - terminated.astype(jnp.float32)) + reward
    count = stats["count"]
    delta = discounted - stats["mean"]
    total = count + 1.0
    mean = stats["mean"] + delta / total
    var = (stats["var"] * count + delta**2 * count / total) / total
    new = {"mean": mean, "var": var, "count": total, "discounted": discounted}
    return new, reward / jnp.sqrt(var + REWARD_NORM_EPS)


def log_prob_and_entropy(logits: Array, actions: Array) -> tuple[Array, Array]:
    """Categorical log pi(action) and entropy from logits (..., A)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_p, actions[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return chosen, entropy


def normalise_advantages(advantages: Array) -> Array:
    return (advantages - advantages.mean()) / (jnp.std(advantages, ddof=1) + ADV_EPS)


def ppo_losses(
    cfg: PPOConfig,
    logits: Array,
    values: Array,
    batch: dict[str, Array],
) -> tuple[Array, dict[str, Array]]:
    """The PPO objective of one minibatch from the replayed logits and values."""
    log_p, entropy = log_prob_and_entropy(logits, batch["action"])
    log_ratio = log_p - batch["log_prob"]
    ratio = jnp.exp(log_ratio)
    advantages = batch["advantage"]
    if cfg.norm_adv:
        advantages = normalise_advantages(advantages)
    policy_loss = jnp.maximum(
        -advantages * ratio, -advantages * jnp.clip(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
    ).mean()
    if cfg.clip_vloss:
        clipped = batch["value"] + jnp.clip(values - batch["value"], -cfg.clip_coef, cfg.clip_coef)
        value_loss = (
            0.5
            * jnp.maximum((values - batch["return"]) ** 2, (clipped - batch["return"]) ** 2).mean()
        )
    else:
        value_loss = 0.5 * ((values - batch["return"]) ** 2).mean()
    entropy = entropy.mean()
    loss = policy_loss - cfg.ent_coef * entropy + cfg.vf_coef * value_loss
    stop = jax.lax.stop_gradient
    metrics = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        "approx_kl": stop(((ratio - 1) - log_ratio).mean()),
        "clipfrac": stop((jnp.abs(ratio - 1.0) > cfg.clip_coef).astype(jnp.float32).mean()),
    }
    return loss, metrics


def episode_update(episode: dict[str, Array], reward: Array, done: Array) -> dict[str, Array]:
    """Running raw return/length of each environment's episode; at an episode end the totals go
    to last_return/last_length and the counters restart (RecordEpisodeStatistics, on the raw
    rewards)."""
    ret = episode["return"] + reward
    length = episode["length"] + 1.0
    return {
        "return": jnp.where(done, 0.0, ret),
        "length": jnp.where(done, 0.0, length),
        "last_return": jnp.where(done, ret, episode["last_return"]),
        "last_length": jnp.where(done, length, episode["last_length"]),
        "finished": jnp.maximum(episode["finished"], done.astype(jnp.float32)),
    }


def episode_init(num_envs: int) -> dict[str, Array]:
    zeros = jnp.zeros((num_envs,), jnp.float32)
    return {
        "return": zeros,
        "length": zeros,
        "last_return": zeros,
        "last_length": zeros,
        "finished": zeros,
    }


# ------------------------------------------------------------------------------------------------
# The algorithm


@dataclasses.dataclass(frozen=True)
class PPO:
    """PPO on `env` with `agent` (`tasks.ctm_rl.agent.Agent`); every method is pure."""

    agent: nn.Module
    env: ClassicControl | FourRooms
    cfg: PPOConfig

    # -- the agent -----------------------------------------------------------------------------
    def policy(self, params: Any, obs: Array, state: Any, starts: Array) -> tuple[Any, ...]:
        return self.agent.apply({"params": params}, obs, state, starts)

    def initial_state(self, params: Any, batch: int) -> Any:
        return self.agent.apply({"params": params}, batch, method="initial_state")

    def init_params(self, key: Array) -> Any:
        obs = jnp.zeros((self.cfg.num_envs, *self.env.obs_shape), self.env.obs_dtype)
        return self.agent.init(key, obs)["params"]

    def init_buffers(self, params: Any, key: Array) -> Buffers:
        """Fresh environments, each starting an episode from the agent's start state."""
        n = self.cfg.num_envs
        obs, env_state = jax.vmap(self.env.reset)(jax.random.split(key, n))
        return {
            "env": env_state,
            "obs": obs,
            "starts": jnp.ones((n,), jnp.float32),
            "core": self.initial_state(params, n),
            "reward_stats": reward_normaliser_init(n),
            "episode": episode_init(n),
        }

    # -- 1. rollout ------------------------------------------------------------------------------
    def rollout(
        self, params: Any, buffers: Buffers, key: Array
    ) -> tuple[Buffers, dict[str, Array]]:
        """`num_steps` steps of every environment -> (buffers after them, trajectory (S, E, ...)).

        The trajectory holds, per step: the observation and its episode-start flag, the action,
        its log-probability and the value, the (normalised) reward, and where an episode ended,
        its raw return and length."""
        n = self.cfg.num_envs

        def one(buf: Buffers, step_key: Array) -> tuple[Buffers, dict[str, Array]]:
            act_key, env_key = jax.random.split(step_key)
            logits, value, core = self.policy(params, buf["obs"], buf["core"], buf["starts"])
            action = jax.random.categorical(act_key, logits)
            log_p, _ = log_prob_and_entropy(logits, action)
            out = jax.vmap(self.env.step)(jax.random.split(env_key, n), buf["env"], action)
            stats, reward = buf["reward_stats"], out.reward
            if self.cfg.normalize_reward:
                stats, reward = normalise_reward(stats, out.reward, out.terminated, self.cfg.gamma)
            episode = episode_update(buf["episode"], out.reward, out.done)
            new = {
                "env": out.state,
                "obs": out.obs,
                "starts": out.done.astype(jnp.float32),
                "core": core,
                "reward_stats": stats,
                "episode": episode,
            }
            transition = {
                "obs": buf["obs"],
                "starts": buf["starts"],
                "action": action,
                "log_prob": log_p,
                "value": value,
                "reward": reward,
                "ended": out.done.astype(jnp.float32),
                "episode_return": episode["last_return"],
                "episode_length": episode["last_length"],
            }
            return new, transition

        return jax.lax.scan(one, buffers, jax.random.split(key, self.cfg.num_steps))

    # -- 3. update -------------------------------------------------------------------------------
    def replay(self, params: Any, state0: Any, obs: Array, starts: Array) -> tuple[Array, Array]:
        """Logits (S, e, A) and values (S, e) of the agent re-run over stored sequences."""

        def one(state: Any, x: tuple[Array, Array]) -> tuple[Any, tuple[Array, Array]]:
            logits, value, state = self.policy(params, x[0], state, x[1])
            return state, (logits, value)

        _, (logits, values) = jax.lax.scan(one, state0, (obs, starts))
        return logits, values

    def minibatch_loss(
        self, params: Any, state0: Any, batch: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        logits, values = self.replay(params, state0, batch["obs"], batch["starts"])
        return ppo_losses(self.cfg, logits, values, batch)

    def update(
        self,
        params: Any,
        opt_state: Any,
        tx: optax.GradientTransformation,
        state0: Any,
        data: dict[str, Array],
        lr_scale: Array,
        key: Array,
    ) -> tuple[Any, Any, dict[str, Array]]:
        """`update_epochs` passes over `num_minibatches` groups of environments; every update is
        scaled by `lr_scale` (the linear annealing). Returns params, optimiser state and the
        metrics averaged over all the updates."""
        cfg = self.cfg
        per_minibatch = cfg.num_envs // cfg.num_minibatches
        grad_fn = jax.value_and_grad(self.minibatch_loss, has_aux=True)

        def minibatch(carry: tuple[Any, Any, Array], start: Array):
            params, opt_state, order = carry
            envs = jax.lax.dynamic_slice(order, (start,), (per_minibatch,))
            batch = jax.tree.map(lambda x: jnp.take(x, envs, axis=1), data)
            init = jax.tree.map(lambda x: jnp.take(x, envs, axis=0), state0)
            (loss, metrics), grads = grad_fn(params, init, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
            params = optax.apply_updates(params, updates)
            metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
            return (params, opt_state, order), metrics

        def epoch(carry: tuple[Any, Any], epoch_key: Array):
            params, opt_state = carry
            order = jnp.arange(cfg.num_envs)
            if cfg.shuffle_minibatches:
                order = jax.random.permutation(epoch_key, order)
            starts = jnp.arange(cfg.num_minibatches) * per_minibatch
            (params, opt_state, _), metrics = jax.lax.scan(
                minibatch, (params, opt_state, order), starts
            )
            return (params, opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(key, cfg.update_epochs)
        )
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    # -- the whole iteration ---------------------------------------------------------------------
    def iteration(
        self,
        params: Any,
        opt_state: Any,
        buffers: Buffers,
        tx: optax.GradientTransformation,
        lr_scale: Array,
        key: Array,
    ) -> tuple[Any, Any, Buffers, dict[str, Array]]:
        """Rollout -> GAE -> update. Returns params, optimiser state, buffers and metrics."""
        roll_key, update_key = jax.random.split(key)
        after, traj = self.rollout(params, buffers, roll_key)
        _, last_value, _ = self.policy(params, after["obs"], after["core"], after["starts"])
        advantages, returns = gae(
            traj["reward"],
            traj["value"],
            traj["starts"],
            last_value,
            after["starts"],
            self.cfg.gamma,
            self.cfg.gae_lambda,
        )
        data = {
            "obs": traj["obs"],
            "starts": traj["starts"],
            "action": traj["action"],
            "log_prob": traj["log_prob"],
            "value": traj["value"],
            "advantage": advantages,
            "return": returns,
        }
        params, opt_state, metrics = self.update(
            params, opt_state, tx, buffers["core"], data, lr_scale, update_key
        )
        metrics.update(episode_metrics(traj, after["episode"]))
        metrics["explained_variance"] = explained_variance(traj["value"], returns)
        return params, opt_state, after, metrics

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, params: Any, key: Array, episodes: int, greedy: bool) -> dict[str, Array]:
        """One episode in each of `episodes` fresh environments (seeded by `key`), acting greedily
        or by sampling: raw returns and lengths, (episodes,) each. No reward normalisation."""
        reset_key, run_key = jax.random.split(key)
        obs, env_state = jax.vmap(self.env.reset)(jax.random.split(reset_key, episodes))
        starts = jnp.ones((episodes,), jnp.float32)
        core = self.initial_state(params, episodes)
        zeros = jnp.zeros((episodes,), jnp.float32)

        def one(carry: tuple[Any, ...], step_key: Array):
            obs, env_state, starts, core, ret, length, running = carry
            act_key, env_key = jax.random.split(step_key)
            logits, _, core = self.policy(params, obs, core, starts)
            if greedy:
                action = jnp.argmax(logits, axis=-1)
            else:
                action = jax.random.categorical(act_key, logits)
            out = jax.vmap(self.env.step)(jax.random.split(env_key, episodes), env_state, action)
            ret = ret + running * out.reward
            length = length + running
            running = running * (1.0 - out.done.astype(jnp.float32))
            done = out.done.astype(jnp.float32)
            return (out.obs, out.state, done, core, ret, length, running), None

        # Every episode ends within the time limit, so that many steps finish them all.
        carry = (obs, env_state, starts, core, zeros, zeros, jnp.ones_like(zeros))
        carry, _ = jax.lax.scan(one, carry, jax.random.split(run_key, self.env.max_episode_steps))
        return {"return": carry[4], "length": carry[5]}


def episode_metrics(traj: dict[str, Array], episode: dict[str, Array]) -> dict[str, Array]:
    """Mean raw return and length of the episodes that ended during the rollout, and how many;
    with none ended, each environment's last finished episode (0 before any has finished)."""
    ended = traj["ended"]
    count = ended.sum()
    mean = lambda x: jnp.sum(x * ended) / jnp.maximum(count, 1.0)
    finished = episode["finished"]
    before = lambda x: jnp.sum(x * finished) / jnp.maximum(finished.sum(), 1.0)
    return {
        "return": jnp.where(
            count > 0, mean(traj["episode_return"]), before(episode["last_return"])
        ),
        "episode_length": jnp.where(
            count > 0, mean(traj["episode_length"]), before(episode["last_length"])
        ),
        "episodes": count,
    }


def explained_variance(values: Array, returns: Array) -> Array:
    """1 - Var(returns - values) / Var(returns) (CleanRL's diagnostic; 0 when Var(returns) = 0)."""
    var = jnp.var(returns)
    return jnp.where(var > 0, 1.0 - jnp.var(returns - values) / jnp.where(var > 0, var, 1.0), 0.0)


def linear_anneal(step: Array, total_steps: int) -> Array:
    """1 - step / total_steps: the reference's linear learning-rate annealing to 0, per PPO
    iteration (step counts the iterations already done)."""
    return 1.0 - step.astype(jnp.float32) / float(total_steps)
