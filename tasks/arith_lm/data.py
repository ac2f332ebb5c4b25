"""Arithmetic problems as byte-level LM training text: "123+456=579" + EOS, packed, seeded.

Problems (the definitions of `inference_scaling/tasks/arithmetic.py`, re-implemented here because
`tasks/` may not import `inference_scaling/`): level `add:d` / `mul:d` draws both operands
uniformly with exactly d digits -- [10^(d-1), 10^d - 1], and [0, 9] for d = 1 -- the text is
"a+b=" / "a*b=" (the ArithmeticTask prompt) followed by the decimal answer and EOS.

Tokens: `tasks.parscale_lm.data.ByteTokenizer` -- ids 0..255 are the UTF-8 bytes (these texts are
ASCII), 256 = EOS, 257 = PAD. There is no BOS: a prompt starts at position 0.

Sequence j of a split (exact rule, random access): its own generator
`np.random.default_rng([seed, split_code, j])` (split_code 0 = train, 1 = eval) draws examples in
turn -- a level from `levels` with probabilities `level_weights` (uniform when empty), then the
two operands -- and appends them while they fit in seq_len + 1 tokens; the first that does not
fit is dropped and the sequence is padded with PAD. Examples are never split across sequences.

Model example (`model_example`, t = 0..seq_len-1), as in the LM task (`tasks.parscale_lm.data`):
  inputs[t] = tokens[t]; targets[t] = tokens[t + 1]; segment_ids[t] = 1 + example index (0 on
  padding); positions[t] restart at 0 with every example (so a packed example computes what it
  would compute alone, and what the sampler computes for its prompt); and
  loss_mask[t] = 1 iff target t is an answer character or the EOS that ends the answer, i.e.
  the prompt "a+b=" is context only and never trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from core.errors import ConfigError
from tasks.parscale_lm.data import ByteTokenizer
from tasks.parscale_lm.data import model_example as lm_model_example

OPERATORS = {"add": "+", "mul": "*"}
MAX_DIGITS = {"add": 8, "mul": 4}  # the ArithmeticTask's levels
LEVELS = tuple(f"{op}:{d}" for op, top in MAX_DIGITS.items() for d in range(1, top + 1))
SPLIT_CODES = {"train": 0, "eval": 1}
# Length of the train split: effectively endless (each index is a fresh random sequence).
TRAIN_SEQUENCES = 2**31 - 1
TOKENIZER = ByteTokenizer()


def parse_level(level: str) -> tuple[str, int]:
    """'add:3' -> ('add', 3); ConfigError for anything outside `LEVELS`."""
    if level not in LEVELS:
        raise ConfigError(f"level {level!r} is invalid: allowed: {', '.join(LEVELS)}")
    op, digits = level.split(":")
    return op, int(digits)


def operand_range(digits: int) -> tuple[int, int]:
    """(lo, hi), inclusive, of operands with exactly `digits` digits (0..9 for one digit)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def solve(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a * b


def prompt_text(op: str, a: int, b: int) -> str:
    """'123+456=' (the ArithmeticTask prompt)."""
    return f"{a}{OPERATORS[op]}{b}="


def example_text(op: str, a: int, b: int) -> str:
    """'123+456=579' (without the EOS token)."""
    return prompt_text(op, a, b) + str(solve(op, a, b))


def max_example_tokens(level: str) -> int:
    """Tokens of the longest example of a level, EOS included: add:d 3d + 4, mul:d 4d + 3."""
    op, d = parse_level(level)
    _, hi = operand_range(d)
    return len(example_text(op, hi, hi)) + 1


def draw_problem(rng: np.random.Generator, level: str) -> tuple[str, int, int]:
    """(op, a, b): both operands uniform over the level's range, drawn as ArithmeticTask does."""
    op, digits = parse_level(level)
    lo, hi = operand_range(digits)
    a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
    return op, a, b


def example_tokens(op: str, a: int, b: int) -> tuple[np.ndarray, int]:
    """(ids of prompt + answer + EOS as int32, prompt length in tokens)."""
    prompt = TOKENIZER.encode_array(prompt_text(op, a, b))
    answer = TOKENIZER.encode_array(str(solve(op, a, b)))
    ids = np.concatenate([prompt, answer, np.asarray([TOKENIZER.eos_id], np.int32)])
    return ids, len(prompt)


@dataclasses.dataclass(frozen=True)
class ArithSpec:
    """What the data of a run is: the level mix, the sequence length and the seed."""

    levels: tuple[str, ...]
    seq_len: int
    level_weights: tuple[float, ...] = ()  # empty: uniform over `levels`
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.levels:
            raise ConfigError("task.levels=() is invalid: give at least one level, e.g. 'add:3'")
        for level in self.levels:
            try:
                parse_level(level)
            except ConfigError:
                raise ConfigError(
                    f"task.levels={tuple(self.levels)!r} is invalid: {level!r} is not one of "
                    f"{', '.join(LEVELS)}"
                ) from None
        if self.level_weights and (
            len(self.level_weights) != len(self.levels)
            or any(not w >= 0 for w in self.level_weights)
            or sum(self.level_weights) <= 0
        ):
            raise ConfigError(
                f"task.level_weights={tuple(self.level_weights)!r} is invalid: need one weight "
                f">= 0 per level ({len(self.levels)}), not all 0, or () for uniform"
            )
        longest = max(max_example_tokens(level) for level in self.levels)
        if self.seq_len + 1 < longest:
            raise ConfigError(
                f"task.seq_len={self.seq_len} is invalid: the longest example of task.levels "
                f"has {longest} tokens; need seq_len >= {longest - 1}"
            )

    @property
    def probabilities(self) -> np.ndarray:
        weights = np.asarray(self.level_weights or [1.0] * len(self.levels), np.float64)
        return weights / weights.sum()


def pack_sequence(spec: ArithSpec, split: str, index: int) -> dict[str, np.ndarray]:
    """Stored sequence `index` of `split`: {'tokens', 'segment_ids', 'answer_mask'}, each
    (seq_len + 1,) int32 (the rule in the module docstring); answer_mask marks the answer
    characters and the EOS of every example."""
    if split not in SPLIT_CODES:
        raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_CODES)}")
    rng = np.random.default_rng([int(spec.seed), SPLIT_CODES[split], int(index)])
    width = spec.seq_len + 1
    tokens = np.full(width, TOKENIZER.pad_id, np.int32)
    segments = np.zeros(width, np.int32)
    answer = np.zeros(width, np.int32)
    used, count = 0, 0
    probabilities = spec.probabilities
    while True:
        level = spec.levels[int(rng.choice(len(spec.levels), p=probabilities))]
        ids, prompt_len = example_tokens(*draw_problem(rng, level))
        if used + len(ids) > width:
            break
        count += 1
        tokens[used : used + len(ids)] = ids
        segments[used : used + len(ids)] = count
        answer[used + prompt_len : used + len(ids)] = 1
        used += len(ids)
    return {"tokens": tokens, "segment_ids": segments, "answer_mask": answer}


def model_example(
    tokens: np.ndarray, segment_ids: np.ndarray, answer_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Stored sequence -> inputs, targets, loss_mask, segment_ids, positions ((seq_len,) int32):
    the LM task's example with the loss on answer targets only."""
    example = lm_model_example(tokens, segment_ids)
    # The answer never starts a segment, so its targets share the input's segment.
    example["loss_mask"] = example["loss_mask"] * np.asarray(answer_mask, np.int32)[1:]
    return example


def arith_dataset(
    split: str,
    spec: ArithSpec,
    *,
    batch_size: int,
    num_sequences: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Batches {'inputs', 'targets', 'loss_mask', 'segment_ids', 'positions'} of
    (batch_size, seq_len) int32. `num_sequences` defaults to endless for 'train'; host
    `shard_index` of `shard_count` gets sequences shard_index, shard_index + shard_count, ..."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be positive")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if split not in SPLIT_CODES:
        raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_CODES)}")
    if num_sequences is None:
        num_sequences = TRAIN_SEQUENCES
    ds = grain.MapDataset.range(int(num_sequences))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.map(lambda j: model_example(**pack_sequence(spec, split, int(j))))
    return ds.batch(batch_size, drop_remainder=True)


def decode_examples(tokens: Sequence[int]) -> list[str]:
    """The texts of a stored sequence's examples (for tests and inspection)."""
    texts, current = [], []
    for t in tokens:
        if t == TOKENIZER.eos_id:
            texts.append(TOKENIZER.decode(current))
            current = []
        elif t == TOKENIZER.pad_id:
            break
        else:
            current.append(int(t))
    return texts
