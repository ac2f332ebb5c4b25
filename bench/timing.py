"""Timing helpers every benchmark shares (no flags here, so any benchmark may import them)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def best_seconds(fn, reps: int) -> float:
    """Fastest of `reps` calls of fn() (blocking on the result), after one warm-up call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """Dense float32 matmul FLOP/s of this machine, as XLA runs it."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / best_seconds(lambda: dot(a, b), reps)


def time_calls(fn, reps: int) -> float:
    """Median seconds per call (blocking on the result)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))
