"""The arithmetic LM: training data and loss mask, the `arith-test` preset's training run, the HF
export (weights, byte tokenizer, dynamic-P stream sets) and the LM sampler (per-key determinism,
exclusion decoding)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from tokenizers import Tokenizer

from configs import parscale_lm
from core.errors import CheckpointMismatchError, ConfigError
from inference_scaling.engine import root_key, sample_keys
from inference_scaling.samplers.lm import LMSampler, non_embedding_params
from inference_scaling.tasks.arithmetic import ArithmeticTask
from launch import export_lm
from parscale_jax import convert
from parscale_jax.config import ParScaleConfig
from parscale_jax.generate import generate, generate_rows
from parscale_jax.model import ParScaleLM
from tasks.arith_lm import data
from tasks.arith_lm.task import ArithLMTask, answer_exact_match
from tasks.parscale_lm.data import ByteTokenizer
from train_lib import metrics, trainer

REPO = Path(__file__).resolve().parents[1]
BYTES = ByteTokenizer()
TINY = ParScaleConfig(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def text_of(ids) -> str:
    return "".join(chr(int(t)) if t < 256 else ("|" if t == BYTES.eos_id else ".") for t in ids)


# ------------------------------------------------------------------------------------------------
# Data


def test_examples_are_the_arithmetic_task_prompts_with_answer_and_eos():
    ids, prompt_len = data.example_tokens("add", 123, 456)
    assert text_of(ids) == "123+456=579|" and prompt_len == len("123+456=")
    ids, _ = data.example_tokens("mul", 12, 34)
    assert text_of(ids) == "12*34=408|"
    # The same prompt text as inference_scaling's ArithmeticTask, for the same operands.
    task = ArithmeticTask()
    for level in ("add:1", "add:4", "mul:2"):
        for instance in task.generate(3, level, 5):
            meta = instance.meta
            assert data.prompt_text(meta["op"], meta["a"], meta["b"]) == task.prompt(instance)
            assert data.solve(meta["op"], meta["a"], meta["b"]) == instance.solution
    assert task.levels == data.LEVELS
    assert data.operand_range(1) == (0, 9) and data.operand_range(3) == (100, 999)
    assert data.max_example_tokens("add:4") == len("9999+9999=19998") + 1


def test_the_loss_mask_covers_the_answer_and_its_eos_only():
    stored = {"tokens": [], "segment_ids": [], "answer_mask": []}
    for segment, (a, b) in enumerate(((12, 34), (5, 7)), start=1):
        ids, prompt_len = data.example_tokens("add", a, b)
        stored["tokens"] += list(ids)
        stored["segment_ids"] += [segment] * len(ids)
        stored["answer_mask"] += [0] * prompt_len + [1] * (len(ids) - prompt_len)
    stored = {
        k: np.asarray(v + [BYTES.pad_id if k == "tokens" else 0] * 3, np.int32)
        for k, v in stored.items()
    }
    example = data.model_example(**stored)
    # inputs "12+34=46|5+7=12|.." ; loss on the targets 4, 6, EOS, 1, 2, EOS
    assert text_of(example["inputs"]) == "12+34=46|5+7=12|.."
    trained = [
        text_of([t]) for t, m in zip(example["targets"], example["loss_mask"], strict=True) if m
    ]
    assert trained == ["4", "6", "|", "1", "2", "|"]
    assert list(example["positions"][:10]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]
    assert list(example["segment_ids"][-3:]) == [2, 0, 0]


def test_sequences_are_random_access_packed_and_in_range():
    spec = data.ArithSpec(levels=("add:1", "add:3", "mul:2"), seq_len=48, seed=5)
    first = data.pack_sequence(spec, "train", 7)
    again = data.pack_sequence(spec, "train", 7)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other = data.pack_sequence(spec, "eval", 7)
    assert not np.array_equal(first["tokens"], other["tokens"])
    for index in range(20):
        stored = data.pack_sequence(spec, "train", index)
        texts = data.decode_examples(stored["tokens"])
        assert len(texts) == stored["segment_ids"].max() >= 1
        for text in texts:
            op = "add" if "+" in text else "mul"
            a, rest = text.split(data.OPERATORS[op])
            b, answer = rest.split("=")
            digits = {len(a), len(b)}
            assert len(digits) == 1 and f"{op}:{digits.pop()}" in spec.levels
            assert int(answer) == data.solve(op, int(a), int(b))
    ds = data.arith_dataset("train", spec, batch_size=4)
    batch = ds[3]
    assert {k: v.shape for k, v in batch.items()} == dict.fromkeys(batch, (4, 48))
    with pytest.raises(ConfigError, match="task.seq_len=10"):
        data.ArithSpec(levels=("add:4",), seq_len=10)
    with pytest.raises(ConfigError, match="'add:9'"):
        data.ArithSpec(levels=("add:9",), seq_len=64)


def test_exact_match_counts_examples_with_every_answer_token_right():
    # Two examples in one row: the first fully right, the second with one wrong answer token.
    targets = jnp.array([[1, 2, 3, 4, 5, 6]])
    mask = jnp.array([[0, 1, 1, 0, 1, 1]])
    segments = jnp.array([[1, 1, 1, 2, 2, 2]])
    predicted = jnp.array([[9, 2, 3, 9, 5, 0]])  # wrong outside the mask does not count
    logits = jax.nn.one_hot(predicted, 10)
    right, examples = answer_exact_match(logits, targets, mask, segments)
    assert (float(right), float(examples)) == (1.0, 2.0)


def test_the_arith_presets_build_one_model():
    models = {}
    for name in ("arith", "arith-p2", "arith-p4", "arith-p2-recycle", "arith-p4-recycle"):
        config = parscale_lm.get_config(name)
        task = ArithLMTask(config)
        models[name] = task.model_config
        assert config.freeze_backbone == name.endswith("recycle")
    base = models["arith"]
    for name, model in models.items():
        assert model.parscale_n == (1 if name == "arith" else int(name[len("arith-p")]))
        assert {**vars(model), "parscale_n": 1} == vars(base)
    # Presets are copies: changing one config leaves the preset alone.
    parscale_lm.get_config("arith").task.seq_len = 7
    assert parscale_lm.get_config("arith").task.seq_len == 64


# ------------------------------------------------------------------------------------------------
# Training and export


def arith_test_config(**changes) -> ml_collections.ConfigDict:
    config = parscale_lm.get_config("arith-test")
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def p1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("arith_p1")
    trainer.train_and_evaluate(arith_test_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def p2_recycled(p1_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("arith_p2")
    config = arith_test_config(init_from=str(p1_run), freeze_backbone=True)
    config.model.parscale_n = 2
    config.optim.warmup_steps = 1
    config.train.update(total_steps=4, checkpoint_every=4)
    trainer.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(p1_run: Path, p2_recycled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "arith_lm"
    export_lm.export(str(p1_run), str(out), [str(p2_recycled)])
    return out


def params_of(workdir: Path) -> dict:
    _, state, _ = trainer.restore_run(workdir)
    return jax.device_get(state.params)


def test_the_test_preset_trains_and_its_loss_falls(p1_run: Path):
    records = metrics.read_metrics(p1_run, split="train")
    assert records[-1]["step"] == 30
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert 0.0 <= records[-1]["exact_match"] <= 1.0


def test_export_round_trip_gives_the_same_params_and_byte_ids(p1_run: Path, exported: Path):
    config, params = convert.load_checkpoint(exported)
    assert config.to_hf() == ArithLMTask(arith_test_config()).model_config.to_hf()
    ours = flatten_dict(params_of(p1_run))
    theirs = flatten_dict(params)
    assert ours.keys() == theirs.keys()
    for path, value in ours.items():
        np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(value), str(path))
    hf = json.loads((exported / "config.json").read_text())
    assert (hf["eos_token_id"], hf["pad_token_id"]) == (BYTES.eos_id, BYTES.pad_id)
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    for text in ("123+456=579", "h\u00e9llo w\u00f6rld \u2603\n\t\x00\x7f~ ", ""):
        ids = tokenizer.encode(text).ids
        assert ids == BYTES.encode(text)
        assert tokenizer.decode(ids) == BYTES.decode(ids) == text
    assert tokenizer.decode([*BYTES.encode("42"), BYTES.eos_id, BYTES.pad_id]) == "42"
    assert tokenizer.get_vocab_size() == BYTES.vocab_size


def test_export_refuses_a_directory_with_files(p1_run: Path, tmp_path: Path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match=str(tmp_path)):
        export_lm.export(str(p1_run), str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_dynamic_p_assembles_the_recycled_model(p2_recycled: Path, exported: Path):
    assert convert.available_streams(exported) == [1, 2]
    config, params = convert.load_checkpoint(exported, parscale_n=2)
    own = params_of(p2_recycled)
    model = ArithLMTask(arith_test_config()).model_config
    assert config == dataclasses.replace(model, parscale_n=2)
    ours, theirs = flatten_dict(own), flatten_dict(params)
    assert ours.keys() == theirs.keys()
    for path, value in ours.items():
        np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(value), str(path))
    prompts = np.asarray([BYTES.encode("12+34="), BYTES.encode("56+78=")], np.int32)
    tokens = [
        np.asarray(generate(config, p, prompts, max_new_tokens=6, temperature=1.0, seed=3))
        for p in (params, own)
    ]
    np.testing.assert_array_equal(*tokens)
    # P = 1 is the bare backbone; an unknown P names what the directory serves.
    config1, backbone = convert.load_checkpoint(exported, parscale_n=1)
    assert config1.parscale_n == 1 and "aggregate_layer" not in backbone
    with pytest.raises(ConfigError, match=r"parscale_n=4 is not available.*P = 1, 2"):
        convert.load_checkpoint(exported, parscale_n=4)


def test_launch_generate_runs_a_stream_set(exported: Path):
    """`python -m launch.generate --parscale_n=2` on the exported directory: the greedy tokens of
    the assembled P = 2 model (one subprocess: the CLI and its flag)."""
    config, params = convert.load_checkpoint(exported, parscale_n=2)
    want = np.asarray(generate(config, params, np.asarray([BYTES.encode("7+8=")]), None, 5))[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.generate",
            f"--checkpoint={exported}",
            "--prompt=7+8=",
            "--max_new_tokens=5",
            "--parscale_n=2",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout.strip().splitlines()[-1])["ids"]
    stop = [i for i, t in enumerate(want) if t == BYTES.eos_id]
    assert ids == [int(t) for t in want[: stop[0] + 1 if stop else len(want)]]


def test_stream_sets_need_the_same_backbone(exported: Path, tmp_path: Path):
    base = convert.read_safetensors(exported)
    other = dict(base)
    name = "model.layers.1.mlp.up_proj.weight"
    other[name] = base[name].copy()
    other[name].flat[3] += 1e-6
    with pytest.raises(CheckpointMismatchError, match=name.replace(".", r"\.")):
        export_lm.check_same_backbone(base, other, "W2", "W1")
    export_lm.check_same_backbone(base, dict(base), "W2", "W1")
    # A base whose backbone changed after the streams were written is refused at load time.
    copy = tmp_path / "changed"
    copy.mkdir()
    for item in ("config.json", "tokenizer.json", "streams"):
        os.symlink(exported / item, copy / item)
    from safetensors.numpy import save_file

    save_file(other, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="another backbone"):
        convert.load_checkpoint(copy, parscale_n=2)


# ------------------------------------------------------------------------------------------------
# The LM sampler


def test_the_sampler_is_deterministic_per_key(exported: Path):
    task = ArithmeticTask()
    instances = task.generate(0, "add:2", 2)
    sampler = LMSampler.from_dir(exported, parscale_n=2, temperature=1.0, max_new_tokens=6)
    assert (sampler.label, sampler.diversity) == ("P=2", "temperature=1,top_k=0,top_p=1")
    assert LMSampler.from_dir(exported).label == "P=1"
    root = root_key(11)
    pairs = [(i.instance_id, r) for i in instances for r in range(4)]
    rows = [i for i in instances for _ in range(4)]
    first = sampler.sample(rows, sample_keys(root, pairs))
    # The same keys in another batch layout (reversed, a smaller batch) give the same samples.
    again = sampler.sample(rows[::-1][:5], sample_keys(root, pairs[::-1][:5]))
    assert [s.answer for s in again] == [s.answer for s in first[::-1][:5]]
    assert [s.score for s in again] == pytest.approx([s.score for s in first[::-1][:5]])
    # Different repeat ids of one instance: different samples.
    assert len({s.answer for s in first[:4]}) > 1
    for sample in first:
        assert sample.cost.unit == "tokens" and sample.cost.streams == 2
        assert 1 <= sample.cost.native <= 6 and sample.cost.flops > 0
        assert np.isfinite(sample.score) and sample.score <= 0
    greedy = LMSampler(sampler.config, sampler.params, sampler.tokenizer, max_new_tokens=6)
    assert (greedy.label, greedy.diversity) == ("P=2", "greedy")
    answers = {s.answer for s in greedy.sample(rows[:4], sample_keys(root, pairs[:4]))}
    assert len(answers) == 1  # greedy: every repeat the same


class CharTokenizer:
    """Ids as characters (chr / ord), with a chosen EOS: lets a random model 'end an answer'."""

    vocab_size = 320
    pad_id = 319

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) for i in ids)


def test_exclusion_decoding_avoids_the_wrong_answers():
    # An untied random model: with a tied head the random model just repeats its last token.
    config = dataclasses.replace(TINY, tie_word_embeddings=False)
    params = ParScaleLM(config).init(jax.random.key(4), jnp.zeros((1, 4), jnp.int32))["params"]
    # A prompt whose first three greedy tokens differ; the third is made the EOS, so the greedy
    # answer is the first two tokens.
    candidates = np.arange(3 * 8, dtype=np.int32).reshape(8, 3) + 40
    keys8 = jax.random.split(jax.random.key(0), 8)
    greedy_tokens = np.asarray(generate_rows(config, params, candidates, None, keys8, 8)[0])
    row = next(i for i, t in enumerate(greedy_tokens) if len(set(t[:3].tolist())) == 3)
    prompt, free = candidates[row].tolist(), greedy_tokens[row]
    tokenizer = CharTokenizer(eos_id=int(free[2]))
    sampler = LMSampler(config, params, tokenizer, max_new_tokens=8, prompt_fn=lambda i: i)
    keys = sample_keys(root_key(0), [(0, 0), (0, 1)])
    greedy = sampler.sample([tokenizer.decode(prompt)] * 2, keys)
    assert greedy[0].answer == tokenizer.decode(free[:2]) and greedy[0].cost.native == 3
    wrong = greedy[0].answer
    contexts = [{"incorrect": True, "wrong_answers": [wrong]}, {}]
    excluded = sampler.sample([tokenizer.decode(prompt)] * 2, keys, contexts)
    assert excluded[0].answer != wrong
    assert excluded[1].answer == wrong  # the row without feedback is untouched
    # Excluding answers repeatedly (F2's growing list) never gives one of them back.
    seen = [wrong, excluded[0].answer]
    for _ in range(3):
        out = sampler.sample([tokenizer.decode(prompt)], keys[:1], [{"wrong_answers": seen}])[0]
        assert out.answer not in seen
        seen.append(out.answer)
    # Sampling (temperature > 0) respects the exclusion too.
    hot = LMSampler(
        config, params, tokenizer, temperature=1.5, max_new_tokens=8, prompt_fn=lambda i: i
    )
    many = sample_keys(root_key(1), [(0, r) for r in range(8)])
    outs = hot.sample([tokenizer.decode(prompt)] * 8, many, [{"wrong_answers": [wrong]}] * 8)
    assert wrong not in {o.answer for o in outs}


def test_generate_rows_matches_generate_when_greedy():
    params = ParScaleLM(TINY).init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]
    prompts = np.asarray([[1, 2, 3, 4], [0, 9, 8, 7]], np.int32)
    mask = np.asarray([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32)
    want = generate(TINY, params, prompts, mask, 5, stop_tokens=(300,), pad_id=0)
    keys = jax.random.split(jax.random.key(0), 2)
    free, logp, lengths = generate_rows(
        TINY, params, prompts, mask, keys, 5, stop_tokens=(300,), pad_id=0
    )
    np.testing.assert_array_equal(np.asarray(free), np.asarray(want))
    assert np.all(np.asarray(logp) <= 0) and list(np.asarray(lengths)) == [5, 5]
    # The budget ends the text like a stop token: forbidding the whole greedy continuation
    # changes it; the other row is untouched.
    forbidden = [[[*np.asarray(free[0]).tolist(), 300]], []]
    tokens, _, _ = generate_rows(
        TINY, params, prompts, mask, keys, 5, stop_tokens=(300,), pad_id=0, forbidden=forbidden
    )
    tokens, free = np.asarray(tokens), np.asarray(free)
    assert list(tokens[0]) != list(free[0]) and list(tokens[1]) == list(free[1])
    assert non_embedding_params(params) == sum(
        np.size(v) for k, v in flatten_dict(params).items() if k[0] != "embed_tokens"
    )


def test_exclusion_samples_the_conditional_distribution():
    """A 4-token model (3 = stop), answers of at most 2 tokens: with (0, 1) excluded, sampling
    follows p(y) / (1 - p(0, 1)) -- the first token is 0 with probability
    p(0) (1 - p(1 | 0)) / (1 - p(0) p(1 | 0)), not p(0) as when only the last token is refused."""
    config = dataclasses.replace(TINY, vocab_size=4, tie_word_embeddings=False)
    model = ParScaleLM(config)
    params = model.init(jax.random.key(7), jnp.zeros((1, 2), jnp.int32))["params"]
    prob = lambda ids: np.asarray(jax.nn.softmax(model.apply({"params": params}, ids).logits))
    p_first = prob(np.zeros((1, 2), np.int32))[0, -1]
    p_second = prob(np.zeros((1, 3), np.int32))[0, -1]  # after the first token 0
    excluded = p_first[0] * p_second[1]
    want = p_first / (1 - excluded)
    want[0] = p_first[0] * (1 - p_second[1]) / (1 - excluded)
    n = 4096
    tokens, _, _ = generate_rows(
        config,
        params,
        np.zeros((n, 2), np.int32),
        None,
        jax.random.split(jax.random.key(1), n),
        2,
        temperature=1.0,
        stop_tokens=(3,),
        forbidden=[[[0, 1, 3]]] * n,
    )
    tokens = np.asarray(tokens)
    assert not np.any((tokens[:, 0] == 0) & (tokens[:, 1] == 1))
    got = np.bincount(tokens[:, 0], minlength=4) / n
    assert abs(want[0] - p_first[0]) > 5 * np.sqrt(want[0] * (1 - want[0]) / n)  # a real test
    np.testing.assert_allclose(got, want, atol=4 * np.sqrt(0.25 / n))
