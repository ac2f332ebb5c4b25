"""Image classification data: tfds random-access sources + grain, no TensorFlow at train time.

Datasets (`task.dataset`):
  imagenet2012  ILSVRC-2012 (1000 classes) via `tfds.data_source('imagenet2012')`. tfds cannot
                download it: the two archives ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
                go in `<data_dir>/downloads/manual/`, then tfds prepares it (task.download=True,
                once; hours) in the random-access array_record format.
  cifar10, cifar100
                via `tfds.data_source`; task.download=True lets tfds download and prepare them.
  digits        scikit-learn's 8x8 handwritten digits (1,797 greyscale images, shipped with the
                package: no download), for the CPU presets; a fixed split of 1,413 train / 384
                held-out images.

Pipeline (`image_dataset`): the split's records -> (train) shuffled each epoch and repeated ->
per-example transform seeded by (seed, global index) -> this process's shard -> batches of
{'inputs': (B, S, S, C) float32 normalised, 'targets': (B,) int32}. Element i of shard k is the
same whatever the run history, which is what lets a checkpointed grain iterator resume exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from core.errors import ConfigError, DataError
from tasks.ctm_image import augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

# Train augmentations (`task.augment`).
AUGMENTATIONS = (
    "random_resized_crop",  # ImageNet: RandomResizedCrop(image_size) + horizontal flip
    "autoaugment",  # CIFAR: the AutoAugment CIFAR-10 policy
    "shift",  # digits: a random translation of up to one pixel
    "none",
)
# Evaluation transforms (`task.eval_transform`).
EVAL_TRANSFORMS = (
    "center_crop",  # resize the shorter side to eval_resize, centre-crop image_size (reference)
    "resize",  # resize the shorter side to eval_resize only (the paper's uncropped analysis)
    "none",  # the stored image (resized to image_size when that differs)
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the task needs to know about a dataset before reading it."""

    tfds_name: str | None  # None: not a tfds dataset (digits)
    num_classes: int
    channels: int
    native_size: int | None  # stored images' side when all share it; None: variable (ImageNet)
    train_split: str
    eval_split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        "imagenet2012", 1000, 3, None, "train", "validation", IMAGENET_MEAN, IMAGENET_STD
    ),
    # The reference's CIFAR normalisation constants.
    "cifar10": DatasetSpec(
        "cifar10",
        10,
        3,
        32,
        "train",
        "test",
        (0.49139968, 0.48215827, 0.44653124),
        (0.24703233, 0.24348505, 0.26158768),
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        100,
        3,
        32,
        "train",
        "test",
        (0.5070751592371341, 0.48654887331495067, 0.4409178433670344),
        (0.2673342858792403, 0.2564384629170882, 0.27615047132568393),
    ),
    # Mean / std of the 1,413 training digits' pixels (scaled to [0, 1]); `digits_statistics`.
    "digits": DatasetSpec(None, 10, 1, 8, "train", "test", (0.3054,), (0.3758,)),
}

DIGITS_EVAL = 384  # held-out digits (the last of a fixed permutation); 6 batches of 64


def spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"task.dataset={name!r} is invalid: allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


# ------------------------------------------------------------------------------------------------
# Sources


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, 8, 8, 1) in a fixed shuffled order, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], data.target[order].astype(np.int32)


def digits_statistics() -> tuple[float, float]:
    """Pixel mean and std (in [0, 1]) of the digits training split (DATASETS['digits'])."""
    images, _ = _digits()
    x = images[:-DIGITS_EVAL].astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


@dataclasses.dataclass(frozen=True)
class DigitsSource:
    """Random-access digits: {'image': uint8 (8, 8, 1), 'label': int32}."""

    split: str

    def _range(self) -> tuple[int, int]:
        n = len(_digits()[0])
        return (0, n - DIGITS_EVAL) if self.split == "train" else (n - DIGITS_EVAL, n)

    def __len__(self) -> int:
        lo, hi = self._range()
        return hi - lo

    def __getitem__(self, index: int) -> dict[str, Any]:
        lo, hi = self._range()
        if not 0 <= int(index) < hi - lo:
            raise IndexError(index)
        images, labels = _digits()
        return {"image": images[lo + int(index)], "label": labels[lo + int(index)]}


def tfds_prepared(name: str, data_dir: str | None) -> bool:
    """Whether `data_dir` holds a prepared version of tfds dataset `name` (its
    dataset_info.json), looked up on disk without building anything."""
    root = (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )
    return bool(glob.glob(os.path.join(root, name, "*", "dataset_info.json")))


def check_available(name: str, data_dir: str | None, download: bool) -> None:
    """DataError (one line) when dataset `name` cannot be read from `data_dir` as configured:
    not prepared and no download allowed, or ImageNet without its manually downloaded files."""
    ds = spec(name)
    if ds.tfds_name is None or tfds_prepared(ds.tfds_name, data_dir):
        return
    root = (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )
    if name == "imagenet2012":
        manual = os.path.join(root, "downloads", "manual")
        missing = [f for f in IMAGENET_MANUAL_FILES if not os.path.exists(os.path.join(manual, f))]
        if missing:
            raise DataError(
                f"task.data_dir={data_dir!r}: imagenet2012 is not prepared there and tfds cannot "
                f"download it; put {' and '.join(IMAGENET_MANUAL_FILES)} (from image-net.org) in "
                f"{manual}/ (missing: {', '.join(missing)}), then run with task.download=True once"
            )
    if not download:
        raise DataError(
            f"task.data_dir={data_dir!r} holds no prepared {ds.tfds_name} (looked for "
            f"{root}/{ds.tfds_name}/<version>/); set task.download=True to let tfds prepare it"
        )


def tfds_source(name: str, split: str, data_dir: str | None, download: bool) -> Any:
    """`tfds.data_source` of a dataset's split (array_record: random access, no TensorFlow)."""
    import tensorflow_datasets as tfds

    ds = spec(name)
    try:
        return tfds.data_source(
            ds.tfds_name,
            split=split,
            data_dir=data_dir,
            download=download,  # tfds prepares as array_record for data sources
        )
    except NotImplementedError:  # prepared as TFRecord: no random access
        raise DataError(
            f"task.data_dir={data_dir!r}: {ds.tfds_name} is prepared there in a format without "
            "random access; prepare it as array_record (tfds build --file_format=array_record)"
        ) from None


def source(name: str, split: str, data_dir: str | None = None, download: bool = False) -> Any:
    """Random-access records {'image': uint8 (H, W, C), 'label': int} of a dataset split
    ('train' or 'eval')."""
    ds = spec(name)
    stored = ds.train_split if split == "train" else ds.eval_split
    if ds.tfds_name is None:
        return DigitsSource(stored)
    return tfds_source(name, stored, data_dir, download)


# ------------------------------------------------------------------------------------------------
# Transforms


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Record -> {'inputs': float32 (S, S, C), 'targets': int32} for one split.

    `augment` (train) or `eval_transform` (eval) decides the geometry; the result is resized to
    image_size x image_size when it is not already (except eval_transform='resize', which keeps
    the aspect ratio), then normalised."""

    dataset: str
    train: bool
    image_size: int
    augment: str = "none"
    eval_transform: str = "center_crop"
    eval_resize: int = 256

    def geometry(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        s = self.image_size
        if self.train:
            if self.augment == "random_resized_crop":
                image = augment.random_flip(augment.random_resized_crop(image, s, rng), rng)
            elif self.augment == "autoaugment":
                image = augment.autoaugment_cifar10(image, rng)
            elif self.augment == "shift":
                image = augment.random_shift(image, rng)
        elif self.eval_transform == "center_crop":
            image = augment.center_crop(augment.resize_shorter(image, self.eval_resize), s)
        elif self.eval_transform == "resize":
            return augment.resize_shorter(image, self.eval_resize)
        return augment.resize(image, s, s)

    def __call__(self, record: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        ds = spec(self.dataset)
        image = np.asarray(record["image"], np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        image = self.geometry(image, rng)
        return {
            "inputs": augment.normalise(image, ds.mean, ds.std),
            "targets": np.int32(record["label"]),
        }


class _TrainMap(grain.transforms.RandomMap):
    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return self.transform(element, rng)


class _EvalMap(grain.transforms.Map):
    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return self.transform(element, None)


def image_dataset(
    records: Sequence[Any],
    transform: ImageTransform,
    *,
    batch_size: int,
    seed: int = 0,
    num_examples: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Batched grain dataset over `records` (see the module docstring). Training data is shuffled
    with a new permutation every epoch and repeated without end; evaluation data is read once in
    order (a last partial batch is dropped)."""
    ds = grain.MapDataset.source(records)
    if num_examples is not None and len(ds) > num_examples:
        ds = ds[:num_examples]
    if transform.train:
        # Shuffle, repeat, then the seeded random map: example j of the stream is augmented with
        # its own generator (seed, j), before sharding, so it is the same on whichever process.
        ds = ds.shuffle(seed=seed).repeat().random_map(_TrainMap(transform), seed=seed)
    else:
        ds = ds.map(_EvalMap(transform))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=True)
