"""The protocol every verifiable task follows: generate instances, canonicalise and verify answers.

A task is a generator plus a perfect verifier. Instances come from a key, a level and an index
only, so any instance can be rebuilt on its own and a larger set extends a smaller one. The
verifier says three things about an answer, from weakest to strongest: it could be read
(`parsed`), it is well formed for the task (`valid`) and it is right (`correct`, the one bit the
aggregators count). It also returns structured `feedback` for sequential retries (where the
answer went wrong, never what the right answer is) and secondary `details`.

`canonicalize` maps an answer to a hashable form such that equal forms are equivalent answers;
majority vote counts votes per canonical form, so e.g. a rotated TSP tour votes with the original.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
import zlib
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from core.errors import ConfigError


def deep_equal(a: Any, b: Any) -> bool:
    """Structural equality that also compares numpy arrays (shape, dtype and values)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        return all(deep_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """One problem of a task. Arrays in it are read-only; treat `meta` as read-only too.

    `solution` is one correct answer in canonical form, so `verify(instance, instance.solution)`
    is always correct (an oracle "model" for tests). `meta` holds JSON-able facts about the
    instance (difficulty measures, sizes) for per-level reports.
    """

    instance_id: int
    level: str
    problem: Any
    solution: Any
    meta: Mapping[str, Any]

    def __eq__(self, other: object) -> bool:
        # Generated dataclass equality would call bool() on numpy array comparisons.
        if not isinstance(other, Instance):
            return NotImplemented
        return all(
            deep_equal(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays and dicts


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the verifier says about one answer; `correct` implies `valid` implies `parsed`."""

    parsed: bool
    valid: bool
    correct: bool
    feedback: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def unparsed(reason: str = "unparseable answer", **details: Any) -> Verdict:
    """The verdict of an answer that could not be read; it counts as wrong everywhere."""
    return Verdict(False, False, False, {"reason": reason}, details)


def frozen(array: Any, dtype: Any = None) -> np.ndarray:
    """A read-only numpy copy: instances are shared between samples and must not change."""
    out = np.array(array, dtype=dtype)
    out.setflags(write=False)
    return out


def key_words(key: Any) -> tuple[int, ...]:
    """The uint32 words of a jax PRNG key (typed or raw) or of an int seed.

    An int seed s means `jax.random.key(s)`, so `generate(s, ...)` and
    `generate(jax.random.key(s), ...)` give the same instances.
    """
    import jax

    if isinstance(key, bool | np.bool_):
        raise ConfigError(f"key={key!r} is invalid: expected a jax PRNG key or an int seed")
    if isinstance(key, int | np.integer):
        try:
            key = jax.random.key(int(key))
        except (OverflowError, ValueError) as e:
            raise ConfigError(f"key={key!r} is invalid: the int seed must fit 64 bits") from e
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ConfigError(f"key shape {key.shape} is invalid: expected a single PRNG key")
        key = jax.random.key_data(key)
    data = np.asarray(key)
    if data.ndim != 1 or data.size == 0 or data.dtype.kind not in "ui":
        raise ConfigError(
            f"key of shape {data.shape} and dtype {data.dtype} is invalid: expected a jax PRNG "
            "key, a raw uint32 key of shape (k,) or an int seed"
        )
    return tuple(int(x) for x in data.astype(np.uint32))


def instance_rng(words: tuple[int, ...], task: str, level: str, index: int) -> np.random.Generator:
    """The numpy generator of instance `index` from the key's words (`key_words`): a function
    of (key, task, level, index) only, so instance i is the same whatever n is."""
    label = zlib.crc32(f"{task}/{level}".encode())
    return np.random.default_rng([*words, label, int(index)])


_FINAL_ANSWER = re.compile(r"<final_answer>(.*?)</final_answer>", re.DOTALL | re.IGNORECASE)


def final_answer_text(text: str) -> str:
    """The content of the last `<final_answer>...</final_answer>` block, else the whole text
    (the paper's LM prompts ask for the answer inside such tags)."""
    blocks = _FINAL_ANSWER.findall(text)
    return (blocks[-1] if blocks else text).strip()


def to_builtin(value: Any) -> Any:
    """numpy scalars / arrays and tuples -> plain python values json can write."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_builtin(v) for v in value]
    return value


class VerifiableTask(abc.ABC):
    """A task with a generator and a perfect verifier (see the module docstring).

    Subclasses set `name` and `levels` (easiest first) and implement `make_instance`,
    `canonicalize`, `verify` and `prompt`; `generate` validates its arguments and seeds each
    instance from (key, level, index).
    """

    name: str = ""
    levels: tuple[str, ...] = ()

    def check_level(self, level: str) -> None:
        """ConfigError unless `level` is one of this task's levels."""
        if level not in self.levels:
            raise ConfigError(
                f"level={level!r} is invalid: task {self.name!r} has levels {list(self.levels)}"
            )

    def generate(self, key: Any, level: str, n: int) -> list[Instance]:
        """n instances of `level`; instance i depends on (key, level, i) only."""
        self.check_level(level)
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ConfigError(f"n={n!r} is invalid: expected an integer >= 1")
        words = key_words(key)
        return [
            self.make_instance(instance_rng(words, self.name, level, i), level, i)
            for i in range(int(n))
        ]

    @abc.abstractmethod
    def make_instance(self, rng: np.random.Generator, level: str, index: int) -> Instance:
        """Instance `index` of a (validated) level from its own generator."""

    @abc.abstractmethod
    def canonicalize(self, answer: Any, instance: Instance | None = None) -> Hashable | None:
        """Hashable canonical form of an answer, None when it cannot be read. `instance` is
        optional; tasks whose equivalence depends on the instance (the maze) merge more with it.
        """

    @abc.abstractmethod
    def verify(self, instance: Instance, answer: Any) -> Verdict:
        """Check an answer (model output or text) against an instance."""

    @abc.abstractmethod
    def prompt(self, instance: Instance) -> str:
        """The instance as text: an LM prompt, or a readable rendering for non-LM tasks."""

    def answer_text(self, answer: Any) -> str:
        """A text form of an answer for logs: the canonical form as JSON when it parses, else
        the raw answer as given (so failures stay inspectable)."""
        canonical = self.canonicalize(answer)
        if canonical is None:
            return answer if isinstance(answer, str) else repr(to_builtin(answer))
        return json.dumps(to_builtin(canonical))
