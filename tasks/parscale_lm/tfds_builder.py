"""tfds builder `lm_corpus`: packed LM sequences of `tasks.parscale_lm.data`, prepared offline.

Nothing is downloaded: documents come from the running Python's standard library, local files,
or an already prepared tfds text dataset, and the output is array_record, so preparing and
reading need no TensorFlow:

    spec = data.CorpusSpec(corpus="stdlib", tokenizer="bytes", seq_len=256)
    builder = prepare(spec, data_dir)       # no-op when already prepared
    source = builder.as_data_source(split="train")
    # or: tfds.data_source("lm_corpus/stdlib-bytes-256", split="train", data_dir=data_dir)

One config per `CorpusSpec` (`spec.config_name()`, e.g. 'stdlib-bytes-256',
'files<hash>-hf<hash>-1024'); splits 'train' and 'validation'; stored example i of a split is
sequence i of `data.pack_documents` over that split's documents in name order
(`disable_shuffling`), features `tokens` and `segment_ids`, int32 (seq_len + 1,).
`data.model_example` derives inputs / targets / loss_mask / segment_ids / positions when
reading: storing only the two packed arrays keeps the files 2.5x smaller than storing all five.

Note: the stdlib corpus is that of the Python that prepared it (recorded in the description);
a prepared config is reused as is, so prepare once per data_dir (before starting many hosts on
a shared one).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks.parscale_lm import data


@dataclasses.dataclass(eq=False)
class LMConfig(tfds.core.BuilderConfig):
    """A tfds config wrapping the `CorpusSpec` that defines its content."""

    spec: data.CorpusSpec = dataclasses.field(default_factory=data.CorpusSpec)


def lm_config(spec: data.CorpusSpec) -> LMConfig:
    """The config of `spec`, named `spec.config_name()`."""
    detail = f"{spec}"
    if spec.corpus == "stdlib":
        detail += f"; Python {platform.python_version()} standard library"
    return LMConfig(name=spec.config_name(), spec=spec, description=detail)


class LmCorpus(tfds.core.GeneratorBasedBuilder):
    """Tokenised documents packed into fixed-length sequences with per-token segment ids."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stream packing with one-token overlap, segment ids per token."}
    BUILDER_CONFIGS = [lm_config(data.CorpusSpec(seq_len=seq_len)) for seq_len in (256, 1024, 2048)]

    def _info(self) -> tfds.core.DatasetInfo:
        width = self.builder_config.spec.seq_len + 1
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(width,), dtype=np.int32),
                    "segment_ids": tfds.features.Tensor(shape=(width,), dtype=np.int32),
                }
            ),
            disable_shuffling=True,  # stored sequence i is packed sequence i
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, Any]]]:
        del dl_manager  # local documents, nothing to download
        spec = self.builder_config.spec
        corpus = spec.make_corpus()
        splits = spec.split_documents(corpus)
        return {split: self._generate_examples(corpus, names) for split, names in splits.items()}

    def _generate_examples(
        self, corpus: data.Corpus, names: list[str]
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        spec = self.builder_config.spec
        tokenizer = spec.make_tokenizer()
        documents = (data.encode_array(tokenizer, corpus.read(name)) for name in names)
        packed = data.pack_documents(documents, spec.seq_len, tokenizer.eos_id, tokenizer.pad_id)
        yield from enumerate(packed)


def prepare(spec: data.CorpusSpec, data_dir: str | os.PathLike | None = None) -> LmCorpus:
    """The builder for `spec`, prepared as array_record under `data_dir` (tfds' default when
    None) if not yet there."""
    config: str | LMConfig = lm_config(spec)
    registered = {c.name: c for c in LmCorpus.BUILDER_CONFIGS}
    if config.name in registered and registered[config.name].spec == spec:
        config = config.name  # tfds refuses a custom config named like a registered one
    builder = LmCorpus(config=config, data_dir=None if data_dir is None else os.fspath(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return builder
