"""The inference-scaling statistics: aggregators and curves against closed forms and brute-force
subset enumeration, the sequential loop against parallel best-of-R, and the cost ledger."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, NamedTuple

import numpy as np
import pytest

from core.errors import ConfigError
from inference_scaling import aggregators as agg
from inference_scaling import ledger
from inference_scaling.sequential import (
    build_context,
    calls_for_rounds,
    run_sequential,
    run_sequential_batched,
)


class Verdict(NamedTuple):
    parsed: bool
    valid: bool
    correct: bool
    feedback: Any = None


def bernoulli_table(m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Instances with p_i ~ U(0, 1) and n i.i.d. Bernoulli(p_i) samples each."""
    rng = np.random.default_rng(seed)
    p = rng.random(m)
    return p, rng.random((m, n)) < p[:, None]


def within_sampling_error(estimates: np.ndarray, targets: np.ndarray, sigmas: float = 4.0) -> bool:
    """Mean of (estimate_i - target_i) within `sigmas` standard errors of zero."""
    diff = np.asarray(estimates, float) - np.asarray(targets, float)
    return abs(diff.mean()) <= sigmas * diff.std() / math.sqrt(diff.size) + 1e-12


def binomial_majority(p: np.ndarray, k: int) -> np.ndarray:
    """P(Bin(k, p) > k / 2) + 1/2 P(Bin(k, p) = k / 2): majority vote with a fair tie-break."""
    out = np.zeros_like(p)
    for j in range(k + 1):
        mass = math.comb(k, j) * p**j * (1 - p) ** (k - j)
        out += mass if 2 * j > k else (0.5 * mass if 2 * j == k else 0.0)
    return out


# --------------------------------------------------------------------------- closed forms


def test_bernoulli_model_matches_closed_forms():
    p, correct = bernoulli_table(3000, 8, seed=1)
    c, n = correct.sum(axis=1), correct.shape[1]
    for k in range(1, n + 1):
        assert within_sampling_error(agg.pass_at_k(c, n, k), 1 - (1 - p) ** k), k
        assert within_sampling_error(agg.worst_at_k(c, n, k), p**k), k
    assert within_sampling_error(agg.average(correct).per_instance, p)
    assert within_sampling_error(agg.best_of_n(correct), 1 - (1 - p) ** n)
    assert within_sampling_error(agg.worst_of_n(correct), p**n)
    assert agg.average(correct).accuracy == pytest.approx(correct.mean())


def test_majority_on_a_binary_answer_space_is_the_binomial_tail():
    p, correct = bernoulli_table(3000, 7, seed=2)
    answers = np.where(correct, "right", "wrong").astype(object)
    for k in range(1, 8):  # odd k: the strict tail; even k: plus half the tie mass
        assert within_sampling_error(agg.maj_at_k(answers, correct, k), binomial_majority(p, k))
    voted, _ = agg.majority_vote(answers, correct)
    assert within_sampling_error(voted, binomial_majority(p, 7))


def test_multiple_choice_guesser_reaches_the_guessing_floor():
    rng = np.random.default_rng(3)
    m, n, options = 4000, 8, 4
    keys = rng.integers(0, options, m)
    answers = rng.integers(0, options, (m, n))
    correct = answers == keys[:, None]
    floor = lambda k: np.full(m, 1 - (1 - 1 / options) ** k)
    assert within_sampling_error(agg.best_of_n(correct), floor(n))
    for k, value in agg.pass_at_k_curve(correct, range(1, n + 1)).items():
        assert value == pytest.approx(floor(k)[0], abs=0.03), k


def test_deterministic_model_collapses_every_aggregator_and_flattens_every_curve():
    rng = np.random.default_rng(4)
    kinds = rng.integers(0, 3, 30)  # 0 right, 1 wrong, 2 parse failure
    answers = np.empty((30, 6), dtype=object)
    for i, kind in enumerate(kinds):
        answers[i] = [("42", "17", None)[kind]] * 6
    correct = np.repeat((kinds == 0)[:, None], 6, axis=1)
    report = agg.summarize(correct, answers, ks=range(1, 7), n_boot=50)
    value = float((kinds == 0).mean())
    for key in ("acc_avg", "acc_mv", "acc_bon", "acc_won"):
        assert report[key] == pytest.approx(value), key
    for curve in ("pass@k", "worst@k", "maj@k"):
        assert report[curve] == pytest.approx({str(k): value for k in range(1, 7)}), curve
    assert report["gap_reliability"] == pytest.approx(0.0)
    assert report["headroom"] == pytest.approx(0.0)
    assert report["acc_avg_std"] == pytest.approx(0.0)
    assert report["fail_rate"] == pytest.approx(float((kinds == 2).mean()))


# --------------------------------------------------------------------------- subset enumeration


def test_unbiased_estimators_equal_subset_enumeration():
    _, correct = bernoulli_table(40, 6, seed=5)
    c = correct.sum(axis=1)
    for k in range(1, 7):
        combos = list(itertools.combinations(range(6), k))
        best = np.array([np.mean([row[list(s)].any() for s in combos]) for row in correct])
        worst = np.array([np.mean([row[list(s)].all() for s in combos]) for row in correct])
        np.testing.assert_allclose(agg.pass_at_k(c, 6, k), best, atol=1e-12)
        np.testing.assert_allclose(agg.worst_at_k(c, 6, k), worst, atol=1e-12)
    assert agg.pass_at_k(3, 6, 4) == pytest.approx(1.0)  # n - c < k: a correct one is always in
    assert agg.worst_at_k(2, 6, 3) == 0.0


def brute_force_maj(answers: np.ndarray, correct: np.ndarray, k: int, seed: int) -> np.ndarray:
    """maj@k by enumerating subsets, with the documented tie rule written out plainly."""
    out = []
    for i, row in enumerate(answers):
        order = list(dict.fromkeys(a for a in row if a is not None))  # first appearance
        truth = {a: bool(correct[i][list(row).index(a)]) for a in order}
        votes, tied_lists = [], []
        for subset in itertools.combinations(range(len(row)), k):
            counts = {a: 0 for a in order}
            for j in subset:
                if row[j] is not None:
                    counts[row[j]] += 1
            top = max(counts.values(), default=0)
            tied = [a for a in order if counts[a] == top] if top else []
            votes.append(tied)
            if len(tied) > 1:
                tied_lists.append(tied)
        draws = iter(np.random.default_rng([seed, i]).integers(0, [len(t) for t in tied_lists]))
        picked = [t[next(draws)] if len(t) > 1 else (t[0] if t else None) for t in votes]
        out.append(np.mean([a is not None and truth[a] for a in picked]))
    return np.array(out)


def test_maj_at_k_exact_mode_equals_enumeration_and_majority_vote_at_n():
    rng = np.random.default_rng(6)
    alphabet = np.array(["a", "b", "c", None], dtype=object)
    answers = alphabet[rng.integers(0, 4, (60, 6))]
    correct = answers == "a"
    for k in range(1, 7):
        got = agg.maj_at_k(answers, correct, k, seed=3)
        np.testing.assert_allclose(got, brute_force_maj(answers, correct, k, 3), atol=1e-12)
    voted_correct, voted = agg.majority_vote(answers, correct, seed=3)
    np.testing.assert_array_equal(agg.maj_at_k(answers, correct, 6, seed=3), voted_correct)
    for row, winner in zip(answers, voted, strict=True):
        parsed = [a for a in row if a is not None]
        if parsed:
            assert parsed.count(winner) == max(parsed.count(a) for a in parsed)
        else:
            assert winner is None


def test_maj_at_k_sampled_mode_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(7)
    answers = np.array(["x", "y", "z"], dtype=object)[rng.integers(0, 3, (200, 12))]
    correct = answers == "x"
    exact = agg.maj_at_k(answers, correct, 6)  # C(12, 6) = 924 subsets
    sampled = agg.maj_at_k(answers, correct, 6, seed=1, max_subsets=300)
    np.testing.assert_array_equal(sampled, agg.maj_at_k(answers, correct, 6, 1, 300))
    assert np.abs(sampled - exact).max() < 0.15
    assert abs(sampled.mean() - exact.mean()) < 0.01
    one = agg.maj_at_k(answers[5:6], correct[5:6], 6, 1, 300, instance_ids=[5])
    assert one[0] == sampled[5]


# --------------------------------------------------------------------------- ties and failures


def test_majority_ties_are_seeded_reproducible_and_independent_of_other_rows():
    m = 400
    answers = np.array([["a", "b", "b", "a", None]] * m, dtype=object)  # every row a 2-2 tie
    correct = answers == "a"
    first, voted = agg.majority_vote(answers, correct, seed=11)
    again, _ = agg.majority_vote(answers, correct, seed=11)
    other, _ = agg.majority_vote(answers, correct, seed=12)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert set(voted) == {"a", "b"}
    assert abs(first.mean() - 0.5) < 4 * 0.5 / math.sqrt(m)
    perm = np.random.default_rng(0).permutation(m)
    shuffled, _ = agg.majority_vote(answers[perm], correct[perm], seed=11, instance_ids=perm)
    np.testing.assert_array_equal(shuffled, first[perm])
    alone, _ = agg.majority_vote(answers[7:8], correct[7:8], seed=11, instance_ids=[7])
    assert alone[0] == first[7]


def test_failures_count_wrong_everywhere_and_denominators_are_m():
    answers = np.array(
        [[None, None, None], ["1", None, "1"], ["2", "3", None], [None, None, "9"]], dtype=object
    )
    correct = np.array([[0, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
    report = agg.summarize(correct, answers, ks=[1, 2, 3], n_boot=20)
    assert report["instances"] == 4
    assert report["fail_rate"] == pytest.approx(7 / 12)
    assert report["acc_avg"] == pytest.approx(3 / 12)
    assert report["acc_bon"] == pytest.approx(2 / 4)
    assert report["acc_won"] == 0.0
    # Row 2 is a 1-1 tie between "2" (wrong) and "3" (right); row 1 votes "1".
    voted, winners = agg.majority_vote(answers, correct)
    assert winners[0] is None and winners[1] == "1" and winners[3] == "9"
    assert report["acc_mv"] == pytest.approx((1 + int(voted[2])) / 4)
    # maj@1 = average: one sample, a failure votes for nothing.
    assert report["maj@k"]["1"] == pytest.approx(report["acc_avg"])
    with pytest.raises(ConfigError, match=r"correct\[0, 1\]"):
        agg.majority_vote(answers, np.array([[0, 1, 0]] + [[0, 0, 0]] * 3, dtype=bool))
    with pytest.raises(ConfigError, match=r"correct\[0\] is invalid"):
        agg.majority_vote([["1", "1", "1"]] * 4, np.array([[1, 0, 1]] + [[0, 0, 0]] * 3))


def test_summarize_is_json_ready_and_consistent():
    _, correct = bernoulli_table(50, 5, seed=8)
    answers = np.where(correct, "ok", "no").astype(object)
    scores = np.random.default_rng(8).random(correct.shape)
    report = agg.summarize(correct, answers, scores=scores, n_boot=100)
    json.dumps(report, allow_nan=False)
    assert list(report["pass@k"]) == ["1", "2", "4", "5"]
    assert report["maj@k"]["5"] == pytest.approx(report["acc_mv"])
    assert report["pass@k"]["5"] == pytest.approx(report["acc_bon"])
    assert report["worst@k"]["5"] == pytest.approx(report["acc_won"])
    assert report["pass@k"]["1"] == pytest.approx(report["acc_avg"])
    assert report["acc_avg_std"] == pytest.approx(np.std(correct.mean(axis=0), ddof=1))
    assert report["gap_verifier"] == pytest.approx(report["acc_bon"] - report["acc_sel"])
    for key in ("acc_avg", "acc_mv", "acc_bon", "acc_won", "acc_sel"):
        low, high = report["ci"][key]
        assert low <= report[key] <= high, key


def test_selection_gaps_and_bootstrap_on_a_hand_table():
    correct = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=bool)
    scores = np.array([[0.1, 0.9, 0.2], [0.5, 0.5, np.nan], [1, 2, 3], [0, 0, 0]])
    np.testing.assert_array_equal(agg.selected_best_of_n(correct, scores), [0, 0, 0, 1])
    assert agg.verifier_gap(correct, scores) == pytest.approx(0.75 - 0.25)
    assert agg.reliability_gap(correct) == pytest.approx(6 / 12 - 1 / 4)
    assert agg.headroom(correct) == pytest.approx(3 / 4 - 6 / 12)
    assert agg.conventional_to_reasoning_gap(weak_best=0.6, strong_average=0.7) == pytest.approx(
        0.1
    )
    assert agg.bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))
    values = (np.random.default_rng(9).random(2000) < 0.3).astype(float)
    low, high = agg.bootstrap_ci(values, n_boot=500, seed=1)
    assert (low, high) == agg.bootstrap_ci(values, n_boot=500, seed=1)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * values.std() / math.sqrt(2000), rel=0.2)
    average = agg.average(correct)
    np.testing.assert_allclose(average.per_repeat, [0.5, 0.5, 0.5])
    assert average.repeat_std == 0.0 and average.repeat_mean == pytest.approx(0.5)


def test_bad_statistics_inputs_name_the_field():
    with pytest.raises(ConfigError, match="k=7"):
        agg.pass_at_k(2, 6, 7)
    with pytest.raises(ConfigError, match="k=0"):
        agg.worst_at_k(2, 6, 0)
    with pytest.raises(ConfigError, match="n=0"):
        agg.pass_at_k(0, 0, 1)
    with pytest.raises(ConfigError, match="c="):
        agg.pass_at_k(7, 6, 1)
    with pytest.raises(ConfigError, match="n=0"):
        agg.average(np.zeros((3, 0), bool))
    table = np.zeros((3, 4), bool)
    with pytest.raises(ConfigError, match="k=5"):
        agg.maj_at_k(np.full((3, 4), "a", dtype=object), table, 5)
    with pytest.raises(ConfigError, match="k=9"):
        agg.summarize(table, np.full((3, 4), "a", dtype=object), ks=[9])
    with pytest.raises(ConfigError, match="answers.shape"):
        agg.majority_vote(np.full((3, 5), "a", dtype=object), table)
    with pytest.raises(ConfigError, match="alpha"):
        agg.bootstrap_ci([1.0, 0.0], alpha=1.5)


# --------------------------------------------------------------------------- sequential


def bernoulli_attempt(seed: int):
    def attempt(instance: tuple[int, float], r: int, context: dict) -> str:
        index, p = instance
        return "right" if np.random.default_rng([seed, index, r]).random() < p else "wrong"

    return attempt


def verify_right(instance: Any, answer: Any) -> Verdict:
    return Verdict(answer is not None, answer is not None, answer == "right")


def test_f0_sequential_is_parallel_best_of_r_in_distribution():
    m, rounds = 2000, 4
    p = np.random.default_rng(10).random(m)
    instances = list(enumerate(p))
    result = run_sequential(bernoulli_attempt(0), verify_right, instances, rounds, "F0")

    def parallel(seed: int) -> np.ndarray:
        attempt = bernoulli_attempt(seed)
        return np.array(
            [[attempt(x, r, {}) == "right" for r in range(1, rounds + 1)] for x in instances]
        )

    # The same draws as a parallel table: identical instance by instance.
    np.testing.assert_array_equal(result.solved, agg.best_of_n(parallel(0)))
    independent = agg.best_of_n(parallel(1))
    for r, value in result.solved_by_round().items():
        target = 1 - (1 - p) ** r
        solved_r = (result.solved_round > 0) & (result.solved_round <= r)
        assert within_sampling_error(solved_r, target), r
        assert value == pytest.approx(solved_r.mean())
    diff = result.solved.astype(float) - independent
    assert abs(diff.mean()) <= 4 * diff.std() / math.sqrt(m)
    # Calls: one model call per round run, no critic under F0.
    expected_calls = np.where(result.solved, result.solved_round, rounds)
    np.testing.assert_array_equal(result.model_calls, expected_calls)
    assert not result.critic_calls.any()
    assert len(result.records) == expected_calls.sum()
    assert list(result.solved_by_calls()) == [1, 2, 3, 4]


def test_f1_counts_one_critic_call_per_retried_failure():
    answers = {0: ["wrong", "right"], 1: ["wrong", "wrong", "wrong"], 2: ["right"]}
    seen: list[tuple[int, int, dict]] = []

    def attempt(instance: int, r: int, context: dict) -> str:
        seen.append((instance, r, context))
        return answers[instance][r - 1]

    result = run_sequential(attempt, verify_right, [0, 1, 2], 3, "F1")
    assert [s for s in seen if s[1] == 1] == [(0, 1, {}), (1, 1, {}), (2, 1, {})]
    assert all(ctx == {"incorrect": True} for _, r, ctx in seen if r > 1)
    np.testing.assert_array_equal(result.solved_round, [2, 0, 1])
    np.testing.assert_array_equal(result.model_calls, [2, 3, 1])
    np.testing.assert_array_equal(result.critic_calls, [1, 2, 0])
    summary = result.summary()
    assert summary["seq_solved@r"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 2 / 3})
    assert summary["solved_by_calls"] == pytest.approx({"1": 1 / 3, "3": 2 / 3, "5": 2 / 3})
    assert summary["seq_calls@r"]["3"] == {"model": 3, "critic": 2, "total": 5}
    assert summary["model_calls_total"] == 6 and summary["critic_calls_total"] == 3
    assert calls_for_rounds(3, "F0") == (3, 0)
    json.dumps(summary, allow_nan=False)


def test_f2_passes_the_distinct_canonical_wrong_answers_so_far():
    sequence = ["5", " 5", "garbage", "7", "9"]
    seen: list[dict] = []

    def attempt(instance: str, r: int, context: dict) -> str:
        seen.append(context)
        return sequence[r - 1]

    def verify(instance: str, answer: str) -> Verdict:
        parsed = answer.strip().isdigit()
        return Verdict(parsed, parsed, parsed and answer.strip() == instance)

    result = run_sequential(attempt, verify, ["9"], 5, "F2", canonicalize=str.strip)
    assert seen == [
        {},
        {"incorrect": True, "wrong_answers": ["5"]},
        {"incorrect": True, "wrong_answers": ["5"]},
        {"incorrect": True, "wrong_answers": ["5"]},
        {"incorrect": True, "wrong_answers": ["5", "7"]},
    ]
    assert result.solved_round[0] == 5
    assert (result.model_calls[0], result.critic_calls[0]) == (5, 4)
    assert [rec.parsed for rec in result.records] == [True, True, False, True, True]
    assert result.summary()["fail_rate"] == pytest.approx(1 / 5)


def test_f3_passes_the_verifier_feedback_and_the_previous_answer():
    seen: list[dict] = []

    def attempt(instance: str, r: int, context: dict) -> str:
        seen.append(context)
        return ["1234", "1294", "1299"][r - 1]

    def verify(instance: str, answer: str) -> Verdict:
        wrong = [i for i, (a, b) in enumerate(zip(answer, instance, strict=True)) if a != b]
        feedback = {"first_error": wrong[0]} if wrong else {}
        return Verdict(True, True, not wrong, feedback)

    result = run_sequential(attempt, verify, ["1299"], 3, "F3")
    assert seen == [
        {},
        {"incorrect": True, "feedback": {"first_error": 2}, "previous_answer": "1234"},
        {"incorrect": True, "feedback": {"first_error": 3}, "previous_answer": "1294"},
    ]
    assert result.solved_round[0] == 3
    assert result.records[0].feedback == {"first_error": 2}
    assert result.records[0].as_dict()["round"] == 1


def test_batched_attempt_sees_only_the_unsolved_instances():
    batches: list[tuple[list[int], int]] = []

    def attempt_batch(batch: list[int], r: int, contexts: list[dict]) -> list[str]:
        batches.append((list(batch), r))
        return ["right" if x <= r else "wrong" for x in batch]

    result = run_sequential_batched(attempt_batch, verify_right, [1, 2, 3, 5], 3, "F0")
    assert batches == [([1, 2, 3, 5], 1), ([2, 3, 5], 2), ([3, 5], 3)]
    np.testing.assert_array_equal(result.solved_round, [1, 2, 3, 0])
    with pytest.raises(ValueError, match="2 answers for 4"):
        run_sequential_batched(lambda b, r, c: ["x", "y"], verify_right, [1, 2, 3, 4], 1, "F0")


def test_bad_sequential_inputs_name_the_field():
    attempt = bernoulli_attempt(0)
    with pytest.raises(ConfigError, match="feedback='F4'.*F0, F1, F2, F3"):
        run_sequential(attempt, verify_right, [(0, 0.5)], 2, "F4")
    with pytest.raises(ConfigError, match="rounds=0"):
        run_sequential(attempt, verify_right, [(0, 0.5)], 0, "F1")
    with pytest.raises(ConfigError, match="feedback"):
        build_context("f1", [])


# --------------------------------------------------------------------------- ledger


def test_ledger_on_a_hand_table():
    cost = np.array([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    mean, std = ledger.per_instance_cost(cost)
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(std, [1.0, 0.0])
    assert ledger.cost_nondeterminism(cost) == pytest.approx(0.5)
    np.testing.assert_allclose(ledger.aggregator_cost(cost, "average"), [2.0, 4.0])
    for name in ("majority", "best_of_n", "worst_of_n", "selected_best_of_n"):
        np.testing.assert_allclose(ledger.aggregator_cost(cost, name), [6.0, 12.0])
    per_round = np.array([[10.0, 20.0, np.nan], [5.0, np.nan, np.nan]])
    total = ledger.aggregator_cost(
        per_round, "sequential", rounds_run=[2, 1], critic_calls=[1, 0], critic_cost=3.0
    )
    np.testing.assert_allclose(total, [33.0, 5.0])
    split = ledger.split_by_outcome(np.array([[1, 1], [0, 0], [1, 0]]))
    np.testing.assert_array_equal(split["always_correct"], [True, False, False])
    np.testing.assert_array_equal(split["always_wrong"], [False, True, False])
    np.testing.assert_array_equal(split["mixed"], [False, False, True])
    samples = [[ledger.SampleCost(7, "ticks", 1, 70.0), ledger.SampleCost(9, "ticks", 1, 90.0)]]
    np.testing.assert_allclose(ledger.cost_table(samples), [[7.0, 9.0]])
    np.testing.assert_allclose(ledger.cost_table(samples, "flops"), [[70.0, 90.0]])
    with pytest.raises(ConfigError, match="aggregator='median'"):
        ledger.aggregator_cost(cost, "median")
    with pytest.raises(ConfigError, match="rounds_run"):
        ledger.aggregator_cost(per_round, "sequential")


def test_flop_counters_on_hand_values():
    assert ledger.matmul_flops(2, 3, 4) == 48
    # N=100, V=10, H=4, L=2, prompt 3, new 2 -> T = 4 positions through the backbone.
    plain = ledger.lm_decode_flops(100, 10, 4, 2, 3, 2, streams=1)
    assert plain == 2 * 100 * 4 + 4 * 2 * 4 * (4 * 5 // 2) + 2 * 2 * 4 * 10
    two = ledger.lm_decode_flops(100, 10, 4, 2, 3, 2, streams=2)
    attention = 4 * 2 * 4 * 2 * (48 * 4 + 10)
    assert two == 2 * 100 * 2 * 4 + attention + 2 * 2 * (2 * 16 + 4 * 2) + 2 * 2 * 4 * 10
    no_prefix = ledger.lm_decode_flops(100, 10, 4, 2, 3, 2, streams=2, prefix_tokens=0)
    assert no_prefix == two - 4 * 2 * 4 * 2 * 48 * 4
    with pytest.raises(ConfigError, match="streams=0"):
        ledger.lm_decode_flops(100, 10, 4, 2, 3, 2, streams=0)
