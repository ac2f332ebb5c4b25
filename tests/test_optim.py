"""Optimiser: schedule values, autoclip QuantileClip semantics, weight-decay mask, validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.ctm_parity import get_config
from core.errors import ConfigError
from train_lib import optim


def _optim_config(**overrides):
    config = get_config("test").optim
    config.update(overrides)
    return config


# -- schedule ------------------------------------------------------------------------------------


def test_warmup_then_cosine_to_eta_min():
    lr, warmup, total, end = 1e-3, 100, 1000, 1e-7
    sched = optim.make_schedule(
        _optim_config(lr=lr, warmup_steps=warmup, end_lr=end, warmup_init_lr=0.0), total
    )
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(50)), lr / 2, rtol=1e-5)  # linear warm-up
    np.testing.assert_allclose(float(sched(warmup)), lr, rtol=1e-6)  # peak at warm-up end
    mid = warmup + (total - warmup) // 2
    np.testing.assert_allclose(float(sched(mid)), end + (lr - end) / 2, rtol=1e-4)
    step = 700  # a generic cosine point: end + (lr-end) * (1 + cos(pi * frac)) / 2
    frac = (step - warmup) / (total - warmup)
    want = end + (lr - end) * (1 + math.cos(math.pi * frac)) / 2
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-4)
    np.testing.assert_allclose(float(sched(total)), end, rtol=1e-5)  # eta_min at the end
    np.testing.assert_allclose(float(sched(total + 50)), end, rtol=1e-5)
    values = np.array([float(sched(s)) for s in range(warmup, total + 1, 25)])
    assert np.all(np.diff(values) <= 0)


def test_constant_schedule_after_warmup():
    sched = optim.make_schedule(_optim_config(schedule="constant", lr=2e-3, warmup_steps=10), 100)
    np.testing.assert_allclose(float(sched(5)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose([float(sched(s)) for s in (10, 50, 100)], [2e-3] * 3, rtol=1e-6)


# -- quantile clipping ---------------------------------------------------------------------------


class _ReferenceQuantileClip:
    """autoclip.torch.QuantileClip restated in NumPy: threshold = quantile of earlier norms
    (none on the first step), clip_grad_norm_ semantics, then record the pre-clip norm."""

    def __init__(self, quantile, history_length):
        self.q, self.h = quantile, history_length
        self.history: dict[str, list[float]] = {}

    def clip(self, grads: dict[str, np.ndarray], key_of=lambda name: name):
        out = {}
        groups: dict[str, list[str]] = {}
        for name in grads:
            groups.setdefault(key_of(name), []).append(name)
        for key, names in groups.items():
            norm = math.sqrt(sum(float(np.sum(grads[n].astype(np.float64) ** 2)) for n in names))
            past = self.history.get(key, [])
            threshold = np.quantile(past, self.q) if past else math.inf
            scale = min(1.0, threshold / (norm + 1e-6))
            for n in names:
                out[n] = grads[n] * scale
            self.history[key] = (past + [norm])[-self.h :]
        return out


@pytest.mark.parametrize("scope", ["per_parameter", "global"])
def test_quantile_clip_matches_autoclip(scope):
    history, quantile = 5, 0.9  # short history so the ring buffer wraps within the test
    tx = optim.quantile_clip(quantile, history, scope)
    rng = np.random.default_rng(0)
    params = {"a": np.zeros((3, 4), np.float32), "b": np.zeros((7,), np.float32)}
    state = tx.init(params)
    reference = _ReferenceQuantileClip(quantile, history)
    key_of = (lambda name: name) if scope == "per_parameter" else (lambda name: "all")
    update = jax.jit(tx.update)
    clipped_any = False
    for step in range(14):
        # Occasional spikes, so some steps are clipped and some are not.
        scale = 50.0 if step % 4 == 3 else 1.0 + 0.1 * step
        grads = {
            k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in params.items()
        }
        got, state = update(grads, state)
        want = reference.clip(grads, key_of)
        for k in grads:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-7)
            clipped_any |= not np.allclose(want[k], grads[k])
        if step == 0:  # no history yet: the first step passes through untouched
            for k in grads:
                np.testing.assert_array_equal(np.asarray(got[k]), grads[k])
    assert clipped_any
    assert int(state.count) == 14


def test_history_quantile_is_torch_linear_quantile():
    values = np.array([3.0, 1.0, 4.0, 1.5, 9.0, 2.0], np.float32)
    buffer = np.concatenate([values, np.full(4, 123.0, np.float32)])  # unused slots ignored
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        got = optim.history_quantile(jnp.asarray(buffer), jnp.asarray(6), q)
        np.testing.assert_allclose(float(got), np.quantile(values, q), rtol=1e-6)
    assert math.isinf(float(optim.history_quantile(jnp.asarray(buffer), jnp.asarray(0), 0.9)))


# -- full optimiser ------------------------------------------------------------------------------


def test_global_norm_clipping_bounds_the_update_direction():
    tx, _ = optim.make_optimizer(
        _optim_config(clip="global_norm", max_grad_norm=0.5, lr=1.0, warmup_steps=0), 10
    )
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # norm 5
    clip_state = tx.init(params)[0]
    clipped, _ = optax.clip_by_global_norm(0.5).update(grads, clip_state)
    np.testing.assert_allclose(float(optax.tree.norm(clipped)), 0.5, rtol=1e-6)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_weight_decay_mask_by_name_pattern():
    tx, _ = optim.make_optimizer(
        _optim_config(
            clip="none",
            lr=0.1,
            warmup_steps=0,
            weight_decay=0.5,
            weight_decay_exclude=(r"(^|/)bias$", "decay_params"),
        ),
        10,
    )
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
        "decay_params_out": jnp.ones((3,)),
    }
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients: only weight decay moves parameters, and only the unmasked ones.
    assert float(jnp.abs(updates["dense"]["kernel"]).min()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["decay_params_out"]).max()) == 0.0


def test_adamw_first_step_matches_the_closed_form():
    lr, eps = 1e-2, 1e-8
    tx, _ = optim.make_optimizer(
        _optim_config(clip="none", lr=lr, warmup_steps=0, eps=eps, schedule="constant"), 10
    )
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.3, -0.1])}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Bias-corrected first Adam step is -lr * g / (|g| + eps) = -lr * sign(g).
    np.testing.assert_allclose(np.asarray(updates["w"]), [-lr, lr], rtol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clip", "sometimes"),
        ("lr", 0.0),
        ("warmup_steps", 500),  # not below total_steps=100
        ("clip_quantile", 1.5),
        ("clip_scope", "layer"),
        ("schedule", "linear"),
        ("weight_decay_exclude", ("[unclosed",)),
    ],
)
def test_bad_optimiser_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^optim\.{field}="):
        optim.make_optimizer(_optim_config(**{field: value}), 100)
