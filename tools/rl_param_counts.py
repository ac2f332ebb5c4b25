"""Parameter counts of the RL presets' agents (core + actor + critic), to check that each LSTM
baseline matches its CTM:

    python -m tools.rl_param_counts                 # every reference RL preset
    python -m tools.rl_param_counts fourrooms_t1 fourrooms_lstm_t1
"""

from __future__ import annotations

import sys

import jax

from configs import ctm_rl
from tasks.ctm_rl.task import RLTask


def agent_parameters(preset: str) -> int:
    """Number of parameters of the agent `configs/ctm_rl.py:<preset>` builds."""
    config = ctm_rl.get_config(preset)
    # Parameter shapes do not depend on the number of environments; 4 keeps the init cheap.
    config.task.num_envs = 4
    config.task.num_minibatches = 1
    config.train.batch_size = 4 * config.task.num_steps
    task = RLTask(config)
    params = task.ppo(task.build_model()).init_params(jax.random.key(0))
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def main(argv: list[str]) -> None:
    presets = argv or [
        name for name in ctm_rl.PRESETS if name.startswith(("cartpole", "acrobot", "fourrooms"))
    ]
    for name in presets:
        print(f"{name:24s} {agent_parameters(name):>12,d}")


if __name__ == "__main__":
    main(sys.argv[1:])
