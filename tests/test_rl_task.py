"""The RL task: GAE and the reward normaliser against plain loops / gymnasium, the RL CTM's and the
LSTM's shapes, formulas and parameter counts, config validation, and a short trainer run that
learns and checkpoints the whole rollout state (environments, recurrent state, normaliser)."""

from __future__ import annotations

import json

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import checkpoint_steps, load_state_arrays

from configs.ctm_rl import get_config
from core.errors import ConfigError
from ctm_jax.rl import CTMRL, CTMRLConfig, clamp_with_gradient, window_synchronisation
from tasks.ctm_rl import ppo
from tasks.ctm_rl.agent import Agent
from tasks.ctm_rl.lstm import LSTMRL, LSTMRLConfig
from train_lib import trainer
from train_lib.task import make_task

# ------------------------------------------------------------------------------------------------
# PPO pieces


def _loop_gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """The reference's (CleanRL's) GAE loop, verbatim in numpy."""
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards)
    lastgaelam = 0.0
    for t in reversed(range(steps)):
        if t == steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
    return advantages, advantages + values


def test_gae_matches_the_reference_loop():
    rng = np.random.default_rng(0)
    steps, envs = 37, 5
    rewards = rng.normal(size=(steps, envs)).astype(np.float32)
    values = rng.normal(size=(steps, envs)).astype(np.float32)
    dones = (rng.random((steps, envs)) < 0.15).astype(np.float32)
    next_value = rng.normal(size=envs).astype(np.float32)
    next_done = np.array([1, 0, 0, 1, 0], np.float32)
    want_adv, want_ret = _loop_gae(rewards, values, dones, next_value, next_done, 0.99, 0.95)
    adv, ret = jax.jit(ppo.gae, static_argnums=(5, 6))(
        rewards, values, dones, next_value, next_done, 0.99, 0.95
    )
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert dones.sum() > 10  # episode boundaries were exercised


class _Scripted(gym.Env):
    """Emits a fixed sequence of (reward, terminated), for gymnasium's NormalizeReward."""

    observation_space = gym.spaces.Box(-1, 1, (1,))
    action_space = gym.spaces.Discrete(1)

    def __init__(self, rewards, terminated):
        self.rewards, self.terminated, self.t = rewards, terminated, 0

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        r, term = float(self.rewards[self.t]), bool(self.terminated[self.t])
        self.t += 1
        return np.zeros(1, np.float32), r, term, False, {}


def test_reward_normaliser_matches_gymnasium():
    rng = np.random.default_rng(1)
    rewards = rng.choice([1.0, -1.0, 0.0, 2.5], size=(60, 3))
    terminated = rng.random((60, 3)) < 0.1
    want = np.zeros_like(rewards)
    for e in range(3):
        env = gym.wrappers.NormalizeReward(_Scripted(rewards[:, e], terminated[:, e]), gamma=0.99)
        env.reset()
        want[:, e] = [env.step(0)[1] for _ in range(60)]
    stats = ppo.reward_normaliser_init(3)
    step = jax.jit(lambda s, r, t: ppo.normalise_reward(s, r, t, 0.99))
    got = []
    for t in range(60):
        stats, r = step(stats, jnp.float32(rewards[t]), jnp.asarray(terminated[t]))
        got.append(np.asarray(r))
    np.testing.assert_allclose(np.stack(got), want, rtol=2e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The models

SMALL_CTM = CTMRLConfig(
    iterations=2, d_model=12, d_input=6, n_synch_out=4, synapse_depth=1, memory_length=5
)


def test_window_synchronisation_matches_a_loop_and_clamps_decays_to_0_4():
    rng = np.random.default_rng(2)
    trace = rng.normal(size=(3, 12, 5)).astype(np.float32)
    n = 4
    decay = rng.uniform(-1, 6, size=n * (n + 1) // 2).astype(np.float32)
    got = np.asarray(
        jax.jit(window_synchronisation, static_argnums=2)(jnp.asarray(trace), jnp.asarray(decay), n)
    )
    want = np.zeros((3, len(decay)), np.float32)
    for b in range(3):
        k = 0
        for i in range(12 - n, 12):  # the last n neurons, pairs i <= j row by row
            for j in range(i, 12):
                rate = min(max(decay[k], 0.0), 4.0)
                w = np.exp(-rate * np.arange(4, -1, -1))  # oldest sample weighted least
                want[b, k] = np.sum(w * trace[b, i] * trace[b, j]) / np.sqrt(w.sum())
                k += 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decay_clamp_passes_gradients_on_the_closed_interval_only():
    grad = jax.jit(jax.grad(lambda p: jnp.sum(clamp_with_gradient(p, 0.0, 4.0))))
    np.testing.assert_array_equal(grad(jnp.array([-0.5, 0.0, 2.0, 4.0, 4.5])), [0, 1, 1, 1, 0])


def _random_variables(model, *args):
    """Variables of `model` with random normal values drawn in numpy (the shapes come from
    jax.eval_shape: no compiled init, which costs seconds on a CPU)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)


def test_ctm_rl_shapes_and_state_carried_across_steps():
    model = CTMRL(SMALL_CTM)
    obs = jax.random.normal(jax.random.key(0), (3, 4))
    zeros = jnp.zeros((3, 12, 5))
    variables = _random_variables(model, obs, {"trace": zeros, "activated_trace": zeros})

    @jax.jit
    def run(variables, obs):
        start = model.apply(variables, 3, method="initial_state")
        synch, state = model.apply(variables, obs, start)
        synch_again, _ = model.apply(variables, obs, state)
        return start, synch, state, synch_again

    start, synch, state, synch_again = run(variables, obs)
    params = variables["params"]
    assert start["trace"].shape == start["activated_trace"].shape == (3, 12, 5)
    np.testing.assert_array_equal(start["trace"][2], params["start_trace"])
    assert synch.shape == (3, 10)  # 4 * 5 / 2 pairs
    # Each of the 2 ticks pushes one pre- and one post-activation into the windows.
    np.testing.assert_array_equal(state["trace"][:, :, :3], start["trace"][:, :, 2:])
    np.testing.assert_array_equal(
        state["activated_trace"][:, :, :3], start["activated_trace"][:, :, 2:]
    )
    # The synchronisation reads the new window; the carried state changes the next answer.
    want = window_synchronisation(state["activated_trace"], params["decay_params_out"], 4)
    np.testing.assert_allclose(synch, want, rtol=1e-6)
    assert not np.allclose(synch_again, synch)


def test_agent_resets_the_carried_state_at_episode_starts():
    agent = Agent(core=CTMRL(SMALL_CTM), num_actions=2)
    obs = jax.random.normal(jax.random.key(0), (3, 4))
    variables = _random_variables(agent, obs)
    carried = jax.tree.map(
        lambda x: x + 1.0,
        {"trace": jnp.zeros((3, 12, 5)), "activated_trace": jnp.zeros((3, 12, 5))},
    )

    @jax.jit
    def run(variables, obs, carried):
        fresh = agent.apply(variables, obs)  # from the learned start state
        reset = agent.apply(variables, obs, carried, jnp.array([1.0, 0.0, 1.0]))
        kept = agent.apply(variables, obs, carried, jnp.zeros(3))
        return fresh, reset, kept

    fresh, reset, kept = run(variables, obs, carried)
    for got, want in zip(reset, fresh, strict=True):  # logits, values, then the new state
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a[0::2], b[0::2], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(reset), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(a[1], b[1])  # the row without a reset carries on
    assert fresh[0].shape == (3, 2) and fresh[1].shape == (3,)
    assert not np.allclose(fresh[0][1], kept[0][1])


def test_lstm_cell_is_torchs_lstm_cell():
    model = LSTMRL(LSTMRLConfig(iterations=2, d_model=5, d_input=3))
    obs = jax.random.normal(jax.random.key(0), (2, 4))
    state = {"h": jnp.full((2, 5), 0.1), "c": jnp.full((2, 5), -0.2)}
    variables = _random_variables(model, obs, state)

    @jax.jit
    def run(variables, obs, state):
        features = model.apply(variables, obs, method=lambda m, x: m.backbone(x))
        return features, model.apply(variables, obs, state)

    features, (h, new) = run(variables, obs, state)
    # torch.nn.LSTMCell, twice on the same features: gates (i, f, g, o) from W_ih x + b_ih +
    # W_hh h + b_hh; c' = f c + i g; h' = o tanh(c').
    cell = jax.tree.map(np.asarray, variables["params"]["lstm_cell"])
    sig = lambda x: 1 / (1 + np.exp(-x))
    hh, cc, features = np.asarray(state["h"]), np.asarray(state["c"]), np.asarray(features)
    for _ in range(2):
        gates = (
            features @ cell["input"]["kernel"]
            + cell["input"]["bias"]
            + hh @ cell["hidden"]["kernel"]
            + cell["hidden"]["bias"]
        )
        i, f, g, o = np.split(gates, 4, axis=-1)
        cc = sig(f) * cc + sig(i) * np.tanh(g)
        hh = sig(o) * np.tanh(cc)
    np.testing.assert_allclose(h, hh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["c"], cc, rtol=1e-5, atol=1e-6)


def _count(preset: str) -> int:
    config = get_config(preset)
    task = make_task(config)
    shapes = jax.eval_shape(
        lambda k: task.init_variables(task.build_model(), k, None)["params"], jax.random.key(0)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _reference_ctm_count(obs, d, d_in, m, h, n_out, actions):
    """The reference RL agent's parameter count, layer by layer (torch shapes)."""
    backbone = (obs * 2 * d_in + 2 * d_in) + 2 * d_in + (d_in * 2 * d_in + 2 * d_in) + 2 * d_in
    synapses = ((d_in + d) * 2 * d + 2 * d) + 2 * d + (d * 2 * d + 2 * d) + 2 * d
    nlms = (m * 2 * h * d + 2 * h * d + 1) + (h * 2 * d + 2 * d + 1)
    synch = n_out * (n_out + 1) // 2
    heads = 2 * (synch * 64 + 64 + 64 * 64 + 64) + (64 * actions + actions) + (64 + 1)
    return backbone + synapses + nlms + 2 * d * m + synch + heads


def _reference_lstm_count(obs, hidden, d_in, actions):
    backbone = (obs * 2 * d_in + 2 * d_in) + 2 * d_in + (d_in * 2 * d_in + 2 * d_in) + 2 * d_in
    cell = 4 * hidden * (d_in + hidden) + 8 * hidden
    heads = 2 * (hidden * 64 + 64 + 64 * 64 + 64) + (64 * actions + actions) + (64 + 1)
    return backbone + cell + 2 * hidden + heads


def test_parameter_counts_match_the_reference_and_the_lstm_widths_match_them():
    cartpole = _count("cartpole_t1")
    assert cartpole == _reference_ctm_count(4, 128, 128, 10, 4, 16, 2) == 175_437
    assert _count("cartpole_lstm_t1") == _reference_lstm_count(4, 118, 128, 2) == 175_855
    acrobot = _count("acrobot_t1")
    assert acrobot == _reference_ctm_count(6, 256, 64, 5, 4, 16, 3) == 350_094
    assert _count("acrobot_lstm_t1") == _reference_lstm_count(6, 243, 64, 3) == 350_118


def _classic_backbone_count(obs, d_in):
    return (obs * 2 * d_in + 2 * d_in) + 2 * d_in + (d_in * 2 * d_in + 2 * d_in) + 2 * d_in


def _navigation_backbone_count(d_in):
    """Four width-8 tables (11 objects, 6 colours, 3 states, 49 view cells), then the 49 x 32
    concatenated features through the same two Linear-GLU-LayerNorm blocks."""
    return 8 * (11 + 6 + 3 + 49) + _classic_backbone_count(49 * 32, d_in)


def test_fourrooms_counts_and_the_parameter_matched_lstm():
    """The reference's layers with the navigation backbone in place of the classic one; the
    LSTM preset's width (528) matches the T = 1 CTM to 0.1 %."""
    swap = _navigation_backbone_count(128) - _classic_backbone_count(1, 128)
    ctm = _count("fourrooms_t1")
    assert ctm == _reference_ctm_count(1, 512, 128, 10, 16, 32, 7) + swap == 1_904_450
    lstm = _count("fourrooms_lstm_t1")
    assert lstm == _reference_lstm_count(1, 528, 128, 7) + swap == 1_903_056
    assert abs(lstm - ctm) / ctm < 1e-3


# ------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("task", "num_minibatches", 3, r"^task\.num_minibatches=3 is invalid: must divide"),
        ("task", "env", "Breakout", r"^task\.env='Breakout' is invalid"),
        ("task", "gamma", 1.5, r"^task\.gamma=1\.5 is invalid"),
        ("model", "kind", "gru", r"^model\.kind='gru' is invalid"),
        ("model", "neuron_select_type", "random", r"^model\.neuron_select_type='random'"),
        ("model", "n_synch_out", 64, r"^model\.n_synch_out=64 is invalid: must be <= d_model=16"),
        ("model", "backbone_type", "navigation-backbone", r"^model\.backbone_type="),
        ("model", "backbone_type", "pixels", r"^model\.backbone_type='pixels' is invalid: allowed"),
        ("optim", "schedule", "cosine", r"^optim\.schedule='cosine' is invalid: must be 'consta"),
        ("train", "microbatches", 2, r"^train\.microbatches=2 is invalid"),
    ],
)
def test_bad_fields_fail_before_tracing(section, field, value, message):
    config = get_config("test")
    config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        make_task(config)


def test_fourrooms_needs_its_backbone_and_no_velocity_mask():
    config = get_config("test_fourrooms")
    config.task.mask_velocity = True
    with pytest.raises(ConfigError, match=r"^task\.mask_velocity=True is invalid for MiniGrid"):
        make_task(config)
    config = get_config("test_fourrooms")
    config.model.backbone_type = "classic-control-backbone"
    with pytest.raises(ConfigError, match=r"must be 'navigation-backbone'$"):
        make_task(config)


def test_batch_size_follows_the_rollout_size_and_must_match_it():
    config = get_config("test")
    assert config.train.batch_size == 16 * 32
    config.task.num_envs = 8  # the derived batch follows the override
    assert config.train.batch_size == 8 * 32
    config.train.batch_size = 100
    with pytest.raises(ConfigError, match=r"^train\.batch_size=100 is invalid: must equal"):
        make_task(config)


# ------------------------------------------------------------------------------------------------
# A short run through the trainer: it learns, and its checkpoint holds the rollout state.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rl") / "run"
    summary = trainer.train_and_evaluate(get_config("test"), workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, summary, rows


def test_short_run_learns_cartpole(run):
    _, summary, rows = run
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 40
    early = [r["return"] for r in train[1:4]]  # a random policy lasts about 20 steps
    late = [r["return"] for r in train[-5:]]
    assert max(early) < 35 and min(late) > 40, (early, late)
    assert summary.eval_metrics["return"] >= 45  # greedy, the cap is 50
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "lr", "episodes"):
        assert all(np.isfinite(r[name]) for r in train), name
    assert train[-1]["lr"] < train[0]["lr"]  # linear annealing
    assert train[-1]["entropy"] < train[1]["entropy"]


def test_the_checkpoint_holds_the_whole_rollout_state(run):
    """What a resume needs besides the params: environments, last observations and episode-start
    flags, the carried CTM state, the reward normaliser and the episode statistics (the trainer's
    generic resume tests show that checkpointed buffers come back bit for bit)."""
    workdir, _, _ = run
    assert checkpoint_steps(workdir) == [20, 40]
    _, state, step = trainer.restore_run(workdir)
    assert step == 40
    rollout = jax.tree.map(np.asarray, state.buffers["rollout"])
    assert set(rollout) == {"env", "obs", "starts", "core", "reward_stats", "episode"}
    assert rollout["core"]["trace"].shape == (16, 16, 4)  # (envs, D, M), carried across steps
    # 40 iterations of 32 steps went through each environment's normaliser.
    np.testing.assert_allclose(rollout["reward_stats"]["count"], 40 * 32 + 1e-4, rtol=1e-6)
    assert np.all(rollout["env"]["time"] < 50) and np.any(rollout["env"]["time"] > 0)
    assert np.all(rollout["episode"]["finished"] == 1.0)
    start = np.asarray(state.params["core"]["start_trace"])
    assert not np.allclose(rollout["core"]["trace"], start)  # mid-episode histories, not starts
    saved = load_state_arrays(workdir, 40)
    np.testing.assert_array_equal(saved["buffers/rollout/obs"], rollout["obs"])


def test_fourrooms_runs_through_the_trainer(tmp_path):
    """PPO on the JAX FourRooms with the navigation backbone: the symbolic views, rollout state
    and evaluation go through the trainer and its checkpoints (learning is shown on CartPole
    above; FourRooms needs millions of steps, see configs/ctm_rl.py's CPU_NOTE)."""
    summary = trainer.train_and_evaluate(get_config("test_fourrooms"), tmp_path / "run")
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4
    for name in ("policy_loss", "value_loss", "entropy", "return"):
        assert all(np.isfinite(r[name]) for r in train), name
    assert 0.0 < train[0]["entropy"] <= np.log(7) + 1e-6  # seven MiniGrid actions
    # Greedy evaluation: 4 episodes of at most 20 steps, returns in MiniGrid's [0, 1).
    assert 0.0 <= summary.eval_metrics["return"] < 1.0
    assert 1.0 <= summary.eval_metrics["episode_length"] <= 20.0
    _, state, step = trainer.restore_run(tmp_path / "run")
    obs = np.asarray(state.buffers["rollout"]["obs"])
    assert step == 4 and obs.shape == (8, 7, 7, 3) and obs.dtype == np.int32
    assert set(np.unique(obs[..., 0])) <= {0, 1, 2, 8}  # unseen, empty, wall, goal


def test_final_evaluation_compares_with_the_uniform_policy(run):
    """launch.rl_pictures plays the final checkpoint greedily, sampled, and with the actor's last
    layer zeroed (uniform actions) on the same episodes: the trained CartPole agent beats it."""
    from launch.rl_pictures import evaluate_final, uniform_policy

    workdir, _, _ = run
    _, state, _ = trainer.restore_run(workdir)
    zeroed = uniform_policy(state.params)
    assert not np.any(np.asarray(zeroed["actor"]["dense_2"]["kernel"]))
    assert np.any(np.asarray(state.params["actor"]["dense_2"]["kernel"]))  # the run is untouched
    found = evaluate_final(workdir, 16)
    assert {k: v.shape for k, v in found.items() if k != "step"} == {
        "greedy": (16,),
        "sampled": (16,),
        "random": (16,),
    }
    assert found["greedy"].mean() > found["random"].mean() + 15, found  # cap 50, random ~20
