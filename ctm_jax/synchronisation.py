"""Neural synchronisation: which neuron pairs are tracked, and their decayed inner products.

For a pair (i, j) with decay rate p >= 0 the synchronisation after tick t is

    S_ij^t = sum_{tau<=t} e^{-p (t-tau)} z_i^tau z_j^tau / sqrt(sum_{tau<=t} e^{-p (t-tau)}),

evaluated with the O(1)-per-tick recursion alpha <- r alpha + z_i z_j, beta <- r beta + 1,
S = alpha / sqrt(beta), r = e^{-p}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DECAY_MIN, DECAY_MAX = 0.0, 15.0


def init_neuron_indices(
    key: Array,
    neuron_select_type: str,
    d_model: int,
    n_synch: int,
    role: str,
    n_random_pairing_self: int = 0,
) -> tuple[Array, Array]:
    """The (left, right) neuron index vectors for the 'out' or 'action' synchronisation.

    first-last: out uses the first n neurons, action the last n. random: two independent draws
    with replacement. random-pairing: left with replacement, right[:k] = left[:k] (self pairs),
    the rest drawn with replacement. Drawn once at init and stored; importing a reference model
    must copy its buffers rather than redraw them.
    """
    if neuron_select_type == "first-last":
        start = 0 if role == "out" else d_model - n_synch
        idx = jnp.arange(start, start + n_synch, dtype=jnp.int32)
        return idx, idx
    key_left, key_right = jax.random.split(key)
    left = jax.random.randint(key_left, (n_synch,), 0, d_model, dtype=jnp.int32)
    right = jax.random.randint(key_right, (n_synch,), 0, d_model, dtype=jnp.int32)
    if neuron_select_type == "random-pairing":
        k = n_random_pairing_self
        right = jnp.concatenate([left[:k], right[k:]])
    return left, right


def pair_indices(neuron_select_type: str, left: Array, right: Array) -> tuple[Array, Array]:
    """Flat (i, j) neuron indices of every tracked pair.

    Dense selections take the upper triangle (incl. diagonal, row-major) of left x right; this
    gathers those pairs directly instead of materialising the B x n x n outer product.
    """
    if neuron_select_type == "random-pairing":
        return left, right
    rows, cols = np.triu_indices(left.shape[0])
    return left[rows], right[cols]


def pairwise_products(z: Array, pairs: tuple[Array, Array]) -> Array:
    """z_i * z_j for every tracked pair: (B, D) -> (B, S)."""
    i, j = pairs
    return jnp.take(z, i, axis=1) * jnp.take(z, j, axis=1)


def decay_factors(decay_params: Array, straight_through: bool) -> Array:
    """r = exp(-clip(p, 0, 15)).

    straight_through=True reproduces the main reference class, which clamps `.data` in place: the
    forward uses the clamped value, the gradient is d/dp exp(-p) at that value without the clamp's
    mask (and the optimiser later projects the stored params back, see `project_decay_params`).
    straight_through=False is the SORT variant's clamp inside autograd (zero gradient outside).
    """
    # torch.clamp passes the gradient on the closed interval [0, 15]; jnp.clip would halve it at
    # the end points, where reference checkpoints put many params.
    clipped = jnp.where(
        decay_params < DECAY_MIN,
        DECAY_MIN,
        jnp.where(decay_params > DECAY_MAX, DECAY_MAX, decay_params),
    )
    if straight_through:
        clipped = decay_params + jax.lax.stop_gradient(clipped - decay_params)
    return jnp.exp(-clipped)


def project_decay_params(decay_params: Array) -> Array:
    """The reference's in-place clamp of the stored decay params, applied after each update."""
    return jnp.clip(decay_params, DECAY_MIN, DECAY_MAX)


def update_synchronisation(
    alpha: Array, beta: Array, products: Array, r: Array
) -> tuple[Array, Array, Array]:
    """One recursion step; returns (synchronisation, alpha, beta).

    Starting from alpha = beta = 0 gives alpha = products, beta = 1 on the first step, which is
    how the reference seeds its accumulators.
    """
    alpha = r * alpha + products
    beta = r * beta + 1.0
    return alpha / jnp.sqrt(beta), alpha, beta
