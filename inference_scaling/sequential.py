"""Sequential scaling with feedback: attempt, verify, and retry the unsolved instances.

Round r = 1..R: every instance not yet solved gets one model call (an attempt); the verifier
checks the answer; a correct instance leaves the loop; a wrong one gets feedback for round r + 1.
The feedback strength is a parameter:

    F0  no feedback: re-sample (parallel best-of-R with early stopping; the control)
    F1  binary: the last answer was incorrect
    F2  the list of distinct wrong answers so far (canonical when `canonicalize` is given)
    F3  the verifier-located error: the verdict's structured feedback and the previous answer

What the attempt sees in round r (``context``): round 1 always {}; later rounds
F0 {}, F1 {"incorrect": True}, F2 {"incorrect": True, "wrong_answers": [...]},
F3 {"incorrect": True, "feedback": <last verdict's feedback>, "previous_answer": <last answer>}.
Parse failures are not answers and are left out of F2's list.

Call counting (reported separately): one model call per round actually run for an instance, and
one critic call per failed round that is followed by a retry (F1-F3 only; F0 has no critic, and
the failure in the last round R is not turned into feedback). An instance solved in round r used
r model calls and r - 1 critic calls (F1-F3) or none (F0); an unsolved one R and R - 1 (or 0).
The verifier's check itself is not a call. "Solved within c calls" counts model + critic calls.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.errors import ConfigError

FEEDBACK_LEVELS: dict[str, str] = {
    "F0": "no feedback (re-sample)",
    "F1": "binary: incorrect",
    "F2": "the wrong answers so far",
    "F3": "the verifier-located error",
}

AttemptFn = Callable[[Any, int, dict[str, Any]], Any]
AttemptBatchFn = Callable[[list[Any], int, list[dict[str, Any]]], Sequence[Any]]
VerifyFn = Callable[[Any, Any], Any]


def check_feedback(feedback: Any) -> str:
    """The feedback level, one of FEEDBACK_LEVELS."""
    if feedback not in FEEDBACK_LEVELS:
        raise ConfigError(
            f"feedback={feedback!r} is invalid: need one of {', '.join(FEEDBACK_LEVELS)}"
        )
    return feedback


def check_rounds(rounds: Any) -> int:
    """The round budget R >= 1."""
    if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1:
        raise ConfigError(f"rounds={rounds!r} is invalid: need an integer >= 1")
    return int(rounds)


def calls_for_rounds(rounds: int, feedback: str) -> tuple[int, int]:
    """(model calls, critic calls) an instance uses to run `rounds` rounds: (r, r - 1) under
    F1-F3, (r, 0) under F0."""
    rounds, feedback = check_rounds(rounds), check_feedback(feedback)
    return rounds, 0 if feedback == "F0" else rounds - 1


@dataclass(frozen=True)
class RoundRecord:
    """One attempt: the instance's index, the round (1-based), the answer and its verdict."""

    instance: int
    round: int
    answer: Any
    parsed: bool
    valid: bool
    correct: bool
    feedback: Any

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict_fields(verdict: Any) -> tuple[bool, bool, bool, Any]:
    """(parsed, valid, correct, feedback) of a Verdict-like object or mapping."""
    if isinstance(verdict, Mapping):
        fields = (verdict["parsed"], verdict["valid"], verdict["correct"])
        return bool(fields[0]), bool(fields[1]), bool(fields[2]), verdict.get("feedback")
    fields = (verdict.parsed, verdict.valid, verdict.correct)
    return bool(fields[0]), bool(fields[1]), bool(fields[2]), getattr(verdict, "feedback", None)


def build_context(feedback: str, history: Sequence[tuple[Any, Any]]) -> dict[str, Any]:
    """What the next attempt may see, from this instance's failed rounds so far.

    `history` holds (wrong answer as listed, RoundRecord) per failed round in order; the listed
    answer is the canonical one (None for a parse failure). See the module docstring."""
    feedback = check_feedback(feedback)
    if not history or feedback == "F0":
        return {}
    context: dict[str, Any] = {"incorrect": True}
    if feedback == "F2":
        wrong: list[Any] = []
        for listed, _ in history:
            if listed is not None and listed not in wrong:
                wrong.append(listed)
        context["wrong_answers"] = wrong
    elif feedback == "F3":
        _, last = history[-1]
        context["feedback"] = last.feedback
        context["previous_answer"] = last.answer
    return context


@dataclass(frozen=True)
class SequentialResult:
    """The loop's records and per-instance outcome.

    solved_round [M]: the round that solved the instance, 0 if none within `rounds`;
    model_calls / critic_calls [M]: the calls each instance actually used."""

    feedback: str
    rounds: int
    records: tuple[RoundRecord, ...]
    solved_round: np.ndarray
    model_calls: np.ndarray
    critic_calls: np.ndarray

    @property
    def solved(self) -> np.ndarray:
        """[M] bool: solved within the round budget (best-of-R across rounds)."""
        return self.solved_round > 0

    def solved_by_round(self) -> dict[int, float]:
        """{r: fraction of all M instances solved within r rounds} for r = 1..R."""
        solved = self.solved_round
        return {r: float(((solved > 0) & (solved <= r)).mean()) for r in range(1, self.rounds + 1)}

    def solved_by_calls(self) -> dict[int, float]:
        """{c: fraction solved within a budget of c calls (model + critic)}, c for r = 1..R."""
        return {
            sum(calls_for_rounds(r, self.feedback)): value
            for r, value in self.solved_by_round().items()
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready: seq_solved@r, seq_calls@r (budget per instance), solved_by_calls, the
        calls actually made (totals and means per instance) and fail_rate over attempts."""
        calls = {}
        for r in range(1, self.rounds + 1):
            model, critic = calls_for_rounds(r, self.feedback)
            calls[str(r)] = {"model": model, "critic": critic, "total": model + critic}
        n_records = max(len(self.records), 1)
        return {
            "feedback": self.feedback,
            "rounds": self.rounds,
            "instances": int(self.solved_round.size),
            "seq_solved@r": {str(r): v for r, v in self.solved_by_round().items()},
            "seq_calls@r": calls,
            "solved_by_calls": {str(c): v for c, v in self.solved_by_calls().items()},
            "model_calls_total": int(self.model_calls.sum()),
            "critic_calls_total": int(self.critic_calls.sum()),
            "model_calls_mean": float(self.model_calls.mean()),
            "critic_calls_mean": float(self.critic_calls.mean()),
            "fail_rate": sum(not rec.parsed for rec in self.records) / n_records,
        }


def run_sequential_batched(
    attempt_batch: AttemptBatchFn,
    verify: VerifyFn,
    instances: Sequence[Any],
    rounds: int,
    feedback: str,
    canonicalize: Callable[[Any], Hashable | None] | None = None,
) -> SequentialResult:
    """The sequential loop with one batched model call per round.

    `attempt_batch(unsolved_instances, round, contexts) -> answers` (same length and order) is
    called once per round with only the instances still unsolved; `verify(instance, answer)`
    returns a Verdict-like object with .parsed, .valid, .correct, .feedback. `canonicalize` maps
    an answer to the form listed under F2 (identity when None)."""
    rounds, feedback = check_rounds(rounds), check_feedback(feedback)
    instances = list(instances)
    m = len(instances)
    if m < 1:
        raise ConfigError("instances=[] is invalid: need at least one instance")
    histories: list[list[tuple[Any, RoundRecord]]] = [[] for _ in range(m)]
    solved_round = np.zeros(m, dtype=np.int64)
    records: list[RoundRecord] = []
    active = list(range(m))
    for r in range(1, rounds + 1):
        if not active:
            break
        contexts = [build_context(feedback, histories[i]) for i in active]
        answers = list(attempt_batch([instances[i] for i in active], r, contexts))
        if len(answers) != len(active):
            raise ValueError(
                f"attempt_batch returned {len(answers)} answers for {len(active)} instances"
            )
        still = []
        for i, answer in zip(active, answers, strict=True):
            parsed, valid, correct, verdict_feedback = _verdict_fields(verify(instances[i], answer))
            record = RoundRecord(i, r, answer, parsed, valid, correct, verdict_feedback)
            records.append(record)
            if correct:
                solved_round[i] = r
                continue
            listed = None
            if parsed:
                listed = canonicalize(answer) if canonicalize is not None else answer
            histories[i].append((listed, record))
            still.append(i)
        active = still
    model_calls = np.array([len(histories[i]) + bool(solved_round[i]) for i in range(m)])
    critic_calls = np.zeros(m, dtype=np.int64) if feedback == "F0" else model_calls - 1
    return SequentialResult(
        feedback=feedback,
        rounds=rounds,
        records=tuple(records),
        solved_round=solved_round,
        model_calls=model_calls,
        critic_calls=critic_calls,
    )


def run_sequential(
    attempt: AttemptFn,
    verify: VerifyFn,
    instances: Sequence[Any],
    rounds: int,
    feedback: str,
    canonicalize: Callable[[Any], Hashable | None] | None = None,
) -> SequentialResult:
    """The sequential loop with `attempt(instance, round, context) -> answer` called for each
    unsolved instance; see `run_sequential_batched` for the rest."""

    def attempt_batch(batch: list[Any], r: int, contexts: list[dict[str, Any]]) -> list[Any]:
        return [attempt(x, r, c) for x, c in zip(batch, contexts, strict=True)]

    return run_sequential_batched(attempt_batch, verify, instances, rounds, feedback, canonicalize)
