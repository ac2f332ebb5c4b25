"""Return curves of RL training runs (e.g. the CTM and the LSTM on masked CartPole), and an
evaluation of their final checkpoints.

    python -m launch.rl_pictures --workdirs=runs/rl_cpu,runs/rl_cpu_lstm --labels=CTM,LSTM \
        [--episodes=100] [--out=docs/figures/rl_cartpole_returns.png]

For each workdir: the training return (mean raw return of the episodes that ended in each logged
interval, actions sampled as in training) and the periodic evaluations (greedy) from
`metrics.jsonl`, against environment steps; then the latest checkpoint plays `--episodes` fresh
episodes greedily and with sampled actions (seeded, the same episodes for every run). Writes one
figure and prints the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from core.errors import ConfigError, DataError  # noqa: E402
from launch import cli  # noqa: E402
from launch.runs import load_run  # noqa: E402
from tasks.ctm_rl.task import RLTask  # noqa: E402

EVAL_SEED = 20_250_601  # the final-checkpoint episodes (not the training run's eval_seed)
SOLVED = 195.0  # the classic CartPole threshold (average return)


def read_curves(workdir: str | Path) -> dict[str, Any]:
    """Training and evaluation returns against env steps from `<workdir>/metrics.jsonl`."""
    workdir = Path(workdir)
    try:
        config = json.loads((workdir / "config.json").read_text())
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"--workdirs: {workdir} is not a finished RL run's workdir ({e})") from None
    per_step = int(config["train"]["batch_size"])
    train = [r for r in rows if r.get("split") == "train" and "return" in r]
    evals = [r for r in rows if r.get("split") == "eval" and "return" in r]
    if not train:
        raise DataError(f"--workdirs: {workdir}/metrics.jsonl has no training returns")
    return {
        "config": config,
        "train_steps": np.array([r["step"] * per_step for r in train]),
        "train_return": np.array([r["return"] for r in train]),
        "eval_steps": np.array([r["step"] * per_step for r in evals]),
        "eval_return": np.array([r["return"] for r in evals]),
    }


def uniform_policy(params: Any) -> Any:
    """`params` with the actor's last layer zeroed: logits 0, so sampling picks actions
    uniformly (the random-policy baseline, on the same episodes as the trained agent)."""
    actor = dict(params["actor"])
    actor["dense_2"] = jax.tree.map(np.zeros_like, actor["dense_2"])
    return {**params, "actor": actor}


def evaluate_final(workdir: str | Path, episodes: int) -> dict[str, Any]:
    """Raw returns of `episodes` episodes of the latest checkpoint, greedy and sampled, and of
    the uniformly random policy on the same episodes."""
    if episodes < 1:
        raise ConfigError(f"--episodes={episodes} is invalid: must be >= 1")
    exp, variables, step = load_run(workdir, RLTask, kind="RL", tool="launch.rl_pictures")
    ppo = exp.task.ppo(exp.model)
    key = jax.random.key(EVAL_SEED)
    found = {"step": step}
    params = variables["params"]
    for mode, greedy, weights in (
        ("greedy", True, params),
        ("sampled", False, params),
        ("random", False, uniform_policy(params)),
    ):
        play = jax.jit(lambda p, k, g=greedy: ppo.evaluate(p, k, episodes, g))
        found[mode] = np.asarray(play(weights, key)["return"])
    return found


def is_cartpole(curve: dict[str, Any]) -> bool:
    return curve["config"]["task"]["env"] == "CartPole-v1"


def is_minigrid(curve: dict[str, Any]) -> bool:
    return curve["config"]["task"]["env"].startswith("MiniGrid")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (the first points average what there is)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def plot_returns(
    curves: Sequence[dict[str, Any]], labels: Sequence[str], path: str | Path, title: str
) -> Path:
    """Training returns (raw, faint; smoothed, solid) and the periodic evaluations (markers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cap = 0.0
    for i, (curve, label) in enumerate(zip(curves, labels, strict=True)):
        colour = colours[i % len(colours)]
        steps, ret = curve["train_steps"], curve["train_return"]
        ax.plot(steps, ret, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(ret, 5), color=colour, label=f"{label}: training (sampled actions)")
        eval_mode = "greedy" if curve["config"]["task"].get("eval_greedy", True) else "sampled"
        if len(curve["eval_steps"]):
            ax.plot(
                curve["eval_steps"],
                curve["eval_return"],
                color=colour,
                marker="o",
                linestyle=":",
                markersize=4,
                label=f"{label}: evaluation ({eval_mode})",
            )
        cap = max(cap, float(curve["config"]["task"]["max_episode_steps"]))
    if is_cartpole(curves[0]):
        # CartPole earns +1 per step: returns in [0, cap]. The legend goes between the solved
        # curves near the cap and any flat one lower down.
        ax.axhline(SOLVED, color="0.5", linestyle="--", linewidth=0.8, label=f"return {SOLVED:g}")
        ax.set_ylim(0, cap * 1.05)
        ax.legend(loc="center right", bbox_to_anchor=(1.0, 0.52), fontsize=8)
    elif is_minigrid(curves[0]):
        ax.set_ylim(0, 1.0)  # MiniGrid: 1 - 0.9 * steps / cap on reaching the goal, else 0
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.set_ylim(-cap * 1.05, 0)  # Acrobot: -1 per step until the goal, so [-cap, 0]
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def define_flags() -> None:
    """The command line; defined only when run as a program."""
    flags.DEFINE_list("workdirs", None, "Workdirs of RL training runs, comma-separated.")
    flags.DEFINE_list("labels", None, "One label per workdir (default: the model kinds).")
    flags.DEFINE_integer("episodes", 100, "Episodes per final-checkpoint evaluation.")
    flags.DEFINE_string("out", "docs/figures/rl_cartpole_returns.png", "Figure path.")
    flags.mark_flags_as_required(["workdirs"])


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    args = flags.FLAGS
    if args.labels is not None and len(args.labels) != len(args.workdirs):
        cli.fail(
            f"--labels={','.join(args.labels)} is invalid: needs one label per workdir "
            f"({len(args.workdirs)})"
        )
    with cli.one_line_errors():
        curves = [read_curves(w) for w in args.workdirs]
        labels = args.labels or [c["config"]["model"]["kind"].upper() for c in curves]
        finals = [evaluate_final(w, args.episodes) for w in args.workdirs]
        env = curves[0]["config"]["task"]
        masked = "masked " if env["mask_velocity"] else ""
        path = plot_returns(
            curves,
            labels,
            args.out,
            f"PPO on {masked}{env['env']} (episodes capped at {env['max_episode_steps']} steps)",
        )
    print(f"figure: {path}")
    for label, curve, final, workdir in zip(labels, curves, finals, args.workdirs, strict=True):
        # MiniGrid returns lie in [0, 1): three decimals, and the share of episodes that found
        # the goal; the classic tasks count steps.
        fmt = ".3f" if is_minigrid(curve) else ".1f"
        last = curve["train_return"][-10:]
        print(
            f"{label} ({workdir}): step {final['step']}, {int(curve['train_steps'][-1]):,} env "
            f"steps; training return, last {len(last)} logs: {last.mean():{fmt}}"
        )
        for mode in ("greedy", "sampled", "random"):
            ret = final[mode]
            extra = ""
            if is_cartpole(curve):
                extra = f", {np.mean(ret >= SOLVED):.0%} >= {SOLVED:g}"
            elif is_minigrid(curve):
                extra = f", goal reached in {np.mean(ret > 0):.1%}"
            who = "uniformly random policy" if mode == "random" else f"final checkpoint, {mode}"
            print(
                f"  {who}, {len(ret)} episodes: mean {ret.mean():{fmt}} "
                f"(std {ret.std():{fmt}}, min {ret.min():{fmt}}){extra}"
            )


if __name__ == "__main__":
    define_flags()
    cli.run(main)
