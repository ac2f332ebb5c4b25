"""CTM image classification (the CTM paper's ImageNet-1K and CIFAR experiments).

The model sees an image and emits class logits at every internal tick. The loss is the
reference's (`ctm_jax.losses.image_classification_loss`): per example, the mean of the
cross-entropies at the min-loss tick and at the most certain tick. Accuracy is reported, as the
reference does, at the most certain tick; evaluation also reports the last tick and the
read-outs of `ctm_jax.readouts` there, and `evaluate_per_tick` gives the full per-tick table
(top-1 / top-5 for every read-out, calibration error, certainty-threshold exits).

BatchNorm: the ResNet backbone's BatchNorms run with batch statistics in training; before every
evaluation the running statistics are reset and re-estimated on `task.bn_reestimate_batches`
training batches (`eval_buffers`), as the reference does, so evaluation never depends on the
running averages the training steps left behind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from core.errors import ConfigError
from ctm_jax import config as ctm_config
from ctm_jax import readouts
from ctm_jax.backbones import BN_MOMENTUM
from ctm_jax.flops import ctm_flops
from ctm_jax.losses import image_classification_loss
from ctm_jax.model import CTM, CTMOutput, project_params
from tasks.ctm_image import data
from train_lib.task import Batch, Metrics, Task

# Certainty thresholds of the early-exit table (the reference's ImageNet analysis).
EXIT_THRESHOLDS = (0.5, 0.8, 0.9)
BN_REESTIMATE_MODES = ("reference", "cumulative")
CALIBRATION_BINS = 10


def min_image_size(cfg: ctm_config.CTMConfig) -> int:
    """Smallest square image side whose backbone feature map is at least 2x2 (attention over a
    single position could not look anywhere)."""
    side = 2
    while min(cfg.feature_map_size(side, side)) < 2:
        side += 1
    return side


def model_config(
    model: Mapping[str, Any], num_classes: int, image_size: int, channels: int
) -> ctm_config.CTMConfig:
    """CTMConfig from the `model` section; out_dims is the dataset's class count."""
    values = dict(model.items())
    for name, derived in (("out_dims", num_classes), ("prediction_reshaper", (-1,))):
        given = values.get(name)
        if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(derived)):
            raise ConfigError(
                f"model.{name}={given!r} is invalid: the dataset needs {derived!r} "
                "(leave it out of the config)"
            )
        values[name] = derived
    cfg = ctm_config.CTMConfig.from_mapping(values)
    if cfg.backbone_type == "parity_backbone" or cfg.variant != "ctm":
        raise ConfigError(
            f"model.backbone_type={cfg.backbone_type!r} is invalid: images need an image "
            "backbone (resnet{18,34,50,101,152}-{1..4}, shallow-wide) or 'none'"
        )
    cfg.validate_input_shape((1, image_size, image_size, channels))
    if cfg.backbone_type != "none" and min(cfg.feature_map_size(image_size, image_size)) < 2:
        h, w = cfg.feature_map_size(image_size, image_size)
        raise ConfigError(
            f"task.image_size={image_size} is invalid: {cfg.backbone_type} reduces it to a {h}x{w} "
            f"feature map; needs >= {min_image_size(cfg)} for at least 2x2 positions to attend"
        )
    return cfg


# ------------------------------------------------------------------------------------------------
# Metrics


def final_probabilities(predictions: jax.Array, certainties: jax.Array) -> dict[str, jax.Array]:
    """The read-outs at the last tick only (`readouts.per_tick_probabilities(...)[:, -1]`
    without the (B, T, C) tensors): {read-out: (B, C)}."""
    logits = jnp.asarray(predictions, jnp.float32)  # (B, C, T)
    certainty = jnp.asarray(certainties, jnp.float32)[:, 1]  # (B, T)
    where = jnp.argmax(certainty, axis=-1)
    chosen = jnp.take_along_axis(logits, where[:, None, None], axis=-1)[..., 0]
    weights = certainty[:, None, :]
    weighted = jnp.sum(weights * logits, -1) / jnp.maximum(jnp.sum(weights, -1), 1e-12)
    return {
        "instant": jax.nn.softmax(logits[..., -1], axis=-1),
        "most_certain": jax.nn.softmax(chosen, axis=-1),
        "mean_prob": jnp.mean(jax.nn.softmax(logits, axis=1), axis=-1),
        "mean_logits": jax.nn.softmax(jnp.mean(logits, axis=-1), axis=-1),
        "certainty_weighted": jax.nn.softmax(weighted, axis=-1),
    }


def _topk(probs: jax.Array, targets: jax.Array, k: int) -> jax.Array:
    """(B, C) probabilities -> mean of 'label among the k most probable' (k capped at C)."""
    k = min(k, probs.shape[-1])
    return readouts.topk_correct(probs[:, None], targets, k)[:, 0].astype(jnp.float32).mean()


def image_metrics(outputs: CTMOutput, targets: jax.Array) -> dict[str, jax.Array]:
    """Eval scalars: top-1/top-5 at the most certain tick (the reference's accuracy) and at the
    last tick, top-1 of the mean-probability and certainty-weighted read-outs after all ticks,
    the chosen tick's certainty and the mean most-certain tick (0-based)."""
    probs = final_probabilities(outputs.predictions, outputs.certainties)
    certain = jnp.argmax(outputs.certainties[:, 1], axis=-1)
    chosen_certainty = jnp.take_along_axis(outputs.certainties[:, 1], certain[:, None], axis=-1)
    return {
        "accuracy": _topk(probs["most_certain"], targets, 1),
        "top5": _topk(probs["most_certain"], targets, 5),
        "accuracy_last_tick": _topk(probs["instant"], targets, 1),
        "top5_last_tick": _topk(probs["instant"], targets, 5),
        "accuracy_mean_prob": _topk(probs["mean_prob"], targets, 1),
        "accuracy_certainty_weighted": _topk(probs["certainty_weighted"], targets, 1),
        "certainty": chosen_certainty.mean(),
        "most_certain_tick": certain.astype(jnp.float32).mean(),
    }


# ------------------------------------------------------------------------------------------------
# BatchNorm re-estimation


class _Featuriser(CTM):
    """The CTM's featuriser alone (same variable names): what BatchNorm re-estimation runs, as
    the ticks never touch the backbone's statistics."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:  # type: ignore[override]
        return self.featurise(x, train)


def reset_batch_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """torch's reset_running_stats on every BatchNorm: mean 0, variance 1, count 0."""
    fresh = {}
    for path, leaf in flatten_dict(dict(stats)).items():
        if path[-1] == "running_var":
            fresh[path] = jnp.ones_like(leaf)
        else:  # running_mean, num_batches_tracked
            fresh[path] = jnp.zeros_like(leaf)
    return unflatten_dict(fresh)


def _combine(
    current: Mapping[str, Any], updated: Mapping[str, Any], reset: Mapping[str, Any], n: int
) -> dict[str, Any]:
    """Cumulative mean after batch n (1-based): one train-mode pass from the reset statistics
    gives (1 - m) reset + m batch statistic, so the batch statistic is recovered exactly and
    averaged in with weight 1/n."""
    out = {}
    cur, upd, base = (flatten_dict(dict(t)) for t in (current, updated, reset))
    for path, value in upd.items():
        if path[-1] == "num_batches_tracked":
            out[path] = jnp.full_like(value, n)
            continue
        batch_stat = (value - (1.0 - BN_MOMENTUM) * base[path]) / BN_MOMENTUM
        out[path] = cur[path] + (batch_stat - cur[path]) / n
    return unflatten_dict(out)


# ------------------------------------------------------------------------------------------------
# Task


class ImageTask(Task):
    """Config: `task.{dataset, data_dir, download, image_size, augment, eval_transform,
    eval_resize, num_train, seed, use_most_certain, bn_reestimate, bn_reestimate_batches}` and the
    CTM fields in `model` (without out_dims / prediction_reshaper, which the dataset fixes)."""

    progress_keys = ("loss", "accuracy")

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__(config)
        task = config.task
        self.spec = data.spec(str(task.dataset))
        self.dataset_name = str(task.dataset)
        self.image_size = self._positive_int("image_size")
        self.eval_resize = self._positive_int("eval_resize")
        for name, allowed in (
            ("augment", data.AUGMENTATIONS),
            ("eval_transform", data.EVAL_TRANSFORMS),
            ("bn_reestimate", BN_REESTIMATE_MODES),
        ):
            if task[name] not in allowed:
                raise ConfigError(
                    f"task.{name}={task[name]!r} is invalid: allowed: {', '.join(allowed)}"
                )
        if task.eval_transform == "center_crop" and self.eval_resize < self.image_size:
            raise ConfigError(
                f"task.eval_resize={self.eval_resize} is invalid: eval_transform='center_crop' "
                f"crops task.image_size={self.image_size} from it, so it must be >= that"
            )
        if int(task.bn_reestimate_batches) < 0:
            raise ConfigError(
                f"task.bn_reestimate_batches={task.bn_reestimate_batches!r} is invalid: must be "
                ">= 0 (0: evaluate with the training steps' running statistics)"
            )
        if task.get("num_train") is not None and int(task.num_train) < 1:
            raise ConfigError(f"task.num_train={task.num_train!r} is invalid: must be >= 1")
        if int(task.seed) < 0:
            raise ConfigError(f"task.seed={task.seed!r} is invalid: must be >= 0")
        self.model_config = model_config(
            config.model, self.spec.num_classes, self.image_size, self.spec.channels
        )
        uses_bn = self.model_config.backbone_type.startswith(("resnet", "shallow"))
        self.mutable_collections = ("batch_stats",) if uses_bn else ()
        data.check_available(self.dataset_name, self._data_dir(), bool(task.download))
        self._check_eval_batches()
        self._bn_fns: dict[int, Callable[..., Any]] = {}

    def _check_eval_batches(self) -> None:
        """ConfigError when train.eval_batches asks for more full batches than the held-out
        split holds (the trainer reads them by index, before compiling its steps)."""
        train = self.config.get("train")
        if train is None or int(train.get("eval_every", 0)) <= 0:
            return
        batch = int(train.batch_size) // jax.process_count()
        if self.config.task.eval_transform == "resize":
            return  # uncropped images: evaluated one at a time outside the trainer
        task = self.config.task
        held_out = len(
            data.source(self.dataset_name, "eval", self._data_dir(), bool(task.download))
        )
        available = held_out // max(batch, 1)
        if int(train.eval_batches) > available:
            raise ConfigError(
                f"train.eval_batches={int(train.eval_batches)} is invalid: the "
                f"{self.dataset_name} {self.spec.eval_split} split ({held_out} images) holds "
                f"{available} batches of {batch}"
            )

    def _positive_int(self, name: str) -> int:
        value = self.config.task[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"task.{name}={value!r} is invalid: must be a positive integer")
        return int(value)

    def _data_dir(self) -> str | None:
        return self.config.task.get("data_dir") or None

    # -- data -----------------------------------------------------------------------------------
    def transform(self, split: str) -> data.ImageTransform:
        task = self.config.task
        return data.ImageTransform(
            self.dataset_name,
            train=split == "train",
            image_size=self.image_size,
            augment=str(task.augment),
            eval_transform=str(task.eval_transform),
            eval_resize=self.eval_resize,
        )

    def dataset(
        self, split: str, *, batch_size: int, shard_index: int = 0, shard_count: int = 1
    ) -> grain.MapDataset:
        if split not in ("train", "eval"):
            raise ConfigError(f"unknown split {split!r}; image classification has train, eval")
        task = self.config.task
        if split == "eval" and task.eval_transform == "resize" and batch_size != 1:
            raise ConfigError(
                "task.eval_transform='resize' is invalid here: uncropped images differ in size, "
                f"so they only batch one at a time (asked for batches of {batch_size})"
            )
        records = data.source(self.dataset_name, split, self._data_dir(), bool(task.download))
        return data.image_dataset(
            records,
            self.transform(split),
            batch_size=batch_size,
            seed=int(task.seed),
            num_examples=task.get("num_train") if split == "train" else None,
            shard_index=shard_index,
            shard_count=shard_count,
        )

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zeros of the training shapes: initialising needs no image decoded, and works whatever
        the eval geometry (uncropped eval images differ in size)."""
        side, channels = self.image_size, self.spec.channels
        return {
            "inputs": np.zeros((batch_size, side, side, channels), np.float32),
            "targets": np.zeros((batch_size,), np.int32),
        }

    # -- model ----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return CTM(self.model_config)

    def project_params(self, params: Any) -> Any:
        return project_params(self.model_config, params)

    def forward_flops_per_example(self) -> float:
        """Analytic forward FLOPs of one image (backbone and K/V once, then the ticks)."""
        cfg = self.model_config
        shape = (self.image_size, self.image_size, self.spec.channels)
        return float(ctm_flops(cfg, shape).total(cfg.iterations))

    def train_flops_per_example(self) -> float:
        return 3.0 * self.forward_flops_per_example()

    # -- BatchNorm ------------------------------------------------------------------------------
    def _bn_fn(self, model: nn.Module) -> Callable[..., Any]:
        """Jitted (params, buffers, inputs) -> the batch_stats after one train-mode featuriser
        pass."""
        key = id(model)
        if key not in self._bn_fns:
            featuriser = _Featuriser(model.config, model.dtype)

            def updated(params: Any, buffers: Any, inputs: jax.Array) -> Any:
                _, new = featuriser.apply(
                    {"params": params, **buffers}, inputs, train=True, mutable=["batch_stats"]
                )
                return new["batch_stats"]

            self._bn_fns[key] = jax.jit(updated)
        return self._bn_fns[key]

    def eval_buffers(
        self,
        model: nn.Module,
        params: Any,
        buffers: Any,
        train_batch: Callable[[int], Batch],
    ) -> Any:
        """BatchNorm statistics reset and re-estimated on `task.bn_reestimate_batches` training
        batches (augmented, as the reference's): 'reference' runs them in train mode from the
        reset statistics with momentum 0.1, as torch's BatchNorm does; 'cumulative' gives each
        batch equal weight (torch's momentum=None). Other collections are passed through."""
        n = int(self.config.task.bn_reestimate_batches)
        if "batch_stats" not in buffers or n == 0:
            return buffers
        if not isinstance(model, CTM):
            raise ConfigError(f"BatchNorm re-estimation needs a CTM, got {type(model).__name__}")
        fn = self._bn_fn(model)
        stats = buffers["batch_stats"]
        reset = reset_batch_stats(stats)
        current = reset
        for i in range(n):
            inputs = train_batch(i)["inputs"]
            if self.config.task.bn_reestimate == "reference":
                current = fn(params, {**buffers, "batch_stats": current}, inputs)
            else:
                updated = fn(params, {**buffers, "batch_stats": reset}, inputs)
                current = _combine(current, updated, reset, i + 1)
        # Back on the devices and layout the compiled eval step expects.
        current = jax.tree.map(
            lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), current, stats
        )
        return {**buffers, "batch_stats": current}

    def eval_variables(
        self, model: nn.Module, variables: Mapping[str, Any], batch_size: int
    ) -> dict[str, Any]:
        """`variables` with BatchNorm statistics re-estimated (`eval_buffers`) on this task's
        first training batches of `batch_size`, for analysis outside the trainer."""
        train = self.dataset("train", batch_size=batch_size)
        buffers = {k: v for k, v in variables.items() if k != "params"}
        params = variables["params"]
        buffers = self.eval_buffers(model, params, buffers, lambda i: dict(train[i]))
        return {"params": params, **buffers}

    # -- objective ------------------------------------------------------------------------------
    def loss_and_metrics(self, outputs: CTMOutput, batch: Batch) -> tuple[jax.Array, Metrics]:
        targets = batch["targets"]
        loss, where = image_classification_loss(
            outputs.predictions,
            outputs.certainties,
            targets,
            bool(self.config.task.use_most_certain),
        )
        chosen = jnp.take_along_axis(outputs.predictions, where[:, None, None], axis=-1)[..., 0]
        accuracy = (jnp.argmax(chosen, axis=-1) == targets).astype(jnp.float32).mean()
        return loss, {"accuracy": accuracy, "most_certain_tick": where.astype(jnp.float32).mean()}

    def eval_metrics(self, outputs: CTMOutput, batch: Batch) -> Metrics:
        loss, _ = image_classification_loss(
            outputs.predictions,
            outputs.certainties,
            batch["targets"],
            bool(self.config.task.use_most_certain),
        )
        return {"loss": loss, **image_metrics(outputs, batch["targets"])}


# ------------------------------------------------------------------------------------------------
# The per-tick table


def _per_batch_tables(
    predictions: jax.Array, certainties: jax.Array, targets: jax.Array
) -> dict[str, Any]:
    """Per-batch sums for `evaluate_per_tick` (jitted): top-1/top-5 counts per read-out and tick,
    per-example calibration inputs per tick, and per-threshold exits."""
    probs = readouts.per_tick_probabilities(predictions, certainties)
    classes = predictions.shape[1]
    out: dict[str, Any] = {
        "top1": {r: readouts.topk_correct(p, targets, 1).sum(0) for r, p in probs.items()},
        "top5": {
            r: readouts.topk_correct(p, targets, min(5, classes)).sum(0) for r, p in probs.items()
        },
    }
    # Calibration of the prediction at tick t (the class with the highest logit there), with two
    # confidences: its probability at t (the usual ECE), and the mean over ticks <= t of that
    # class's probability (what the reference's ImageNet analysis plots).
    instant = probs["instant"]  # (B, T, C)
    predicted = jnp.argmax(instant, axis=-1)  # (B, T)
    ticks = predictions.shape[-1]
    running = jnp.cumsum(instant, axis=1) / jnp.arange(1, ticks + 1)[None, :, None]
    out["confidence"] = jnp.max(instant, axis=-1)
    out["confidence_mean_prob"] = jnp.take_along_axis(running, predicted[..., None], -1)[..., 0]
    out["correct"] = predicted == targets[:, None]
    exits = readouts.certainty_exits(predictions, certainties, EXIT_THRESHOLDS)
    instant5 = readouts.topk_correct(probs["instant"], targets, min(5, classes))  # (B, T)
    out["exits"] = {
        str(thr): {
            "tick": tick,
            "top1": cls == targets,
            "top5": jnp.take_along_axis(instant5, tick[:, None], axis=1)[:, 0],
            "reached": jnp.any(certainties[:, 1] >= thr, axis=-1),
        }
        for thr, (tick, cls) in exits.items()
    }
    return out


_TABLE_FNS: dict[int, tuple[nn.Module, Callable[..., Any]]] = {}


def _tables_fn(model: nn.Module) -> Callable[..., Any]:
    """The jitted forward + `_per_batch_tables` of `model` (one per model, so repeated calls
    compile once per batch shape)."""
    key = id(model)
    if key not in _TABLE_FNS or _TABLE_FNS[key][0] is not model:

        def tables(variables: Any, inputs: jax.Array, targets: jax.Array) -> dict[str, Any]:
            out = model.apply(variables, inputs, train=False)
            return _per_batch_tables(out.predictions, out.certainties, targets)

        _TABLE_FNS[key] = (model, jax.jit(tables))
    return _TABLE_FNS[key][1]


def evaluate_per_tick(
    task: ImageTask,
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Batch],
) -> dict[str, Any]:
    """Per-tick evaluation over `batches` ({'inputs', 'targets'}) with `variables` as given (call
    `task.eval_variables` first to re-estimate BatchNorm statistics, as training evaluations do).

    Returns {"top1": {read-out: [T]}, "top5": {...} (fractions of examples, read-outs of
    `ctm_jax.readouts.READOUTS`), "ece": [T] (expected calibration error of the prediction at
    each tick with its own probability, 10 equal-width bins), "reliability": {"confidence",
    "accuracy", "count"}: [T][bins] (those bins), "ece_mean_prob" / "reliability_mean_prob" (the
    same with the reference analysis' confidence: the predicted class's probability averaged
    over ticks <= t), "exits": {threshold: {"tick_mean" (mean ticks used, 1-based), "top1",
    "top5", "reached" (fraction whose certainty reached the threshold)}}, "n": examples}."""
    del task  # the model and variables carry everything; kept for a uniform signature
    tables = _tables_fn(model)
    sums: dict[str, Any] | None = None
    per_example: dict[str, list[np.ndarray]] = {}
    exits: dict[str, dict[str, list[np.ndarray]]] = {}
    n = 0
    for batch in batches:
        result = jax.device_get(tables(variables, batch["inputs"], batch["targets"]))
        n += len(np.asarray(batch["targets"]))
        counts = {k: result[k] for k in ("top1", "top5")}
        sums = counts if sums is None else jax.tree.map(np.add, sums, counts)
        for key in ("confidence", "confidence_mean_prob", "correct"):
            per_example.setdefault(key, []).append(np.asarray(result[key]))
        for thr, values in result["exits"].items():
            for key, value in values.items():
                exits.setdefault(thr, {}).setdefault(key, []).append(np.asarray(value))
    if sums is None:
        raise ConfigError("evaluate_per_tick got no batches")
    correct = np.concatenate(per_example["correct"])
    per_tick_calibration = jax.jit(
        jax.vmap(functools.partial(readouts.calibration, bins=CALIBRATION_BINS), in_axes=1)
    )
    table: dict[str, Any] = {
        k: {r: (np.asarray(sums[k][r]) / n).tolist() for r in readouts.READOUTS}
        for k in ("top1", "top5")
    }
    for suffix, key in (("", "confidence"), ("_mean_prob", "confidence_mean_prob")):
        # leaves with a leading tick axis
        calib = jax.device_get(per_tick_calibration(np.concatenate(per_example[key]), correct))
        table[f"ece{suffix}"] = np.asarray(calib["ece"]).tolist()
        table[f"reliability{suffix}"] = {
            "confidence": np.asarray(calib["bin_confidence"]).tolist(),
            "accuracy": np.asarray(calib["bin_accuracy"]).tolist(),
            "count": np.asarray(calib["bin_count"]).tolist(),
        }
    table["exits"] = {
        float(thr): {
            "tick_mean": float(np.mean(np.concatenate(v["tick"]) + 1)),
            "top1": float(np.mean(np.concatenate(v["top1"]))),
            "top5": float(np.mean(np.concatenate(v["top5"]))),
            "reached": float(np.mean(np.concatenate(v["reached"]))),
        }
        for thr, v in exits.items()
    }
    table["n"] = n
    return table
