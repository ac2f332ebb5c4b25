"""Reinforcement learning with PPO: the RL CTM (or the LSTM baseline) on masked CartPole /
Acrobot and MiniGrid FourRooms (the CTM paper's RL experiments).

One trainer step is one PPO iteration (`tasks.ctm_rl.ppo.PPO.iteration`): a rollout of
`num_envs` x `num_steps` environment steps with the agent's recurrent state carried across them,
GAE, then `update_epochs` x `num_minibatches` Adam updates, all in one jitted function
(`make_train_step`). Environment states, last observations, the carried recurrent state, the reward
normaliser and episode statistics are the 'rollout' collection of the train state's buffers, so a
checkpoint resumes the run exactly. `train.batch_size` is the env steps of one iteration
(num_envs x num_steps), so the progress line's examples/s are environment steps per second; the
dataset's batches only carry their index (the trainer's data iterator keeps its usual role).

Evaluation (`apply` with train=False): one episode in each of `eval_episodes` fresh environments
seeded by (eval_seed, eval batch index), the same episodes at every evaluation; `eval_metrics`
averages their raw returns and lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from core.errors import ConfigError
from ctm_jax.rl import CTMRL, CTMRLConfig
from tasks.ctm_rl.agent import Agent
from tasks.ctm_rl.envs import ENV_NAMES, ClassicControl
from tasks.ctm_rl.lstm import LSTMRL, LSTMRLConfig
from tasks.ctm_rl.minigrid import FOURROOMS, FourRooms
from tasks.ctm_rl.ppo import PPO, PPOConfig, linear_anneal
from train_lib.task import Batch, Metrics, Task

# Iterations are effectively unbounded; grain needs a length.
STREAM_LENGTH = 2**62
MODEL_KINDS = ("ctm", "lstm")
ENVIRONMENTS = (*ENV_NAMES, FOURROOMS)
# The observation featuriser each environment's observations need.
BACKBONE_FOR_ENV = {
    "CartPole-v1": "classic-control-backbone",
    "Acrobot-v1": "classic-control-backbone",
    FOURROOMS: "navigation-backbone",
}
# Fields of the `model` section each kind reads; the other kind's fields are ignored.
LSTM_FIELDS = ("iterations", "d_model", "d_input", "backbone_type")


@dataclasses.dataclass(frozen=True)
class IndexSource:
    """grain source whose element i is already a batch: {'index': (batch,) int32 filled with i}.

    Batching one-number examples in grain would cost a Python call per env step."""

    batch_size: int

    def __len__(self) -> int:
        return STREAM_LENGTH

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"index": np.full((self.batch_size,), int(index) % 2**31, np.int32)}


def ppo_config(task: Mapping[str, Any]) -> PPOConfig:
    """PPOConfig from the `task` section; ConfigError naming the first impossible field."""

    def fail(name: str, allowed: str) -> None:
        raise ConfigError(f"task.{name}={task[name]!r} is invalid: {allowed}")

    for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches"):
        if int(task[name]) < 1:
            fail(name, "must be >= 1")
    if int(task["num_envs"]) % int(task["num_minibatches"]):
        fail(
            "num_minibatches",
            f"must divide task.num_envs={task['num_envs']} (a minibatch is a group of whole "
            "environments)",
        )
    if int(task["num_envs"]) // int(task["num_minibatches"]) * int(task["num_steps"]) < 2:
        fail("num_minibatches", "leaves minibatches of one step (their advantage std is undefined)")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= float(task[name]) <= 1.0:
            fail(name, "must lie in [0, 1]")
    if not float(task["clip_coef"]) > 0:
        fail("clip_coef", "must be > 0")
    for name in ("ent_coef", "vf_coef"):
        if float(task[name]) < 0:
            fail(name, "must be >= 0")
    flags = ("clip_vloss", "norm_adv", "normalize_reward", "shuffle_minibatches")
    for name in flags:
        if not isinstance(task[name], bool):
            fail(name, "must be true or false")
    return PPOConfig(
        num_envs=int(task["num_envs"]),
        num_steps=int(task["num_steps"]),
        update_epochs=int(task["update_epochs"]),
        num_minibatches=int(task["num_minibatches"]),
        gamma=float(task["gamma"]),
        gae_lambda=float(task["gae_lambda"]),
        clip_coef=float(task["clip_coef"]),
        clip_vloss=task["clip_vloss"],
        ent_coef=float(task["ent_coef"]),
        vf_coef=float(task["vf_coef"]),
        norm_adv=task["norm_adv"],
        normalize_reward=task["normalize_reward"],
        shuffle_minibatches=task["shuffle_minibatches"],
    )


def make_env(task: Mapping[str, Any]) -> ClassicControl | FourRooms:
    """The environment of the `task` section; ConfigError naming the first impossible field."""
    name = task["env"]
    if name not in ENVIRONMENTS:
        raise ConfigError(f"task.env={name!r} is invalid: allowed: {', '.join(ENVIRONMENTS)}")
    if name == FOURROOMS:
        if task["mask_velocity"]:
            raise ConfigError(
                f"task.mask_velocity={task['mask_velocity']!r} is invalid for {FOURROOMS}: it "
                "has no velocities to mask (its view is already partial); set it to False"
            )
        return FourRooms(int(task["max_episode_steps"]))
    return ClassicControl(str(name), int(task["max_episode_steps"]), bool(task["mask_velocity"]))


def core_config(model: Mapping[str, Any]) -> CTMRLConfig | LSTMRLConfig:
    """The recurrent core's config from the `model` section (`model.kind` picks it)."""
    values = dict(model.items())
    kind = values.pop("kind", None)
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} is invalid: allowed: {', '.join(MODEL_KINDS)}")
    if kind == "lstm":
        return LSTMRLConfig.from_mapping({k: values[k] for k in LSTM_FIELDS if k in values})
    return CTMRLConfig.from_mapping(values)


class RLTask(Task):
    """PPO with a recurrent agent. Config: `task` (environment, PPO and evaluation fields),
    `model` (`kind` ctm | lstm and the core's fields); see configs/ctm_rl.py."""

    progress_keys = ("return", "episode_length", "entropy", "approx_kl", "value_loss")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        task = config.task
        for name in ("mask_velocity", "anneal_lr", "continuous_state_trace", "eval_greedy"):
            if not isinstance(task[name], bool):
                raise ConfigError(f"task.{name}={task[name]!r} is invalid: must be true or false")
        self.env = make_env(task)
        self.ppo_config = ppo_config(task)
        if int(task.eval_episodes) < 1:
            raise ConfigError(f"task.eval_episodes={task.eval_episodes!r} is invalid: must be >= 1")
        if int(task.eval_seed) < 0:
            raise ConfigError(f"task.eval_seed={task.eval_seed!r} is invalid: must be >= 0")
        self.core_config = core_config(config.model)
        wanted = BACKBONE_FOR_ENV[self.env.name]
        if self.core_config.backbone_type != wanted:
            raise ConfigError(
                f"model.backbone_type={self.core_config.backbone_type!r} is invalid for "
                f"task.env={self.env.name!r}: must be {wanted!r}"
            )
        self._check_trainer_fields(config)

    def _check_trainer_fields(self, config: ml_collections.ConfigDict) -> None:
        """The trainer fields PPO constrains: one iteration per step, its own lr annealing."""
        cfg = self.ppo_config
        steps = cfg.num_envs * cfg.num_steps
        if int(config.train.batch_size) != steps:
            raise ConfigError(
                f"train.batch_size={config.train.batch_size!r} is invalid: must equal "
                f"task.num_envs x task.num_steps = {steps} (the env steps of one PPO iteration)"
            )
        if int(config.train.get("microbatches", 1)) != 1:
            raise ConfigError(
                f"train.microbatches={config.train.microbatches!r} is invalid: PPO's minibatches "
                "are task.num_minibatches; must be 1"
            )
        # The optimiser's schedule would count Adam updates (epochs x minibatches per step);
        # the task anneals per iteration itself (task.anneal_lr), so the schedule stays flat.
        if config.optim.schedule != "constant":
            raise ConfigError(
                f"optim.schedule={config.optim.schedule!r} is invalid: must be 'constant' "
                "(PPO anneals the learning rate itself: task.anneal_lr)"
            )
        if int(config.optim.warmup_steps) != 0:
            raise ConfigError(
                f"optim.warmup_steps={config.optim.warmup_steps!r} is invalid: must be 0 for PPO"
            )

    # -- data -------------------------------------------------------------------------------------
    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; the RL task has 'train' and 'eval'")
        return grain.MapDataset.source(IndexSource(batch_size))

    # -- model ------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg = self.core_config
        core = CTMRL(cfg) if isinstance(cfg, CTMRLConfig) else LSTMRL(cfg)
        return Agent(
            core=core,
            num_actions=self.env.num_actions,
            carry_state=bool(self.config.task.continuous_state_trace),
        )

    def ppo(self, model: nn.Module) -> PPO:
        return PPO(model, self.env, self.ppo_config)

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> dict[str, Any]:
        """Agent params and the 'rollout' buffers: fresh environments, each starting an episode."""
        param_key, env_key = jax.random.split(rng)
        ppo = self.ppo(model)
        params = ppo.init_params(param_key)
        return {"params": params, "rollout": ppo.init_buffers(params, env_key)}

    def apply(
        self,
        model: nn.Module,
        variables: Mapping[str, Any],
        batch: Batch,
        *,
        train: bool,
        rng: jax.Array | None = None,
        mutable: Sequence[str] | bool = False,
    ) -> dict[str, jax.Array]:
        """Evaluation episodes (training runs through `make_train_step`): raw returns and
        lengths of `task.eval_episodes` episodes seeded by (eval_seed, batch['index'][0])."""
        if train:
            raise ValueError("the RL task trains through make_train_step, not apply")
        task = self.config.task
        key = jax.random.fold_in(jax.random.key(int(task.eval_seed)), batch["index"][0])
        return self.ppo(model).evaluate(
            variables["params"], key, int(task.eval_episodes), bool(task.eval_greedy)
        )

    def make_train_step(
        self,
        model: nn.Module,
        tx: Any,
        schedule: Callable[[Any], Any],
        microbatches: int = 1,
    ) -> Callable[[Any, Batch], tuple[Any, Metrics]]:
        """One PPO iteration per trainer step; the updates are scaled by the linear annealing
        factor 1 - step / total_steps (the optimiser's own schedule is constant)."""
        ppo = self.ppo(model)
        total_steps = int(self.config.train.total_steps)
        anneal = bool(self.config.task.anneal_lr)

        def train_step(state: Any, batch: Batch) -> tuple[Any, Metrics]:
            del batch  # only the step number matters, and the state has it
            scale = linear_anneal(state.step, total_steps) if anneal else jnp.float32(1.0)
            key = jax.random.fold_in(state.rng, state.step)
            params, opt_state, rollout, metrics = ppo.iteration(
                state.params, state.opt_state, state.buffers["rollout"], tx, scale, key
            )
            new_state = state.replace(
                step=state.step + 1,
                params=params,
                opt_state=opt_state,
                buffers={**state.buffers, "rollout": rollout},
            )
            metrics = {
                **metrics,
                "lr": schedule(state.step) * scale,
                "param_norm": optax.tree.norm(params),
            }
            return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

        return train_step

    # -- objective --------------------------------------------------------------------------------
    def loss_and_metrics(self, outputs: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        """For evaluation only: loss = - mean return (PPO's losses live in the train step)."""
        metrics = self.eval_metrics(outputs, batch)
        return -metrics["return"], metrics

    def eval_metrics(self, outputs: Any, batch: Batch) -> Metrics:
        return {"return": outputs["return"].mean(), "episode_length": outputs["length"].mean()}
