"""Adaptive-compute inference: the exit-tick outputs equal the full forward's at that tick."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.adaptive import adaptive_forward
from ctm_jax.config import CTMConfig
from ctm_jax.model import CTM
from tasks.ctm_parity.task import model_config as parity_model_config
from tests.train_helpers import SMALL_CTM

TOKENS = SMALL_CTM
PARITY = parity_model_config(
    {
        "iterations": 5,
        "d_model": 24,
        "d_input": 8,
        "heads": 2,
        "n_synch_out": 6,
        "n_synch_action": 6,
        "synapse_depth": 1,
        "memory_length": 3,
        "deep_nlms": True,
        "memory_hidden_dims": 2,
        "do_layernorm_nlm": False,
        "backbone_type": "parity_backbone",
        "positional_embedding_type": "custom-rotational-1d",
        "dropout": 0.0,
    },
    seq_len=6,
)


@functools.cache
def setup(config: CTMConfig, batch: int = 16):
    """Model, variables and an input batch (token sets or +-1 parity sequences). The output
    projection is scaled up so certainties are far from uniform and differ across ticks."""
    key = jax.random.key(0)
    if config.backbone_type == "parity_backbone":
        x = jnp.where(jax.random.bernoulli(key, 0.5, (batch, 6)), 1.0, -1.0)
    else:
        x = jax.random.normal(key, (batch, 6, 8))
    model = CTM(config)
    variables = model.init({"params": jax.random.key(1)}, x)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * 30 if "output_projector" in jax.tree_util.keystr(path) else leaf,
        variables,
    )
    return model, variables, x


def first_tick_over(certainty: np.ndarray, threshold: float) -> np.ndarray:
    """(B, T) certainty -> 0-based first tick >= threshold per example, else the last tick."""
    over = certainty >= threshold
    return np.where(over.any(axis=1), over.argmax(axis=1), certainty.shape[1] - 1)


def threshold_between(values: np.ndarray, q: float, margin: float = 1e-6) -> float:
    """A threshold near the q-quantile of `values` but at least `margin` from each of them, so
    float rounding differences between the scanned and the looped ticks cannot flip a tick."""
    v = np.unique(values.ravel())
    gaps = np.flatnonzero(np.diff(v) > 2 * margin)
    i = gaps[np.argmin(np.abs(gaps - q * (len(v) - 1)))]
    return float((v[i] + v[i + 1]) / 2)


def assert_matches_full_forward(out, full, threshold: float) -> None:
    cert = np.asarray(full.certainties[:, 1])
    tick = first_tick_over(cert, threshold)
    rows = np.arange(len(tick))
    np.testing.assert_array_equal(out.exit_tick, tick + 1)
    assert int(out.ticks_run) == tick.max() + 1
    np.testing.assert_allclose(
        out.predictions, np.asarray(full.predictions)[rows, :, tick], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        out.certainties, np.asarray(full.certainties)[rows, :, tick], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("config", [TOKENS, PARITY], ids=["tokens", "parity"])
def test_exit_tick_outputs_equal_the_full_forward(config):
    model, variables, x = setup(config)
    full = model.apply(variables, x)
    cert = np.asarray(full.certainties[:, 1])
    run = jax.jit(lambda v, x, thr: adaptive_forward(model, v, x, thr))
    # The median tick-1 certainty stops half the batch at tick 1 and the rest later.
    median_first = threshold_between(cert[:, 0], 0.5)
    spread = first_tick_over(cert, median_first)
    assert len(set(spread.tolist())) > 1, "the test needs examples exiting at different ticks"
    for threshold in (median_first, *(threshold_between(cert, q) for q in (0.3, 0.6, 0.9))):
        out = run(variables, x, threshold)
        assert_matches_full_forward(out, full, threshold)


def test_threshold_zero_stops_after_one_tick():
    model, variables, x = setup(TOKENS)
    full = model.apply(variables, x)
    out = adaptive_forward(model, variables, x, 0.0)
    assert int(out.ticks_run) == 1
    np.testing.assert_array_equal(out.exit_tick, 1)
    np.testing.assert_allclose(out.predictions, full.predictions[..., 0], rtol=1e-5, atol=1e-6)


def test_threshold_above_one_runs_all_ticks():
    model, variables, x = setup(TOKENS)
    full = model.apply(variables, x)
    out = adaptive_forward(model, variables, x, 1.01)
    assert int(out.ticks_run) == TOKENS.iterations
    np.testing.assert_array_equal(out.exit_tick, TOKENS.iterations)
    np.testing.assert_allclose(out.predictions, full.predictions[..., -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.certainties, full.certainties[..., -1], rtol=1e-5, atol=1e-6)


def test_batch_stops_when_all_examples_are_done():
    model, variables, x = setup(TOKENS)
    cert = np.asarray(model.apply(variables, x).certainties[:, 1])
    # Every example is over this threshold by tick 2 at the latest (with a rounding margin).
    threshold = float(cert[:, :2].max(axis=1).min()) - 1e-5
    out = adaptive_forward(model, variables, x, threshold)
    assert int(out.ticks_run) <= 2 < TOKENS.iterations
    assert int(out.ticks_run) == int(np.max(out.exit_tick))


def test_more_ticks_than_trained_continue_the_recurrence():
    model, variables, x = setup(TOKENS)
    longer = CTM(dataclasses.replace(TOKENS, iterations=3 * TOKENS.iterations))
    full = longer.apply(variables, x)  # the tick params are shared, so the same variables fit
    out = adaptive_forward(model, variables, x, 2.0, max_ticks=3 * TOKENS.iterations)
    assert int(out.ticks_run) == 3 * TOKENS.iterations
    np.testing.assert_allclose(out.predictions, full.predictions[..., -1], rtol=1e-5, atol=1e-6)
    threshold = threshold_between(np.asarray(full.certainties[:, 1]), 0.7)
    out = adaptive_forward(model, variables, x, threshold, max_ticks=3 * TOKENS.iterations)
    assert_matches_full_forward(out, full, threshold)


def test_max_ticks_must_be_positive():
    model, variables, x = setup(TOKENS)
    with pytest.raises(ValueError, match="max_ticks"):
        adaptive_forward(model, variables, x, 0.5, max_ticks=0)
