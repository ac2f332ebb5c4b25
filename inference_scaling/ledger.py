"""Cost ledger: what each sample, instance and aggregator costs, in native units and in FLOPs.

A sample's cost is recorded in its native unit -- generated tokens for a language model, internal
ticks for the CTM (which vary per sample under certainty-based exit) -- together with the number
of parallel streams P it ran with and its FLOPs. Tables are [instances x samples] (M x n), or
[instances x rounds] (M x R) for a sequential run.

Definitions:

    per-instance cost        mean_j cost_ij and std_j cost_ij (ddof 1; 0 when n = 1)
    cost nondeterminism      mean_i std_j cost_ij  (spread across repeats of one instance)
    aggregator cost          per instance, the total cost of the calls the aggregator consumes:
                               average                    mean_j cost_ij (one call, expected)
                               majority / best-of-N /
                               worst-of-N / selected      sum_j cost_ij  (all N samples)
                               sequential                 sum of the rounds actually run
                                                          + critic calls x critic_cost
    outcome split            always correct (all j), always wrong (no j), mixed (the rest)

FLOPs are counted analytically: a matmul of [m, k] by [k, n] is 2 m k n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError

PARALLEL_AGGREGATORS = ("average", "majority", "best_of_n", "worst_of_n", "selected_best_of_n")
AGGREGATORS = (*PARALLEL_AGGREGATORS, "sequential")

# ParScale's learned prefix length per stream (K/V slots in every layer) when P > 1.
PARSCALE_PREFIX_TOKENS = 48


@dataclass(frozen=True)
class SampleCost:
    """One sample's cost: `native` in `unit` ("tokens" or "ticks"), `streams` P, `flops`."""

    native: float
    unit: str
    streams: int = 1
    flops: float = 0.0


def cost_table(samples: Sequence[Sequence[SampleCost]], field: str = "native") -> np.ndarray:
    """An [M, n] float table of one SampleCost field ("native", "streams" or "flops")."""
    if field not in ("native", "streams", "flops"):
        raise ConfigError(f"field={field!r} is invalid: need one of native, streams, flops")
    table = np.array([[float(getattr(s, field)) for s in row] for row in samples], dtype=float)
    return _check_cost(table)


def _check_cost(cost: Any, name: str = "cost") -> np.ndarray:
    table = np.asarray(cost, dtype=float)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ConfigError(
            f"{name}.shape={table.shape} is invalid: need a non-empty 2-D [instances, n] table"
        )
    return table


def per_instance_cost(cost: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean [M], std [M]) of each instance's cost across its n repeats (std ddof 1, 0 if n = 1)."""
    table = _check_cost(cost)
    std = table.std(axis=1, ddof=1) if table.shape[1] > 1 else np.zeros(table.shape[0])
    return table.mean(axis=1), std


def cost_nondeterminism(cost: Any) -> float:
    """The paper's cost nondeterminism: mean over instances of the per-instance std of cost."""
    return float(per_instance_cost(cost)[1].mean())


def split_by_outcome(correct: Any) -> dict[str, np.ndarray]:
    """[M] bool masks: always_correct (every sample right), always_wrong (none), mixed."""
    table = np.asarray(correct)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ConfigError(
            f"correct.shape={table.shape} is invalid: need a non-empty 2-D [instances, samples] "
            "table"
        )
    table = table.astype(bool)
    always_correct, always_wrong = table.all(axis=1), ~table.any(axis=1)
    return {
        "always_correct": always_correct,
        "always_wrong": always_wrong,
        "mixed": ~(always_correct | always_wrong),
    }


def aggregator_cost(
    cost: Any,
    aggregator: str,
    *,
    rounds_run: Any = None,
    critic_calls: Any = None,
    critic_cost: float = 0.0,
) -> np.ndarray:
    """Per-instance total cost [M] of what `aggregator` consumes (see the module docstring).

    Parallel: `cost` is [M, n]; "average" is the mean over the n samples (one call), every other
    aggregator the sum. Sequential: `cost` is [M, R] per round, `rounds_run` [M] the rounds each
    instance ran (entries after them are ignored, may be NaN) and `critic_calls` [M] (default 0)
    each cost `critic_cost`. The benchmark figure is the mean of the result over instances. An
    imperfect verifier's own scoring cost is not included; add it to `cost` if it matters."""
    if aggregator not in AGGREGATORS:
        raise ConfigError(f"aggregator={aggregator!r} is invalid: need one of {AGGREGATORS}")
    table = _check_cost(cost)
    m, n = table.shape
    if aggregator != "sequential":
        if rounds_run is not None or critic_calls is not None:
            raise ConfigError(
                f"aggregator={aggregator!r} is invalid with rounds_run/critic_calls: those "
                "belong to aggregator='sequential'"
            )
        return table.mean(axis=1) if aggregator == "average" else table.sum(axis=1)
    if rounds_run is None:
        raise ConfigError("rounds_run=None is invalid: aggregator='sequential' needs it [M]")
    ran = np.asarray(rounds_run)
    if ran.shape != (m,) or (ran < 0).any() or (ran > n).any():
        raise ConfigError(f"rounds_run={rounds_run!r} is invalid: need [M={m}] ints in [0, {n}]")
    calls = np.zeros(m) if critic_calls is None else np.asarray(critic_calls, dtype=float)
    if calls.shape != (m,) or (calls < 0).any():
        raise ConfigError(f"critic_calls={critic_calls!r} is invalid: need [M={m}] counts >= 0")
    used = np.arange(n)[None, :] < ran[:, None]
    return np.where(used, table, 0.0).sum(axis=1) + calls * float(critic_cost)


# --------------------------------------------------------------------------- FLOP counters


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an [m, k] @ [k, n] matmul: 2 m k n (one multiply and one add per term)."""
    return 2 * int(m) * int(k) * int(n)


def lm_decode_flops(
    n_params_non_embedding: int,
    vocab: int,
    hidden: int,
    layers: int,
    prompt_tokens: int,
    new_tokens: int,
    streams: int = 1,
    *,
    prefix_tokens: int | None = None,
    attn_dim: int | None = None,
) -> int:
    """Forward FLOPs to generate `new_tokens` after a prompt with a P-stream (ParScale) LM.

    With N = non-embedding backbone parameters, P = streams, H = hidden, V = vocab, L = layers,
    d = attn_dim (heads x head_dim, default H), K = prefix_tokens (default 48 if P > 1, else 0):

        T      = prompt_tokens + new_tokens - 1      positions run through the backbone (prefill
                                                     of the prompt, then every generated token
                                                     but the last; the prompt alone when
                                                     new_tokens = 0)
        FLOPs  = 2 N P T                              each of the P streams runs the backbone
               + 4 L d P (K T + T (T + 1) / 2)        causal attention, QK^T and AV: position t
                                                     attends its stream's K prefix slots and
                                                     tokens 0..t
               + new_tokens 2 (P H H + H P)           aggregator MLP [P H -> H -> P] on the P
                                                     final states (P > 1 only), once per
                                                     generated token; its weighted sum is
                                                     not counted
               + new_tokens 2 H V                     LM head on the aggregated state

    P = 1 is a plain decoder (no prefix, no aggregator); the total is then close to the usual
    2 N (prompt + new) plus attention and the head."""
    prefix = PARSCALE_PREFIX_TOKENS if prefix_tokens is None else prefix_tokens
    d = hidden if attn_dim is None else attn_dim
    minimum = {"n_params_non_embedding": 0, "vocab": 1, "hidden": 1, "layers": 1}
    minimum |= {"prompt_tokens": 1, "new_tokens": 0, "streams": 1, "prefix_tokens": 0}
    values = (n_params_non_embedding, vocab, hidden, layers, prompt_tokens, new_tokens, streams)
    for (name, low), value in zip(minimum.items(), (*values, prefix), strict=True):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid: need an integer >= {low}")
    if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
        raise ConfigError(f"attn_dim={d!r} is invalid: need an integer >= 1")
    n, v, h, n_layers, p, new = (int(x) for x in (*values[:4], streams, new_tokens))
    if prefix_tokens is None and p == 1:
        prefix = 0  # plain decoder: no learned prefix
    t = int(prompt_tokens) + max(new - 1, 0)
    backbone = 2 * n * p * t
    attention = 4 * n_layers * int(d) * p * (int(prefix) * t + t * (t + 1) // 2)
    aggregator = new * 2 * (p * h * h + h * p) if p > 1 else 0
    head = new * 2 * h * v
    return backbone + attention + aggregator + head
