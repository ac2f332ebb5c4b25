"""Checkpoints: round trip (state + typed key + grain iterator + JSON), retention, atomicity,
and a clear error for a checkpoint whose shapes do not match the config."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.ctm_parity import get_config
from core.errors import CheckpointMismatchError
from tasks.ctm_parity.task import parity_dataset
from train_lib import checkpointing, optim, trainer
from train_lib.task import make_task


def _state(seed: int = 0) -> trainer.TrainState:
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) + seed, "bias": jnp.zeros(3)}}
    tx = optax.chain(optim.quantile_clip(0.9, 8), optax.adamw(1e-3))
    return trainer.TrainState(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        buffers={"buffers": {"idx": jnp.arange(4, dtype=jnp.int32)}},
        opt_state=tx.init(params),
        rng=jax.random.key(seed),
    )


def _iterator():
    return iter(parity_dataset(8, seed=0, batch_size=2).to_iter_dataset())


def test_round_trip_latest_step_and_retention(tmp_path):
    it = _iterator()
    with checkpointing.Checkpointer(tmp_path / "ckpt", save_every=2, keep=2) as ckpt:
        saved = {}
        for step in range(1, 8):
            next(it)
            state = _state(step)
            if ckpt.save(step, state, it, {"config": {"lr": 0.1}, "step": step}):
                saved[step] = (state, it.get_state())
        assert sorted(saved) == [2, 4, 6]
        assert ckpt.save(7, _state(7), it, {"step": 7}, force=True)  # final save off-interval
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]  # LatestN(2)
        assert ckpt.latest_step() == 7

    with checkpointing.Checkpointer(tmp_path / "ckpt", save_every=2, keep=2) as ckpt:
        abstract = jax.eval_shape(lambda: _state(0))
        fresh = _iterator()
        restored, meta = ckpt.restore(6, abstract, fresh)
    want_state, want_iter_state = saved[6]
    assert meta == {"config": {"lr": 0.1}, "step": 6}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(want_state), strict=True):
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert fresh.get_state() == want_iter_state
    # The restored iterator continues the stream where the saved one was.
    reference = _iterator()
    for _ in range(6):
        next(reference)
    np.testing.assert_array_equal(next(fresh)["inputs"], next(reference)["inputs"])


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    it = _iterator()
    with checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), it, {})
    # What a run killed during an async save leaves behind.
    partial = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 10)
    with checkpointing.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.all_steps() == [1]
        # The resumed run saves step 2 again; Orbax clears the leftover before its first save.
        assert ckpt.save(2, _state(2), it, {})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]
    assert not partial.exists()


def test_describe_mismatch_names_leaves():
    saved = {
        "params": {
            "w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
            "gone": jax.ShapeDtypeStruct((1,), jnp.float32),
        }
    }
    wanted = {
        "params": {
            "w": jax.ShapeDtypeStruct((2, 4), jnp.float32),
            "new": jax.ShapeDtypeStruct((5,), jnp.int32),
        }
    }
    lines = checkpointing.describe_mismatch(saved, wanted)
    assert "params/w: checkpoint (2, 3) float32 vs config (2, 4) float32" in lines
    assert any(line.startswith("params/gone:") and "not built" in line for line in lines)
    assert any(line.startswith("params/new:") and "missing" in line for line in lines)
    assert checkpointing.describe_mismatch(saved, saved) == []


def test_workdir_checkpoint_of_another_model_fails_before_compiling(tmp_path, caplog):
    """A checkpoint written for d_model=32 cannot be resumed by a d_model=48 config."""
    caplog.set_level(logging.INFO)  # the trainer's lines are absl INFO records
    config = get_config("test")
    task = make_task(config)
    model = task.build_model()
    tx, _ = optim.make_optimizer(config.optim, config.train.total_steps)
    state = trainer.init_state(task, model, tx, task.example_batch(4), jax.random.key(0))
    it = iter(task.dataset("train", batch_size=16).to_iter_dataset())
    with checkpointing.Checkpointer(tmp_path / trainer.CHECKPOINT_DIR, save_every=1, keep=1) as c:
        c.save(1, state, it, {"config": {}})

    config.model.d_model = 48
    with pytest.raises(CheckpointMismatchError) as info:
        trainer.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert "leaves differ" in message and "\n" not in message
    assert "params/start_activated_state: checkpoint (32,) float32 vs config (48,) float32" in (
        message
    )
    assert "compiling" not in caplog.text
