"""Multi-digit addition and multiplication as text, for a language model with an exact checker.

Problem text "a+b=" or "a*b="; the answer is the integer. Level `add:d` / `mul:d` has both
operands with exactly d digits (leading digit non-zero; 1-digit operands are 0..9), uniform over
that range. Difficulty also grows with the carries of the column addition, which `meta` records
(None for multiplication) and the `carries=` option fixes by rejection sampling.

Feedback for a wrong answer names it (for "list the wrong answers so far" retries) and the
first wrong digit counted from the most significant one (for "which digit is wrong" retries).
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import numpy as np

from core.errors import ConfigError
from inference_scaling.tasks.base import Instance, Verdict, VerifiableTask, unparsed

OPERATORS = {"add": "+", "mul": "*"}
MAX_DIGITS = {"add": 8, "mul": 4}
LEVELS = tuple(f"{op}:{d}" for op, top in MAX_DIGITS.items() for d in range(1, top + 1))
# Rejection sampling bound for the carries filter; the rarest count (all or no carries on
# 8 digits) takes a few hundred draws.
MAX_DRAWS = 100_000
_INTEGER = re.compile(r"[+-]?\d+")


def count_carries(a: int, b: int) -> int:
    """Carries of the column addition of a and b (non-negative): 999 + 1 has 3."""
    if a < 0 or b < 0:
        raise ValueError(f"count_carries needs non-negative operands, got {a} and {b}")
    carry = count = 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        count += carry
        a, b = a // 10, b // 10
    return count


def first_wrong_digit(answer: int, truth: int) -> int | None:
    """Index (from the most significant digit) of the first character of `answer` that differs
    from `truth`'s decimal form; the shorter length when one is a prefix; None when equal."""
    got, want = str(answer), str(truth)
    if got == want:
        return None
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return i
    return min(len(got), len(want))


def parse_integer(answer: Any) -> int | None:
    """An int from an int (not bool), a numpy integer scalar, or text that is one integer with
    optional sign and surrounding whitespace; None otherwise ("5a9", "57.0", "x=579")."""
    if isinstance(answer, str):
        text = answer.strip()
        return int(text) if _INTEGER.fullmatch(text) else None
    if isinstance(answer, bool | np.bool_):
        return None
    if isinstance(answer, int):
        return answer
    try:
        value = np.asarray(answer)
    except (TypeError, ValueError):
        return None
    return int(value) if value.ndim == 0 and value.dtype.kind in "iu" else None


def parse_level(level: str) -> tuple[str, int]:
    """'add:3' -> ('add', 3)."""
    op, digits = level.split(":")
    return op, int(digits)


class ArithmeticTask(VerifiableTask):
    """a+b / a*b with d-digit operands; `carries` keeps only additions with that many carries."""

    name = "arithmetic"
    levels = LEVELS

    def __init__(self, carries: int | None = None) -> None:
        if carries is not None and (
            isinstance(carries, bool) or not isinstance(carries, int) or carries < 0
        ):
            raise ConfigError(f"carries={carries!r} is invalid: expected None or an int >= 0")
        self.carries = carries

    def make_instance(self, rng: np.random.Generator, level: str, index: int) -> Instance:
        op, digits = parse_level(level)
        if self.carries is not None and (op != "add" or self.carries > digits):
            raise ConfigError(
                f"carries={self.carries} is invalid for level {level}: the filter applies to "
                f"'add' levels and allows 0..{digits} there"
            )
        lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
        for _ in range(MAX_DRAWS):
            a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
            carries = count_carries(a, b) if op == "add" else None
            if self.carries is None or carries == self.carries:
                break
        else:  # pragma: no cover - every allowed count is common enough
            raise RuntimeError(f"no {level} pair with {self.carries} carries in {MAX_DRAWS}")
        return Instance(
            instance_id=index,
            level=level,
            problem=f"{a}{OPERATORS[op]}{b}=",
            solution=a + b if op == "add" else a * b,
            meta={"op": op, "digits": digits, "a": a, "b": b, "carries": carries},
        )

    def canonicalize(self, answer: Any, instance: Instance | None = None) -> Hashable | None:
        return parse_integer(answer)

    def verify(self, instance: Instance, answer: Any) -> Verdict:
        value = parse_integer(answer)
        if value is None:
            return unparsed("not an integer")
        correct = value == instance.solution
        feedback = {
            "wrong_answer": None if correct else value,
            "first_wrong_digit": first_wrong_digit(value, instance.solution),
        }
        return Verdict(True, True, correct, feedback, {"digits": len(str(abs(value)))})

    def prompt(self, instance: Instance) -> str:
        return instance.problem

    def answer_text(self, answer: Any) -> str:
        value = parse_integer(answer)
        if value is None:
            return answer if isinstance(answer, str) else repr(answer)
        return str(value)
