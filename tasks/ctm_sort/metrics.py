"""Sorting metrics: greedy CTC decoding, accuracies, sortedness and the wait-ticks analysis.

The model emits one distribution over N + 1 classes per tick (N indices, blank last). Greedy
decoding takes the most likely class at every tick, merges runs of the same class and drops the
blanks; the decoded sequence is then cut or blank-padded to N, as the reference does before it
compares with the target. The JAX functions run inside the jitted steps; the NumPy ones analyse
the ticks at which each element is emitted, on the host.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Inside the steps (JAX, fixed shapes)


def emitted(tokens: Array, blank: int) -> Array:
    """(B, T) greedy classes -> (B, T) bool: the tick starts a new output element (not blank,
    and not a repeat of the previous tick's class; a blank between two equal classes separates
    them)."""
    previous = jnp.concatenate([jnp.full_like(tokens[:, :1], blank), tokens[:, :-1]], axis=1)
    return (tokens != blank) & (tokens != previous)


def greedy_decode(predictions: Array, length: int) -> tuple[Array, Array]:
    """predictions (B, C, T), blank = C - 1 -> (decoded (B, length) int32 padded with the blank
    and cut at `length`, number of decoded elements before the cut (B,))."""
    blank = predictions.shape[1] - 1
    tokens = jnp.argmax(predictions, axis=1).astype(jnp.int32)  # (B, T)
    emit = emitted(tokens, blank)
    position = jnp.cumsum(emit, axis=1) - 1
    # Ticks that emit nothing, or emit past `length`, write into a spare last slot (dropped).
    slot = jnp.where(emit & (position < length), position, length)
    rows = jnp.arange(tokens.shape[0])[:, None]
    decoded = jnp.full((tokens.shape[0], length + 1), blank, jnp.int32).at[rows, slot].set(tokens)
    return decoded[:, :length], emit.sum(axis=1)


def sortedness(decoded: Array, inputs: Array, blank: int) -> Array:
    """(B,) fraction of the N - 1 successive output pairs that are both present and in strictly
    increasing order of value: 1 for a sorted output, about 0.5 for a random permutation, lower
    when elements are missing (a pair with a blank counts as unsorted)."""
    present = decoded != blank
    values = jnp.take_along_axis(inputs, jnp.clip(decoded, 0, inputs.shape[1] - 1), axis=1)
    ordered = present[:, :-1] & present[:, 1:] & (values[:, 1:] > values[:, :-1])
    return ordered.mean(axis=1)


def sort_metrics(predictions: Array, inputs: Array, targets: Array) -> dict[str, Array]:
    """Batch means: per-position and exact-sequence accuracy of the greedy decoding, sortedness
    of its values, and the fraction decoded to exactly N elements."""
    n = targets.shape[1]
    decoded, lengths = greedy_decode(predictions, n)
    correct = decoded == targets
    return {
        "accuracy": correct.mean(),
        "sequence_accuracy": correct.all(axis=1).mean(),
        "sortedness": sortedness(decoded, inputs, predictions.shape[1] - 1).mean(),
        "right_length": (lengths == n).mean(),
    }


# ------------------------------------------------------------------------------------------------
# Wait-ticks analysis (NumPy, on the host)


def emissions(predictions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """predictions (B, C, T) -> per example (decoded elements, the tick each was emitted at):
    an element's tick is the first tick of its run (ticks count from 0)."""
    predictions = np.asarray(predictions)
    blank = predictions.shape[1] - 1
    tokens = predictions.argmax(axis=1)
    previous = np.concatenate([np.full_like(tokens[:, :1], blank), tokens[:, :-1]], axis=1)
    emit = (tokens != blank) & (tokens != previous)
    return [(tokens[b, emit[b]], np.flatnonzero(emit[b])) for b in range(tokens.shape[0])]


def wait_ticks_and_gaps(
    predictions: np.ndarray, inputs: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(waits, gaps) over every pair of successive output positions k, k + 1 that the greedy
    decoding got right: wait = ticks between emitting element k and element k + 1, gap = the
    difference between the (k+1)-th and k-th smallest input values (>= 0)."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    waits: list[int] = []
    gaps: list[float] = []
    for b, (elements, ticks) in enumerate(emissions(predictions)):
        m = min(len(elements), targets.shape[1])
        right = elements[:m] == targets[b, :m]
        for k in np.flatnonzero(right[:-1] & right[1:]):
            waits.append(int(ticks[k + 1] - ticks[k]))
            gaps.append(float(inputs[b, targets[b, k + 1]] - inputs[b, targets[b, k]]))
    return np.asarray(waits, np.float64), np.asarray(gaps, np.float64)


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of `a`, tied values sharing the mean of their ranks (for Spearman's rho)."""
    _, inverse, counts = np.unique(np.asarray(a), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


@dataclasses.dataclass(frozen=True)
class WaitStats:
    """Binned means and correlations of wait ticks against value gaps."""

    pairs: int  # (wait, gap) pairs analysed
    pearson: float  # linear correlation of wait with gap
    spearman: float  # rank correlation (ties averaged)
    bin_gap: np.ndarray  # (bins,) mean gap in each gap-quantile bin
    bin_wait: np.ndarray  # (bins,) mean wait in that bin
    bin_sem: np.ndarray  # (bins,) standard error of that mean (0 for a single pair)
    bin_count: np.ndarray  # (bins,) pairs in the bin


def wait_stats(waits: np.ndarray, gaps: np.ndarray, bins: int = 10) -> WaitStats:
    """Correlations and means of the waits in `bins` equal-count bins of the gap. Needs at least
    two pairs with varying waits and gaps for the correlations (NaN otherwise)."""
    waits, gaps = np.asarray(waits, np.float64), np.asarray(gaps, np.float64)
    if waits.size >= 2 and np.ptp(waits) > 0 and np.ptp(gaps) > 0:
        pearson = float(np.corrcoef(gaps, waits)[0, 1])
        spearman = float(np.corrcoef(average_ranks(gaps), average_ranks(waits))[0, 1])
    else:
        pearson = spearman = float("nan")
    order = np.argsort(gaps, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, max(waits.size, 1))) if g.size]
    counts = np.array([g.size for g in groups], np.int64)
    sem = [waits[g].std(ddof=1) / np.sqrt(g.size) if g.size > 1 else 0.0 for g in groups]
    return WaitStats(
        pairs=int(waits.size),
        pearson=pearson,
        spearman=spearman,
        bin_gap=np.array([gaps[g].mean() for g in groups]),
        bin_wait=np.array([waits[g].mean() for g in groups]),
        bin_sem=np.asarray(sem, np.float64),
        bin_count=counts,
    )
