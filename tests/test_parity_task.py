"""Parity task: targets, the seeded grain stream, checkpointable iteration, metrics, validation."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ctm_parity import get_config
from core.errors import ConfigError
from ctm_jax.model import CTMOutput
from tasks.ctm_parity import task as parity
from train_lib import trainer
from train_lib.task import make_task


def _loop_targets(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape, np.int32)
    for b in range(x.shape[0]):
        negatives = 0
        for i in range(x.shape[1]):
            negatives += int(x[b, i] == -1)
            out[b, i] = negatives % 2
    return out


def test_targets_match_a_direct_loop():
    x = np.random.default_rng(0).choice([-1.0, 1.0], size=(32, 64)).astype(np.float32)
    np.testing.assert_array_equal(parity.parity_targets(x), _loop_targets(x))
    # A hand-checked case: -1 flips the running parity, +1 keeps it.
    np.testing.assert_array_equal(
        parity.parity_targets(np.array([1, -1, -1, 1, -1], np.float32)), [0, 1, 0, 0, 1]
    )


def test_examples_are_balanced_signs_with_consistent_targets():
    batch = parity.parity_dataset(seq_len=16, seed=3, batch_size=512)[0]
    x, y = batch["inputs"], batch["targets"]
    assert x.shape == (512, 16) and x.dtype == np.float32
    assert y.shape == (512, 16) and y.dtype == np.int32
    assert set(np.unique(x)) == {-1.0, 1.0}
    assert abs(float((x == -1).mean()) - 0.5) < 0.02
    np.testing.assert_array_equal(y, _loop_targets(x))


def test_same_seed_same_batches_other_seed_other_batches():
    a = parity.parity_dataset(16, seed=5, batch_size=8)
    b = parity.parity_dataset(16, seed=5, batch_size=8)
    c = parity.parity_dataset(16, seed=6, batch_size=8)
    for i in (0, 1, 1000, 10**12):
        np.testing.assert_array_equal(a[i]["inputs"], b[i]["inputs"])
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    assert not np.array_equal(a[0]["inputs"], a[1]["inputs"])
    # Batch i is examples [i*B, (i+1)*B) of the stream: the batch size does not change the data.
    per_example = parity.parity_dataset(16, seed=5, batch_size=1)
    np.testing.assert_array_equal(a[2]["inputs"][3], per_example[2 * 8 + 3]["inputs"][0])


def test_iterator_state_restores_the_exact_stream():
    ds = parity.parity_dataset(16, seed=1, batch_size=4).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    )
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(5)]

    fresh = iter(ds)
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], want)


def test_host_shards_partition_the_stream():
    whole = parity.parity_dataset(8, seed=2, batch_size=1)
    shards = [
        parity.parity_dataset(8, seed=2, batch_size=2, shard_index=k, shard_count=2)
        for k in range(2)
    ]
    for k in range(2):
        batch = shards[k][1]["inputs"]  # shard k, batch 1 = stream examples k+4, k+6
        np.testing.assert_array_equal(batch[0], whole[k + 4]["inputs"][0])
        np.testing.assert_array_equal(batch[1], whole[k + 6]["inputs"][0])


def test_task_uses_different_streams_for_train_and_eval():
    task = make_task(get_config("test"))
    train = task.dataset("train", batch_size=4)[0]["inputs"]
    evaluation = task.dataset("eval", batch_size=4)[0]["inputs"]
    assert not np.array_equal(train, evaluation)
    with pytest.raises(ValueError, match="split"):
        task.dataset("validation", batch_size=4)


def _loop_accuracy(pred: np.ndarray, targets: np.ndarray, ticks: np.ndarray):
    b, length = targets.shape
    logits = pred.reshape(b, length, 2, -1)
    per_position, whole = [], []
    for i in range(b):
        answers = [int(np.argmax(logits[i, j, :, ticks[i]])) for j in range(length)]
        hits = [a == t for a, t in zip(answers, targets[i], strict=True)]
        per_position += hits
        whole.append(all(hits))
    return np.mean(per_position), np.mean(whole)


def test_metrics_at_most_certain_and_last_tick_match_a_loop():
    rng = np.random.default_rng(0)
    b, length, t = 6, 5, 4
    targets = rng.integers(0, 2, (b, length)).astype(np.int32)
    # Make some sequences fully right at one tick so whole-sequence accuracy is non-trivial.
    logits = rng.normal(size=(b, length, 2, t)).astype(np.float32)
    logits[:3, :, :, 1] = 0.0
    logits[np.arange(3)[:, None], np.arange(length)[None], targets[:3], 1] = 5.0
    predictions = logits.reshape(b, 2 * length, t)
    certainties = rng.uniform(size=(b, 2, t)).astype(np.float32)
    certainties[:3, 1, 1] = 2.0  # their most certain tick is 1

    out = CTMOutput(jnp.asarray(predictions), jnp.asarray(certainties), jnp.zeros((b, 1)))
    got = parity.parity_metrics(out, jnp.asarray(targets))
    certain = np.argmax(certainties[:, 1], axis=-1)
    acc, seq_acc = _loop_accuracy(predictions, targets, certain)
    acc_last, seq_acc_last = _loop_accuracy(predictions, targets, np.full(b, t - 1))
    np.testing.assert_allclose(float(got["accuracy"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(got["sequence_accuracy"]), seq_acc, rtol=1e-6)
    np.testing.assert_allclose(float(got["accuracy_last_tick"]), acc_last, rtol=1e-6)
    np.testing.assert_allclose(float(got["sequence_accuracy_last_tick"]), seq_acc_last, rtol=1e-6)
    assert seq_acc >= 0.5  # the three planted sequences are right at their most certain tick
    np.testing.assert_allclose(float(got["most_certain_tick"]), certain.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        float(got["certainty"]), certainties[np.arange(b), 1, certain].mean(), rtol=1e-6
    )


def test_model_config_follows_seq_len():
    config = get_config("test")
    config.task.seq_len = 12
    task = make_task(config)
    assert task.model_config.out_dims == 24
    assert task.model_config.prediction_reshaper == (12, 2)


@pytest.mark.parametrize(
    ("section", "field", "value", "needle"),
    [
        ("task", "seq_len", 0, "task.seq_len=0"),
        ("task", "eval_seed", 0, "task.eval_seed=0"),  # equal to train_seed: not held out
        ("model", "heads", 3, "model.heads=3"),
        ("model", "neuron_select_type", "bogus", "model.neuron_select_type='bogus'"),
    ],
)
def test_bad_values_raise_one_line_config_errors(section, field, value, needle):
    config = get_config("test")
    config[section][field] = value
    with pytest.raises(ConfigError) as info:
        make_task(config)
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("preset", [None, "tiny", "test"])
def test_presets_validate(preset):
    config = get_config(preset)
    task, mesh = trainer.validate_config(config)
    assert task.seq_len == config.task.seq_len
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    if preset is None:  # the reference parity run (its training script)
        m = task.model_config
        got = (m.d_model, m.d_input, m.heads, m.iterations, m.memory_length)
        assert got == (1024, 512, 8, 75, 25)
        assert (m.out_dims, m.prediction_reshaper) == (128, (64, 2))
        assert config.train.total_steps == 200_001 and config.optim.clip == "quantile"
