"""Cumulative parity, the CTM parity task: x in {-1, +1}^L, target[i] = (number of -1 in
x[0..i]) mod 2. The answer is the L target bits; it is correct only when every bit is right.

The problem is x as float32 (the CTM's input format). Level `L<n>` has sequence length n.
Feedback names the first wrong position, so a retry knows how much of its prefix to keep.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import numpy as np

from inference_scaling.tasks.base import (
    Instance,
    Verdict,
    VerifiableTask,
    final_answer_text,
    frozen,
    unparsed,
)

LENGTHS = (8, 16, 32, 64)
LEVELS = tuple(f"L{n}" for n in LENGTHS)
_WORDS = {"0": 0, "1": 1, "false": 0, "true": 1}


def parity_targets(x: np.ndarray) -> np.ndarray:
    """Cumulative parity of the -1 entries: {-1, +1}^L -> {0, 1}^L int32."""
    return (np.cumsum(np.asarray(x) < 0, axis=-1) % 2).astype(np.int32)


def parse_bits(answer: Any) -> tuple[int, ...] | None:
    """A tuple of 0/1 from bits / bools / integral floats, or from text ("0110", "0 1 1 0",
    "[1, 0]", true/false words); None when anything else appears."""
    if isinstance(answer, str):
        text = final_answer_text(answer).strip().strip("[]()").strip()
        tokens = [t for t in re.split(r"[\s,]+", text) if t]
        if len(tokens) == 1 and tokens[0].lower() not in _WORDS:
            tokens = list(tokens[0])
        if not all(t.lower() in _WORDS for t in tokens):
            return None
        return tuple(_WORDS[t.lower()] for t in tokens)
    try:
        values = np.asarray(answer)
    except (TypeError, ValueError):
        return None
    if values.ndim != 1 or values.dtype.kind not in "buif":
        return None
    if not np.all((values == 0) | (values == 1)):
        return None
    return tuple(int(v) for v in values)


class ParityTask(VerifiableTask):
    """Cumulative parity of a random +-1 sequence."""

    name = "parity"
    levels = LEVELS

    def make_instance(self, rng: np.random.Generator, level: str, index: int) -> Instance:
        length = int(level[1:])
        x = (2 * rng.integers(0, 2, size=length, dtype=np.int8) - 1).astype(np.float32)
        return Instance(
            instance_id=index,
            level=level,
            problem=frozen(x),
            solution=tuple(int(b) for b in parity_targets(x)),
            meta={"length": length, "negatives": int(np.sum(x < 0))},
        )

    def canonicalize(self, answer: Any, instance: Instance | None = None) -> Hashable | None:
        return parse_bits(answer)

    def verify(self, instance: Instance, answer: Any) -> Verdict:
        bits = parse_bits(answer)
        if bits is None:
            return unparsed("not a sequence of bits")
        truth = instance.solution
        if len(bits) != len(truth):
            feedback = {"reason": f"expected {len(truth)} bits, got {len(bits)}"}
            return Verdict(True, False, False, feedback, {"accuracy": 0.0, "per_position": ()})
        per_position = tuple(b == t for b, t in zip(bits, truth, strict=True))
        wrong = [i for i, ok in enumerate(per_position) if not ok]
        details = {"accuracy": sum(per_position) / len(truth), "per_position": per_position}
        feedback = {"first_wrong_position": wrong[0] if wrong else None}
        return Verdict(True, True, not wrong, feedback, details)

    def prompt(self, instance: Instance) -> str:
        signs = " ".join("-" if v < 0 else "+" for v in np.asarray(instance.problem))
        return (
            f"Signs: {signs}\nFor each position, the parity (0 even, 1 odd) of the number of "
            "'-' signs up to and including it:"
        )
