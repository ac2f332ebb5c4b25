"""Q&A-MNIST questions: digit images, then a question about them, then ticks to answer.

The reference format (its QAMNIST dataset and sampler), with R = `repeats`:

* n_digits images, each shown for R ticks;
* the question [index, (operator, index) x n_ops], each token for R ticks: an index names one of
  the shown digits by position (0-based), the operators are '+' (token -1) and '-' (token -2);
* `answer_steps` ticks with no input;
* target = the running result mod 10: v = label[index_0]; then v = (v op label[index_k]) mod 10
  for every (op, index_k) in order.

Draw order per question (as the reference): first index; then per operation its operator, then
its index. The digit images are drawn uniformly from the split's images.

Ranges are inclusive here (`min_digits..max_digits`). The reference's command line gives a
centre and a delta (q_num_images=3, q_num_images_delta=2 -> range [1, 5]) and draws with
`np.random.randint(1, 5)`, whose upper bound is *exclusive*: 1 to 4 digits, never 5. The same
holds for operations. So the reference preset uses min 1, max 4 for both.

Deviations from the reference, on purpose: the counts are drawn per example (the reference draws
them once per batch so that a PyTorch batch has one shape; the distribution of a question is the
same); and every example carries `max_digits` images (the slots past n_digits hold real digits the
question never shows), so that the digit backbone's BatchNorm statistics see only real digits.

Streams are seeded and random-access like the parity task's: example i of stream s comes from
`np.random.default_rng([s, i])`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import grain
import numpy as np

from core.errors import ConfigError, DataError

# The model's tick modes and operator tokens (`ctm_jax.qamnist`; data modules import no model,
# so they are repeated here and the tests check that both agree).
PAD, DIGIT, INDEX, OPERATOR, ANSWER = 0, 1, 2, 3, 4
PLUS, MINUS = -1, -2

STREAM_LENGTH = 2**62  # streams are endless; grain needs a length
MODULUS = 10  # answers are digits: the running result mod 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the reference's MNIST normalisation
MNIST_SIZE = 28
# scikit-learn's 8x8 digits (1797 images, 0..16): the first 1437 train, the last 360 test.
DIGITS_TRAIN = 1437
SOURCES = ("mnist", "digits")


# ------------------------------------------------------------------------------------------------
# Question format


@dataclasses.dataclass(frozen=True)
class QuestionSpec:
    """How questions are drawn and laid out over ticks (ranges inclusive)."""

    min_digits: int
    max_digits: int
    min_ops: int
    max_ops: int
    repeats: int  # R: ticks per digit image and per question token
    answer_steps: int  # ticks with no input at the end, where the answer is read

    def ticks(self, max_ops: int | None = None) -> int:
        """Ticks of the longest question (with `max_ops` operations, default the spec's): every
        example is laid out over this many."""
        ops = self.max_ops if max_ops is None else max_ops
        return (self.max_digits + 1 + 2 * ops) * self.repeats + self.answer_steps


@dataclasses.dataclass(frozen=True)
class Question:
    """One question: which digits are asked about and how they combine."""

    first: int  # index (position among the shown digits) of the starting digit
    operators: tuple[int, ...]  # PLUS (-1) or MINUS (-2), one per operation
    indices: tuple[int, ...]  # index of each operation's digit

    def tokens(self) -> list[int]:
        """[index, (operator, index) x n_ops]: the question's tokens, once each."""
        out = [self.first]
        for op, index in zip(self.operators, self.indices, strict=True):
            out += [op, index]
        return out

    def answer(self, labels: Any) -> int:
        """The running result mod 10 for digits with these labels (by position)."""
        value = int(labels[self.first]) % MODULUS
        for op, index in zip(self.operators, self.indices, strict=True):
            digit = int(labels[index])
            value = (value + digit if op == PLUS else value - digit) % MODULUS
        return value

    def readable(self, labels: Any) -> str:
        """E.g. '7 + 3 - 5 = 5 (mod 10)'."""
        text = str(int(labels[self.first]))
        for op, index in zip(self.operators, self.indices, strict=True):
            text += f" {'+' if op == PLUS else '-'} {int(labels[index])}"
        return f"{text} = {self.answer(labels)} (mod 10)"


def draw_question(rng: np.random.Generator, n_digits: int, n_ops: int) -> Question:
    """The reference's draw order: first index, then per operation its operator and index."""
    first = int(rng.integers(n_digits))
    operators, indices = [], []
    for _ in range(n_ops):
        operators.append(PLUS if rng.integers(2) == 0 else MINUS)
        indices.append(int(rng.integers(n_digits)))
    return Question(first, tuple(operators), tuple(indices))


def layout(
    question: Question, n_digits: int, repeats: int, answer_steps: int, ticks: int
) -> tuple[np.ndarray, np.ndarray]:
    """(modes, tokens), each (ticks,) int32: pad ticks first, then n_digits x R digit ticks (token
    = the digit slot), the question's tokens R ticks each (INDEX / OPERATOR), then the answer
    ticks. The answer ticks are the last `answer_steps` whatever the question's length."""
    modes = [DIGIT] * (n_digits * repeats)
    tokens = [slot for slot in range(n_digits) for _ in range(repeats)]
    for token in question.tokens():
        modes += [OPERATOR if token < 0 else INDEX] * repeats
        tokens += [token] * repeats
    modes += [ANSWER] * answer_steps
    tokens += [0] * answer_steps
    pad = ticks - len(modes)
    if pad < 0:
        raise ValueError(f"the question needs {len(modes)} ticks, the layout has {ticks}")
    return (
        np.asarray([PAD] * pad + modes, np.int32),
        np.asarray([0] * pad + tokens, np.int32),
    )


# ------------------------------------------------------------------------------------------------
# Digit images


class DigitImages(Protocol):
    """Random-access labelled digit images, already resized and normalised."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> tuple[np.ndarray, int]:
        """(image (size, size, 1) float32, label)."""
        ...


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a bilinear (triangle-filter) resize with half-pixel centres,
    widened when shrinking (antialiased), as PIL's bilinear resize (torchvision's Resize on
    images) does; rows sum to 1. Resize an image with M @ image @ M.T."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    pixels = np.arange(n_in) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(pixels[None, :] - centres[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W) square images -> (..., size, size)."""
    m = resize_matrix(images.shape[-1], size)
    return np.einsum("oh,...hw,pw->...op", m, images.astype(np.float32), m)


@dataclasses.dataclass(frozen=True)
class SklearnDigits:
    """scikit-learn's 8x8 digits (ships with the package: no download), scaled to [0, 1],
    resized to `size` and normalised with the training images' mean and std."""

    split: str
    size: int

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _sklearn_digits(self.split, self.size)

    def __len__(self) -> int:
        return len(self._arrays()[1])

    def get(self, index: int) -> tuple[np.ndarray, int]:
        images, labels = self._arrays()
        return images[index], int(labels[index])


@functools.lru_cache(maxsize=8)
def _sklearn_digits(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = resize(data.images / 16.0, size)
    train = images[:DIGITS_TRAIN]
    mean, std = float(train.mean()), float(train.std())
    part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    normalised = ((images[part] - mean) / std)[..., None].astype(np.float32)
    return normalised, data.target[part].astype(np.int32)


class TfdsMnist:
    """MNIST through `tfds.data_source('mnist')` (array_record: random access, no TensorFlow),
    resized to `size` (the reference: 32) and normalised with (0.1307, 0.3081)."""

    def __init__(self, split: str, size: int, data_dir: str | None = None) -> None:
        import tensorflow_datasets as tfds

        self.size = size
        tfds_split = "train" if split == "train" else "test"
        try:
            # No download here: a prepared copy is read (runs must not depend on the network).
            self.source = tfds.data_source(
                "mnist", split=tfds_split, data_dir=data_dir, download=False
            )
        except Exception as e:  # tfds raises assorted errors for a missing or unprepared dataset
            first_line = (str(e).splitlines() or [""])[0][:160]
            raise DataError(
                f"task.data_dir={data_dir!r}: cannot open the tfds dataset 'mnist' "
                f"({type(e).__name__}: {first_line}); prepare it with `tfds build mnist "
                "--file_format=array_record --data_dir=<dir>` or use task.source='digits'"
            ) from None
        self.matrix = resize_matrix(MNIST_SIZE, size)

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int) -> tuple[np.ndarray, int]:
        record = self.source[int(index)]
        pixels = np.asarray(record["image"], np.float32)[..., 0] / 255.0
        if pixels.shape != (self.size, self.size):
            pixels = self.matrix @ pixels @ self.matrix.T
        image = ((pixels - MNIST_MEAN) / MNIST_STD)[..., None].astype(np.float32)
        return image, int(record["label"])


def digit_images(source: str, split: str, size: int, data_dir: str | None = None) -> DigitImages:
    """The images a split's questions are built from: MNIST train / test, or the digits' split."""
    if source == "mnist":
        return TfdsMnist(split, size, data_dir)
    if source == "digits":
        return SklearnDigits(split, size)
    raise ConfigError(f"task.source={source!r} is invalid: allowed: {', '.join(SOURCES)}")


# ------------------------------------------------------------------------------------------------
# Examples and datasets


def qamnist_example(
    images: DigitImages,
    spec: QuestionSpec,
    seed: int,
    index: int,
    *,
    ops_range: tuple[int, int] | None = None,
    ticks: int | None = None,
) -> dict[str, np.ndarray]:
    """Example `index` of stream `seed`. `ops_range` (inclusive) replaces the spec's operation
    range (evaluation beyond the training range); `ticks` the layout length (default: the
    spec's longest question)."""
    rng = np.random.default_rng([seed, index])
    n_digits = int(rng.integers(spec.min_digits, spec.max_digits + 1))
    low, high = ops_range or (spec.min_ops, spec.max_ops)
    n_ops = int(rng.integers(low, high + 1))
    picks = rng.integers(0, len(images), size=spec.max_digits)
    pairs = [images.get(int(i)) for i in picks]
    labels = np.asarray([label for _, label in pairs], np.int32)
    question = draw_question(rng, n_digits, n_ops)
    modes, tokens = layout(
        question, n_digits, spec.repeats, spec.answer_steps, ticks or spec.ticks()
    )
    return {
        "digits": np.stack([image for image, _ in pairs]),
        "modes": modes,
        "tokens": tokens,
        "targets": np.int32(question.answer(labels)),
        "labels": labels,
        "n_digits": np.int32(n_digits),
        "n_ops": np.int32(n_ops),
    }


@dataclasses.dataclass(frozen=True)
class QuestionSource:
    """grain source: element i is `qamnist_example(images, spec, seed, i)`. With `eval_max_ops`
    above the spec's max_ops, odd elements ask beyond the training range (n_ops uniform in
    max_ops + 1 .. eval_max_ops) and every element is laid out over that longer question;
    `beyond` marks them."""

    images: Any  # DigitImages
    spec: QuestionSpec
    seed: int
    eval_max_ops: int | None = None

    def __len__(self) -> int:
        return STREAM_LENGTH

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        extra = self.eval_max_ops is not None and self.eval_max_ops > self.spec.max_ops
        beyond = extra and index % 2 == 1
        ops_range = (self.spec.max_ops + 1, self.eval_max_ops) if beyond else None
        ticks = self.spec.ticks(self.eval_max_ops if extra else None)
        example = qamnist_example(
            self.images, self.spec, self.seed, index, ops_range=ops_range, ticks=ticks
        )
        example["beyond"] = np.int32(beyond)
        return example


def qamnist_dataset(
    images: DigitImages,
    spec: QuestionSpec,
    seed: int,
    batch_size: int,
    *,
    eval_max_ops: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Batches of this process's shard (examples shard_index, +shard_count, ...) of the stream."""
    ds = grain.MapDataset.source(QuestionSource(images, spec, seed, eval_max_ops))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=True)
