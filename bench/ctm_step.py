"""CTM train-step and forward throughput, against this machine's own dense matmul peak.

    python -m bench.ctm_step [--steps=3] [--skip_reference] [--skip_maze]

For the parity `:tiny` preset, the reference parity configuration (d_model 1024, 75 ticks,
batch 64) and the maze `:small` preset (resnet18-1 backbone, d_model 1024, 50 ticks, U-Net synapses
of depth 8, 15x15 mazes, batch 16; the trainer's own jitted step: AdamW, the maze loss, BatchNorm
statistics) it prints examples/s for a full train step (forward + backward + AdamW + projection) and
for the forward alone, the achieved FLOP/s as a fraction of the dense float32 matmul FLOP/s
measured in the same run, and the compile time of the train step at 5 and 75 ticks (the tick loop
is one `nn.scan`, so compile time should stay nearly flat).

FLOPs are counted analytically (matmuls and einsums; XLA's cost analysis counts a scan body once,
not once per tick); a train step is counted as 3x the forward. On a chip in `train_lib.mfu`'s
table (TPU v4/v5e/v5p/v6e, H100/H200) an MFU column gives the same FLOP/s against the chip's
dense bf16 peak ('-' elsewhere, e.g. CPU). Every function runs on one device, so the examples/s
are per device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from bench.timing import matmul_peak_flops, time_calls
from configs import ctm_maze, ctm_parity
from ctm_jax.config import CTMConfig
from ctm_jax.flops import forward_flops
from ctm_jax.losses import parity_loss
from ctm_jax.model import CTM, project_params
from launch import cli
from train_lib import sharding, trainer
from train_lib.mfu import peak_flops

_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls per measurement.", lower_bound=1)
_SKIP_MAZE = flags.DEFINE_bool("skip_maze", False, "Leave out the maze :small workload.")
_MAZE_BATCH = flags.DEFINE_integer("maze_batch", 16, "Batch of the maze :small workload.")
_SKIP_REFERENCE = flags.DEFINE_bool(
    "skip_reference", False, "Only the :tiny preset (the reference config takes minutes)."
)


def make_steps(cfg: CTMConfig, batch: int, length: int, lr: float = 1e-4):
    model = CTM(cfg)
    x = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], (batch, length)), jnp.float32)
    targets = (jnp.cumsum(x < 0, axis=1) % 2).astype(jnp.int32)
    variables = model.init({"params": jax.random.key(0)}, x)
    tx = optax.adamw(lr)
    state = (variables["params"], tx.init(variables["params"]))
    buffers = variables["buffers"]

    def train_step(state, x, targets, key):
        params, opt_state = state

        def loss_fn(p):
            out = model.apply(
                {"params": p, "buffers": buffers}, x, train=True, rngs={"dropout": key}
            )
            return parity_loss(out.predictions, out.certainties, targets)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = project_params(cfg, optax.apply_updates(params, updates))
        return (params, opt_state), loss

    def forward(params, x):
        return model.apply({"params": params, "buffers": buffers}, x).predictions

    return jax.jit(train_step, donate_argnums=0), jax.jit(forward), state, x, targets


def percent(fraction: float | None) -> str:
    """'12.3%', or '-' for no value (no chip peak)."""
    return "    -" if fraction is None else f"{100 * fraction:4.1f}%"


def bench_config(
    name: str,
    cfg: CTMConfig,
    batch: int,
    length: int,
    steps: int,
    peak: float,
    chip_peak: float | None = None,
) -> dict:
    """Times one configuration; `peak` is the measured f32 matmul FLOP/s, `chip_peak` the chip
    table's dense bf16 peak (None: no MFU)."""
    train_step, forward, state, x, targets = make_steps(cfg, batch, length)
    key = jax.random.key(1)
    start = time.perf_counter()
    compiled = train_step.lower(state, x, targets, key).compile()
    compile_s = time.perf_counter() - start
    state, _ = compiled(state, x, targets, key)  # warm-up

    holder = {"state": state}

    def one_step():
        holder["state"], loss = compiled(holder["state"], x, targets, key)
        return loss

    step_s = time_calls(one_step, steps)
    params = holder["state"][0]
    forward(params, x).block_until_ready()
    fwd_s = time_calls(lambda: forward(params, x), steps)
    flops = forward_flops(cfg, batch, length, cfg.d_input)
    return report(name, batch, cfg.iterations, compile_s, step_s, fwd_s, flops, peak, chip_peak)


def report(
    name: str,
    batch: int,
    ticks: int,
    compile_s: float,
    step_s: float,
    fwd_s: float,
    flops: float,
    peak: float,
    chip_peak: float | None,
) -> dict:
    """Prints one workload's line and returns its numbers; `flops` is one forward of the batch."""
    result = {
        "name": name,
        "batch": batch,
        "ticks": ticks,
        "compile_s": compile_s,
        "train_step_s": step_s,
        "train_examples_per_s": batch / step_s,
        "train_flops_ratio": 3 * flops / step_s / peak,
        "forward_s": fwd_s,
        "forward_examples_per_s": batch / fwd_s,
        "forward_flops_ratio": flops / fwd_s / peak,
        # one device: the rates above are per device
        "train_examples_per_s_per_device": batch / step_s,
        "forward_examples_per_s_per_device": batch / fwd_s,
        "train_mfu": 3 * flops / step_s / chip_peak if chip_peak else None,
        "forward_mfu": flops / fwd_s / chip_peak if chip_peak else None,
    }
    print(
        f"{name:28s} batch {batch:3d} T {ticks:3d} | train {step_s * 1e3:8.1f} ms "
        f"{batch / step_s:8.1f} ex/s {100 * result['train_flops_ratio']:5.1f}% of peak "
        f"MFU {percent(result['train_mfu'])} | "
        f"forward {fwd_s * 1e3:8.1f} ms {batch / fwd_s:8.1f} ex/s "
        f"{100 * result['forward_flops_ratio']:5.1f}% of peak "
        f"MFU {percent(result['forward_mfu'])} | compile {compile_s:5.1f} s",
        flush=True,
    )
    return result


def bench_maze(preset: str, batch: int, steps: int, peak: float, chip_peak: float | None) -> dict:
    """Times the trainer's own train step (`trainer.jit_train_step`) and the task's forward on
    one batch of the maze preset; FLOPs from `MazeTask.train_flops_per_example`."""
    config = ctm_maze.get_config(preset)
    with config.unlocked():
        config.train.batch_size = batch
        config.mesh.data = 1  # one device, as the parity workloads
    exp = trainer.build_experiment(config)
    state = jax.jit(exp.init, out_shardings=exp.state_shardings)(jax.random.key(0))
    batch_arrays = sharding.put_batch(exp.dataset("train")[0], exp.batch_sharding)
    start = time.perf_counter()
    with jax.set_mesh(exp.mesh), sharding.activate(exp.mesh, exp.logical_rules):
        compiled = trainer.jit_train_step(exp).lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": compiled(state, batch_arrays)[0]}  # warm-up

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch_arrays)
        return metrics["loss"]

    with jax.set_mesh(exp.mesh):
        step_s = time_calls(one_step, steps)
        params, buffers = holder["state"].params, holder["state"].buffers

        @jax.jit
        def forward(params, buffers, inputs):
            outputs = exp.task.apply(exp.model, {"params": params, **buffers}, inputs, train=False)
            return outputs.predictions

        jax.block_until_ready(forward(params, buffers, batch_arrays))
        fwd_s = time_calls(lambda: forward(params, buffers, batch_arrays), steps)
    flops = exp.task.train_flops_per_example() / 3 * batch
    ticks = exp.task.model_config.iterations
    name = f"maze :{preset} ({exp.task.size})"
    return report(name, batch, ticks, compile_s, step_s, fwd_s, flops, peak, chip_peak)


def compile_seconds(cfg: CTMConfig, batch: int, length: int) -> float:
    train_step, _, state, x, targets = make_steps(cfg, batch, length)
    start = time.perf_counter()
    train_step.lower(state, x, targets, jax.random.key(1)).compile()
    return time.perf_counter() - start


def model_config(preset: str | None) -> tuple[CTMConfig, int, int]:
    config = ctm_parity.get_config(preset)
    length = config.task.seq_len
    cfg = CTMConfig.from_mapping(
        {**config.model.to_dict(), "out_dims": 2 * length, "prediction_reshaper": (length, 2)}
    )
    return cfg, config.train.batch_size, length


def main(argv: Sequence[str]) -> None:
    cli.start(argv)
    kind = jax.devices()[0].device_kind
    print(f"jax {jax.__version__} on {kind} x{jax.device_count()} (the benchmark uses one)")
    peak = matmul_peak_flops()
    print(f"dense f32 matmul peak (2048^3, best of 10): {peak / 1e9:.1f} GFLOP/s")
    chip_peak = peak_flops(kind)
    if chip_peak:
        print(f"MFU against the chip table's dense bf16 peak: {chip_peak / 1e12:.1f} TFLOP/s")
    else:
        print(f"no chip table peak for {kind!r}: no MFU (the '% of peak' is the f32 matmul's)")
    bench_config("parity :tiny", *model_config("tiny"), _STEPS.value, peak, chip_peak)
    if not _SKIP_MAZE.value:
        bench_maze("small", _MAZE_BATCH.value, _STEPS.value, peak, chip_peak)
    if _SKIP_REFERENCE.value:
        return
    reference, batch, length = model_config(None)
    bench_config(
        "parity reference (D1024)", reference, batch, length, _STEPS.value, peak, chip_peak
    )
    t5 = compile_seconds(dataclasses.replace(reference, iterations=5), batch, length)
    t75 = compile_seconds(reference, batch, length)
    print(
        f"train-step compile time, reference config: 5 ticks {t5:.1f} s, 75 ticks {t75:.1f} s "
        f"(ratio {t75 / t5:.2f})"
    )


if __name__ == "__main__":
    app.run(main)
