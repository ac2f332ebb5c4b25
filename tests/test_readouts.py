"""ctm_jax.readouts against plain per-example, per-tick loops."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ctm_jax import readouts

B, C, T = 5, 7, 6


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def outputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(B, C, T)).astype(np.float32) * 2
    sure = rng.uniform(size=(B, T)).astype(np.float32)
    sure[0, 2] = sure[0, 4] = 1.5  # a tie: the first of the two must win
    certainties = np.stack([1 - sure, sure], axis=1)
    labels = rng.integers(0, C, size=B)
    return predictions, certainties, labels


def _loop_probabilities(predictions, certainties) -> dict[str, np.ndarray]:
    out = {name: np.zeros((B, T, C)) for name in readouts.READOUTS}
    for b in range(B):
        for t in range(T):
            logits = predictions[b, :, : t + 1]  # (C, t+1)
            sure = certainties[b, 1, : t + 1]
            best = max(range(t + 1), key=lambda s: (sure[s], -s))
            out["instant"][b, t] = _softmax(logits[:, t])
            out["most_certain"][b, t] = _softmax(logits[:, best])
            out["mean_prob"][b, t] = np.mean([_softmax(logits[:, s]) for s in range(t + 1)], 0)
            out["mean_logits"][b, t] = _softmax(logits.mean(1))
            out["certainty_weighted"][b, t] = _softmax((logits * sure).sum(1) / sure.sum())
    return out


def test_per_tick_probabilities_match_loops(outputs) -> None:
    predictions, certainties, _ = outputs
    got = jax.jit(readouts.per_tick_probabilities)(predictions, certainties)
    want = _loop_probabilities(predictions, certainties)
    assert set(got) == set(readouts.READOUTS)
    for name in readouts.READOUTS:
        np.testing.assert_allclose(np.asarray(got[name]), want[name], atol=1e-5, err_msg=name)
    # The first tick has only itself to read from: all read-outs agree there.
    for name in readouts.READOUTS:
        np.testing.assert_allclose(np.asarray(got[name])[:, 0], want["instant"][:, 0], atol=1e-5)


def test_topk_correct_matches_loops(outputs) -> None:
    predictions, _, labels = outputs
    probs = np.exp(predictions - predictions.max(1, keepdims=True)).transpose(0, 2, 1)
    for k in (1, 3):
        got = np.asarray(jax.jit(readouts.topk_correct, static_argnums=2)(probs, labels, k))
        want = np.array(
            [[labels[b] in np.argsort(-probs[b, t])[:k] for t in range(T)] for b in range(B)]
        )
        np.testing.assert_array_equal(got, want)
    assert np.asarray(readouts.topk_correct(probs, labels, C)).all()


def test_certainty_exits_match_loops(outputs) -> None:
    predictions, certainties, _ = outputs
    exits = jax.jit(lambda p, c: readouts.certainty_exits(p, c, (0.3, 0.9, 2.0)))
    got = exits(predictions, certainties)
    assert sorted(got) == [0.3, 0.9, 2.0]
    for threshold, (tick, cls) in got.items():
        for b in range(B):
            above = [t for t in range(T) if certainties[b, 1, t] >= threshold]
            want = above[0] if above else T - 1
            assert int(tick[b]) == want
            assert int(cls[b]) == int(np.argmax(predictions[b, :, want]))
    # Nothing reaches certainty 2: everyone exits at the last tick.
    assert (np.asarray(got[2.0][0]) == T - 1).all()


def test_calibration_matches_loops() -> None:
    rng = np.random.default_rng(1)
    confidence = np.concatenate([rng.uniform(size=200), [0.0, 1.0]]).astype(np.float32)
    correct = rng.uniform(size=202) < confidence
    calibration = jax.jit(readouts.calibration, static_argnames="bins")
    got = calibration(confidence, correct, bins=10)
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (confidence >= lo) & ((confidence < hi) | ((b == 9) & (confidence <= hi)))
        assert int(got["bin_count"][b]) == inside.sum()
        if inside.any():
            acc, conf = correct[inside].mean(), confidence[inside].mean()
            np.testing.assert_allclose(float(got["bin_accuracy"][b]), acc, atol=1e-6)
            np.testing.assert_allclose(float(got["bin_confidence"][b]), conf, atol=1e-6)
            ece += inside.sum() / 202 * abs(acc - conf)
    np.testing.assert_allclose(float(got["ece"]), ece, atol=1e-6)
    # A perfectly calibrated predictor (accuracy = confidence in every bin) has ECE 0.
    perfect = calibration(np.full(8, 0.75), np.arange(8) < 6, bins=4)
    assert float(perfect["ece"]) < 1e-6
