"""The N-sample engine: N samples per instance from a model, verified, as one tidy table.

Sample j of instance i is drawn with the key `fold_in(fold_in(root, instance_id), repeat_id)`,
so any subset of (instance, repeat) pairs re-runs bit-identically, in any batch layout. A
`Sampler` wraps one model at one compute setting (its `label`, e.g. "T=16,P=1") and one named
source of diversity; it answers a batch of (instance, key) pairs in one jitted call.

Sequential rounds use keys from a separate root, `fold_in(root, SEQUENTIAL_STREAM)`, folded the
same way with the round number in place of the repeat, so round 1 of a sequential run is not a
copy of repeat 0 of the parallel run.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from core.errors import ConfigError
from inference_scaling.ledger import SampleCost
from inference_scaling.tasks.base import Instance, Verdict, VerifiableTask, to_builtin

# Folded into the root key for sequential runs (any constant distinct from instance ids).
SEQUENTIAL_STREAM = 0x5E9


@dataclasses.dataclass(frozen=True)
class Sample:
    """One model answer: the raw `answer` in the task's format, the imperfect verifier's `score`
    (higher = more confident; NaN when the model has none) and its cost."""

    answer: Any
    score: float
    cost: SampleCost


class Sampler(abc.ABC):
    """One model at one compute setting with one named source of diversity."""

    # The compute knob in the output, e.g. "T=16,P=1" (ticks, streams) or "P=2" for an LM.
    label: str
    # What makes samples differ, named in the output: e.g. "dihedral", "temperature=0.7".
    diversity: str

    @abc.abstractmethod
    def sample(
        self,
        instances: Sequence[Instance],
        keys: jax.Array,
        contexts: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Sample]:
        """One answer per (instance, key) pair; `keys` is a [B] array of typed PRNG keys.

        `contexts` (sequential rounds) holds what the feedback level reveals for each pair:
        {} (F0), {"incorrect": True} (F1), + "wrong_answers" (F2), + "feedback" and
        "previous_answer" (F3); a sampler that cannot use a level ignores it."""


def sample_key(root: jax.Array, instance_id: int, repeat_id: int) -> jax.Array:
    """fold_in(fold_in(root, instance_id), repeat_id)."""
    return jax.random.fold_in(jax.random.fold_in(root, int(instance_id)), int(repeat_id))


def sample_keys(root: jax.Array, pairs: Sequence[tuple[int, int]]) -> jax.Array:
    """[B] keys of (instance_id, repeat_id) pairs."""
    if not pairs:
        raise ConfigError("pairs is invalid: need at least one (instance, repeat) pair")
    ids = np.asarray(pairs, np.uint32)
    fold = jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(root, i), r))
    return fold(ids[:, 0], ids[:, 1])


def root_key(seed: int) -> jax.Array:
    return jax.random.key(int(seed))


@dataclasses.dataclass
class SampleTable:
    """[instances x samples] results of one sampler on one task (rows in instance order)."""

    instances: list[Instance]
    correct: np.ndarray  # [M, n] bool
    answers: np.ndarray  # [M, n] object: canonical answers, None = parse failure
    scores: np.ndarray  # [M, n] float
    cost: np.ndarray  # [M, n] native cost (ticks / tokens)
    flops: np.ndarray  # [M, n]
    rows: list[dict[str, Any]]  # one record per sample (samples.jsonl)


def row(
    task: VerifiableTask,
    sampler: Sampler,
    instance: Instance,
    repeat_id: int,
    round_id: int,
    sample: Sample,
    verdict: Verdict,
    canonical: Any,
) -> dict[str, Any]:
    """The samples.jsonl record of one sample (Eureka's column names as aliases)."""
    unit = sample.cost.unit
    return {
        "task": task.name,
        "instance_id": instance.instance_id,
        "data_point_id": instance.instance_id,
        "repeat_id": repeat_id,
        "data_repeat_id": f"repeat_{repeat_id}",
        "round": round_id,
        "level": instance.level,
        "config": sampler.label,
        "diversity": sampler.diversity,
        "answer": task.answer_text(sample.answer),
        "canonical": to_builtin(canonical),
        "parsed": bool(verdict.parsed),
        "valid": bool(verdict.valid),
        "correct": bool(verdict.correct),
        unit: float(sample.cost.native),
        "streams": int(sample.cost.streams),
        "flops": float(sample.cost.flops),
        "score": None if not np.isfinite(sample.score) else float(sample.score),
        "details": to_builtin(dict(verdict.details)),
    }


def sample_padded(
    sampler: Sampler,
    instances: Sequence[Instance],
    keys: jax.Array,
    contexts: Sequence[Mapping[str, Any]] | None,
    size: int,
) -> list[Sample]:
    """`sampler.sample` on a batch padded to `size` rows (copies of the last row, dropped
    again), so every call of a sampler has one shape and compiles once."""
    real = len(instances)
    if real >= size:
        return sampler.sample(instances, keys, contexts)
    extra = size - real
    instances = [*instances, *([instances[-1]] * extra)]
    keys = jax.numpy.concatenate([keys, jax.numpy.repeat(keys[-1:], extra, axis=0)])
    if contexts is not None:
        contexts = [*contexts, *([contexts[-1]] * extra)]
    return sampler.sample(instances, keys, contexts)[:real]


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ConfigError(f"batch_size={size} is invalid: must be >= 1")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_parallel(
    task: VerifiableTask,
    sampler: Sampler,
    instances: Sequence[Instance],
    n: int,
    root: jax.Array,
    *,
    batch_size: int = 64,
    done: Mapping[tuple[int, int], Mapping[str, Any]] | None = None,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> SampleTable:
    """N samples of every instance, verified and canonicalised.

    `done` holds rows already written by an interrupted run with the same seed, keyed by
    (instance_id, repeat_id): those samples are not drawn again (the keys make the redrawn ones
    identical anyway). `on_batch` receives each new batch's rows (the report writer appends and
    flushes them), so an interrupted run leaves complete rows only.
    """
    if n < 1:
        raise ConfigError(f"n={n} is invalid: the number of samples N must be >= 1")
    if not instances:
        raise ConfigError("instances is invalid: need at least one instance")
    done = dict(done or {})
    index = {inst.instance_id: i for i, inst in enumerate(instances)}
    records: dict[tuple[int, int], dict[str, Any]] = {}
    for key, record in done.items():
        if key[0] in index and key[1] < n:
            records[key] = dict(record)
    todo = [
        (inst.instance_id, r)
        for inst in instances
        for r in range(n)
        if (inst.instance_id, r) not in records
    ]
    for pairs in batched(todo, batch_size):
        batch_instances = [instances[index[i]] for i, _ in pairs]
        keys = sample_keys(root, pairs)
        samples = sample_padded(sampler, batch_instances, keys, None, min(batch_size, len(todo)))
        new_rows = []
        for (instance_id, repeat_id), instance, sample in zip(
            pairs, batch_instances, samples, strict=True
        ):
            canonical = task.canonicalize(sample.answer, instance)
            verdict = task.verify(instance, sample.answer)
            record = row(task, sampler, instance, repeat_id, 1, sample, verdict, canonical)
            record["_canonical"] = canonical
            records[(instance_id, repeat_id)] = record
            new_rows.append(record)
        if on_batch is not None:
            on_batch([{k: v for k, v in r.items() if not k.startswith("_")} for r in new_rows])
    return _table(task, instances, n, records)


def _table(
    task: VerifiableTask,
    instances: Sequence[Instance],
    n: int,
    records: Mapping[tuple[int, int], Mapping[str, Any]],
) -> SampleTable:
    m = len(instances)
    correct = np.zeros((m, n), bool)
    answers = np.empty((m, n), object)
    scores = np.full((m, n), np.nan)
    cost = np.zeros((m, n))
    flops = np.zeros((m, n))
    rows = []
    for i, instance in enumerate(instances):
        for r in range(n):
            record = records[(instance.instance_id, r)]
            correct[i, r] = bool(record["correct"])
            canonical = record.get("_canonical", record.get("canonical"))
            answers[i, r] = _hashable(canonical) if record["parsed"] else None
            scores[i, r] = np.nan if record.get("score") is None else float(record["score"])
            unit = "ticks" if "ticks" in record else "tokens"
            cost[i, r] = float(record.get(unit, 0.0))
            flops[i, r] = float(record["flops"])
            rows.append({k: v for k, v in record.items() if not k.startswith("_")})
    return SampleTable(list(instances), correct, answers, scores, cost, flops, rows)


def _hashable(value: Any) -> Any:
    """JSON round trips turn tuples into lists; majority voting needs hashable answers."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value
