"""LM data for ParScale training: text -> tokens -> packed fixed-length sequences -> grain.

Pipeline (one way, offline preparation then TF-free reading):

    corpus (documents: name, text) --split by file--> train / validation documents
      --tokenizer--> token ids, each document followed by EOS --pack--> sequences of seq_len + 1
      --tfds builder `lm_corpus` (tasks/parscale_lm/tfds_builder.py)--> array_record under data_dir
      --tfds data source + grain--> `lm_dataset(...)`: shuffled, repeated, host-sharded batches.

Tokenizers (`make_tokenizer(spec)`): 'bytes' is `ByteTokenizer` (ids 0..255 are the UTF-8 bytes,
256 = EOS, the document separator, 257 = PAD; `vocab_size` 258, which `round_vocab` pads to 320
for a TPU-friendly embedding table: 64-aligned); any other spec is the path of a Hugging Face
`tokenizer.json` (e.g. Qwen2.5's) read with the `tokenizers` library (`HFTokenizer`). Its EOS is
the token string given, else `eos_token` from the `tokenizer_config.json` next to it; without
either it fails, naming both.

Corpora (`Corpus`: sorted document names, `read(name)` -> text):
* `StdlibCorpus`, the default: the *.py files of the running Python's standard library
  (`sysconfig.get_paths()['stdlib']`; always present offline, and Python code like the paper's
  Stack-V2-Python). Excluded: site-packages / dist-packages, `__pycache__`, and by default the
  test suites (directories named test, tests, idle_test: 60% of the bytes, much of it generated
  or deliberately odd data); `include_tests=True` keeps them. Names are POSIX paths relative to
  the stdlib root; files are decoded by their PEP 263 encoding declaration.
* `FileCorpus`: local text files from paths or globs (recursive `**` allowed), one file one
  document, UTF-8 (undecodable bytes replaced). A name is the path relative to the glob's
  non-wildcard base directory (a plain file path: its basename), so the split does not depend on
  where the tree is mounted.
* `TfdsTextCorpus`: the `text` feature (configurable) of a tfds dataset already prepared as
  array_record, read through `tfds.data_source` (no TensorFlow); names are `<split>/<index>`.

Train / validation split (`split_names`): by document, never inside one. A document goes to
validation when the first 8 bytes of sha256(name), as a fraction of 2**64, are below
`validation_fraction` (default 0.02); stable under adding or removing other files. If that
leaves validation empty while there are >= 2 documents, the one document with the smallest hash
moves there, so small corpora still validate. `max_documents` (for tiny presets) first keeps the
documents with the smallest sha256("select:" + name), a deterministic spread over the corpus.

Packing (`pack_documents`), exact rule: documents (empty ones skipped), each followed by EOS, are
concatenated in order into one stream with a document index per token (a document's EOS belongs
to it). Sequence i holds stream tokens [i * seq_len, i * seq_len + seq_len + 1): consecutive
sequences overlap by one token, so every next-token transition of the stream is in exactly one
sequence. The last sequence is padded with PAD (segment 0) to seq_len + 1; a final lone token
(no target left) is dropped. Stored per sequence: `tokens` (seq_len + 1,) and `segment_ids`
(seq_len + 1,): 1 + (document index - index of the sequence's first document), 0 on padding.

Model example (`model_example`, computed when reading; t = 0..seq_len-1):
  inputs[t] = tokens[t]; targets[t] = tokens[t + 1]
  segment_ids[t] = segment of input t (0 = padding)
  loss_mask[t] = 1 iff segment_ids[t] > 0 and the segment of token t + 1 equals it; i.e. the
    target is the next token of the same document or the EOS that ends it. It is 0 from a
    document's EOS to the next document's first token, and on padding.
  positions[t] = t - (first index of input t's segment in this sequence); 0 on padding. A
    document continued from the previous sequence restarts at 0: with rotary embeddings only
    relative positions matter, and attention must anyway stay inside a segment of the sequence
    (causal & equal nonzero segment_ids), exactly what the loss mask assumes.
So the number of loss tokens of a split is the sum of its documents' token counts (each document
contributes len(doc) transitions: n - 1 inside it plus its last token -> EOS).

Reading (`lm_dataset`): the prepared split (prepared on first use), then shuffle (a new
permutation each epoch, seeded), repeat, shard by index (host k takes global elements k, k + n,
...; disjoint, and together the whole stream), map to model examples, batch. Everything is a
`grain.MapDataset` of random-access elements, so element j is the same whatever the run history
and the trainer checkpoints the iterator state with the model.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import os
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import grain
import numpy as np

from core.errors import ConfigError, DataError

DEFAULT_VALIDATION_FRACTION = 0.02
SPLITS = {"train": "train", "validation": "validation", "eval": "validation", "test": "validation"}
CORPORA = ("stdlib", "files", "tfds")
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


# ------------------------------------------------------------------------------------------------
# Tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def round_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Embedding-table size: `vocab_size` rounded up to a multiple (258 -> 320 for bytes)."""
    if vocab_size <= 0 or multiple <= 0:
        raise ConfigError(f"vocab_size={vocab_size} and multiple={multiple} must be positive")
    return -(-vocab_size // multiple) * multiple


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256 (document separator), PAD = 257; vocab 258."""

    spec = "bytes"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array, without the Python list."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text (special ids dropped, invalid UTF-8 replaced by U+FFFD)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def read_tokenizer_json(path: str | os.PathLike) -> Any:
    """A `tokenizers.Tokenizer` from an existing tokenizer.json; DataError naming the file when
    the library cannot read it (it raises plain Exception)."""
    from tokenizers import Tokenizer as _Tokenizer

    try:
        return _Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path} is not a readable tokenizer.json: {detail}") from None


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (no special tokens are
    added when encoding)."""

    def __init__(self, tokenizer: Any, eos_id: int, pad_id: int, spec: str = "") -> None:
        self._tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.spec = spec
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, eos_token: str | None = None, pad_token: str | None = None
    ) -> HFTokenizer:
        """Reads `path`; EOS is `eos_token`, else `eos_token` of `tokenizer_config.json` in the
        same folder. PAD likewise (`pad_token`), defaulting to EOS (it only fills the padding,
        which the loss mask excludes)."""

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        tok = read_tokenizer_json(path)
        config_path = path.parent / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{config_path} is not valid JSON: {e}") from None
            if not isinstance(config, dict):
                raise DataError(
                    f"{config_path} is invalid: expected a JSON object, got {type(config).__name__}"
                )

        def token_string(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        eos = eos_token or token_string(config.get("eos_token"))
        if not eos:
            raise DataError(
                f"no EOS token for {path}: pass eos_token=... or put 'eos_token' in {config_path}"
            )
        pad = pad_token or token_string(config.get("pad_token")) or eos
        ids = {}
        for what, token in (("EOS", eos), ("PAD", pad)):
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise DataError(f"{what} token {token!r} is not in the vocabulary of {path}")
            ids[what] = token_id
        return cls(tok, ids["EOS"], ids["PAD"], spec=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def make_tokenizer(spec: str | os.PathLike = "bytes", eos_token: str | None = None) -> Tokenizer:
    """'bytes' -> `ByteTokenizer`; a path to a tokenizer.json -> `HFTokenizer.from_file`."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec, eos_token=eos_token)


def tokenizer_tag(spec: str | os.PathLike) -> str:
    """Short name of a tokenizer for config names: 'bytes', or 'hf' + 10 hex of the file's
    sha256 (so a changed tokenizer.json is a different dataset)."""
    if str(spec) == "bytes":
        return "bytes"
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    return "hf" + hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as int32 (a fast path when the tokenizer offers `encode_array`)."""
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:
        return fast(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# Corpora


class Corpus(Protocol):
    """Documents by name: `names()` sorted and unique, `read(name)` the text."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> str: ...


def read_python_source(path: str | os.PathLike) -> str:
    """Text of a Python file by its PEP 263 declaration (UTF-8 by default; errors replaced)."""
    data = Path(path).read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:
        encoding = "utf-8"
    return data.decode(encoding, errors="replace")


class StdlibCorpus:
    """The running Python's standard-library *.py files (see the module docstring)."""

    def __init__(self, include_tests: bool = False, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        self.include_tests = include_tests
        if not self.root.is_dir():
            raise FileNotFoundError(f"standard library folder {self.root} does not exist")

    @functools.cache  # noqa: B019 (one small list per corpus object)
    def names(self) -> list[str]:
        skip = SKIP_DIRS if self.include_tests else SKIP_DIRS | TEST_DIRS
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            rel = Path(dirpath).relative_to(self.root)
            found.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
        return sorted(found)

    def read(self, name: str) -> str:
        return read_python_source(self.root / name)


def _glob_base(pattern: str) -> str:
    """The leading directory of `pattern` before any wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    if len(fixed) == len(parts):  # a plain path: its folder
        return str(Path(pattern).parent)
    return str(Path(*fixed)) if fixed else "."


class FileCorpus:
    """Local text files from paths or globs; one file one document (see the module docstring)."""

    def __init__(self, patterns: Sequence[str | os.PathLike]) -> None:
        if isinstance(patterns, str | os.PathLike):
            patterns = [patterns]
        self._paths: dict[str, Path] = {}
        seen: set[Path] = set()
        for pattern in map(str, patterns):
            base = _glob_base(pattern)
            for match in sorted(glob.glob(pattern, recursive=True)):
                path = Path(match)
                if not path.is_file() or path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                name = Path(os.path.relpath(path, base)).as_posix()
                if name in self._paths:
                    raise DataError(f"two files share the document name {name!r}")
                self._paths[name] = path
        if not self._paths:
            raise FileNotFoundError(f"no files match {list(map(str, patterns))}")

    def names(self) -> list[str]:
        return sorted(self._paths)

    def path(self, name: str) -> Path:
        """The file of document `name`."""
        return self._paths[name]

    def read(self, name: str) -> str:
        return self._paths[name].read_bytes().decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """sha256 over names, sizes and modification times (10 hex)."""
        h = hashlib.sha256()
        for name in self.names():
            st = self._paths[name].stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:10]


class TfdsTextCorpus:
    """Documents from a string feature of a tfds dataset prepared as array_record."""

    def __init__(
        self,
        name: str,
        splits: Sequence[str] = ("train",),
        feature: str = "text",
        data_dir: str | os.PathLike | None = None,
    ) -> None:
        import tensorflow_datasets as tfds

        self.feature = feature
        self._sources = {
            split: tfds.data_source(
                name,
                split=split,
                data_dir=None if data_dir is None else os.fspath(data_dir),
                download=False,
            )
            for split in splits
        }

    def names(self) -> list[str]:
        return sorted(f"{s}/{i}" for s, src in self._sources.items() for i in range(len(src)))

    def read(self, name: str) -> str:
        split, _, index = name.rpartition("/")
        value = self._sources[split][int(index)][self.feature]
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_names(
    names: Sequence[str],
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    max_documents: int | None = None,
) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]}, each sorted (rule in the module docstring)."""
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"validation_fraction={validation_fraction} must be in [0, 1)")
    names = sorted(set(names))
    if max_documents is not None:
        if max_documents <= 0:
            raise ConfigError(f"max_documents={max_documents} must be positive")
        names = sorted(sorted(names, key=lambda n: _hash_fraction("select:" + n))[:max_documents])
    fractions = {n: _hash_fraction(n) for n in names}
    validation = [n for n in names if fractions[n] < validation_fraction]
    if not validation and validation_fraction > 0 and len(names) >= 2:
        validation = [min(names, key=fractions.__getitem__)]
    held_out = set(validation)
    return {"train": [n for n in names if n not in held_out], "validation": validation}


# ------------------------------------------------------------------------------------------------
# Packing


def pack_documents(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, eos_id: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """Packed sequences {'tokens', 'segment_ids'} (int32, seq_len + 1 each) of token documents,
    streaming (rule in the module docstring)."""
    if seq_len <= 0:
        raise ConfigError(f"seq_len={seq_len} must be positive")
    width = seq_len + 1
    tokens = np.zeros(0, np.int32)
    docs = np.zeros(0, np.int64)
    doc_index = 0

    def emit(chunk: np.ndarray, chunk_docs: np.ndarray) -> dict[str, np.ndarray]:
        out_tokens = np.full(width, pad_id, np.int32)
        out_segments = np.zeros(width, np.int32)
        out_tokens[: len(chunk)] = chunk
        out_segments[: len(chunk)] = chunk_docs - chunk_docs[0] + 1
        return {"tokens": out_tokens, "segment_ids": out_segments}

    for document in documents:
        ids = np.asarray(document, dtype=np.int32)
        if ids.size == 0:
            continue
        tokens = np.concatenate([tokens, ids, np.asarray([eos_id], np.int32)])
        docs = np.concatenate([docs, np.full(ids.size + 1, doc_index, np.int64)])
        doc_index += 1
        start = 0
        while len(tokens) - start >= width:
            yield emit(tokens[start : start + width], docs[start : start + width])
            start += seq_len
        tokens, docs = tokens[start:], docs[start:]
    if len(tokens) > 1:
        yield emit(tokens, docs)


def model_example(tokens: np.ndarray, segment_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Stored sequence (seq_len + 1,) -> inputs, targets, loss_mask, segment_ids, positions,
    each (seq_len,) int32 (rule in the module docstring)."""
    tokens = np.asarray(tokens, np.int32)
    segments = np.asarray(segment_ids, np.int32)
    inputs_seg, target_seg = segments[:-1], segments[1:]
    n = len(inputs_seg)
    index = np.arange(n, dtype=np.int32)
    starts = np.ones(n, bool)
    starts[1:] = inputs_seg[1:] != inputs_seg[:-1]
    first = np.maximum.accumulate(np.where(starts, index, 0))
    real = inputs_seg > 0
    return {
        "inputs": tokens[:-1].copy(),
        "targets": tokens[1:].copy(),
        "loss_mask": (real & (target_seg == inputs_seg)).astype(np.int32),
        "segment_ids": inputs_seg.copy(),
        "positions": np.where(real, index - first, 0).astype(np.int32),
    }


def _model_element(element: dict[str, Any]) -> dict[str, np.ndarray]:
    return model_example(element["tokens"], element["segment_ids"])


# ------------------------------------------------------------------------------------------------
# Dataset specification and reading


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """What goes into one prepared dataset (everything that changes its content)."""

    corpus: str = "stdlib"  # 'stdlib' | 'files' | 'tfds'
    tokenizer: str = "bytes"  # 'bytes' | path to tokenizer.json
    seq_len: int = 256
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    max_documents: int | None = None
    include_tests: bool = False  # stdlib only
    paths: tuple[str, ...] = ()  # files only: paths or globs
    tfds_name: str = ""  # tfds only: 'name' or 'name/config'
    tfds_splits: tuple[str, ...] = ("train",)
    text_feature: str = "text"
    tfds_data_dir: str | None = None
    eos_token: str | None = None  # HF tokenizers: overrides tokenizer_config.json

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ConfigError(f"unknown corpus {self.corpus!r}; expected one of {list(CORPORA)}")
        if isinstance(self.seq_len, bool) or int(self.seq_len) != self.seq_len or self.seq_len <= 0:
            raise ConfigError(f"seq_len={self.seq_len} must be a positive integer")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction={self.validation_fraction} must be in [0, 1)")
        if self.max_documents is not None and self.max_documents <= 0:
            raise ConfigError(f"max_documents={self.max_documents} must be positive")
        if self.corpus == "files" and not self.paths:
            raise ConfigError("corpus='files' needs paths=(file paths or globs, ...)")
        if self.corpus == "tfds" and not self.tfds_name:
            raise ConfigError("corpus='tfds' needs tfds_name='dataset[/config]'")
        if self.tokenizer != "bytes" and not Path(self.tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer file {self.tokenizer!r} does not exist")

    def make_corpus(self) -> Corpus:
        if self.corpus == "stdlib":
            return StdlibCorpus(include_tests=self.include_tests)
        if self.corpus == "files":
            return FileCorpus(self.paths)
        return TfdsTextCorpus(
            self.tfds_name, self.tfds_splits, self.text_feature, self.tfds_data_dir
        )

    def make_tokenizer(self) -> Tokenizer:
        return make_tokenizer(self.tokenizer, eos_token=self.eos_token)

    def config_name(self) -> str:
        """tfds config name, e.g. 'stdlib-bytes-256'; options that change the content add
        suffixes, local files and tfds sources a content/name hash."""
        if self.corpus == "stdlib":
            corpus = "stdlib"
        elif self.corpus == "files":
            corpus = "files" + FileCorpus(self.paths).fingerprint()
        else:
            key = f"{self.tfds_name}|{','.join(self.tfds_splits)}|{self.text_feature}"
            corpus = "tfds" + hashlib.sha256(key.encode()).hexdigest()[:10]
        tok = tokenizer_tag(self.tokenizer)
        if self.eos_token:
            tok += "e" + hashlib.sha256(self.eos_token.encode()).hexdigest()[:6]
        name = f"{corpus}-{tok}-{self.seq_len}"
        if self.include_tests and self.corpus == "stdlib":
            name += "-tests"
        if self.max_documents is not None:
            name += f"-n{self.max_documents}"
        if self.validation_fraction != DEFAULT_VALIDATION_FRACTION:
            name += f"-v{self.validation_fraction:g}"
        return name

    def split_documents(self, corpus: Corpus | None = None) -> dict[str, list[str]]:
        corpus = corpus or self.make_corpus()
        return split_names(corpus.names(), self.validation_fraction, self.max_documents)


def stored_split(split: str) -> str:
    """'train' -> 'train'; 'validation' / 'eval' / 'test' -> 'validation'."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def lm_source(spec: CorpusSpec, split: str, data_dir: str | os.PathLike | None = None) -> Any:
    """Random-access source of stored sequences {'tokens', 'segment_ids'} of a split, preparing
    the tfds dataset under `data_dir` (tfds' default, ~/tensorflow_datasets, when None) first if
    it is not there."""
    from tasks.parscale_lm import tfds_builder as lm_tfds

    check_documents(spec)
    try:
        builder = lm_tfds.prepare(spec, data_dir)
    except AssertionError as e:  # tfds cannot store a split without examples
        if "No examples were yielded" not in str(e):
            raise
        raise DataError(
            f"{spec.config_name()}: {e} (every split needs a document with at least one token)"
        ) from None
    return builder.as_data_source(split=stored_split(split))


def check_documents(spec: CorpusSpec) -> None:
    """Local files (corpus 'files'): DataError naming the files when a split would hold no text
    (tfds cannot store an empty split): one file only (validation takes a whole file, so train
    or validation gets none), or a split whose every file is empty."""
    if spec.corpus != "files":
        return
    corpus = FileCorpus(spec.paths)
    for split, names in spec.split_documents(corpus).items():
        if not names:
            found = ", ".join(str(corpus.path(n)) for n in corpus.names()[:3])
            raise DataError(
                f"paths={list(spec.paths)} give {len(corpus.names())} file(s) ({found}): the "
                f"{split} split gets none; give at least 2 files (validation takes whole files; "
                f"validation_fraction={spec.validation_fraction})"
            )
        paths = [corpus.path(n) for n in names]
        if all(path.stat().st_size == 0 for path in paths):
            listed = ", ".join(map(str, paths[:3])) + (", ..." if len(paths) > 3 else "")
            raise DataError(
                f"{listed}: empty file{'s' if len(paths) > 1 else ''}, the only "
                f"document{'s' if len(paths) > 1 else ''} of the {split} split"
            )


def lm_dataset(
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    tokenizer: str = "bytes",
    corpus: str = "stdlib",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    **spec_options: Any,
) -> grain.MapDataset:
    """Batches {'inputs', 'targets', 'loss_mask', 'segment_ids', 'positions'}, each
    (batch_size, seq_len) int32, of the packed `corpus` tokenised by `tokenizer`.

    `spec_options` are the other `CorpusSpec` fields (paths, max_documents, tfds_name, ...).
    shuffle / repeat default to True for 'train' and False otherwise. `batch_size` is per
    process; host `shard_index` of `shard_count` gets global elements shard_index,
    shard_index + shard_count, ... of the (shuffled, repeated) stream.
    """
    name = stored_split(split)
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be positive")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    spec = CorpusSpec(corpus=corpus, tokenizer=str(tokenizer), seq_len=seq_len, **spec_options)
    ds = grain.MapDataset.source(lm_source(spec, name, data_dir))
    if len(ds) == 0:
        raise DataError(f"split {name!r} of {spec.config_name()} is empty")
    if shuffle if shuffle is not None else name == "train":
        ds = ds.shuffle(seed=seed)
    if repeat if repeat is not None else name == "train":
        ds = ds.repeat()
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.map(_model_element)
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def split_token_counts(source: Sequence[dict[str, np.ndarray]]) -> dict[str, int]:
    """{'sequences', 'loss_tokens' (targets with loss_mask 1), 'tokens' (non-padding inputs)}
    of a stored split."""
    loss = tokens = 0
    for i in range(len(source)):
        example = source[i]
        segments = np.asarray(example["segment_ids"])
        inputs_seg, target_seg = segments[:-1], segments[1:]
        loss += int(np.sum((inputs_seg > 0) & (inputs_seg == target_seg)))
        tokens += int(np.sum(inputs_seg > 0))
    return {"sequences": len(source), "loss_tokens": loss, "tokens": tokens}
