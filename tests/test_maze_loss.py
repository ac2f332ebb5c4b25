"""The maze loss's auto-curriculum against a direct loop over the reference's definition."""

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax.losses import maze_loss


def reference_maze_loss(predictions, certainties, targets, lookahead=5):
    """Plain loops: per tick, the longest all-correct prefix; the loss covers up to its maximum
    over ticks plus the lookahead; then (min-loss tick + most-certain tick) / 2 per example."""
    b, route = targets.shape
    ticks = predictions.shape[-1]
    logits = predictions.reshape(b, route, 5, ticks).astype(np.float64)
    log_p = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    total = 0.0
    uptos = []
    for i in range(b):
        best = 0
        for t in range(ticks):
            k = 0
            while k < route and logits[i, k, :, t].argmax() == targets[i, k]:
                k += 1
            best = max(best, max(k - 1, 0))
        upto = min(best + lookahead, route)
        uptos.append(upto)
        per_tick = [
            -np.mean([log_p[i, r, targets[i, r], t] for r in range(upto)]) for t in range(ticks)
        ]
        t_min = int(np.argmin(per_tick))
        t_cert = int(np.argmax(certainties[i, 1]))
        total += (per_tick[t_min] + per_tick[t_cert]) / 2
    return total / b, uptos


def test_maze_loss_matches_the_reference_definition():
    rng = np.random.default_rng(0)
    b, route, ticks = 4, 12, 6
    targets = rng.integers(0, 5, (b, route))
    logits = rng.normal(size=(b, route, 5, ticks)).astype(np.float32)
    # Make long correct prefixes at some ticks so the curriculum actually moves.
    for i, (t, k) in enumerate([(2, 9), (5, 0), (0, 12), (3, 4)]):
        for r in range(k):
            logits[i, r, targets[i, r], t] += 10.0
    predictions = logits.reshape(b, route * 5, ticks)
    certainties = rng.uniform(size=(b, 2, ticks)).astype(np.float32)
    loss, where, upto = maze_loss(
        jnp.asarray(predictions), jnp.asarray(certainties), jnp.asarray(targets)
    )
    want_loss, want_upto = reference_maze_loss(predictions, certainties, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_array_equal(upto, want_upto)
    assert upto[0] == 12 and upto[2] == 12  # long correct prefixes push the curriculum out
    np.testing.assert_array_equal(where, certainties[:, 1].argmax(-1))
    grads = jax.grad(lambda p: maze_loss(p, jnp.asarray(certainties), jnp.asarray(targets))[0])(
        jnp.asarray(predictions)
    )
    # Route steps beyond the curriculum get no gradient.
    g = np.asarray(grads).reshape(b, route, 5, ticks)
    for i, k in enumerate(np.asarray(upto)):
        assert np.all(g[i, k:] == 0) and np.any(g[i, :k] != 0)
