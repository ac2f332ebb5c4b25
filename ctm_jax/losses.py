"""The reference's training losses (utils/losses.py), per tick then reduced over ticks.

The certainty loss takes, per example, the tick with the lowest loss and the tick with the highest
certainty, and averages the two: L = (mean_b L[b, t_min] + mean_b L[b, t_certain]) / 2. The
selections are argmin/argmax (first index on ties), so gradients flow only through those ticks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def per_tick_cross_entropy(logits: Array, targets: Array) -> Array:
    """Cross-entropy at every tick: logits (B, ..., C, T), targets (B, ...) -> (B, ..., T)."""
    logits = jnp.moveaxis(logits, -1, -2)  # (B, ..., T, C)
    labels = jnp.broadcast_to(targets[..., None], logits.shape[:-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def select_ticks(
    tick_losses: Array, certainties: Array, use_most_certain: bool = True
) -> tuple[Array, Array]:
    """Per-example losses at the min-loss and most-certain ticks: (B, T) -> ((B,), (B,), (B,)).

    Returns (loss at min-loss tick, loss at selected tick) summed over nothing yet, plus the
    selected tick index (the last tick when use_most_certain=False)."""
    batch = jnp.arange(tick_losses.shape[0])
    t_min = jnp.argmin(tick_losses, axis=1)
    if use_most_certain:
        t_sel = jnp.argmax(certainties[:, 1], axis=-1)
    else:
        t_sel = jnp.full((tick_losses.shape[0],), tick_losses.shape[1] - 1)
    return tick_losses[batch, t_min], tick_losses[batch, t_sel], t_sel


def certainty_loss(
    tick_losses: Array, certainties: Array, use_most_certain: bool = True
) -> tuple[Array, Array]:
    """(mean over batch of the min-loss tick + mean of the most-certain tick) / 2."""
    at_min, at_selected, where = select_ticks(tick_losses, certainties, use_most_certain)
    return (at_min.mean() + at_selected.mean()) / 2, where


def image_classification_loss(
    predictions: Array, certainties: Array, targets: Array, use_most_certain: bool = True
) -> tuple[Array, Array]:
    """predictions (B, C, T), targets (B,) -> (loss, most-certain tick per example)."""
    return certainty_loss(
        per_tick_cross_entropy(predictions, targets), certainties, use_most_certain
    )


def parity_loss(
    predictions: Array, certainties: Array, targets: Array, use_most_certain: bool = True
) -> tuple[Array, Array]:
    """predictions (B, 2L, T) as the model emits them, targets (B, L) in {0, 1}.

    Per-position cross-entropy averaged over the L positions gives L[b, t]; then certainty loss.
    """
    b, length = targets.shape
    logits = predictions.reshape(b, length, 2, predictions.shape[-1])
    tick_losses = per_tick_cross_entropy(logits, targets).mean(axis=1)
    return certainty_loss(tick_losses, certainties, use_most_certain)


def sort_loss(predictions: Array, targets: Array) -> Array:
    """CTC over the ticks with blank = last class; torch's 'mean' reduction (each sequence's
    negative log-likelihood divided by its target length, then averaged over the batch).

    predictions (B, N+1, T), targets (B, N) int. With fewer ticks than the targets need (T < N
    plus the repeats) no alignment exists: optax then returns a large finite value (its
    log-epsilon, 1e5 / N) where torch gives inf, so callers check T up front (tasks.ctm_sort).
    """
    logits = jnp.moveaxis(predictions, 1, 2)  # (B, T, C)
    b, t, c = logits.shape
    nll = optax.ctc_loss(
        logits,
        jnp.zeros((b, t), logits.dtype),
        targets.astype(jnp.int32),
        jnp.zeros(targets.shape, logits.dtype),
        blank_id=c - 1,
    )
    return jnp.mean(nll / targets.shape[1])


def maze_loss(
    predictions: Array,
    certainties: Array,
    targets: Array,
    lookahead: int = 5,
    use_most_certain: bool = True,
) -> tuple[Array, Array, Array]:
    """The reference's maze loss with its auto-curriculum.

    predictions (B, R*5, T), targets (B, R) in {0 up, 1 down, 2 left, 3 right, 4 wait}. At every
    tick find the longest correctly predicted prefix of the route; the loss covers route steps
    [0, longest prefix over ticks + lookahead) (at least the first `lookahead`), averaged per
    tick; then the certainty loss over ticks. Returns (loss, most-certain tick, steps covered).
    """
    b, route = targets.shape
    ticks = predictions.shape[-1]
    logits = predictions.reshape(b, route, 5, ticks)
    step_losses = per_tick_cross_entropy(logits, targets)  # (B, R, T)
    correct = jnp.argmax(logits, axis=2) == targets[..., None]  # (B, R, T)
    # Length of the all-correct prefix at each tick (the reference's cumsum/argmax construction:
    # the first route step always counts, so a wrong first step gives 0 as the prefix index).
    prefix_ok = jnp.cumprod(correct, axis=1).astype(bool).at[:, 0].set(True)
    prefix_index = jnp.sum(prefix_ok, axis=1) - 1  # (B, T): index of the last correct step
    upto = jnp.minimum(jnp.max(prefix_index, axis=1) + lookahead, route)  # (B,)
    mask = (jnp.arange(route)[None, :] < upto[:, None]).astype(step_losses.dtype)  # (B, R)
    tick_losses = jnp.sum(step_losses * mask[..., None], axis=1) / jnp.sum(mask, axis=1)[:, None]
    loss, where = certainty_loss(tick_losses, certainties, use_most_certain)
    return loss, where, upto
