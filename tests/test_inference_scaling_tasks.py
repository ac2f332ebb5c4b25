"""Verifiable tasks: ground truth against brute force, verifiers on hand-made answers,
deterministic generation and argument errors."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.errors import ConfigError
from inference_scaling.tasks import TASKS, arithmetic, make_task, maze, sat, tsp
from inference_scaling.tasks.base import Instance
from tasks.ctm_maze import data as maze_data
from tasks.ctm_maze.metrics import walk_route

# ------------------------------------------------------------------------------------------------
# Every task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_stored_solution_verifies_and_is_canonical(name):
    task = make_task(name)
    for level in (task.levels[0], task.levels[-1]):
        for instance in task.generate(7, level, 2):
            assert instance.level == level
            verdict = task.verify(instance, instance.solution)
            assert verdict.parsed and verdict.valid and verdict.correct
            assert task.canonicalize(instance.solution, instance) == instance.solution
            assert isinstance(task.prompt(instance), str)
            assert isinstance(task.answer_text(instance.solution), str)
            json.dumps([dict(instance.meta), dict(verdict.feedback), dict(verdict.details)])
            junk = task.verify(instance, "%%%")
            assert not (junk.parsed or junk.valid or junk.correct)
            assert task.canonicalize("%%%") is None


CASES = [
    ("maze", "side11-len11-20"),
    ("arithmetic", "add:4"),
    ("parity", "L16"),
    ("sat", "n6-hard"),
    ("tsp", "L2"),
]


@pytest.mark.parametrize("name, level", CASES)
def test_generation_is_deterministic_and_prefix_stable(name, level):
    task = make_task(name)
    key = jax.random.key(3)
    first = task.generate(key, level, 3)
    assert first == task.generate(key, level, 3)
    assert first == task.generate(key, level, 10)[:3]
    # An int seed means jax.random.key(seed); a raw uint32 key gives the same words.
    assert first == task.generate(3, level, 3)
    assert first == task.generate(jax.random.PRNGKey(3), level, 3)
    assert [i.instance_id for i in first] == [0, 1, 2]
    assert first != task.generate(4, level, 3)


def test_bad_names_levels_and_counts_are_config_errors():
    with pytest.raises(ConfigError, match=r"task='nope'.*arithmetic"):
        make_task("nope")
    task = make_task("parity")
    with pytest.raises(ConfigError, match=r"level='L7'.*L8"):
        task.generate(0, "L7", 1)
    with pytest.raises(ConfigError, match=r"n=0"):
        task.generate(0, "L8", 0)
    with pytest.raises(ConfigError, match=r"criterion="):
        make_task("maze", criterion="fast")
    with pytest.raises(ConfigError, match=r"carries=3"):
        make_task("arithmetic", carries=3).generate(0, "add:2", 1)
    with pytest.raises(ConfigError, match=r"key"):
        task.generate("seed", "L8", 1)


# ------------------------------------------------------------------------------------------------
# 3SAT


def brute_force_models(clauses: np.ndarray, n: int) -> set[tuple[bool, ...]]:
    return {
        values
        for values in itertools.product([False, True], repeat=n)
        if all(any(values[abs(v) - 1] == (v > 0) for v in clause) for clause in clauses.tolist())
    }


def test_sat_enumeration_matches_brute_force():
    task = make_task("sat")
    for n in range(4, 9):
        for category in ("easy_under", "hard", "easy_over"):
            for instance in task.generate(1, f"n{n}-{category}", 3):
                clauses = np.asarray(instance.problem)
                assert clauses.shape == (round(sat.RATIOS[category] * n), 3)
                assert all(len(set(np.abs(row))) == 3 for row in clauses)
                found = sat.satisfying_assignments(clauses, n)
                assert {tuple(bool(v) for v in row) for row in found} == brute_force_models(
                    clauses, n
                )
                assert instance.meta["n_solutions"] == len(found)


def test_sat_hard_unique_has_exactly_one_model():
    task = make_task("sat")
    for n in (4, 6, 8):
        for instance in task.generate(2, f"n{n}-hard_unique", 3):
            models = brute_force_models(np.asarray(instance.problem), n)
            assert models == {instance.solution}


def test_sat_unsatisfiable_claims():
    task = make_task("sat")
    unsat = next(i for i in task.generate(0, "n6-easy_over", 20) if i.meta["n_solutions"] == 0)
    assert unsat.solution == sat.UNSAT
    for text in ("Unsatisfiable", "  unsatisfiable.", "<final_answer>UNSATISFIABLE</final_answer>"):
        assert task.verify(unsat, text).correct
    for values in itertools.product([False, True], repeat=6):
        verdict = task.verify(unsat, list(values))
        assert verdict.valid and not verdict.correct and verdict.feedback["violated_clauses"]


def test_sat_any_model_is_correct_in_any_spelling():
    task = make_task("sat")
    instance = next(i for i in task.generate(0, "n8-easy_under", 20) if i.meta["n_solutions"] > 1)
    models = sat.satisfying_assignments(np.asarray(instance.problem), 8)
    later = tuple(bool(v) for v in models[-1])
    assert later != instance.solution
    as_bits = " ".join(str(int(v)) for v in later)
    spellings = [later, [int(v) for v in later], str(list(later)), [str(v) for v in later]]
    spellings += [as_bits, np.asarray(later), f"<final_answer>{list(later)}</final_answer>"]
    for answer in spellings:
        assert task.canonicalize(answer) == later
        assert task.verify(instance, answer).correct
    verdict = task.verify(instance, "Unsatisfiable")
    assert verdict.valid and not verdict.correct


def test_sat_wrong_answers():
    task = make_task("sat")
    instance = task.generate(0, "n8-hard", 1)[0]
    short = task.verify(instance, [True] * 7)
    assert short.parsed and not short.valid and not short.correct
    assert not task.verify(instance, "maybe").parsed
    assert task.canonicalize("[True, maybe]") is None
    clauses = np.asarray(instance.problem)
    for values in itertools.islice(itertools.product([False, True], repeat=8), 0, 256, 17):
        verdict = task.verify(instance, list(values))
        holds = [any(values[abs(v) - 1] == (v > 0) for v in c) for c in clauses.tolist()]
        broken = [k for k, ok in enumerate(holds) if not ok]
        assert verdict.feedback["violated_clauses"] == broken
        assert verdict.correct == (not broken)


# ------------------------------------------------------------------------------------------------
# TSP


def brute_force_tsp(weights: np.ndarray) -> int:
    n = len(weights)
    return min(tsp.tour_length(weights, (0, *perm)) for perm in itertools.permutations(range(1, n)))


def test_held_karp_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (6, 7, 8):
        for max_weight in (5, 50, 1000):
            weights = tsp.random_weights(rng, n, max_weight)
            length, tour = tsp.held_karp(weights)
            assert length == brute_force_tsp(weights) == tsp.tour_length(weights, tour)
            assert sorted(tour) == list(range(n)) and tour == tsp.canonical_tour(tour)
    for instance in make_task("tsp").generate(0, "L2", 3):
        weights = np.asarray(instance.problem)
        assert weights.shape == (7, 7) and np.array_equal(weights, weights.T)
        assert weights.max() <= 20 and np.all(weights[~np.eye(7, dtype=bool)] >= 1)
        assert instance.meta["optimal_length"] == brute_force_tsp(weights)


def test_tsp_rotations_reversals_and_text_forms_agree():
    task = make_task("tsp")
    instance = task.generate(0, "L3", 1)[0]
    best, optimum = list(instance.solution), instance.meta["optimal_length"]
    forms = []
    for shift in range(len(best)):
        rotated = best[shift:] + best[:shift]
        forms += [rotated, rotated[::-1], rotated + rotated[:1]]
    arrow = "->".join(map(str, best + best[:1]))
    forms += [
        "-".join(map(str, best + best[:1])) + f", length {optimum}",
        f"thinking 1-2... <final_answer>{arrow}; {optimum}</final_answer>",
        f"<final_answer>{{'Path': '{arrow}', 'TotalDistance': '{optimum}'}}</final_answer>",
        f"edges 1-2 and 3-4 look short; so the tour is {arrow} with length {optimum}.",
        (best, optimum),
        {"tour": np.asarray(best), "length": float(optimum)},
        str(best),
    ]
    for answer in forms:
        verdict = task.verify(instance, answer)
        assert verdict.correct, answer
        assert task.canonicalize(answer) == instance.solution
    assert task.verify(instance, task.answer_text((best, optimum))).correct


def test_tsp_invalid_suboptimal_and_wrong_claims():
    task = make_task("tsp")
    instance = task.generate(1, "L1", 1)[0]
    weights, optimum = np.asarray(instance.problem), instance.meta["optimal_length"]
    best = list(instance.solution)
    for bad in ([0, 1, 2, 3, 4, 0, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 1], [0, 1, 2, 3, 4, 9]):
        verdict = task.verify(instance, bad)
        assert verdict.parsed and not verdict.valid and not verdict.correct
    assert task.verify(instance, [0, 1, 2, 3, 4]).feedback["missing"] == [5]
    worse = next(
        p for p in itertools.permutations(range(6)) if tsp.tour_length(weights, p) > optimum
    )
    verdict = task.verify(instance, list(worse))
    assert verdict.valid and not verdict.correct
    assert verdict.feedback["gap"] == tsp.tour_length(weights, worse) - optimum > 0
    wrong_claim = task.verify(instance, (best, optimum + 1))
    assert wrong_claim.valid and not wrong_claim.correct
    assert not wrong_claim.feedback["claim_matches"]
    assert not task.verify(instance, "no idea").parsed
    assert task.canonicalize("no idea") is None


# ------------------------------------------------------------------------------------------------
# Maze

OPPOSITE = {0: 1, 1: 0, 2: 3, 3: 2}


def maze_case():
    """An instance and a path step t where a side corridor (a detour) and a wall both adjoin
    the path cell."""
    task = make_task("maze")
    for instance in task.generate(0, "side11-len11-20", 20):
        passable, start, goal = maze.grid(instance.problem)
        path = list(instance.solution)
        cells = maze.path_cells(start, path)
        for t in range(1, len(path)):
            r, c = cells[t]
            options = {a: (r + dr, c + dc) for a, (dr, dc) in enumerate(maze_data.MOVES)}
            off_path = {a: p for a, p in options.items() if p not in (cells[t - 1], cells[t + 1])}
            side = [a for a, p in off_path.items() if passable[p]]
            walls = [a for a, p in options.items() if not passable[p]]
            if side and walls:
                return task, instance, path, cells, t, side[0], walls[0]
    raise AssertionError("no maze with a side corridor on its path")


def jax_walk(instance, route):
    image = maze_data.to_float(instance.problem)
    length = instance.meta["route_length"]
    _, solved, steps = walk_route(
        jnp.asarray(image), jnp.asarray(maze_data.pad_actions(route, length))
    )
    return bool(solved), int(steps)


def test_maze_verifier_on_hand_made_routes():
    task, instance, path, cells, t, side, wall = maze_case()
    length = instance.meta["route_length"]
    assert len(path) == instance.meta["path_length"] <= 20
    routes = {
        "true": maze_data.pad_actions(np.asarray(path), length),
        "detour": path[:t] + [side, OPPOSITE[side]] + path[t:],
        "wall": path[:t] + [wall] + path[t:],
        "short": path[:-1],
    }
    verdicts = {name: task.verify(instance, route) for name, route in routes.items()}
    true, detour, wall_v, short = (verdicts[k] for k in ("true", "detour", "wall", "short"))
    assert true.correct and true.details["exact"] and true.feedback["first_error"] is None
    assert true.details["steps_walked"] == len(path)
    assert detour.valid and detour.correct and detour.details["solved"]
    assert not detour.details["exact"] and detour.feedback["first_error"] == t
    assert detour.feedback["last_correct_cell"] == list(cells[t])
    assert not wall_v.valid and not wall_v.correct
    assert wall_v.feedback["first_error"] == wall_v.feedback["wall_hit"] == t
    assert wall_v.feedback["last_correct_cell"] == list(cells[t])
    assert short.valid and not short.correct and not short.details["solved"]
    assert short.feedback["first_error"] == len(path) - 1
    exact_task = make_task("maze", criterion="exact")
    assert exact_task.verify(instance, routes["true"]).correct
    assert not exact_task.verify(instance, routes["detour"]).correct
    beyond = exact_task.verify(instance, path + [side])  # leaves the goal after reaching it
    assert not beyond.correct and beyond.feedback["prefix_solves"]
    assert beyond.feedback["first_error"] == len(path)
    for name, route in routes.items():  # the jax metric agrees on solved and steps walked
        details = verdicts[name].details
        expected = (details["solved"], details["steps_walked"])
        assert jax_walk(instance, np.asarray(route)) == expected, name
    assert not task.verify(instance, [0, 7, 1]).parsed
    assert task.verify(instance, " ".join(map(str, path))).correct


def test_maze_canonical_forms_merge_what_the_criterion_cannot_tell_apart():
    task, instance, path, _, t, side, _ = maze_case()
    wiggle = path + [side, side, 4]  # moves after the goal never count
    assert task.canonicalize(wiggle, instance) == tuple(path) == instance.solution
    assert task.canonicalize(wiggle) != tuple(path)  # without the maze it cannot know the goal
    assert task.canonicalize(path + [4, 4]) == tuple(path)
    exact = make_task("maze", criterion="exact")
    assert exact.canonicalize(wiggle, instance) != exact.canonicalize(path, instance)
    assert task.canonicalize([0, 1, 5]) is None and task.canonicalize("up") is None


def test_maze_splice_and_restart_image():
    task, instance, path, cells, t, _, _ = maze_case()
    length = instance.meta["route_length"]
    spliced = maze.splice(path[:t], path[t:], length)
    assert spliced.dtype == np.int32 and spliced.shape == (length,)
    assert np.array_equal(spliced, maze_data.pad_actions(np.asarray(path), length))
    assert len(maze.splice(path, path, 5)) == 5
    image = maze.restart_image(instance, cells[t])
    red = np.all(image == maze_data.START, axis=-1)
    assert np.argwhere(red).tolist() == [list(cells[t])]
    start = tuple(instance.meta["start"])
    assert tuple(image[start]) == maze_data.CORRIDOR
    assert np.array_equal(np.asarray(instance.problem)[start], maze_data.START)  # unchanged
    passable, new_start, goal = maze.grid(image)
    again = maze_data.path_to_actions(maze_data.shortest_path(passable, new_start, goal))
    assert again.tolist() == path[t:]
    with pytest.raises(ConfigError, match="cell="):
        maze.restart_image(instance, (0, 0))  # a wall


# ------------------------------------------------------------------------------------------------
# Arithmetic and parity


def test_arithmetic_parsing_levels_carries_and_feedback():
    task = make_task("arithmetic")
    assert task.canonicalize("  579") == 579 and task.canonicalize("+579\n") == 579
    assert task.canonicalize(np.int64(579)) == 579
    for bad in ("5a9", "57.9", "", "579 580", True, 579.0):
        assert task.canonicalize(bad) is None
    assert arithmetic.count_carries(999, 1) == 3 and arithmetic.count_carries(123, 456) == 0
    assert arithmetic.count_carries(58, 67) == 2
    for level, lo, hi in (("add:1", 0, 9), ("add:3", 100, 999), ("mul:4", 1000, 9999)):
        for instance in task.generate(0, level, 30):
            a, b = instance.meta["a"], instance.meta["b"]
            assert lo <= a <= hi and lo <= b <= hi
            op = "+" if level.startswith("add") else "*"
            assert instance.problem == f"{a}{op}{b}="
            assert instance.solution == (a + b if op == "+" else a * b)
    with_two = make_task("arithmetic", carries=2).generate(0, "add:3", 20)
    assert all(arithmetic.count_carries(i.meta["a"], i.meta["b"]) == 2 for i in with_two)
    instance = Instance(0, "add:3", "123+456=", 579, {})
    verdict = task.verify(instance, "589")
    assert verdict.valid and not verdict.correct
    assert verdict.feedback == {"wrong_answer": 589, "first_wrong_digit": 1}
    assert task.verify(instance, "57").feedback["first_wrong_digit"] == 2
    assert task.verify(instance, " 579 ").correct
    assert not task.verify(instance, "five hundred").parsed


def test_parity_answers():
    task = make_task("parity")
    instance = task.generate(0, "L8", 1)[0]
    x, truth = np.asarray(instance.problem), list(instance.solution)
    assert truth == [int(np.sum(x[: i + 1] < 0) % 2) for i in range(8)]
    flipped = truth.copy()
    flipped[5] ^= 1
    verdict = task.verify(instance, np.asarray(flipped))
    assert verdict.valid and not verdict.correct
    assert verdict.feedback["first_wrong_position"] == 5
    assert verdict.details["accuracy"] == 7 / 8
    assert task.verify(instance, "".join(map(str, truth))).correct
    assert task.canonicalize([bool(b) for b in truth]) == instance.solution
    assert not task.verify(instance, truth[:-1]).valid
    assert task.canonicalize([0, 2]) is None
