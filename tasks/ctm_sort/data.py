"""Sorting data: N reals x ~ N(0, 1), target = argsort(x) (the indices in increasing value order).

A seeded, random-access stream: example i of the stream with seed s is drawn from
`np.random.default_rng([s, i])`, so any example can be regenerated without replaying the stream
and a grain iterator position is all a checkpoint needs. Values are continuous, so ties (which
would make the target ambiguous) have probability zero.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

# Streams are effectively infinite; grain needs a length, and 2**62 indices never run out.
STREAM_LENGTH = 2**62


def sort_example(seed: int, index: int, n_values: int) -> dict[str, np.ndarray]:
    """Example `index` of the stream `seed`: inputs (N,) float32 ~ N(0, 1), targets (N,) int32,
    the argsort of the inputs (targets[k] = index of the k-th smallest value)."""
    rng = np.random.default_rng([seed, index])
    x = rng.standard_normal(n_values).astype(np.float32)
    return {"inputs": x, "targets": np.argsort(x, kind="stable").astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class SortSource:
    """grain random-access source: element i is `sort_example(seed, i, n_values)`."""

    n_values: int
    seed: int

    def __len__(self) -> int:
        return STREAM_LENGTH

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return sort_example(self.seed, int(index), self.n_values)


def sort_dataset(
    n_values: int, seed: int, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> grain.MapDataset:
    """Batches of this process's shard of the stream (examples shard_index, +shard_count, ...).

    Batch j of shard k holds the same examples whatever happened before, which keeps a restored
    iterator (and multi-host sharding) exact.
    """
    ds = grain.MapDataset.source(SortSource(n_values, seed))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=True)
