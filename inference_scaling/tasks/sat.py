"""3SAT-Search after the paper's recipe, verified by evaluating the clauses.

Instances: random 3-CNF over n variables (4..15). Each clause takes 3 distinct variables
uniformly at random and negates each literal with probability 0.5; m = round(ratio * n) clauses.
Categories by clause/variable ratio: `easy_under` 2.13 (under-constrained, nearly always
satisfiable), `hard` 4.26 (the satisfiability phase transition), `easy_over` 8.52
(over-constrained, mostly unsatisfiable) and `hard_unique` 4.26 redrawn until exactly one
assignment satisfies it. Level `n<n>-<category>`.

Clauses are an (m, 3) int array of DIMACS literals: +v is variable v (1-based), -v its negation.
Ground truth comes from enumerating all 2^n assignments at once with numpy (2^15 x m booleans
at most). The answer is n truth values or "Unsatisfiable". Any satisfying assignment is correct,
not only a stored one: the verifier evaluates the clauses; "Unsatisfiable" is correct exactly
when the enumeration found no model. `solution` is the first model in enumeration order
(variable 1 most significant, False before True) or "UNSAT".
"""

from __future__ import annotations

import ast
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

RATIOS = {"easy_under": 2.13, "easy_over": 8.52, "hard": 4.26, "hard_unique": 4.26}
VARIABLES = tuple(range(4, 16))
LEVELS = tuple(f"n{n}-{category}" for n in VARIABLES for category in RATIOS)
UNSAT = "UNSAT"
# Rejection sampling bound for `hard_unique`; at ratio 4.26 roughly 1 draw in 5..20 qualifies.
MAX_DRAWS = 100_000
_UNSAT_WORDS = {"unsatisfiable", "unsat"}
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "t": True, "f": False}


def random_3cnf(rng: np.random.Generator, n_vars: int, n_clauses: int) -> np.ndarray:
    """(m, 3) int32 DIMACS literals: 3 distinct variables per clause, each negated w.p. 0.5."""
    variables = np.stack([rng.choice(n_vars, size=3, replace=False) for _ in range(n_clauses)])
    signs = np.where(rng.random((n_clauses, 3)) < 0.5, -1, 1)
    return (signs * (variables + 1)).astype(np.int32)


def all_assignments(n_vars: int) -> np.ndarray:
    """(2^n, n) bool: row k is k in binary, variable 1 the most significant bit."""
    k = np.arange(2**n_vars, dtype=np.int64)[:, None]
    return ((k >> np.arange(n_vars - 1, -1, -1)) & 1).astype(bool)


def clause_values(clauses: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """(..., m) bool: whether each clause holds under each assignment (..., n)."""
    clauses = np.asarray(clauses)
    values = assignments[..., np.abs(clauses) - 1]  # (..., m, 3)
    return np.any(values == (clauses > 0), axis=-1)


def satisfying_assignments(clauses: np.ndarray, n_vars: int) -> np.ndarray:
    """(k, n) bool: every model of the formula, in enumeration order."""
    assignments = all_assignments(n_vars)
    return assignments[np.all(clause_values(clauses, assignments), axis=-1)]


def parse_assignment(answer: Any) -> tuple[bool, ...] | str | None:
    """A tuple of bools or UNSAT from an answer: a sequence of bools / 0-1 / "True"-"False"
    strings, a text list like "[True, False]" or "1 0 1", or the word Unsatisfiable (any case,
    also inside <final_answer> tags); None otherwise."""
    if isinstance(answer, str):
        text = final_answer_text(answer).strip().strip(".").strip()
        if text.lower() in _UNSAT_WORDS:
            return UNSAT
        try:
            literal = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            literal = None
        if isinstance(literal, list | tuple):
            return parse_assignment(literal)
        tokens = [t for t in re.split(r"[\s,\[\]()]+", text) if t]
        if not tokens or not all(t.lower() in _BOOL_WORDS for t in tokens):
            return None
        return tuple(_BOOL_WORDS[t.lower()] for t in tokens)
    if isinstance(answer, np.ndarray) and answer.ndim != 1:
        return None
    if not isinstance(answer, list | tuple | np.ndarray):
        return None
    out = []
    for item in answer:
        if isinstance(item, str):
            word = item.strip().lower()
            if word not in _BOOL_WORDS:
                return None
            out.append(_BOOL_WORDS[word])
        elif isinstance(item, bool | np.bool_ | int | np.integer) and item in (0, 1):
            out.append(bool(item))
        else:
            return None
    return tuple(out)


class SatTask(VerifiableTask):
    """3SAT-Search with semantic verification."""

    name = "sat"
    levels = LEVELS

    def make_instance(self, rng: np.random.Generator, level: str, index: int) -> Instance:
        size, category = level.split("-", 1)
        n_vars = int(size[1:])
        n_clauses = round(RATIOS[category] * n_vars)
        for _ in range(MAX_DRAWS):
            clauses = random_3cnf(rng, n_vars, n_clauses)
            models = satisfying_assignments(clauses, n_vars)
            if category != "hard_unique" or len(models) == 1:
                break
        else:  # pragma: no cover - uniquely satisfiable formulas are common at this ratio
            raise RuntimeError(f"no uniquely satisfiable {level} formula in {MAX_DRAWS} draws")
        return Instance(
            instance_id=index,
            level=level,
            problem=frozen(clauses, np.int32),
            solution=tuple(bool(v) for v in models[0]) if len(models) else UNSAT,
            meta={
                "n_vars": n_vars,
                "n_clauses": n_clauses,
                "category": category,
                "ratio": RATIOS[category],
                "n_solutions": len(models),
            },
        )

    def canonicalize(self, answer: Any, instance: Instance | None = None) -> Hashable | None:
        return parse_assignment(answer)

    def verify(self, instance: Instance, answer: Any) -> Verdict:
        parsed = parse_assignment(answer)
        if parsed is None:
            return unparsed("not a list of truth values or 'Unsatisfiable'")
        clauses = np.asarray(instance.problem)
        n_vars = int(instance.meta["n_vars"])
        if parsed == UNSAT:
            # The count comes from enumerating every assignment at generation time.
            count = instance.meta.get("n_solutions")
            if count is None:
                count = len(satisfying_assignments(clauses, n_vars))
            satisfiable = count > 0
            feedback = {"claimed_unsat": True, "violated_clauses": None}
            return Verdict(True, True, not satisfiable, feedback, {"claimed_unsat": True})
        if len(parsed) != n_vars:
            feedback = {"reason": f"expected {n_vars} values, got {len(parsed)}"}
            return Verdict(True, False, False, feedback, {"claimed_unsat": False})
        holds = clause_values(clauses, np.asarray(parsed, dtype=bool))
        violated = [int(i) for i in np.flatnonzero(~holds)]
        feedback = {"claimed_unsat": False, "violated_clauses": violated}
        details = {"claimed_unsat": False, "n_violated": len(violated)}
        return Verdict(True, True, not violated, feedback, details)

    def prompt(self, instance: Instance) -> str:
        def literal(v: int) -> str:
            return f"x{v}" if v > 0 else f"NOT x{-v}"

        clauses = " AND ".join(
            "(" + " OR ".join(literal(int(v)) for v in row) + ")"
            for row in np.asarray(instance.problem)
        )
        n_vars = instance.meta["n_vars"]
        return (
            f"Variables x1..x{n_vars}. Formula: {clauses}\nGive a satisfying assignment as a "
            f"list of {n_vars} values True/False for x1..x{n_vars}, or say Unsatisfiable."
        )
