"""`model.dtype=bfloat16` for the CTM: bf16 matmuls and convolutions, float32 params, optimiser
state, softmaxes, certainties and synchronisation, and a training curve that tracks float32's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs.ctm_maze import get_config as maze_config
from configs.ctm_parity import get_config as parity_config
from ctm_jax.model import CTM
from train_lib import optim, trainer
from train_lib.task import make_task

STEPS = 60


def _dtypes_of_products(jaxpr: jax.extend.core.Jaxpr) -> list[tuple[str, str]]:
    """(operand dtype, result dtype) of every dot_general and convolution, nested jaxprs too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append((str(eqn.invars[0].aval.dtype), str(eqn.outvars[0].aval.dtype)))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                found += _dtypes_of_products(getattr(inner, "jaxpr", inner))
    return found


def test_bf16_runs_the_products_in_bf16_and_keeps_readouts_float32():
    """Maze test model (ResNet backbone, attention): every conv and every matmul is bf16 except
    the two read-outs of the float32 synchronisation (query and output projections); params
    and outputs are float32. Traced only (shapes and dtypes), nothing computed."""
    task = make_task(maze_config("test"))
    cfg = dataclasses.replace(task.model_config, dtype="bfloat16")
    x = task.example_batch(2)["inputs"]
    variables = jax.eval_shape(lambda: CTM(cfg).init(jax.random.key(0), x))
    assert {str(a.dtype) for a in jax.tree.leaves(variables["params"])} == {"float32"}

    def forward(v):
        return CTM(cfg).apply(v, x, train=True, mutable=["batch_stats"])[0]

    products = _dtypes_of_products(jax.make_jaxpr(forward)(variables).jaxpr)
    bf16 = [p for p in products if p == ("bfloat16", "bfloat16")]
    f32 = [p for p in products if p == ("float32", "float32")]
    assert len(bf16) + len(f32) == len(products)
    assert len(bf16) >= 3 * len(f32) > 0  # convs, kv, synapses, NLMs, attention vs 2 read-outs
    out = jax.eval_shape(forward, variables)
    assert out.predictions.dtype == out.certainties.dtype == jnp.float32


def _parity_losses(dtype: str) -> tuple[np.ndarray, trainer.TrainState]:
    config = parity_config("test")
    config.model.dtype = dtype
    task = make_task(config)
    model = task.build_model()
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
    data = iter(task.dataset("train", batch_size=config.train.batch_size))
    first = {k: jnp.asarray(v) for k, v in next(data).items()}
    state = trainer.init_state(task, model, tx, first, jax.random.key(0))
    step = jax.jit(trainer.make_train_step(task, model, tx, schedule))
    losses = []
    batch = first
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        batch = {k: jnp.asarray(v) for k, v in next(data).items()}
    return np.array(losses), state


def test_bf16_parity_training_tracks_float32():
    """Same init, same batches, 60 steps of the parity test preset. Measured on a 2-core CPU:
    mean |loss_bf16 - loss_f32| 0.0008 over 80 steps, largest 0.010, both curves 0.697 -> 0.61.
    The bound (0.005 mean, 0.03 largest) is about 6x / 3x that; a float32 run of a different
    seed differs by more."""
    f32, _ = _parity_losses("float32")
    bf16, state = _parity_losses("bfloat16")
    gap = np.abs(bf16 - f32)
    assert gap.mean() < 0.005 and gap.max() < 0.03, (gap.mean(), gap.max())
    assert gap.max() > 0  # it did compute in another precision
    assert f32[-10:].mean() < f32[:10].mean() - 0.03  # the curve it tracks goes somewhere
    assert {str(a.dtype) for a in jax.tree.leaves(state.params)} == {"float32"}
    floats = [a for a in jax.tree.leaves(state.opt_state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert {str(a.dtype) for a in floats} == {"float32"}
