"""Q&A-MNIST: the question format against a hand-written example, the seeded stream, digit
images (scikit-learn and mocked tfds MNIST), the model's pad ticks, a short training run and
the one-line config errors."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs.ctm_qamnist import get_config
from core.errors import ConfigError, DataError
from ctm_jax import qamnist
from ctm_jax.qamnist import ANSWER, DIGIT, INDEX, MINUS, OPERATOR, PAD, PLUS
from tasks.ctm_qamnist import data
from train_lib import metrics, trainer
from train_lib.task import make_task

# ------------------------------------------------------------------------------------------------
# Question format


def test_question_format_matches_a_hand_written_example() -> None:
    # The data module's tick modes and operator tokens are the model's.
    for name in ("PAD", "DIGIT", "INDEX", "OPERATOR", "ANSWER", "PLUS", "MINUS"):
        assert getattr(data, name) == getattr(qamnist, name), name
    # Digits shown: 7, 3, 5 (slots 0, 1, 2). Question: "digit 2, + digit 0, - digit 1".
    labels = [7, 3, 5]
    question = data.Question(first=2, operators=(PLUS, MINUS), indices=(0, 1))
    assert question.tokens() == [2, -1, 0, -2, 1]
    assert question.answer(labels) == 9  # 5 + 7 = 12 -> 2; 2 - 3 = -1 -> 9 (mod 10)
    assert question.readable(labels) == "5 + 7 - 3 = 9 (mod 10)"

    # R = 2, 2 answer ticks, laid out for up to 3 digits and 3 operations: (3 + 7) * 2 + 2 = 22
    # ticks; this question uses 3 * 2 + 5 * 2 + 2 = 18 of them, so 4 pad ticks come first.
    spec = data.QuestionSpec(
        min_digits=1, max_digits=3, min_ops=1, max_ops=3, repeats=2, answer_steps=2
    )
    assert spec.ticks() == 22
    modes, tokens = data.layout(question, n_digits=3, repeats=2, answer_steps=2, ticks=22)
    p, d, i, o, a = PAD, DIGIT, INDEX, OPERATOR, ANSWER
    want_modes = [p, p, p, p, d, d, d, d, d, d, i, i, o, o, i, i, o, o, i, i, a, a]
    want_tokens = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, 0, 0, -2, -2, 1, 1, 0, 0]
    assert modes.tolist() == want_modes
    assert tokens.tolist() == want_tokens
    with pytest.raises(ValueError, match="needs 18 ticks"):
        data.layout(question, n_digits=3, repeats=2, answer_steps=2, ticks=17)


@dataclasses.dataclass(frozen=True)
class FakeImages:
    """Image i is constant i (so the image says which record it is); label i % 10."""

    n: int = 97
    size: int = 4

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> tuple[np.ndarray, int]:
        return np.full((self.size, self.size, 1), index, np.float32), index % 10


def _answer_from_layout(
    modes: np.ndarray, tokens: np.ndarray, labels: np.ndarray, repeats: int
) -> int:
    """Reads the question back from the tick layout (one token per run of R ticks) and
    evaluates it: an independent check of the target."""
    asked = [int(t) for m, t in zip(modes, tokens, strict=True) if m in (INDEX, OPERATOR)]
    question = asked[::repeats]
    value, op = None, None
    for token in question:
        if token < 0:
            op = token
        elif value is None:
            value = int(labels[token]) % 10
        else:
            value = (value + labels[token] if op == PLUS else value - labels[token]) % 10
    return int(value)


def test_stream_is_seeded_in_range_and_its_targets_are_the_running_result() -> None:
    spec = data.QuestionSpec(1, 4, 1, 4, repeats=2, answer_steps=3)
    images = FakeImages()
    source = data.QuestionSource(images, spec, seed=3, eval_max_ops=6)
    examples = [source[i] for i in range(400)]
    again = source[123]
    for key, value in examples[123].items():
        np.testing.assert_array_equal(again[key], value)
    assert not np.array_equal(examples[0]["tokens"], examples[2]["tokens"])

    ticks = spec.ticks(6)
    digits, ops = set(), {False: set(), True: set()}
    for i, ex in enumerate(examples):
        beyond = bool(ex["beyond"])
        assert beyond == (i % 2 == 1)  # odd eval examples ask beyond the training range
        assert ex["modes"].shape == ex["tokens"].shape == (ticks,)
        assert ex["digits"].shape == (4, 4, 4, 1)  # always max_digits images
        np.testing.assert_array_equal(ex["labels"], ex["digits"][:, 0, 0, 0].astype(int) % 10)
        n, k = int(ex["n_digits"]), int(ex["n_ops"])
        digits.add(n)
        ops[beyond].add(k)
        counts = np.bincount(ex["modes"], minlength=5)
        assert counts[DIGIT] == 2 * n and counts[ANSWER] == 3
        assert counts[INDEX] == 2 * (k + 1) and counts[OPERATOR] == 2 * k
        assert (ex["modes"][-3:] == ANSWER).all()  # answer ticks are always the last ones
        shown = ex["tokens"][ex["modes"] == INDEX]
        assert shown.min() >= 0 and shown.max() < n  # only shown digits are asked about
        assert int(ex["targets"]) == _answer_from_layout(
            ex["modes"], ex["tokens"], ex["labels"], repeats=2
        )
    # Inclusive ranges: 1..4 digits and operations (the reference's exclusive randint(1, 5)
    # never gives 5); beyond-range questions have 5..6 operations.
    assert digits == {1, 2, 3, 4}
    assert ops[False] == {1, 2, 3, 4} and ops[True] == {5, 6}


# ------------------------------------------------------------------------------------------------
# Digit images


def test_resize_matrix_and_sklearn_digits() -> None:
    np.testing.assert_allclose(data.resize_matrix(8, 8), np.eye(8))
    up = data.resize_matrix(28, 32)
    np.testing.assert_allclose(up.sum(axis=1), 1.0, rtol=1e-6)
    ramp = np.tile(np.arange(28, dtype=np.float32), (28, 1))
    resized = data.resize(ramp, 32)
    assert resized.shape == (32, 32) and np.all(np.diff(resized, axis=1) >= 0)

    train, test = data.SklearnDigits("train", 8), data.SklearnDigits("test", 8)
    assert (len(train), len(test)) == (1437, 360)
    stack = np.stack([train.get(i)[0] for i in range(len(train))])
    assert stack.shape == (1437, 8, 8, 1) and stack.dtype == np.float32
    assert abs(stack.mean()) < 1e-4 and abs(stack.std() - 1.0) < 1e-4
    assert {train.get(i)[1] for i in range(50)} == set(range(10))


def test_mnist_through_mocked_tfds_and_a_missing_dataset(tmp_path) -> None:
    import tensorflow_datasets as tfds

    config = get_config("test")
    config.task.source, config.task.image_size = "mnist", 32
    task = make_task(config)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        images = task.images("train")
        record = images.source[5]
        batch = task.dataset("eval", batch_size=4)[0]
    image, label = images.get(5)
    pixels = np.asarray(record["image"], np.float32)[..., 0] / 255.0
    m = data.resize_matrix(28, 32)
    want = (m @ pixels @ m.T - data.MNIST_MEAN) / data.MNIST_STD
    np.testing.assert_allclose(image[..., 0], want, rtol=1e-5, atol=1e-5)
    assert label == int(record["label"])
    assert batch["digits"].shape == (4, 2, 32, 32, 1)
    assert batch["modes"].shape == (4, data.QuestionSpec(1, 2, 1, 2, 1, 1).ticks(3))

    config.task.data_dir = str(tmp_path / "nothing_here")
    with pytest.raises(DataError, match=r"^task\.data_dir=.*tfds build mnist") as e:
        make_task(config).dataset("train", batch_size=2)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Model


def test_pad_ticks_change_nothing_and_unshown_digits_are_never_seen(trained: dict) -> None:
    exp, state, _ = trainer.restore_run(trained["workdir"])
    variables = {"params": state.params, **state.buffers}
    task, model = exp.task, exp.model
    batch = dict(task.dataset("eval", batch_size=4)[0])
    forward = jax.jit(lambda b: task.apply(model, variables, b, train=False))
    out = forward(batch)
    ticks = batch["modes"].shape[1]
    assert out.predictions.shape == (4, 10, ticks) and out.certainties.shape == (4, 2, ticks)

    # Three more pad ticks in front: every real tick gives exactly the same outputs.
    padded = dict(batch)
    padded["modes"] = np.pad(batch["modes"], ((0, 0), (3, 0)))
    padded["tokens"] = np.pad(batch["tokens"], ((0, 0), (3, 0)))
    out_padded = forward(padded)
    real = batch["modes"] != PAD
    for name in ("predictions", "certainties"):
        a = np.moveaxis(np.asarray(getattr(out, name)), -1, 1)[real]
        b = np.moveaxis(np.asarray(getattr(out_padded, name))[..., 3:], -1, 1)[real]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

    # A digit slot the question never shows cannot matter; a shown one does.
    n = batch["n_digits"]
    unshown = dict(batch, digits=batch["digits"].copy())
    shown = dict(batch, digits=batch["digits"].copy())
    for b in range(4):
        if n[b] < 2:
            unshown["digits"][b, 1] = 5.0
        shown["digits"][b, 0] = -5.0
    assert (n < 2).any()
    last = lambda o: np.asarray(o.predictions[..., -1])
    np.testing.assert_array_equal(last(forward(unshown)), last(out))
    assert np.abs(last(forward(shown)) - last(out)).min() > 0

    # Eval metrics: in-range questions (even) and beyond-range ones (odd) are reported apart.
    values = task.eval_metrics(out, batch)
    answers = np.asarray(out.predictions[:, :, -1]).argmax(axis=1)
    right = answers == batch["targets"]
    assert float(values["accuracy_last_tick"]) == pytest.approx(right[0::2].mean())
    assert float(values["beyond_accuracy_last_tick"]) == pytest.approx(right[1::2].mean())


# ------------------------------------------------------------------------------------------------
# Training (the module's one training run, also used by the model test above)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("qamnist")
    summary = trainer.train_and_evaluate(get_config("test"), workdir)
    return {"workdir": workdir, "summary": summary, "train": metrics.read_metrics(workdir, "train")}


def test_short_run_learns(trained: dict) -> None:
    losses = [record["loss"] for record in trained["train"]]
    assert len(losses) == 6 and trained["summary"].step == 120
    assert losses[0] > 2.15  # near ln 10 = 2.30 at the start
    assert np.mean(losses[-2:]) < losses[0] - 0.1
    accuracy = [record["accuracy"] for record in trained["train"]]
    assert np.mean(accuracy[-2:]) > 0.2  # chance is 0.1


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "section, field, value, match",
    [
        ("task", "answer_steps", 0, r"^task\.answer_steps=0 is invalid: must be >= 1"),
        ("task", "max_digits", 51, r"^task\.max_digits=51 is invalid: .*<= 50"),
        ("task", "eval_max_ops", 1, r"^task\.eval_max_ops=1 is invalid: must be >= task\.max"),
        ("task", "image_size", 10, r"^task\.image_size=10 is invalid: .*multiple of 4"),
        ("task", "source", "cifar", r"^task\.source='cifar' is invalid: allowed: mnist, digits"),
        ("model", "out_dims", 11, r"^model\.out_dims=11 is invalid: Q&A-MNIST needs 10"),
        ("model", "iterations", 5, r"^model\.iterations=5 is invalid: .*layout sets the ticks"),
        ("train", "batch_size", 15, r"^train\.batch_size=15 is invalid: .*must be even"),
    ],
)
def test_bad_config_fails_early_in_one_line(section, field, value, match) -> None:
    config = get_config("test")
    with config.unlocked():
        config[section][field] = value
    with pytest.raises(ConfigError, match=match) as e:
        make_task(config)
    assert "\n" not in str(e.value)
