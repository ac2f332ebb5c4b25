"""LM data: tokenizers, corpora and splits, packing and loss masks, tfds builder, grain reading."""

from __future__ import annotations

import collections
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.parscale_lm import data

FIXTURES = Path(__file__).parent / "fixtures"
HF_DIR = FIXTURES / "hf_qwen2" / "tied_gqa"
EOS, PAD = 9, 0


def packed_model_examples(docs, seq_len, eos=EOS, pad=PAD):
    return [
        data.model_example(s["tokens"], s["segment_ids"])
        for s in data.pack_documents(docs, seq_len, eos, pad)
    ]


# ------------------------------------------------------------------------------------------------
# Packing and masks


def test_packing_and_masks_on_hand_made_documents() -> None:
    # Stream: A = 1 2 3 | EOS, B = 4 5 | EOS, (empty: skipped), D = 6 | EOS
    #   tokens   1 2 3 9 4 5 9 6 9
    #   document 0 0 0 0 1 1 1 2 2
    # seq_len 4 -> sequences are stream[0:5] and stream[4:9] (one-token overlap); stream[8:] is
    # a lone token with no target, dropped.
    seqs = list(data.pack_documents([[1, 2, 3], [4, 5], [], [6]], 4, EOS, PAD))
    assert len(seqs) == 2
    np.testing.assert_array_equal(seqs[0]["tokens"], [1, 2, 3, 9, 4])
    np.testing.assert_array_equal(seqs[0]["segment_ids"], [1, 1, 1, 1, 2])
    np.testing.assert_array_equal(seqs[1]["tokens"], [4, 5, 9, 6, 9])
    np.testing.assert_array_equal(seqs[1]["segment_ids"], [1, 1, 1, 2, 2])

    first, second = (data.model_example(s["tokens"], s["segment_ids"]) for s in seqs)
    np.testing.assert_array_equal(first["inputs"], [1, 2, 3, 9])
    np.testing.assert_array_equal(first["targets"], [2, 3, 9, 4])
    # 3 -> EOS ends A (trained); EOS(A) -> 4 crosses into B (masked).
    np.testing.assert_array_equal(first["loss_mask"], [1, 1, 1, 0])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3])

    np.testing.assert_array_equal(second["inputs"], [4, 5, 9, 6])
    np.testing.assert_array_equal(second["targets"], [5, 9, 6, 9])
    np.testing.assert_array_equal(second["loss_mask"], [1, 1, 0, 1])
    np.testing.assert_array_equal(second["segment_ids"], [1, 1, 1, 2])
    np.testing.assert_array_equal(second["positions"], [0, 1, 2, 0])
    # Every document token has exactly one trained transition: 3 + 2 + 1.
    assert sum(int(e["loss_mask"].sum()) for e in (first, second)) == 6
    for e in (first, second):
        assert all(v.dtype == np.int32 and v.shape == (4,) for v in e.values())


def test_last_sequence_is_padded_and_padding_is_masked() -> None:
    # Stream 1 2 3 9 4 5 9: stream[0:5] = 1 2 3 9 4, then stream[4:7] = 4 5 9 + 2 pads.
    seqs = list(data.pack_documents([[1, 2, 3], [4, 5]], 4, EOS, PAD))
    assert len(seqs) == 2
    np.testing.assert_array_equal(seqs[1]["tokens"], [4, 5, 9, PAD, PAD])
    np.testing.assert_array_equal(seqs[1]["segment_ids"], [1, 1, 1, 0, 0])
    e = data.model_example(seqs[1]["tokens"], seqs[1]["segment_ids"])
    np.testing.assert_array_equal(e["inputs"], [4, 5, 9, PAD])
    np.testing.assert_array_equal(e["targets"], [5, 9, PAD, PAD])
    np.testing.assert_array_equal(e["loss_mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(e["segment_ids"], [1, 1, 1, 0])
    np.testing.assert_array_equal(e["positions"], [0, 1, 2, 0])


def test_document_longer_than_a_sequence_continues_with_fresh_positions() -> None:
    # Stream 1..7 9: sequences [1 2 3 4], [4 5 6 7], [7 9 pad pad] for seq_len 3.
    seqs = packed_model_examples([[1, 2, 3, 4, 5, 6, 7]], 3)
    assert [e["inputs"].tolist() for e in seqs] == [[1, 2, 3], [4, 5, 6], [7, 9, PAD]]
    assert [e["targets"].tolist() for e in seqs] == [[2, 3, 4], [5, 6, 7], [9, PAD, PAD]]
    assert [e["loss_mask"].tolist() for e in seqs] == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    assert [e["positions"].tolist() for e in seqs] == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]


@pytest.mark.parametrize("seq_len", [1, 2, 5, 16])
def test_masked_transitions_are_exactly_the_in_document_ones(seq_len: int) -> None:
    rng = np.random.default_rng(seq_len)
    docs = [list(rng.integers(10, 50, size=int(n))) for n in rng.integers(0, 12, size=30)]
    expected = []  # (input, target) pairs inside each document, its EOS included, in order
    for doc in docs:
        if doc:
            stream = [*doc, EOS]
            expected.extend(zip(stream[:-1], stream[1:], strict=True))
    got = []
    for e in packed_model_examples(docs, seq_len):
        for t in range(seq_len):
            if e["loss_mask"][t]:
                got.append((int(e["inputs"][t]), int(e["targets"][t])))
                # in-document positions count up within a segment
                if t > 0 and e["segment_ids"][t - 1] == e["segment_ids"][t]:
                    assert e["positions"][t] == e["positions"][t - 1] + 1
            if e["segment_ids"][t] == 0:
                assert e["inputs"][t] == PAD and not e["loss_mask"][t]
    assert got == [(int(a), int(b)) for a, b in expected]


def test_pack_rejects_bad_seq_len() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        list(data.pack_documents([[1, 2]], 0, EOS, PAD))


# ------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip_including_non_ascii() -> None:
    tok = data.make_tokenizer("bytes")
    assert isinstance(tok, data.Tokenizer)
    text = "héllo wörld — 日本語 🐍\n\tdef f(x): return x"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert len(ids) > len(text)  # multi-byte characters
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(data.encode_array(tok, text), ids)
    head = len("héllo".encode())  # 6 bytes for 5 characters
    assert tok.decode([*ids[:head], tok.eos_id, tok.pad_id]) == "héllo"  # specials dropped
    assert tok.decode(ids[:2]) == "h\ufffd"  # a cut UTF-8 sequence decodes as U+FFFD
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert data.round_vocab(tok.vocab_size) == 320
    assert data.round_vocab(256, 64) == 256


def test_hf_tokenizer_matches_transformers_and_round_trips() -> None:
    tok = data.make_tokenizer(HF_DIR / "tokenizer.json")
    assert isinstance(tok, data.HFTokenizer)
    assert tok.eos_id == 319 and tok.pad_id == 319 and tok.vocab_size == 320
    ref = np.load(HF_DIR / "outputs.npz")
    assert tok.encode(str(ref["prompt_text"])) == ref["prompt_ids"].tolist()
    text = "Beautiful is better than ugly.\nSimple is better than complex, naïvely. 🐍"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("Flat"), tok.eos_id]) == "Flat<|endoftext|>"


def test_hf_tokenizer_needs_an_eos(tmp_path: Path) -> None:
    lone = tmp_path / "tokenizer.json"
    shutil.copy(HF_DIR / "tokenizer.json", lone)
    with pytest.raises(ValueError, match="eos_token"):
        data.HFTokenizer.from_file(lone)
    assert data.HFTokenizer.from_file(lone, eos_token="<|endoftext|>").eos_id == 319
    with pytest.raises(ValueError, match="not in the vocabulary"):
        data.HFTokenizer.from_file(lone, eos_token="<|im_end|>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_tokenizer(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------
# Corpora and splits


def test_stdlib_corpus_split_by_file_disjoint_and_deterministic() -> None:
    corpus = data.StdlibCorpus()
    names = corpus.names()
    assert len(names) > 100 and names == sorted(set(names))
    assert all(n.endswith(".py") for n in names)
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for n in names
        for part in n.split("/")
    )
    assert "os.py" in names and "json/decoder.py" in names
    assert "def " in corpus.read("os.py")

    split = data.split_names(names)
    assert split == data.split_names(list(reversed(names)))  # deterministic, order-free
    assert set(split["train"]).isdisjoint(split["validation"])
    assert set(split["train"]) | set(split["validation"]) == set(names)
    assert 0.005 < len(split["validation"]) / len(names) < 0.05
    # Adding or removing other files moves no file between splits.
    smaller = data.split_names(names[::2])
    assert set(smaller["validation"]) == set(split["validation"]) & set(names[::2])

    with_tests = data.StdlibCorpus(include_tests=True).names()
    assert set(names) < set(with_tests)


def test_split_small_corpora_and_document_caps() -> None:
    names = [f"doc{i}.txt" for i in range(5)]
    split = data.split_names(names)
    assert len(split["validation"]) == 1  # the smallest-hash document, so validation exists
    assert sorted(split["train"] + split["validation"]) == names
    assert data.split_names(names, validation_fraction=0.0)["validation"] == []
    capped = data.split_names([f"f{i}" for i in range(100)], max_documents=20)
    kept = capped["train"] + capped["validation"]
    assert len(kept) == 20
    assert capped == data.split_names([f"f{i}" for i in range(100)][::-1], max_documents=20)
    with pytest.raises(ValueError, match="validation_fraction"):
        data.split_names(names, validation_fraction=1.0)


def write_files(root: Path, count: int = 12, seed: int = 0) -> dict[str, str]:
    """`count` distinct random text files under root/a and root/b/c; returns name -> text."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyzéöθε日\n")
    texts = {}
    for i in range(count):
        folder = "a" if i % 2 else "b/c"
        name = f"{folder}/file{i:02d}.txt"
        words = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(1, 9, size=40)]
        texts[name] = f"# file {i}\n" + " ".join(words[: int(rng.integers(5, 40))])
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[name], encoding="utf-8")
    return texts


def test_file_corpus_globs_and_names(tmp_path: Path) -> None:
    texts = write_files(tmp_path)
    corpus = data.FileCorpus([str(tmp_path / "**" / "*.txt")])
    assert corpus.names() == sorted(texts)
    assert all(corpus.read(n) == texts[n] for n in texts)
    # Plain paths are named by their basename; duplicates through two patterns are read once.
    one = data.FileCorpus([tmp_path / "a" / "file01.txt", str(tmp_path / "a" / "*.txt")])
    assert "file01.txt" in one.names() and len(one.names()) == 6
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
    assert data.FileCorpus([tmp_path / "bad.txt"]).read("bad.txt") == "ok \ufffd\ufffd end"
    with pytest.raises(FileNotFoundError, match="no files match"):
        data.FileCorpus([str(tmp_path / "*.nothing")])


def test_tfds_text_corpus_reads_a_text_feature() -> None:
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        corpus = data.TfdsTextCorpus("imdb_reviews", splits=("train",), feature="text")
        names = corpus.names()
        assert names == [f"train/{i}" for i in range(4)]
        assert all(isinstance(corpus.read(n), str) for n in names)


# ------------------------------------------------------------------------------------------------
# tfds builder and grain reading


@pytest.fixture(scope="module")
def files_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A files corpus of 40 small documents prepared with seq_len 16 in a temp data_dir."""
    root = tmp_path_factory.mktemp("texts")
    texts = write_files(root, count=40, seed=1)
    data_dir = tmp_path_factory.mktemp("tfds")
    options = {"corpus": "files", "paths": (str(root / "**" / "*.txt"),), "seq_len": 16}
    return {"texts": texts, "data_dir": data_dir, "options": options}


def lm(files_dataset: dict, split: str, **kwargs) -> object:
    return data.lm_dataset(
        split, data_dir=files_dataset["data_dir"], **{**files_dataset["options"], **kwargs}
    )


def test_tfds_builder_round_trip(files_dataset: dict) -> None:
    import tensorflow_datasets as tfds

    from tasks.parscale_lm import tfds_builder as lm_tfds

    opts = files_dataset["options"]
    spec = data.CorpusSpec(corpus="files", paths=opts["paths"], seq_len=16)
    lm_tfds.prepare(spec, files_dataset["data_dir"])
    name = spec.config_name()
    assert name.startswith("files") and name.endswith("-bytes-16")
    split = spec.split_documents()
    texts = files_dataset["texts"]
    assert sorted(split["train"] + split["validation"]) == sorted(texts)
    tok = data.ByteTokenizer()
    for split_name, names in split.items():
        source = tfds.data_source(
            f"lm_corpus/{name}",
            split=split_name,
            data_dir=str(files_dataset["data_dir"]),
            download=False,
        )
        stored = [source[i] for i in range(len(source))]
        expected = list(
            data.pack_documents((tok.encode(texts[n]) for n in names), 16, tok.eos_id, tok.pad_id)
        )
        assert len(stored) == len(expected) > 0
        for got, want in zip(stored, expected, strict=True):
            for key in ("tokens", "segment_ids"):
                assert got[key].dtype == np.int32
                np.testing.assert_array_equal(got[key], want[key])
        # Undo the one-token overlap: the stream is the split's documents, each ended by EOS.
        stream = list(stored[0]["tokens"][:1]) + [t for s in stored for t in s["tokens"][1:]]
        stream = [t for t in stream if t != tok.pad_id]
        eos = [i for i, t in enumerate(stream) if t == tok.eos_id]
        docs = [tok.decode(stream[a + 1 : b]) for a, b in itertools.pairwise([-1, *eos])]
        assert docs == [texts[n] for n in names]
        counts = data.split_token_counts(source)
        assert counts["loss_tokens"] == sum(len(tok.encode(texts[n])) for n in names)


def rows(ds, key: str = "inputs") -> list[tuple[int, ...]]:
    return [tuple(row) for i in range(len(ds)) for row in ds[i][key]]


def test_lm_dataset_batches_shards_and_seeds(files_dataset: dict) -> None:
    ds = lm(files_dataset, "train", batch_size=4, repeat=False)
    batch = ds[0]
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])

    everything = lm(files_dataset, "train", batch_size=1, repeat=False, shuffle=False)
    full = collections.Counter(rows(everything))
    assert len(full) == len(everything) > 20  # distinct texts: every sequence is unique
    shards = [
        lm(files_dataset, "train", batch_size=1, repeat=False, shard_index=k, shard_count=3)
        for k in range(3)
    ]
    counts = [collections.Counter(rows(s)) for s in shards]
    assert sum(len(s) for s in shards) == len(everything)
    assert sum(counts, collections.Counter()) == full  # disjoint and covering
    assert all(len(s) > 0 for s in shards)

    first = rows(lm(files_dataset, "train", batch_size=2, seed=3, repeat=False))
    assert first == rows(lm(files_dataset, "train", batch_size=2, seed=3, repeat=False))
    other = rows(lm(files_dataset, "train", batch_size=2, seed=4, repeat=False))
    assert other != first and sorted(other) == sorted(first)
    # Repeated training data: each epoch is a permutation of all sequences, reshuffled.
    repeated = lm(files_dataset, "train", batch_size=1, seed=3)
    n = len(everything)
    epoch0 = [tuple(repeated[i]["inputs"][0]) for i in range(n)]
    epoch1 = [tuple(repeated[i]["inputs"][0]) for i in range(n, 2 * n)]
    assert collections.Counter(epoch0) == collections.Counter(epoch1) == full
    assert epoch0 != epoch1

    valid = lm(files_dataset, "eval", batch_size=1, drop_remainder=False)
    assert set(rows(valid)).isdisjoint(full)  # validation files are not in train


def test_iterator_state_resumes_at_the_same_batch(files_dataset: dict) -> None:
    ds = lm(files_dataset, "train", batch_size=3, seed=7, shard_index=1, shard_count=2)
    it = iter(ds.to_iter_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    fresh = iter(ds.to_iter_dataset())
    fresh.set_state(state)
    for want in after:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_stdlib_capped_through_lm_dataset(tmp_path: Path) -> None:
    ds = data.lm_dataset(
        "validation", seq_len=64, batch_size=2, max_documents=20, data_dir=tmp_path
    )
    spec = data.CorpusSpec(seq_len=64, max_documents=20)
    assert spec.config_name() == "stdlib-bytes-64-n20"
    names = spec.split_documents()["validation"]
    corpus = data.StdlibCorpus()
    batch = ds[0]
    first_text = corpus.read(names[0])
    n = min(64, len(first_text.encode()))
    assert data.ByteTokenizer().decode(batch["inputs"][0][:n]) == first_text.encode()[:n].decode(
        "utf-8", errors="replace"
    )


def test_hf_tokenizer_dataset(files_dataset: dict, tmp_path: Path) -> None:
    tokenizer = str(HF_DIR / "tokenizer.json")
    ds = data.lm_dataset(
        "train",
        seq_len=8,
        batch_size=2,
        tokenizer=tokenizer,
        corpus="files",
        paths=files_dataset["options"]["paths"],
        data_dir=tmp_path,
        shuffle=False,
    )
    tok = data.make_tokenizer(tokenizer)
    batch = ds[0]
    assert int(batch["inputs"].max()) < tok.vocab_size
    spec = data.CorpusSpec(corpus="files", paths=files_dataset["options"]["paths"])
    first = spec.split_documents()["train"][0]
    ids = tok.encode(files_dataset["texts"][first])
    assert batch["inputs"][0].tolist() == ids[:8]


def test_clear_errors_for_bad_arguments(files_dataset: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        lm(files_dataset, "train", batch_size=2, seq_len=0)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.lm_dataset("train", seq_len=8, batch_size=2, corpus="wikipedia", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        lm(files_dataset, "train", batch_size=2, tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="unknown split"):
        lm(files_dataset, "dev", batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        lm(files_dataset, "train", batch_size=0)
    with pytest.raises(ValueError, match="shard_index"):
        lm(files_dataset, "train", batch_size=2, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="needs paths"):
        data.lm_dataset("train", seq_len=8, batch_size=2, corpus="files", data_dir=tmp_path)


def test_example_batch_falls_back_to_training_rows(tmp_path: Path) -> None:
    """A global batch larger than the validation split with evaluation off (the big presets'
    AOT compile on a small corpus): the example batch, used only for its shapes, comes from the
    training split instead of failing on an empty dataset."""
    from configs.parscale_lm import get_config
    from train_lib.task import make_task

    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(("lorem ipsum dolor sit amet " * 40) + str(i))
    config = get_config("tiny")
    config.task.update(
        corpus="files", paths=(str(tmp_path / "*.txt"),), data_dir=str(tmp_path / "tfds")
    )
    config.train.eval_every = 0
    task = make_task(config)
    assert len(task.dataset("eval", batch_size=16)) == 0 < len(task.dataset("train", batch_size=16))
    batch = task.example_batch(16)
    assert batch["inputs"].shape == (16, config.task.seq_len)
