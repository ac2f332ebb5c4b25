"""CTM train steps of this checkout against an earlier commit, alternating fresh processes.

    python -m bench.ctm_against_commit --baseline=09aa3b8 [--rounds=2]
        [--workloads=tiny,reference,maze]

Checks the baseline commit out into a temporary git worktree, then for every round and workload
times the same train step in a fresh process in the baseline tree and in this one, one after the
other, so that both see the same machine load. The workloads are `bench.ctm_step`'s: parity
`:tiny` (D 128, T 16, batch 64) and the reference parity config (D 1024, T 75, batch 64) through
a plain jitted AdamW step, and maze `:small` (batch 16, one device) through the trainer's own
step. Each process compiles, warms up, and reports the median of its timed steps; the table
gives every process's number and the speed-up of the medians over the rounds.

The worker (`--worker`) only uses APIs both trees have (configs' `get_config`, `CTM`,
`trainer.build_experiment` / `jit_train_step`), so the baseline runs its own code.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = {"tiny": 20, "reference": 4, "maze": 5}


def _median_seconds(fn, steps: int) -> float:
    """`bench.timing.time_calls`, written out again: the worker imports from the baseline's tree,
    where bench/timing.py may not exist (09aa3b8 has none)."""
    import jax

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _parity_step(preset: str | None):
    """The train step of `bench.ctm_step.make_steps`, written out again on purpose: this runs in
    the baseline's tree, whose bench/ may not have it (or have it with another signature)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from configs import ctm_parity
    from ctm_jax.config import CTMConfig
    from ctm_jax.losses import parity_loss
    from ctm_jax.model import CTM, project_params

    config = ctm_parity.get_config(preset)
    length, batch = config.task.seq_len, config.train.batch_size
    cfg = CTMConfig.from_mapping(
        {**config.model.to_dict(), "out_dims": 2 * length, "prediction_reshaper": (length, 2)}
    )
    model = CTM(cfg)
    x = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (batch, length)), jnp.float32)
    targets = (jnp.cumsum(x < 0, axis=1) % 2).astype(jnp.int32)
    variables = model.init({"params": jax.random.key(0)}, x)
    tx = optax.adamw(1e-4)
    buffers = variables["buffers"]

    def step(state, key):
        params, opt_state = state

        def loss_fn(p):
            out = model.apply(
                {"params": p, "buffers": buffers}, x, train=True, rngs={"dropout": key}
            )
            return parity_loss(out.predictions, out.certainties, targets)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (project_params(cfg, optax.apply_updates(params, updates)), opt_state), loss

    state = (variables["params"], tx.init(variables["params"]))
    key = jax.random.key(1)
    compiled = jax.jit(step, donate_argnums=0).lower(state, key).compile()
    holder = {"state": compiled(state, key)[0]}

    def one():
        holder["state"], loss = compiled(holder["state"], key)
        return loss

    return one


def _maze_step():
    import jax

    from configs import ctm_maze
    from train_lib import sharding, trainer

    config = ctm_maze.get_config("small")
    config.train.batch_size = 16
    config.mesh.data = 1
    exp = trainer.build_experiment(config)
    state = jax.jit(exp.init, out_shardings=exp.state_shardings)(jax.random.key(0))
    batch = sharding.put_batch(exp.dataset("train")[0], exp.batch_sharding)
    with jax.set_mesh(exp.mesh), sharding.activate(exp.mesh, exp.logical_rules):
        compiled = trainer.jit_train_step(exp).lower(state, batch).compile()
    holder = {"state": compiled(state, batch)[0]}

    def one():
        with jax.set_mesh(exp.mesh):
            holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    return one


def worker(workload: str, steps: int) -> None:
    """Runs in the tree given by the working directory: prints 'RESULT <seconds>'."""
    sys.path.insert(0, os.getcwd())
    one = (
        _maze_step() if workload == "maze" else _parity_step("tiny" if workload == "tiny" else None)
    )
    one()  # warm-up
    print(f"RESULT {_median_seconds(one, steps)}", flush=True)


def time_in(tree: Path, workload: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", workload, str(STEPS[workload])],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"error: {workload} in {tree} failed:\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main(argv: Sequence[str]) -> None:
    args = dict(a.removeprefix("--").split("=", 1) for a in argv if "=" in a)
    baseline = args.get("baseline", "09aa3b8")
    rounds = int(args.get("rounds", 2))
    workloads = args.get("workloads", "tiny,reference,maze").split(",")
    unknown = [w for w in workloads if w not in STEPS]
    if unknown:
        raise SystemExit(f"error: --workloads: unknown {unknown}; allowed: {', '.join(STEPS)}")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
    )
    print(f"CPU: {model}; baseline {baseline} vs this checkout; {rounds} alternating rounds")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), baseline],
            check=True,
        )
        try:
            times: dict[str, dict[str, list[float]]] = {
                w: {"base": [], "new": []} for w in workloads
            }
            for _ in range(rounds):
                for workload in workloads:
                    times[workload]["base"].append(time_in(tree, workload))
                    times[workload]["new"].append(time_in(REPO, workload))
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
            )
    print(f"{'train step':12s} | {'baseline (per round)':24s} | {'this checkout':24s} | speed-up")
    for workload, t in times.items():
        fmt = lambda xs: " / ".join(f"{x * 1e3:.0f} ms" for x in xs)  # noqa: E731
        ratio = statistics.median(t["base"]) / statistics.median(t["new"])
        print(f"{workload:12s} | {fmt(t['base']):24s} | {fmt(t['new']):24s} | {ratio:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1:])
