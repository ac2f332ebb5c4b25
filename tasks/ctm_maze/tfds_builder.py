"""tfds builder `generated_mazes`: the generated mazes of `maze_data`, prepared offline.

Nothing is downloaded: `_split_generators` never touches the download manager, and the data is
written as array_record, so preparing and reading need no TensorFlow:

    builder = prepare("small", data_dir)          # download_and_prepare(file_format=array_record)
    source = tfds.data_source("generated_mazes/small", split="train", data_dir=data_dir)
    ds = grain.MapDataset.source(source)

Configs: one per preset size (`small`, `medium`, `large`, `extralarge`) with
`DEFAULT_NUM_TRAIN` / `DEFAULT_NUM_TEST` examples; pass a custom `MazeConfig` (with its own
name) for other counts or seeds. Example i of split s is
`maze_example(side, split_seed(seed, s), i, route_length)`, so a prepared dataset equals the
on-the-fly stream of `maze_data` (shuffling is disabled: the stored order is the index order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks.ctm_maze import data as maze_data

DEFAULT_NUM_TRAIN = 50_000
DEFAULT_NUM_TEST = 10_000


@dataclasses.dataclass
class MazeConfig(tfds.core.BuilderConfig):
    """A size preset with example counts and the base seed of the split streams."""

    size: str = "small"
    num_train: int = DEFAULT_NUM_TRAIN
    num_test: int = DEFAULT_NUM_TEST
    seed: int = 0


class GeneratedMazes(tfds.core.GeneratorBasedBuilder):
    """Perfect mazes in the CTM reference's image format with action-sequence targets."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Randomized-DFS perfect mazes, random distinct start and goal."}
    BUILDER_CONFIGS = [
        MazeConfig(name=size, size=size, description=f"{side}x{side} px, route {length}")
        for size, (side, length) in maze_data.PRESETS.items()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        side, route_length = maze_data.preset(self.builder_config.size)
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(side, side, 3), dtype=np.uint8),
                    "actions": tfds.features.Tensor(shape=(route_length,), dtype=np.int32),
                    "route_length": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=("image", "actions"),
            disable_shuffling=True,  # stored example i is stream example i
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, Any]]]:
        del dl_manager  # generated, nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(
        self, split: str, num_examples: int
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        cfg = self.builder_config
        side, route_length = maze_data.preset(cfg.size)
        stream = maze_data.split_seed(cfg.seed, split)
        for index in range(num_examples):
            yield index, maze_data.maze_example(side, stream, index, route_length)


def prepare(config: str | MazeConfig, data_dir: str | os.PathLike) -> GeneratedMazes:
    """The builder for `config`, prepared as array_record under `data_dir` if not yet there."""
    builder = GeneratedMazes(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return builder
