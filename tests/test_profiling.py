"""Diagnostics of the training loop: `train.profile_steps` (an XLA trace for TensorBoard's profile
plugin) and `train.transfer_guard` (implicit host<->device transfers in the steps refused), both
validated before anything is built."""

from __future__ import annotations

import logging

import pytest

from configs.ctm_parity import get_config
from core.errors import ConfigError
from train_lib import metrics, trainer


def _config(total_steps: int = 6, **train):
    config = get_config("test")
    config.optim.warmup_steps = 2
    config.train.update(
        total_steps=total_steps,
        log_every=2,
        eval_every=3,
        eval_batches=1,
        checkpoint_every=3,
        **train,
    )
    return config


def test_profile_steps_write_a_trace_under_the_tensorboard_dir(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    summary = trainer.train_and_evaluate(_config(profile_steps="2,4"), tmp_path)
    assert summary.step == 6
    profile_dir = tmp_path / metrics.TENSORBOARD_DIR / "plugins" / "profile"
    traces = list(profile_dir.glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, list(profile_dir.rglob("*"))
    assert "profiling steps 2 to 4" in caplog.text
    assert f"profile written to {profile_dir}" in caplog.text


def test_transfer_guard_disallow_passes_the_whole_loop(tmp_path):
    # Evaluations and (async) checkpoints at steps 3 and 6 are inside the guarded loop.
    summary = trainer.train_and_evaluate(_config(transfer_guard="disallow"), tmp_path)
    assert summary.step == 6 and summary.eval_metrics
    assert [r["step"] for r in metrics.read_metrics(tmp_path, "train")] == [2, 4, 6]


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("profile_steps", "10", "'START,STOP' with 0 <= START < STOP <= train.total_steps"),
        ("profile_steps", "4,2", "'START,STOP' with 0 <= START < STOP <= train.total_steps"),
        ("profile_steps", "2,7", "'START,STOP' with 0 <= START < STOP <= train.total_steps"),
        ("profile_steps", "a,b", "'START,STOP' with 0 <= START < STOP <= train.total_steps"),
        ("transfer_guard", "forbid", "allow, log, disallow, log_explicit, disallow_explicit"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_field(tmp_path, caplog, field, value, allowed):
    caplog.set_level(logging.INFO)
    with pytest.raises(ConfigError) as info:
        trainer.train_and_evaluate(_config(**{field: value}), tmp_path)
    message = str(info.value)
    assert message.startswith(f"train.{field}={value!r} is invalid: ") and "\n" not in message
    assert allowed in message
    assert "compiling" not in caplog.text  # validated before anything is built
    assert not (tmp_path / trainer.CHECKPOINT_DIR).exists()
