"""PPO with the RL CTM or a parameter-matched LSTM on velocity-masked CartPole / Acrobot
(task `ctm_rl`).

    python -m launch.train --config=configs/ctm_rl.py --workdir=runs/rl          # reference
    python -m launch.train --config=configs/ctm_rl.py:cpu --workdir=runs/rl_cpu
    python -m launch.train --config=configs/ctm_rl.py:cpu_lstm --workdir=runs/rl_cpu_lstm

The default is the reference's CartPole run with T = 1 (D 128, d_input 128, M 10, H 4, 16
output neurons, 256 envs x 100 steps, lr 1e-3, 4 epochs, 10M env steps, episodes capped at 200
steps). One trainer step is one PPO iteration, so train.total_steps counts iterations and
train.batch_size (= num_envs x num_steps, derived) counts env steps. Presets:
  cartpole_t{1,2,5}        the reference CartPole CTM runs (T 1/2/5 with M 10/20/50)
  acrobot_t{1,2,5}         the reference Acrobot CTM runs (D 256, d_input 64, T 1/2/5 with M
                           5/10/25, 12 envs x 100 steps, lr 5e-4, 1 epoch, 2M env steps, 500-step
                           episodes)
  cartpole_lstm_t{1,2,5},  the LSTM baselines: H 118 (CartPole) / 243 (Acrobot), widths that
  acrobot_lstm_t{1,2,5}    match the T = 1 CTMs' parameter counts (measured with this code:
                           CartPole CTM 175,437 vs LSTM 175,855; Acrobot CTM 350,094 vs LSTM
                           350,118; the CTMs with longer memories have more)
  cpu, cpu_lstm            masked CartPole on a 2-core CPU, CTM (T 1, M 10) and LSTM (H 118), the
                           reference models with 32 envs x 64 steps and Adam eps 1e-8 (see
                           CPU_NOTE for the measured runs)
  test, test_lstm          few-second runs for the test suite
  fourrooms_t{1,2}         the reference MiniGrid FourRooms CTM runs (D 512, d_input 128, T 1/2
                           with M 10/20, H 16, 32 output neurons, navigation backbone, 256 envs
                           x 50 steps, lr 1e-4, 300M env steps, 300-step episodes)
  fourrooms_lstm_t{1,2}    their LSTM baselines (H 528: parameter-matched, see
                           FOURROOMS_LSTM_WIDTH)
  cpu_fourrooms            FourRooms on a 2-core CPU (see CPU_NOTE)
Every field can be overridden, e.g. `--config.task.num_envs=64`.

`get_config` writes out the reference configuration; each preset in `PRESETS` lists every value
it sets on top of it.
"""

from __future__ import annotations

import ml_collections

from configs import common

# Measured on a shared 2-core AMD EPYC (other jobs kept the load at 6-13, so times are slow):
CPU_NOTE = """\
cpu (CTM) and cpu_lstm, 600 iterations = 1,228,800 env steps of masked CartPole each:
  CTM  : greedy evaluation 200/200 from iteration 100 on (32 episodes per eval); training return
         (sampled actions) 183 over the last 100 iterations; final checkpoint, 100 new episodes:
         greedy 200.0, sampled 193.1. 14.6 min of training (1,400 env steps/s) + 1.8 min compile.
  LSTM : greedy 200/200 from iteration 50 on; training 186; final greedy 200.0, sampled 187.3.
         6.4 min (3,200 env steps/s) + 1.6 min compile.
  The CTM with its state reset at every step (task.continuous_state_trace=False) stays at ~50
  (greedy 44): the task needs the memory. With the reference's Adam eps 1e-5 the cpu CTM was
  still at the random policy's ~22 after 219 iterations: its synchronisation features are ~1e-3
  at initialisation, so the actor's gradients sit below eps; the cpu presets use 1e-8.
cpu_fourrooms, 1,000 iterations = 3.2M env steps of MiniGrid FourRooms (300-step episodes), 13 min
  with compile and evaluations, 4,400 env steps/s (this machine alone): the final checkpoint on
  512 episodes finds the goal in 19.3% with sampled actions (mean return 0.119), against 7.8%
  (0.051) for the uniformly random policy on the same episodes; greedy 1.6% (it turns in place).
  The training return rose from the random level within the first ~0.2M steps and then stayed
  near 0.1: the reference trains 300M steps. With the reference's entropy weight 0.1 the policy
  was still uniform (entropy 1.94 of ln 7 = 1.95) after 200 iterations.
acrobot_t1 / acrobot_lstm_t1 as the reference (2M env steps, eps 1e-5), final checkpoint, 100
  episodes: CTM greedy -78.7, sampled -107.7 (7.5 min); LSTM greedy -79.1, sampled -99.7 (5.5 min).
"""

# The reference's RL rows: CartPole is the default config; Acrobot's task values, and the CTMs'
# memory length per tick count.
_ACROBOT = dict(env="Acrobot-v1", max_episode_steps=500, num_envs=12, update_epochs=1)
# The FourRooms LSTM's width: the reference names 294, but with this code's navigation backbone
# the T = 1 CTM has 1,904,450 parameters (actor and critic included) and a 294-wide LSTM only
# 981,564; 528 matches (1,903,056). Measured with `python -m tools.rl_param_counts`.
FOURROOMS_LSTM_WIDTH = 528
_FOURROOMS = dict(
    env="MiniGrid-FourRooms-v0",
    mask_velocity=False,
    max_episode_steps=300,
    num_envs=256,
    num_steps=50,
)
_CARTPOLE_MEMORY = {1: 10, 2: 20, 5: 50}
_FOURROOMS_MEMORY = {1: 10, 2: 20}
_ACROBOT_MEMORY = {1: 5, 2: 10, 5: 25}
# 10M env steps of 256 x 100 per iteration; 2M of 12 x 100.
_CARTPOLE_ITERATIONS = 10_000_000 // (256 * 100)
_ACROBOT_ITERATIONS = 2_000_000 // (12 * 100)
_FOURROOMS_ITERATIONS = 300_000_000 // (256 * 50)


def _reference_presets() -> dict[str, dict[str, dict]]:
    presets: dict[str, dict[str, dict]] = {}
    for ticks in (1, 2, 5):
        presets[f"cartpole_t{ticks}"] = {
            "model": dict(kind="ctm", iterations=ticks, memory_length=_CARTPOLE_MEMORY[ticks]),
        }
        presets[f"cartpole_lstm_t{ticks}"] = {
            "model": dict(kind="lstm", iterations=ticks, d_model=118),
        }
        acrobot = {
            "task": dict(_ACROBOT),
            "optim": dict(lr=5e-4),
            "train": dict(total_steps=_ACROBOT_ITERATIONS, eval_every=50, checkpoint_every=50),
        }
        presets[f"acrobot_t{ticks}"] = {
            **acrobot,
            "model": dict(
                kind="ctm",
                iterations=ticks,
                d_model=256,
                d_input=64,
                memory_length=_ACROBOT_MEMORY[ticks],
            ),
        }
        presets[f"acrobot_lstm_t{ticks}"] = {
            **acrobot,
            "model": dict(kind="lstm", iterations=ticks, d_model=243, d_input=64),
        }
    fourrooms = {
        "task": dict(_FOURROOMS),
        "optim": dict(lr=1e-4),
        "train": dict(total_steps=_FOURROOMS_ITERATIONS, eval_every=100, checkpoint_every=100),
    }
    for ticks in (1, 2):
        presets[f"fourrooms_t{ticks}"] = {
            **fourrooms,
            "model": dict(
                kind="ctm",
                iterations=ticks,
                d_model=512,
                memory_length=_FOURROOMS_MEMORY[ticks],
                memory_hidden_dims=16,
                n_synch_out=32,
                backbone_type="navigation-backbone",
            ),
        }
        presets[f"fourrooms_lstm_t{ticks}"] = {
            **fourrooms,
            "model": dict(
                kind="lstm",
                iterations=ticks,
                d_model=FOURROOMS_LSTM_WIDTH,
                backbone_type="navigation-backbone",
            ),
        }
    return presets


# Preset name -> {section: {field: value}}: every value the preset sets on top of the reference
# config written out in `get_config`.
PRESETS: dict[str, dict[str, dict]] = {
    "reference": {},  # the reference config as written in get_config (= cartpole_t1)
    **_reference_presets(),
    # Masked CartPole on a 2-core CPU: the reference CTM, fewer and shorter rollouts, and Adam
    # eps 1e-8 (see CPU_NOTE: with the reference's 1e-5 this CTM did not start learning here).
    "cpu": {
        "task": dict(num_envs=32, num_steps=64),
        "optim": dict(eps=1e-8),
        "train": dict(total_steps=600, log_every=10, eval_every=50, checkpoint_every=50),
    },
    # The same with the parameter-matched LSTM.
    "cpu_lstm": {
        "model": dict(kind="lstm", d_model=118),
        "task": dict(num_envs=32, num_steps=64),
        "optim": dict(eps=1e-8),
        "train": dict(total_steps=600, log_every=10, eval_every=50, checkpoint_every=50),
    },
    # MiniGrid FourRooms on a 2-core CPU: a smaller CTM (D 128, M 10, 16 output neurons), 64
    # envs x 50 steps, the reference's 300-step episodes; lr 1e-3 and Adam eps 1e-8 as the
    # CartPole cpu preset; entropy weight 0.01 (with the reference's 0.1 the policy stayed
    # uniform for 200 iterations); sampled evaluation, because a greedy policy this early
    # mostly turns in place (see CPU_NOTE).
    "cpu_fourrooms": {
        "model": dict(
            d_model=128,
            d_input=64,
            memory_length=10,
            memory_hidden_dims=4,
            n_synch_out=16,
            backbone_type="navigation-backbone",
        ),
        "task": dict(_FOURROOMS, num_envs=64, num_steps=50, ent_coef=0.01, eval_greedy=False),
        "optim": dict(lr=1e-3, eps=1e-8),
        "train": dict(total_steps=1000, log_every=10, eval_every=100, checkpoint_every=100),
    },
    # Seconds-long runs for the test suite (the real agent and PPO, just small). Unmasked
    # CartPole: with the full state a tiny agent reaches the 50-step cap within 40 iterations.
    "test": {
        "model": dict(d_model=16, d_input=8, n_synch_out=4, memory_length=4),
        "task": dict(
            num_envs=16, num_steps=32, eval_episodes=8, max_episode_steps=50, mask_velocity=False
        ),
        "optim": dict(lr=3e-3, eps=1e-8),
        "train": dict(
            total_steps=40, log_every=1, eval_every=20, checkpoint_every=20, keep_checkpoints=2
        ),
    },
    "test_fourrooms": {
        "model": dict(
            d_model=16,
            d_input=8,
            n_synch_out=4,
            memory_length=4,
            backbone_type="navigation-backbone",
        ),
        "task": dict(_FOURROOMS, num_envs=8, num_steps=16, eval_episodes=4, max_episode_steps=20),
        "optim": dict(lr=3e-3, eps=1e-8),
        "train": dict(
            total_steps=4, log_every=1, eval_every=2, checkpoint_every=2, keep_checkpoints=2
        ),
    },
    "test_lstm": {
        "model": dict(kind="lstm", d_model=16, d_input=8),
        "task": dict(
            num_envs=16, num_steps=32, eval_episodes=8, max_episode_steps=50, mask_velocity=False
        ),
        "optim": dict(lr=3e-3, eps=1e-8),
        "train": dict(
            total_steps=40, log_every=1, eval_every=20, checkpoint_every=20, keep_checkpoints=2
        ),
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # The recurrent core. kind 'ctm': the RL CTM (ctm_jax.rl.CTMRLConfig, the reference
    # constructor's arguments); kind 'lstm': the LSTM baseline, which reads only iterations,
    # d_model (its hidden width), d_input and backbone_type.
    config.model = ml_collections.ConfigDict(
        dict(
            kind="ctm",  # ctm | lstm
            iterations=1,  # internal ticks T per environment step (LSTM: cell steps)
            d_model=128,  # neurons D (LSTM: hidden width H)
            d_input=128,  # width of the backbone's observation features
            n_synch_out=16,  # the last n neurons' n(n+1)/2 pairs feed the actor and critic
            synapse_depth=1,  # 1: two Linear-GLU-LayerNorm blocks (the reference's RL synapses)
            memory_length=10,  # M: pre-/post-activation history, also the synchronisation window
            deep_nlms=True,  # 2-layer neuron-level models
            memory_hidden_dims=4,  # H of the neuron-level models
            do_layernorm_nlm=False,  # LayerNorm each neuron's history
            backbone_type="classic-control-backbone",  # observation -> 2 x (Linear-GLU-LN)
            dropout=0.0,  # must be 0 for RL
            neuron_select_type="first-last",  # the only selection of the reference's RL CTM
        )
    )

    config.task = ml_collections.ConfigDict(
        dict(
            name="tasks.ctm_rl.task:RLTask",  # the task class, module:Class
            env="CartPole-v1",  # CartPole-v1 | Acrobot-v1 (JAX ports of gymnasium's)
            mask_velocity=True,  # zero the velocities in the observations (partial observability)
            max_episode_steps=200,  # time limit; the reference caps CartPole at 200
            num_envs=256,  # parallel environments
            num_steps=100,  # steps of every environment per rollout (PPO iteration)
            update_epochs=4,  # passes over the rollout per iteration
            num_minibatches=4,  # minibatches per pass, each a group of whole environments
            gamma=0.99,  # discount
            gae_lambda=0.95,  # GAE lambda
            clip_coef=0.1,  # PPO ratio clip (and the value clip with clip_vloss)
            clip_vloss=False,  # clipped value loss
            ent_coef=0.1,  # entropy bonus weight
            vf_coef=0.25,  # value loss weight
            norm_adv=True,  # normalise advantages per minibatch
            normalize_reward=True,  # gymnasium's NormalizeReward, per environment
            anneal_lr=True,  # lr falls linearly to 0 over train.total_steps iterations
            continuous_state_trace=True,  # carry the recurrent state across env steps
            shuffle_minibatches=False,  # the reference keeps the environment order fixed
            eval_episodes=32,  # evaluation: one episode in each of this many environments
            eval_greedy=True,  # evaluation acts by argmax (False: samples like training)
            eval_seed=1234,  # seeds the evaluation episodes (the same ones at every eval)
        )
    )

    # Adam (weight decay 0) with eps 1e-5 and global-norm clipping at 0.5, as the reference;
    # the schedule stays constant because the task anneals the lr per iteration (anneal_lr).
    config.optim = common.optim_section(
        lr=1e-3,
        schedule="constant",
        warmup_steps=0,
        eps=1e-5,
        clip="global_norm",
        max_grad_norm=0.5,
    )
    # One step = one PPO iteration; the batch is the iteration's env steps (derived).
    config.train = common.train_section(
        total_steps=_CARTPOLE_ITERATIONS,
        log_every=1,
        eval_every=10,
        eval_batches=1,
        checkpoint_every=10,
    )
    config.train.batch_size = config.task.get_ref("num_envs") * config.task.get_ref("num_steps")
    config.mesh = common.mesh_section()  # data parallel over every device (the agent replicated)

    if arg in (None, ""):
        return config
    if arg not in PRESETS:
        raise ValueError(
            f"unknown preset {arg!r} for configs/ctm_rl.py; use one of {', '.join(PRESETS)}"
        )
    for section, values in PRESETS[arg].items():
        config[section].update(values)
    return config
