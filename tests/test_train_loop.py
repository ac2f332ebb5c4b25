"""The training loop on the real CTM: learning, metrics files, checkpoints, projection, the
finished-run path, NaN stop and config errors from the command line."""

from __future__ import annotations

import json
import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import (
    checkpoint_steps,
    load_state_arrays,
    read_tensorboard_scalars,
    run_launcher,
)

from configs.ctm_parity import get_config
from core.errors import ConfigError
from train_lib import metrics, optim, sharding, trainer
from train_lib.task import make_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 200-step run of the `test` preset, shared by the tests that inspect its outputs."""
    workdir = tmp_path_factory.mktemp("parity_run")
    config = get_config("test")
    summary = trainer.train_and_evaluate(config, workdir)
    return config, workdir, summary


def test_loss_goes_down_and_eval_runs(trained):
    config, workdir, summary = trained
    assert summary.step == 200 and not summary.already_finished and summary.resumed_from is None
    train = metrics.read_metrics(workdir, "train")
    assert [r["step"] for r in train] == list(range(20, 201, 20))
    first, last = train[0]["loss"], np.mean([r["loss"] for r in train[-2:]])
    assert last < first - 0.1, (first, last)
    assert train[-1]["accuracy"] > train[0]["accuracy"] + 0.05
    evals = metrics.read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [100, 200]
    assert evals[-1] == {
        "step": 200,
        "split": "eval",
        "time": evals[-1]["time"],
        **summary.eval_metrics,
    }
    for key in (
        "accuracy",
        "sequence_accuracy",
        "accuracy_last_tick",
        "sequence_accuracy_last_tick",
        "certainty",
        "most_certain_tick",
        "loss",
    ):
        assert key in evals[-1]
    assert evals[-1]["accuracy"] > 0.55  # chance is 0.5


def test_logged_norms_and_learning_rate(trained):
    config, workdir, _ = trained
    train = metrics.read_metrics(workdir, "train")
    for record in train:
        for key in ("grad_norm", "param_norm", "update_norm", "lr"):
            assert np.isfinite(record[key]) and record[key] > 0, (key, record)
    # Logged lr is the interval mean of the schedule at the steps taken.
    schedule = optim.make_schedule(config.optim, config.train.total_steps)
    for record in train:
        steps = range(record["step"] - config.train.log_every, record["step"])
        want = np.mean([float(schedule(s)) for s in steps])
        np.testing.assert_allclose(record["lr"], want, rtol=1e-5)


def test_tensorboard_and_config_files(trained):
    config, workdir, _ = trained
    scalars = read_tensorboard_scalars(workdir / metrics.TENSORBOARD_DIR)
    assert [step for step, _ in scalars["train/loss"]] == list(range(20, 201, 20))
    assert [step for step, _ in scalars["eval/accuracy"]] == [100, 200]
    jsonl = metrics.read_metrics(workdir, "train")
    np.testing.assert_allclose(
        [v for _, v in scalars["train/loss"]], [r["loss"] for r in jsonl], rtol=1e-6
    )
    saved = json.loads((workdir / trainer.CONFIG_FILE).read_text())
    assert saved["model"]["d_model"] == config.model.d_model
    assert saved["optim"]["lr"] == config.optim.lr


def test_checkpoints_keep_latest_and_buffers_never_change(trained):
    config, workdir, _ = trained
    assert checkpoint_steps(workdir) == [100, 150, 200]  # every 50, keep 3
    final = load_state_arrays(workdir, 200)
    assert int(final["step"]) == 200
    task = make_task(config)
    initial = task.init_variables(
        task.build_model(),
        jax.random.split(jax.random.key(config.train.seed))[0],
        task.example_batch(2),
    )
    for name, value in jax.tree_util.tree_flatten_with_path(initial["buffers"])[0]:
        key = "buffers/buffers/" + "/".join(k.key for k in name)
        np.testing.assert_array_equal(final[key], np.asarray(value))
    decay = final["params/decay_params_out"]
    assert decay.min() >= 0.0 and decay.max() <= 15.0


def test_finished_run_only_reports(trained, caplog):
    config, workdir, summary = trained
    caplog.set_level(logging.INFO)  # the trainer's lines are absl INFO records
    start = time.perf_counter()
    again = trainer.train_and_evaluate(config, workdir)
    assert again.already_finished and again.step == 200
    assert again.eval_metrics == pytest.approx(summary.eval_metrics)
    out = caplog.text
    assert "already finished at step 200" in out and "compiling" not in out
    assert time.perf_counter() - start < 30
    assert len(metrics.read_metrics(workdir, "train")) == 10  # nothing appended


def test_non_ctm_model_with_batch_norm_statistics(tmp_path):
    config = get_config("test")
    config.task.name = "train_helpers:BatchNormParityTask"
    config.train.update(total_steps=60, eval_every=30, checkpoint_every=30, log_every=10)
    summary = trainer.train_and_evaluate(config, tmp_path)
    assert summary.step == 60 and 0.0 <= summary.eval_metrics["accuracy"] <= 1.0
    final = load_state_arrays(tmp_path, 60)
    stats = {k: v for k, v in final.items() if k.startswith("buffers/batch_stats/")}
    assert stats, sorted(final)
    # Initial BatchNorm statistics are mean 0 / var 1; training moved them.
    assert np.abs(stats["buffers/batch_stats/BatchNorm_0/mean"]).max() > 1e-3
    assert np.abs(stats["buffers/batch_stats/BatchNorm_0/var"] - 1).max() > 1e-3
    assert not any(k.startswith("opt_state/") and "batch_stats" in k for k in final)


def test_train_step_projects_decay_params_after_the_update():
    config = get_config("test")
    task = make_task(config)
    model = task.build_model()
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
    batch = task.example_batch(4)
    state = trainer.init_state(task, model, tx, batch, jax.random.key(0))
    params = dict(state.params)
    params["decay_params_out"] = jnp.full_like(params["decay_params_out"], -3.0)
    params["decay_params_action"] = jnp.full_like(params["decay_params_action"], 40.0)
    state = state.replace(params=params)
    step = jax.jit(trainer.make_train_step(task, model, tx, schedule))
    new_state, step_metrics = step(state, batch)
    assert int(new_state.step) == 1
    np.testing.assert_array_equal(np.asarray(new_state.params["decay_params_out"]), 0.0)
    np.testing.assert_array_equal(np.asarray(new_state.params["decay_params_action"]), 15.0)
    assert {"loss", "accuracy", "grad_norm", "param_norm", "update_norm", "lr"} <= set(step_metrics)


def test_nan_stops_the_run_without_saving_it(tmp_path):
    """A poisoned batch makes step 30's loss NaN; step 30 is a checkpoint step (every 10)."""
    workdir = tmp_path / "nan"
    result = run_launcher(
        workdir,
        "--config.task.name=tests.train_helpers:NanParityTask",
        "--config.train.checkpoint_every=10",
        "--config.train.eval_every=0",
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite train metric at step 30: loss=nan")
    assert "Traceback" not in result.stderr
    assert "latest checkpoint: step 20" in last_line
    # The bad state was not saved: step 20 is intact and still the latest.
    assert checkpoint_steps(workdir) == [10, 20]
    state = load_state_arrays(workdir, 20)
    assert int(state["step"]) == 20
    assert all(np.all(np.isfinite(v)) for k, v in state.items() if v.dtype.kind == "f")
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    assert "step 30" not in json.dumps(metrics.read_metrics(workdir, "train")[-1])


def test_bad_config_value_fails_in_one_line_before_compiling(tmp_path):
    workdir = tmp_path / "bad"
    result = run_launcher(workdir, "--config.model.heads=3", timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.heads=3 is invalid: must divide d_input=16")
    assert "Traceback" not in result.stderr
    assert "compiling" not in result.stdout + result.stderr  # absl logs to stderr
    assert checkpoint_steps(workdir) == []


def test_unknown_config_field_is_rejected(tmp_path):
    result = run_launcher(tmp_path / "x", "--config.optim.learning_rate=0.1", timeout=120)
    assert result.returncode != 0
    assert "learning_rate" in result.stderr


@pytest.mark.parametrize(
    ("mesh", "devices", "want"),
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
        ({"data": -1, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
        ({"data": 1, "fsdp": -1, "tensor": 1}, 4, (1, 4, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 1}, 4, (2, 2, 1)),
    ],
)
def test_mesh_shape_resolution(mesh, devices, want):
    assert sharding.mesh_shape(mesh, devices) == want


@pytest.mark.parametrize(
    ("mesh", "devices", "needle"),
    [
        ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "mesh.fsdp=-1"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "mesh.data=-1"),
        ({"data": 2, "fsdp": 1, "tensor": 1}, 1, "mesh.data=2"),
        ({"data": 0, "fsdp": 1, "tensor": 1}, 1, "mesh.data=0"),
    ],
)
def test_impossible_meshes_name_the_field(mesh, devices, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        sharding.mesh_shape(mesh, devices)


@pytest.mark.parametrize(
    ("field", "value"),
    [("total_steps", 0), ("batch_size", 0), ("eval_batches", 0), ("checkpoint_every", 0)],
)
def test_bad_train_values_name_the_field(field, value):
    config = get_config("test")
    config.train[field] = value
    with pytest.raises(ConfigError, match=rf"^train\.{field}={value} is invalid"):
        trainer.validate_config(config)


def test_microbatches_accumulate_to_the_full_batch_update():
    """train.microbatches=4: four sequential pieces of the batch, their mean gradient, one
    update -- the same update as the whole batch at once (a mean loss; no dropout), up to
    float reassociation; loss and metrics are the whole batch's too."""
    config = get_config("test")
    config.model.dropout = 0.0
    task = make_task(config)
    model = task.build_model()
    tx, schedule = optim.make_optimizer(config.optim, config.train.total_steps)
    batch = task.example_batch(16)
    state = trainer.init_state(task, model, tx, batch, jax.random.key(0))
    whole = jax.jit(trainer.make_train_step(task, model, tx, schedule))
    pieces = jax.jit(trainer.make_train_step(task, model, tx, schedule, microbatches=4))
    (want, want_metrics), (got, got_metrics) = whole(state, batch), pieces(state, batch)
    for name in ("loss", "accuracy", "grad_norm", "update_norm"):
        np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=2e-5, err_msg=name)
    flat_want, flat_got = ocp.tree.to_flat_dict(want.params), ocp.tree.to_flat_dict(got.params)
    for path in flat_want:
        np.testing.assert_allclose(flat_got[path], flat_want[path], rtol=1e-5, atol=1e-6)
    # Not trivially equal: one microbatch alone gives another gradient.
    alone = jax.jit(trainer.make_train_step(task, model, tx, schedule))(
        state, jax.tree.map(lambda x: x[::4], batch)
    )[1]
    assert abs(float(alone["grad_norm"]) - float(want_metrics["grad_norm"])) > 1e-3


def test_microbatches_must_divide_the_batch():
    config = get_config("test")
    config.train.microbatches = 3  # the test preset's batch is 16
    with pytest.raises(ConfigError, match=r"train\.microbatches=3 is invalid: train\.batch_size="):
        trainer.validate_config(config)
    config.train.microbatches = 0
    with pytest.raises(ConfigError, match=r"train\.microbatches=0 is invalid: must be >= 1"):
        trainer.validate_config(config)
