"""The maze task through the shared trainer: a few steps of the `test` preset (ResNet backbone
with BatchNorm statistics), its metrics, and config validation."""

import numpy as np
import pytest

from configs.ctm_maze import get_config
from core.errors import ConfigError
from train_lib import metrics, trainer
from train_lib.task import make_task


def test_presets_build_valid_tasks():
    for preset in ("large", "medium", "small", "cpu", "test"):
        task = make_task(get_config(preset))
        side = {"large": 39, "medium": 19, "small": 15}.get(preset, 11)  # cpu/test: tiny
        batch = task.dataset("eval", batch_size=2)[0]
        assert batch["inputs"].shape == (2, side, side, 3)
        assert task.model_config.out_dims == batch["targets"].shape[1] * 5


def test_a_short_run_trains_and_reports_maze_metrics(tmp_path):
    summary = trainer.train_and_evaluate(get_config("test"), tmp_path)
    assert summary.step == 4
    train = metrics.read_metrics(tmp_path, "train")
    assert {
        "loss",
        "step_accuracy",
        "solve_rate",
        "route_length_reached",
        "curriculum_steps",
    } <= set(train[-1])
    assert np.isfinite(train[-1]["loss"])
    evals = metrics.read_metrics(tmp_path, "eval")
    assert 0.0 <= evals[-1]["solve_rate"] <= 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task.size", "huge", "task.size='huge' is invalid"),
        ("task.lookahead", 0, "task.lookahead=0 is invalid"),
        ("model.heads", 3, "model.heads=3 is invalid"),
    ],
)
def test_bad_values_fail_with_the_field_named(field, value, message):
    config = get_config("test")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        make_task(config)
