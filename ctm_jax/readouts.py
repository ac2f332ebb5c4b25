"""Per-tick read-outs of a CTM classifier: how to turn the T per-tick logits into a prediction.

The model emits logits `predictions (B, C, T)` and `certainties (B, 2, T)` (index 1 = 1 -
normalised entropy). At tick t a read-out may only use ticks 0..t, so every read-out below is a
prediction "if we stopped thinking at tick t". These are the four the CTM paper's ImageNet analysis
reports at every tick, plus certainty-threshold early exits and calibration (expected calibration
error and the reliability-diagram bins).

All functions are pure `jax.numpy` (jit-able) and accept NumPy inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

Array = jax.Array

# Read-out names, in the order tables and figures show them.
READOUTS = ("instant", "most_certain", "mean_prob", "mean_logits", "certainty_weighted")


def _most_certain_so_far(certainty: Array) -> Array:
    """(B, T) certainty -> (B, T) index of the most certain tick among 0..t (first on ties,
    as the loss's argmax)."""
    t = certainty.shape[-1]
    seen = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # (t, s): tick s visible at tick t
    masked = jnp.where(seen[None], certainty[:, None, :], -jnp.inf)  # (B, t, s)
    return jnp.argmax(masked, axis=-1)


def per_tick_probabilities(predictions: Array, certainties: Array) -> dict[str, Array]:
    """predictions (B, C, T) logits, certainties (B, 2, T) -> {read-out: (B, T, C) probabilities}.

    At tick t, using ticks <= t only:
      instant            softmax of the logits at t;
      most_certain       softmax at the most certain tick so far (argmax of certainty[:, 1]);
      mean_prob          mean of the per-tick softmaxes;
      mean_logits        softmax of the mean of the logits (what the reference's ImageNet
                         analysis prints as "most certain": its list is filled from the mean
                         logits, so the paper's headline number may be this read-out);
      certainty_weighted softmax of the certainty-weighted mean of the logits (weights =
                         certainty[:, 1]), the "certainty-weighted logits" read-out of the paper's
                         ImageNet analysis.
    """
    logits = jnp.moveaxis(jnp.asarray(predictions, jnp.float32), 1, 2)  # (B, T, C)
    certainty = jnp.asarray(certainties, jnp.float32)[:, 1]  # (B, T)
    probs = jax.nn.softmax(logits, axis=-1)
    ticks = jnp.arange(1, logits.shape[1] + 1, dtype=jnp.float32)[None, :, None]
    where = _most_certain_so_far(certainty)  # (B, T)
    weights = certainty[..., None]
    # A certainty of exactly 0 (a uniform prediction) everywhere would divide by zero; the tiny
    # floor makes that case the plain mean of the logits instead.
    weighted = jnp.cumsum(weights * logits, axis=1) / jnp.maximum(
        jnp.cumsum(weights, axis=1), 1e-12
    )
    return {
        "instant": probs,
        "most_certain": jnp.take_along_axis(probs, where[..., None], axis=1),
        "mean_prob": jnp.cumsum(probs, axis=1) / ticks,
        "mean_logits": jax.nn.softmax(jnp.cumsum(logits, axis=1) / ticks, axis=-1),
        "certainty_weighted": jax.nn.softmax(weighted, axis=-1),
    }


def topk_correct(probs: Array, labels: Array, k: int) -> Array:
    """(B, T, C) probabilities, (B,) labels -> (B, T) bool: the label is among the k largest.

    Ties count in the label's favour only when it is strictly beaten by fewer than k classes.
    """
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels)
    target = jnp.take_along_axis(probs, labels[:, None, None].astype(jnp.int32), axis=-1)
    beaten_by = jnp.sum(probs > target, axis=-1)  # (B, T)
    return beaten_by < k


def certainty_exits(
    predictions: Array, certainties: Array, thresholds: Iterable[float]
) -> dict[float, tuple[Array, Array]]:
    """Early exit at the first tick whose certainty reaches a threshold (else the last tick).

    predictions (B, C, T), certainties (B, 2, T) -> {threshold: (exit tick (B,), predicted class
    at that tick (B,))}; the class is the argmax of the logits at the exit tick.
    """
    predictions = jnp.asarray(predictions)
    certainty = jnp.asarray(certainties)[:, 1]  # (B, T)
    last = certainty.shape[-1] - 1
    classes = jnp.argmax(predictions, axis=1)  # (B, T)
    out: dict[float, tuple[Array, Array]] = {}
    for threshold in thresholds:
        reached = certainty >= threshold
        tick = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1), last)
        out[float(threshold)] = (tick, jnp.take_along_axis(classes, tick[:, None], axis=1)[:, 0])
    return out


def calibration(confidence: Array, correct: Array, bins: int = 15) -> dict[str, Array]:
    """Expected calibration error over equal-width confidence bins on [0, 1].

    confidence (N,) in [0, 1] (e.g. the top-1 probability), correct (N,) bool ->
    {"ece": scalar, "bin_confidence": (bins,), "bin_accuracy": (bins,), "bin_count": (bins,)};
    ECE = sum_b count_b / N * |accuracy_b - confidence_b|. Empty bins report 0 confidence and
    accuracy and contribute nothing. Bin b holds [b/bins, (b+1)/bins), the last one includes 1.
    """
    confidence = jnp.asarray(confidence, jnp.float32)
    correct = jnp.asarray(correct, jnp.float32)
    index = jnp.clip(jnp.floor(confidence * bins).astype(jnp.int32), 0, bins - 1)
    count = jnp.zeros(bins, jnp.float32).at[index].add(1.0)
    conf_sum = jnp.zeros(bins, jnp.float32).at[index].add(confidence)
    acc_sum = jnp.zeros(bins, jnp.float32).at[index].add(correct)
    safe = jnp.maximum(count, 1.0)
    bin_confidence = conf_sum / safe
    bin_accuracy = acc_sum / safe
    total = jnp.maximum(jnp.sum(count), 1.0)
    ece = jnp.sum(count / total * jnp.abs(bin_accuracy - bin_confidence))
    return {
        "ece": ece,
        "bin_confidence": bin_confidence,
        "bin_accuracy": bin_accuracy,
        "bin_count": count.astype(jnp.int32),
    }
