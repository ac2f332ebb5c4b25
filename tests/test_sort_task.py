"""Sorting task: generated data, CTC loss against a brute-force alignment sum, greedy decoding and
metrics against loops, the wait-ticks analysis, config validation and a short training run."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ctm_sort import get_config
from core.errors import ConfigError
from ctm_jax import losses
from launch import sort_pictures
from tasks.ctm_sort import data, metrics
from train_lib import trainer
from train_lib.task import make_task

# ------------------------------------------------------------------------------------------------
# Data


def test_examples_are_gaussian_values_with_their_argsort():
    batch = data.sort_dataset(n_values=6, seed=3, batch_size=2048)[0]
    x, y = batch["inputs"], batch["targets"]
    assert x.shape == (2048, 6) and x.dtype == np.float32
    assert y.shape == (2048, 6) and y.dtype == np.int32
    # Each target is a permutation that puts the values in increasing order.
    np.testing.assert_array_equal(np.sort(y, axis=1), np.tile(np.arange(6), (2048, 1)))
    assert np.all(np.diff(np.take_along_axis(x, y, axis=1), axis=1) > 0)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


def test_stream_is_seeded_random_access_and_eval_is_held_out():
    a = data.sort_dataset(5, seed=7, batch_size=4)
    b = data.sort_dataset(5, seed=7, batch_size=4)
    for i in (0, 3, 10**12):
        np.testing.assert_array_equal(a[i]["inputs"], b[i]["inputs"])
    assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
    # Batch i is examples [i*B, (i+1)*B): the batch size does not change the stream.
    np.testing.assert_array_equal(
        a[2]["inputs"][1], data.sort_dataset(5, seed=7, batch_size=1)[9]["inputs"][0]
    )
    task = make_task(get_config("test"))
    train = task.dataset("train", batch_size=4)[0]["inputs"]
    assert not np.array_equal(train, task.dataset("eval", batch_size=4)[0]["inputs"])
    with pytest.raises(ConfigError, match="split"):
        task.dataset("test", batch_size=4)


# ------------------------------------------------------------------------------------------------
# CTC loss


def _collapse(path: tuple[int, ...], blank: int) -> list[int]:
    """CTC's many-to-one map, written out: merge repeats, then drop blanks."""
    out, previous = [], None
    for c in path:
        if c != blank and c != previous:
            out.append(c)
        previous = c
    return out


def test_sort_loss_equals_brute_force_sum_over_alignments():
    # T = 4 ticks, 3 classes (labels 0, 1 and the blank 2), 2 labels; the repeated label needs a
    # blank between its two emissions.
    ticks, classes = 4, 3
    label_sets = [[0, 1], [1, 0], [1, 1], [0, 0]]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(label_sets), ticks, classes))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = []
    for p, labels in zip(probs, label_sets, strict=True):
        total = sum(
            np.prod([p[t, c] for t, c in enumerate(path)])
            for path in itertools.product(range(classes), repeat=ticks)
            if _collapse(path, classes - 1) == labels
        )
        expected.append(-np.log(total) / len(labels))  # normalised by the target length
    predictions = jnp.asarray(np.moveaxis(logits, 2, 1), jnp.float32)  # (B, C, T)
    got = losses.sort_loss(predictions, jnp.asarray(label_sets))
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-5)
    for i, labels in enumerate(label_sets):  # and each example on its own
        one = losses.sort_loss(predictions[i : i + 1], jnp.asarray([labels]))
        np.testing.assert_allclose(float(one), expected[i], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Decoding and metrics


def _peaked(tokens: np.ndarray, classes: int) -> np.ndarray:
    """(B, T) classes -> (B, C, T) logits whose argmax at every tick is that class."""
    logits = np.random.default_rng(1).normal(size=(*tokens.shape, classes))
    np.put_along_axis(logits, tokens[..., None], 10.0, axis=-1)
    return np.moveaxis(logits, -1, 1).astype(np.float32)


def test_greedy_decode_matches_a_loop():
    n, blank = 4, 4
    tokens = np.random.default_rng(2).choice([0, 1, 2, 3, 4, 4, 4], size=(64, 9))
    tokens[0] = [4, 2, 2, 4, 0, 0, 1, 4, 3]  # runs merge: 2 0 1 3
    tokens[1] = [1, 4, 1, 1, 4, 4, 2, 3, 0]  # a blank separates equal labels: 1 1 2 3 (0 cut)
    tokens[2] = blank  # nothing emitted
    decoded, lengths = metrics.greedy_decode(jnp.asarray(_peaked(tokens, n + 1)), n)
    for b in range(tokens.shape[0]):
        want = _collapse(tuple(tokens[b]), blank)
        assert int(lengths[b]) == len(want)
        padded = (want + [blank] * n)[:n]
        np.testing.assert_array_equal(np.asarray(decoded[b]), padded)
    np.testing.assert_array_equal(np.asarray(decoded[:3]), [[2, 0, 1, 3], [1, 1, 2, 3], [4] * 4])
    # The host-side decoder agrees, and reports the first tick of each run.
    elements, ticks = metrics.emissions(_peaked(tokens[:2], n + 1))[0]
    np.testing.assert_array_equal(elements, [2, 0, 1, 3])
    np.testing.assert_array_equal(ticks, [1, 4, 6, 8])


def test_sort_metrics_match_a_loop():
    n = 4
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, n)).astype(np.float32)
    targets = np.argsort(x, axis=1).astype(np.int32)
    tokens = np.full((5, 7), n)
    tokens[0, [0, 2, 4, 6]] = targets[0]  # exactly right
    tokens[1, [0, 1, 2, 3]] = targets[1]  # right, no waiting
    tokens[2, [0, 1, 2]] = targets[2, :3]  # one element missing
    tokens[3, [0, 1, 2, 3]] = targets[3, ::-1]  # reversed
    tokens[4, [1, 2, 3, 4]] = [targets[4, 0], targets[4, 2], targets[4, 1], targets[4, 3]]
    got = metrics.sort_metrics(
        jnp.asarray(_peaked(tokens, n + 1)), jnp.asarray(x), jnp.asarray(targets)
    )
    hits, exact, ordered, right_length = [], [], [], []
    for b in range(5):
        out = _collapse(tuple(tokens[b]), n)
        padded = (out + [n] * n)[:n]
        hits += [p == t for p, t in zip(padded, targets[b], strict=True)]
        exact.append(padded == list(targets[b]))
        ordered += [
            padded[k] != n and padded[k + 1] != n and x[b, padded[k + 1]] > x[b, padded[k]]
            for k in range(n - 1)
        ]
        right_length.append(len(out) == n)
    np.testing.assert_allclose(float(got["accuracy"]), np.mean(hits), rtol=1e-6)
    np.testing.assert_allclose(float(got["sequence_accuracy"]), np.mean(exact), rtol=1e-6)
    np.testing.assert_allclose(float(got["sortedness"]), np.mean(ordered), rtol=1e-6)
    np.testing.assert_allclose(float(got["right_length"]), np.mean(right_length), rtol=1e-6)
    assert float(got["sequence_accuracy"]) == pytest.approx(0.4)  # examples 0 and 1
    # sorted: 3 + 3 + 2 (one missing) + 0 (reversed) + 2 (middle pair swapped) of 15 pairs
    assert float(got["sortedness"]) == pytest.approx(10 / 15)


def test_wait_ticks_pair_emission_gaps_with_sorted_value_gaps():
    n = 3
    x = np.array([[0.5, -1.0, 2.0], [0.0, 1.0, 3.0]], np.float32)
    targets = np.argsort(x, axis=1)  # [1, 0, 2], [0, 1, 2]
    tokens = np.full((2, 8), n)
    tokens[0, [0, 3, 4, 7]] = [1, 0, 0, 2]  # emitted at ticks 0, 3, 7 (the run of 0 counts once)
    tokens[1, [1, 2, 5]] = [0, 2, 1]  # only position 0 right: no right successive pair
    waits, gaps = metrics.wait_ticks_and_gaps(_peaked(tokens, n + 1), x, targets)
    np.testing.assert_array_equal(waits, [3, 4])
    np.testing.assert_allclose(gaps, [1.5, 1.5])

    np.testing.assert_array_equal(metrics.average_ranks(np.array([3, 1, 3, 2])), [2.5, 0, 2.5, 1])
    gaps = np.linspace(0.0, 1.0, 40)
    stats = metrics.wait_stats(1 + np.floor(4 * gaps), gaps, bins=4)  # monotone, with ties
    assert stats.pairs == 40 and stats.spearman == pytest.approx(1.0, abs=0.03)
    assert stats.pearson > 0.9
    np.testing.assert_array_equal(stats.bin_count, [10] * 4)
    assert np.all(np.diff(stats.bin_wait) > 0) and np.all(np.diff(stats.bin_gap) > 0)
    anti = metrics.wait_stats(-gaps, gaps)
    assert anti.pearson == pytest.approx(-1.0) and anti.spearman == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("section", "field", "value", "needle"),
    [
        ("model", "out_dims", 20, "model.out_dims=20 is invalid: task.n_values=4 needs 5"),
        ("model", "d_input", 30, "model.d_input=30 is invalid: task.n_values=4 needs 4"),
        ("model", "iterations", 3, "model.iterations=3 is invalid"),
        ("model", "variant", "ctm", "model.variant='ctm' is invalid"),
        ("model", "heads", 2, "model.heads=2 is invalid"),
        ("task", "n_values", 1, "task.n_values=1 is invalid"),
        ("task", "eval_seed", 0, "task.eval_seed=0 is invalid"),
    ],
)
def test_bad_values_raise_one_line_config_errors(section, field, value, needle):
    config = get_config("test")
    config[section][field] = value
    with pytest.raises(ConfigError) as info:
        make_task(config)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_n_values_the_ticks_cannot_fit_fails_before_tracing():
    config = get_config("test")
    config.task.n_values = 7  # the test preset has 6 ticks
    with pytest.raises(ConfigError, match=r"sorting task.n_values=7 needs >= 7 ticks"):
        trainer.build_experiment(config)


@pytest.mark.parametrize("preset", [None, "cpu", "test"])
def test_presets_validate(preset):
    config = get_config(preset)
    task, _ = trainer.validate_config(config)
    m = task.model_config
    assert (m.d_input, m.out_dims) == (task.n_values, task.n_values + 1)
    assert m.variant == "sort" and m.iterations >= task.n_values
    if preset is None:  # the reference sort trainer's defaults
        got = (m.d_model, m.iterations, m.memory_length, m.memory_hidden_dims, m.synapse_depth)
        assert got == (512, 50, 25, 4, 4) and task.n_values == 30
        assert (m.n_synch_out, m.neuron_select_type) == (32, "random-pairing")
        assert (config.train.batch_size, config.train.total_steps) == (32, 100_001)
        assert (config.optim.lr, config.optim.warmup_steps, config.optim.clip) == (
            1e-3,
            5000,
            "none",
        )
    if preset == "cpu":
        assert task.n_values == 8


def test_reference_model_has_the_reference_parameter_count():
    task = make_task(get_config())
    variables = jax.eval_shape(
        task.build_model().init, jax.random.key(0), jnp.zeros((1, 30), jnp.float32)
    )
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    # Counted from the reference module structure: start state 512 + start trace 512*25 + decay
    # 32; U-Net widths 512, 346, 181, 16 on a 30 + 512 input: 278016 + 1024 (first) + 178190 +
    # 63169 + 2944 (down) + 3439 + 63664 + 178688 (up) + 2078 (skip norms); NLMs 102400 + 4096 + 1
    # + 4096 + 1024 + 1; read-out 32*31 + 31.
    assert count == 897_197


# ------------------------------------------------------------------------------------------------
# Training and the analysis launcher


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sort_run")
    summary = trainer.train_and_evaluate(get_config("test"), workdir)
    return workdir, summary


def test_short_run_lowers_the_loss(trained):
    workdir, summary = trained
    assert summary.step == 100
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(train) == 5 and train[-1] < 0.75 * train[0]  # measured: 1.46 -> 0.94
    assert [r["step"] for r in evals] == [50, 100] and evals[1]["loss"] < evals[0]["loss"]
    assert set(summary.eval_metrics) >= {"accuracy", "sequence_accuracy", "sortedness"}
    assert all(np.isfinite(v) for v in summary.eval_metrics.values())


def test_pictures_numbers_agree_with_the_jitted_metrics(trained, tmp_path):
    workdir, _ = trained
    result = sort_pictures.analyse(workdir, examples=48, out=tmp_path / "wait.png")
    assert result["path"].stat().st_size > 10_000 and result["examples"] == 48
    found = result["data"]
    jitted = metrics.sort_metrics(
        jnp.asarray(found["predictions"]), jnp.asarray(found["inputs"]), found["targets"]
    )
    assert found["predictions"].shape == (48, 5, 6) and found["step"] == 100
    np.testing.assert_allclose(result["accuracy"], float(jitted["accuracy"]), rtol=1e-6)
    np.testing.assert_allclose(
        result["sequence_accuracy"], float(jitted["sequence_accuracy"]), rtol=1e-6
    )
    waits, _ = metrics.wait_ticks_and_gaps(found["predictions"], found["inputs"], found["targets"])
    assert result["stats"].pairs == len(waits) and np.all(waits >= 1)
