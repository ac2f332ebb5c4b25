"""Parallel-sampling statistics on an [instances x samples] table (M x n), pure numpy.

Instance i has samples j = 1..n with canonical answers a_ij (None = the answer did not parse) and
ground-truth correctness y_ij in {0, 1}. Every benchmark value is a mean over all M instances: a
parse failure counts as wrong everywhere, an instance is never dropped from a denominator, and the
failure rate is reported on its own (``fail_rate``).

Aggregators at k = n (per-instance value, then the mean over instances)::

    average (Avg pass@1)   (1/n) sum_j y_ij        also per repeat: A_j = (1/M) sum_i y_ij,
                                                   reported as mean_j A_j +- std_j A_j (ddof 1)
    majority vote          y(mode_j a_ij)          parse failures do not vote
    best-of-N              max_j y_ij              a perfect verifier picks a correct sample
    worst-of-N             min_j y_ij              every call was the unlucky one
    selected best-of-N     y_i,argmax_j s_ij       an imperfect verifier's highest score s

Gaps: ``reliability_gap`` = average - worst-of-N, ``headroom`` = best-of-N - average,
``verifier_gap`` = best-of-N - selected best-of-N, and, between two configurations (a weak one
such as ParScale P = 1 or a CTM with few ticks, a strong one such as P > 1 or many ticks),
``conventional_to_reasoning_gap`` = average(strong) - best-of-N(weak).

Curves for every k <= n from one run of n samples (c_i = number of correct samples of instance i):

    pass@k  = 1 - C(n - c, k) / C(n, k)        (Chen et al. 2021; best-of-k, perfect verifier)
    worst@k = C(c, k) / C(n, k)                (all k correct)
    maj@k   = mean over k-subsets of the majority-vote correctness of the subset

Each is the average of its k = n aggregator over the k-subsets of the n samples (pass@k and
worst@k in closed form; maj@k over all subsets, or over random ones when there are too many), so
it is an unbiased estimate of the value a run with k samples would give (for i.i.d. samples with
success probability p: 1 - (1 - p)^k, p^k and the majority-vote probability).

Majority-vote ties are broken by a uniform draw among the tied answers, listed in order of first
appearance in the row, from ``np.random.default_rng([seed, instance_id])``. ``instance_id``
defaults to the row index; pass the instances' own ids when tables are split or reordered, and a
row then gives the same result whatever other rows share its table.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError

DEFAULT_MAX_SUBSETS = 5000


# --------------------------------------------------------------------------- input checks


def _check_n_k(n: Any, k: Any) -> tuple[int, int]:
    """n >= 1 samples and 1 <= k <= n, as plain ints."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"n={n!r} is invalid: need an integer number of samples n >= 1")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ConfigError(f"k={k!r} is invalid: need an integer 1 <= k <= n = {n}")
    return int(n), int(k)


def _check_counts(c: Any, n: int) -> np.ndarray:
    """Correct-sample counts c as an int array with 0 <= c <= n."""
    counts = np.asarray(c)
    if counts.dtype == bool or not np.issubdtype(counts.dtype, np.integer):
        rounded = np.rint(np.asarray(counts, float))
        if not np.array_equal(rounded, counts):
            raise ConfigError(f"c={c!r} is invalid: need integer counts of correct samples")
        counts = rounded.astype(np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > n):
        raise ConfigError(f"c={c!r} is invalid: need 0 <= c <= n = {n}")
    return counts


def _check_correct(correct: Any) -> np.ndarray:
    """The correctness table as a bool [M, n] array with M >= 1 and n >= 1 (0/1 accepted)."""
    table = np.asarray(correct)
    if table.ndim != 2:
        raise ConfigError(
            f"correct.shape={table.shape} is invalid: need a 2-D [instances, samples] table"
        )
    if table.shape[0] < 1:
        raise ConfigError(f"M={table.shape[0]} is invalid: need at least one instance")
    if table.shape[1] < 1:
        raise ConfigError(f"n={table.shape[1]} is invalid: need at least one sample per instance")
    if table.dtype != bool:
        if not np.isin(table, (0, 1)).all():
            raise ConfigError("correct is invalid: need booleans (or 0/1) for every sample")
        table = table.astype(bool)
    return table


def _check_answers(answers: Any, shape: tuple[int, int]) -> np.ndarray:
    """Canonical answers as an object [M, n] array (tuples stay single entries)."""
    if isinstance(answers, np.ndarray) and answers.ndim == 2:
        if answers.shape != shape:
            raise ConfigError(
                f"answers.shape={answers.shape} is invalid: need the shape of correct, {shape}"
            )
        return answers.astype(object, copy=False)
    table = np.empty(shape, dtype=object)
    rows = list(answers)
    if len(rows) != shape[0]:
        raise ConfigError(f"len(answers)={len(rows)} is invalid: need {shape[0]} rows like correct")
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != shape[1]:
            raise ConfigError(f"len(answers[{i}])={len(row)} is invalid: need {shape[1]} samples")
        for j, value in enumerate(row):
            table[i, j] = value
    return table


def _check_scores(scores: Any, shape: tuple[int, int]) -> np.ndarray:
    """Verifier scores as a float [M, n] array; NaN (no score) ranks below every number."""
    table = np.asarray(scores, dtype=float)
    if table.shape != shape:
        raise ConfigError(
            f"scores.shape={table.shape} is invalid: need the shape of correct, {shape}"
        )
    return np.where(np.isnan(table), -np.inf, table)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: need an integer >= 0")
    return int(seed)


def _instance_ids(instance_ids: Sequence[int] | None, m: int) -> list[int]:
    """The ids that seed each row's tie-breaks: the row indices unless given."""
    if instance_ids is None:
        return list(range(m))
    ids = [int(x) for x in instance_ids]
    if len(ids) != m or min(ids) < 0:
        raise ConfigError(
            f"instance_ids (length {len(ids)}) is invalid: need {m} integers >= 0, one per row"
        )
    return ids


@dataclass(frozen=True)
class _Row:
    """One instance's answers as ids: ids[j] = -1 for a parse failure, else the index of a_ij in
    `values` (distinct answers in order of first appearance); `value_correct[u]` = y of answer u."""

    ids: np.ndarray
    values: list[Hashable]
    value_correct: np.ndarray


def _encode(answers: np.ndarray, correct: np.ndarray) -> list[_Row]:
    """Answer ids per row, checking that parse failures are wrong and that canonical equality
    implies equal correctness (the voted answer's correctness is then that of any carrier)."""
    rows = []
    for i in range(answers.shape[0]):
        index: dict[Hashable, int] = {}
        ids = np.full(answers.shape[1], -1, dtype=np.int64)
        first = []
        for j, value in enumerate(answers[i]):
            if value is None:
                if correct[i, j]:
                    raise ConfigError(
                        f"correct[{i}, {j}]=True is invalid: the answer did not parse (None), "
                        "and a parse failure counts as wrong"
                    )
                continue
            try:
                u = index.setdefault(value, len(index))
            except TypeError as err:
                raise ConfigError(
                    f"answers[{i}, {j}]={value!r} is invalid: canonical answers must be hashable"
                ) from err
            if u == len(first):
                first.append(j)
            ids[j] = u
        value_correct = correct[i, first] if first else np.zeros(0, bool)
        parsed = ids >= 0
        if (correct[i, parsed] != value_correct[ids[parsed]]).any():
            raise ConfigError(
                f"correct[{i}] is invalid: samples with equal canonical answers disagree on "
                "correctness"
            )
        rows.append(_Row(ids=ids, values=list(index), value_correct=value_correct))
    return rows


# --------------------------------------------------------------------------- aggregators at n


@dataclass(frozen=True)
class Average:
    """Avg pass@1: `accuracy` = mean over all M x n samples; `per_instance` [M] = row means;
    `per_repeat` [n] = accuracy of each repeat (column), summarised as `repeat_mean` (equal to
    `accuracy`) +- `repeat_std` (std over repeats, ddof 1; 0.0 when n = 1)."""

    accuracy: float
    per_instance: np.ndarray
    per_repeat: np.ndarray
    repeat_mean: float
    repeat_std: float


def average(correct: Any) -> Average:
    """Average accuracy: mean_ij y_ij, with the per-repeat accuracies A_j = mean_i y_ij."""
    table = _check_correct(correct)
    per_repeat = table.mean(axis=0)
    std = float(per_repeat.std(ddof=1)) if per_repeat.size > 1 else 0.0
    return Average(
        accuracy=float(table.mean()),
        per_instance=table.mean(axis=1),
        per_repeat=per_repeat,
        repeat_mean=float(per_repeat.mean()),
        repeat_std=std,
    )


def _vote(row: _Row, subsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Winning answer id of each subset (rows of sample indices); -1 where nothing parsed.

    Ties: the tied answers in order of first appearance, one picked by a single vector draw
    ``rng.integers(0, t)`` over the tied subsets in order (t = number of tied answers)."""
    n_sub, n_values = subsets.shape[0], len(row.values)
    if n_values == 0:
        return np.full(n_sub, -1, dtype=np.int64)
    ids = row.ids[subsets]
    parsed = ids >= 0
    flat = (np.arange(n_sub)[:, None] * n_values + ids)[parsed]
    counts = np.bincount(flat, minlength=n_sub * n_values).reshape(n_sub, n_values)
    top = counts.max(axis=1)
    tied = (counts == top[:, None]) & (top[:, None] > 0)
    n_tied = tied.sum(axis=1)
    pick = np.zeros(n_sub, dtype=np.int64)
    has_tie = n_tied > 1
    if has_tie.any():
        pick[has_tie] = rng.integers(0, n_tied[has_tie])
    winner = np.argmax(np.cumsum(tied, axis=1) > pick[:, None], axis=1)
    return np.where(top > 0, winner, -1)


def majority_vote(
    answers: Any, correct: Any, seed: int = 0, instance_ids: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote: per instance the most frequent canonical answer among parsed samples.

    Returns (correct [M] bool, voted answers [M] object). Parse failures (None) do not vote; an
    instance with no parsed sample votes None and counts wrong. Ties are a uniform draw among the
    tied answers (first-appearance order) from ``default_rng([seed, instance_ids[i]])``."""
    table = _check_correct(correct)
    rows = _encode(_check_answers(answers, table.shape), table)
    ids = _instance_ids(instance_ids, table.shape[0])
    seed = _check_seed(seed)
    everything = np.arange(table.shape[1])[None, :]
    voted_correct = np.zeros(table.shape[0], dtype=bool)
    voted = np.empty(table.shape[0], dtype=object)
    for i, row in enumerate(rows):
        (winner,) = _vote(row, everything, np.random.default_rng([seed, ids[i]]))
        voted[i] = row.values[winner] if winner >= 0 else None
        voted_correct[i] = bool(row.value_correct[winner]) if winner >= 0 else False
    return voted_correct, voted


def best_of_n(correct: Any) -> np.ndarray:
    """Best-of-N with a perfect verifier (coverage): max_j y_ij per instance, [M] bool."""
    return _check_correct(correct).any(axis=1)


def worst_of_n(correct: Any) -> np.ndarray:
    """Worst-of-N: min_j y_ij per instance (all n samples correct), [M] bool."""
    return _check_correct(correct).all(axis=1)


def selected_best_of_n(correct: Any, scores: Any) -> np.ndarray:
    """Best-of-N chosen by an imperfect verifier: y_i,j* with j* = argmax_j s_ij, [M] bool.

    Ties go to the first (lowest j) of the highest-scored samples; a NaN score ranks lowest."""
    table = _check_correct(correct)
    chosen = np.argmax(_check_scores(scores, table.shape), axis=1)
    return table[np.arange(table.shape[0]), chosen]


def verifier_gap(correct: Any, scores: Any) -> float:
    """Verifier gap = best-of-N (perfect verifier) - selected best-of-N (the given scores)."""
    return float(best_of_n(correct).mean() - selected_best_of_n(correct, scores).mean())


def reliability_gap(correct: Any) -> float:
    """Reliability gap = average - worst-of-N (how much a single unlucky call loses)."""
    return float(_check_correct(correct).mean() - worst_of_n(correct).mean())


def headroom(correct: Any) -> float:
    """Headroom = best-of-N - average (what a perfect selector would add to one call)."""
    return float(best_of_n(correct).mean() - _check_correct(correct).mean())


def conventional_to_reasoning_gap(weak_best: float, strong_average: float) -> float:
    """Conventional-to-reasoning gap = average(strong config) - best-of-N(weak config).

    Small: a weak model that could pick its best whole answer already matches the strong one."""
    return float(strong_average) - float(weak_best)


# --------------------------------------------------------------------------- curves over k


def _pass_one(c: int, n: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) = 1 - prod_{j = n-c+1}^{n} (1 - k / j); 1 when n - c < k."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=float)))


def _worst_one(c: int, n: int, k: int) -> float:
    """C(c, k) / C(n, k) = prod_{j = 0}^{k-1} (c - j) / (n - j); 0 when c < k."""
    if c < k:
        return 0.0
    j = np.arange(k, dtype=float)
    return float(np.prod((c - j) / (n - j)))


def _per_count(fn: Any, c: Any, n: Any, k: Any) -> float | np.ndarray:
    n, k = _check_n_k(n, k)
    counts = _check_counts(c, n)
    out = np.zeros(counts.shape, dtype=float)
    for value in np.unique(counts):
        out[counts == value] = fn(int(value), n, k)
    return float(out) if out.ndim == 0 else out


def pass_at_k(c: Any, n: int, k: int) -> float | np.ndarray:
    """Unbiased pass@k from c correct out of n samples: 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{j = n-c+1}^{n} (1 - k / j), stable for large n. `c` may be an array of
    per-instance counts (the result then has its shape)."""
    return _per_count(_pass_one, c, n, k)


def worst_at_k(c: Any, n: int, k: int) -> float | np.ndarray:
    """Unbiased worst@k (all k correct) from c correct out of n: C(c, k) / C(n, k).

    Computed as prod_{j = 0}^{k-1} (c - j) / (n - j); its expectation is p^k for i.i.d.
    Bernoulli(p) samples."""
    return _per_count(_worst_one, c, n, k)


def maj_at_k(
    answers: Any,
    correct: Any,
    k: int,
    seed: int = 0,
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    instance_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Per-instance maj@k [M]: the majority-vote correctness averaged over k-subsets of the row.

    Subsets: all C(n, k) of them (itertools.combinations order) when C(n, k) <= max_subsets,
    else `max_subsets` uniform random k-subsets (each without repetition, drawn independently)
    from ``default_rng([seed, n, k])``, shared by every row. Ties: one vector of draws over the
    row's tied subsets in order from ``default_rng([seed, instance_ids[i]])``, the same rule as
    `majority_vote` (so maj@n equals it). A row's value thus depends only on its own samples, the
    seed and its id. A subset with no parsed sample counts wrong."""
    table = _check_correct(correct)
    n, k = _check_n_k(table.shape[1], k)
    rows = _encode(_check_answers(answers, table.shape), table)
    ids = _instance_ids(instance_ids, table.shape[0])
    seed = _check_seed(seed)
    if isinstance(max_subsets, bool) or not isinstance(max_subsets, int) or max_subsets < 1:
        raise ConfigError(f"max_subsets={max_subsets!r} is invalid: need an integer >= 1")
    if math.comb(n, k) <= max_subsets:
        subsets = np.array(list(itertools.combinations(range(n), k)))
    else:
        noise = np.random.default_rng([seed, n, k]).random((max_subsets, n))
        subsets = np.argpartition(noise, k - 1, axis=1)[:, :k]
    out = np.zeros(table.shape[0], dtype=float)
    for i, row in enumerate(rows):
        if not row.values:
            continue
        if len(row.values) == 1 and (row.ids >= 0).all():
            out[i] = float(row.value_correct[0])
            continue
        winner = _vote(row, subsets, np.random.default_rng([seed, ids[i]]))
        out[i] = np.where(winner >= 0, row.value_correct[np.maximum(winner, 0)], False).mean()
    return out


def default_ks(n: int) -> list[int]:
    """The curve's k grid: 1, 2, 4, ... up to n, plus n itself."""
    n, _ = _check_n_k(n, 1)
    ks = [2**e for e in range(n.bit_length()) if 2**e <= n]
    return ks if ks[-1] == n else [*ks, n]


def _ks(ks: Sequence[int] | None, n: int) -> list[int]:
    chosen = default_ks(n) if ks is None else [int(_check_n_k(n, k)[1]) for k in ks]
    return sorted(set(chosen))


def pass_at_k_curve(correct: Any, ks: Sequence[int] | None = None) -> dict[int, float]:
    """{k: mean_i pass@k(c_i, n, k)} for each k (default `default_ks(n)`)."""
    table = _check_correct(correct)
    c, n = table.sum(axis=1), table.shape[1]
    return {k: float(np.mean(pass_at_k(c, n, k))) for k in _ks(ks, n)}


def worst_at_k_curve(correct: Any, ks: Sequence[int] | None = None) -> dict[int, float]:
    """{k: mean_i worst@k(c_i, n, k)} for each k (default `default_ks(n)`)."""
    table = _check_correct(correct)
    c, n = table.sum(axis=1), table.shape[1]
    return {k: float(np.mean(worst_at_k(c, n, k))) for k in _ks(ks, n)}


def maj_at_k_curve(
    answers: Any,
    correct: Any,
    ks: Sequence[int] | None = None,
    seed: int = 0,
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    instance_ids: Sequence[int] | None = None,
) -> dict[int, float]:
    """{k: mean_i maj@k} for each k (default `default_ks(n)`); see `maj_at_k`."""
    table = _check_correct(correct)
    return {
        k: float(maj_at_k(answers, table, k, seed, max_subsets, instance_ids).mean())
        for k in _ks(ks, table.shape[1])
    }


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    per_instance_values: Any, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over instances.

    Draws `n_boot` resamples of the M instances with replacement, takes each resample's mean and
    returns the alpha/2 and 1 - alpha/2 quantiles of those means."""
    values = np.asarray(per_instance_values, dtype=float)
    if values.ndim != 1 or values.size < 1:
        raise ConfigError(
            f"per_instance_values.shape={values.shape} is invalid: need a non-empty 1-D array"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r} is invalid: need an integer >= 1")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} is invalid: need 0 < alpha < 1")
    rng = np.random.default_rng(_check_seed(seed))
    chunk = max(1, 1_000_000 // values.size)  # resamples per draw, to bound memory
    means = np.concatenate(
        [
            values[
                rng.integers(0, values.size, size=(min(chunk, n_boot - start), values.size))
            ].mean(axis=1)
            for start in range(0, n_boot, chunk)
        ]
    )
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# --------------------------------------------------------------------------- report


def summarize(
    correct: Any,
    answers: Any,
    scores: Any = None,
    ks: Sequence[int] | None = None,
    seed: int = 0,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    max_subsets: int = DEFAULT_MAX_SUBSETS,
    instance_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Every statistic of one configuration's table, JSON-ready (plain floats, string keys).

    Keys: instances, samples, fail_rate (fraction of samples with no canonical answer),
    acc_avg, acc_avg_std (std over repeats), acc_per_repeat, acc_mv, acc_bon, acc_won,
    gap_reliability, headroom, and with `scores` acc_sel and gap_verifier; the curves
    "pass@k", "worst@k", "maj@k" as {"1": ..., "2": ...}; ci = {"level": 1 - alpha, <acc key>:
    [low, high]} (bootstrap over instances, one seed for all)."""
    table = _check_correct(correct)
    answer_table = _check_answers(answers, table.shape)
    avg = average(table)
    mv, _ = majority_vote(answer_table, table, seed, instance_ids)
    per_instance = {
        "acc_avg": avg.per_instance,
        "acc_mv": mv,
        "acc_bon": best_of_n(table),
        "acc_won": worst_of_n(table),
    }
    if scores is not None:
        per_instance["acc_sel"] = selected_best_of_n(table, scores)
    parse_failures = np.vectorize(lambda a: a is None, otypes=[bool])(answer_table)
    report: dict[str, Any] = {
        "instances": int(table.shape[0]),
        "samples": int(table.shape[1]),
        "seed": int(seed),
        "fail_rate": float(parse_failures.mean()),
        "acc_avg_std": avg.repeat_std,
        "acc_per_repeat": [float(x) for x in avg.per_repeat],
    }
    report.update({key: float(np.mean(values)) for key, values in per_instance.items()})
    report["gap_reliability"] = report["acc_avg"] - report["acc_won"]
    report["headroom"] = report["acc_bon"] - report["acc_avg"]
    if scores is not None:
        report["gap_verifier"] = report["acc_bon"] - report["acc_sel"]
    curve_ks = _ks(ks, table.shape[1])
    curves = {
        "pass@k": pass_at_k_curve(table, curve_ks),
        "worst@k": worst_at_k_curve(table, curve_ks),
        "maj@k": maj_at_k_curve(answer_table, table, curve_ks, seed, max_subsets, instance_ids),
    }
    for name, curve in curves.items():
        report[name] = {str(k): v for k, v in curve.items()}
    report["ci"] = {"level": 1.0 - alpha} | {
        key: list(bootstrap_ci(values, n_boot, alpha, seed)) for key, values in per_instance.items()
    }
    return report
